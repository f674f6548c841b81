"""Data-parallel density estimation with torch.distributed: the same fit on one process or on several.

    torchrun --nproc_per_node=2 examples/distributed_density.py --quick
    torchrun --nproc_per_node=1 examples/distributed_density.py --quick   # same global batch: the same test NLL
    python examples/distributed_density.py --quick                        # one process, without torchrun

The data are the checkerboard toy (``pyro_flows.density.checkerboard``, differential entropy log 32 = 3.466 nats:
no model's expected NLL can be lower), generated from the same seed on every rank. By default every rank holds the
whole array and `fit_density` splits each global batch of ``--batch-size`` rows across the ranks; ``--loader``
streams the training and validation rows from DataLoaders with a ``DistributedSampler`` instead, each rank reading
only its own shard (the way to train on data that do not fit in one process's memory). ``--checkpoint PATH`` saves
the fit after every epoch: kill the run and start the same command again, and it resumes where it stopped.

Rank 0 prints the settings, the training throughput, and last a line ``test NLL <nats> ...``.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyro_flows.density import CHECKERBOARD_ENTROPY, FlowDensity, checkerboard
from pyro_flows.training import World


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (about a minute on 2 CPU cores)")
    parser.add_argument("--n-train", type=int, default=None, help="training rows (default 50,000; 10,000 quick)")
    parser.add_argument("--n-test", type=int, default=10_000, help="test rows")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 20; 12 quick)")
    parser.add_argument("--batch-size", type=int, default=512, help="global batch (all ranks together)")
    parser.add_argument("--num-flows", type=int, default=None, help="MAF layers (default 5; 3 quick)")
    parser.add_argument("--hidden", type=int, default=None, help="width of the two hidden layers (128; 64 quick)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loader", action="store_true", help="stream each rank's shard from a DataLoader")
    parser.add_argument("--checkpoint", default=None, help="save every epoch there; resume when it exists")
    parser.add_argument("--device", default=None, help="e.g. cuda (each rank then uses cuda:LOCAL_RANK)")
    parser.add_argument("--progress", action="store_true", help="show the progress bar (rank 0)")
    args = parser.parse_args()
    quick = args.quick
    args.n_train = args.n_train or (10_000 if quick else 50_000)
    args.epochs = args.epochs or (12 if quick else 20)
    args.num_flows = args.num_flows or (3 if quick else 5)
    args.hidden = args.hidden or (64 if quick else 128)
    return args


def main() -> None:
    args = parse_args()
    world = World.current()  # joins the process group torchrun describes (gloo on CPU, NCCL on CUDA)
    # every rank draws the same rows: training, validation (10 %) and test
    rows = checkerboard(args.n_train + args.n_test, generator=torch.Generator().manual_seed(args.seed))
    x, test = rows[: args.n_train], rows[args.n_train :]
    torch.manual_seed(args.seed)
    density = FlowDensity(2, flow="maf", num_flows=args.num_flows, hidden_dims=(args.hidden, args.hidden))
    options = {"epochs": args.epochs, "lr": args.lr, "lr_schedule": "cosine", "patience": None}
    options |= {"seed": args.seed, "progress": args.progress, "device": args.device, "checkpoint": args.checkpoint}
    n_val = round(0.1 * args.n_train)  # fit_density's default validation_fraction, held out by the loader mode too
    if args.loader:
        train_set, val_set = TensorDataset(x[n_val:]), TensorDataset(x[:n_val])
        sampler = DistributedSampler(train_set, num_replicas=world.size, rank=world.rank, seed=args.seed)
        data = DataLoader(train_set, batch_size=args.batch_size // world.size, sampler=sampler)
        val_sampler = DistributedSampler(val_set, num_replicas=world.size, rank=world.rank, shuffle=False)
        options["validation_data"] = DataLoader(val_set, batch_size=4096, sampler=val_sampler)
        del options["seed"]  # the sampler's seed orders the batches
    else:
        data = x
        options["batch_size"] = args.batch_size
    if world.main:
        mode = "DataLoader shards" if args.loader else "in-memory rows split per batch"
        print(f"{world.size} process(es), {mode}: {args.n_train} training rows, global batch {args.batch_size}, "
              f"{args.epochs} epochs, MAF {args.num_flows} x ({args.hidden}, {args.hidden})", flush=True)  # fmt: skip
    start = time.perf_counter()
    history = density.fit(data, **options)
    wall = time.perf_counter() - start
    nll = density.evaluate(test.to(density.data_shift.device))
    if world.main:
        seconds = history.seconds  # the training loop's time (over every resumed run)
        points = (args.n_train - n_val) * history.epochs
        print(f"best epoch {history.best_epoch}, validation NLL {history.best_val_nll:.4f}", flush=True)
        print(f"throughput {points / seconds:.0f} points/s, {history.steps / seconds:.1f} steps/s "
              f"({seconds:.1f} s in the loop, {wall:.1f} s in fit; {world.size} process(es))", flush=True)  # fmt: skip
        print(f"test NLL {nll:.4f} nats (entropy bound {CHECKERBOARD_ENTROPY:.4f}; {world.size} process(es))")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
