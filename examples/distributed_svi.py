"""Data-parallel SVI with a flow guide on torch.distributed: each rank fits on its own shard of the data.

    torchrun --nproc_per_node=2 examples/distributed_svi.py --quick
    torchrun --nproc_per_node=1 examples/distributed_svi.py --quick   # the same run on one process
    python examples/distributed_svi.py --quick                        # one process, without torchrun

The model is a Bayesian logistic regression (weights and bias: global latents) on generated data. Every rank
generates the same data from the seed and keeps only its shard (rows ``rank::size`` would do as well as the
contiguous split used here); the model is written as for one process, its plate ``"data"`` over the rows it is given.
`fit_svi(..., shard_plate="data")` scales that plate's log-likelihood by the number of ranks and averages the
gradients over the ranks after each step, so every rank takes the step of the full data's ELBO and ends with the same
guide. With ``--batch-size B`` each rank subsamples ``B / W`` of its rows per step (``subsample_size`` of the plate:
a global minibatch of ``B``); by default each step sees all the data.

The guide is an `AutoFlow` with the cold start (``start="cold"``): its set-up does not look at the data, so with
the same seed on every rank the guide's draws agree across the ranks and a run on 2 processes is the run on 1 up to
rounding. Rank 0 prints the settings, the throughput, and last a line ``held-out NLL <nats per point> ...``.
"""

from __future__ import annotations

import argparse

import pyro
import pyro.distributions as dist
import torch
import torch.distributed as dist_
from torch import Tensor

from pyro_flows.diagnostics import fit_svi
from pyro_flows.guides import AutoFlow
from pyro_flows.training import World


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small run (well under a minute on 2 CPU cores)")
    parser.add_argument("--n", type=int, default=None, help="training rows (default 100,000; 20,000 quick)")
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="SVI steps (default 1500; 400 quick)")
    parser.add_argument("--batch-size", type=int, default=0, help="global minibatch per step (0: all rows)")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint", default=None, help="save every 100 steps there; resume when it exists")
    parser.add_argument("--progress", action="store_true", help="show the progress bar (rank 0)")
    args = parser.parse_args()
    args.n = args.n or (20_000 if args.quick else 100_000)
    args.steps = args.steps or (400 if args.quick else 1500)
    return args


def data(n: int, features: int, seed: int) -> tuple[Tensor, Tensor]:
    """Rows ``x ~ N(0, I)`` and labels ``y ~ Bernoulli(sigmoid(x w + b))`` for fixed weights, from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.linspace(-1.5, 1.5, features)
    x = torch.randn(n, features, generator=generator)
    y = torch.bernoulli(torch.sigmoid(x @ weight + 0.5), generator=generator)
    return x, y


def model(x: Tensor, y: Tensor, subsample_size: int | None = None) -> None:
    weight = pyro.sample("weight", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    bias = pyro.sample("bias", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(x), subsample_size=subsample_size) as rows:
        pyro.sample("y", dist.Bernoulli(logits=x[rows] @ weight + bias), obs=y[rows])


def held_out_nll(guide: AutoFlow, x: Tensor, y: Tensor, draws: int = 500) -> float:
    r"""Mean over the test rows of $-\log \frac1S \sum_s p(y_i \mid x_i, w_s, b_s)$ for guide draws $(w_s, b_s)$."""
    with torch.no_grad():
        samples = guide.sample_posterior(draws)
        logits = samples["weight"] @ x.T + samples["bias"].reshape(-1, 1)
        log_p = dist.Bernoulli(logits=logits).log_prob(y)
        return -(log_p.logsumexp(0) - torch.log(torch.tensor(float(draws)))).mean().item()


def main() -> None:
    args = parse_args()
    world = World.current()  # joins the process group torchrun describes (gloo on CPU, NCCL on CUDA)
    x, y = data(args.n + 10_000, args.features, args.seed)
    (x, test_x), (y, test_y) = x.split([args.n, 10_000]), y.split([args.n, 10_000])
    shard_x, shard_y = x.tensor_split(world.size)[world.rank], y.tensor_split(world.size)[world.rank]
    batch = args.batch_size // world.size or None
    pyro.set_rng_seed(args.seed)
    guide = AutoFlow(model, flow="iaf", num_flows=2, hidden_dims=(32,), start="cold")
    if world.main:
        print(f"{world.size} process(es): {args.n} rows ({len(shard_x)} on rank 0), {args.features} features, "
              f"{args.steps} steps, global batch {args.batch_size or args.n}", flush=True)  # fmt: skip
    trace = fit_svi(
        model, guide, shard_x, shard_y, batch, num_steps=args.steps, lr=args.lr, progress=args.progress,
        shard_plate="data", checkpoint=args.checkpoint, clear_param_store=True,
    )  # fmt: skip
    if world.main:
        rows = args.batch_size or args.n
        print(f"throughput {args.steps / trace.seconds:.1f} steps/s, {rows * args.steps / trace.seconds:.0f} "
              f"points/s ({trace.seconds:.1f} s, {world.size} process(es))", flush=True)  # fmt: skip
        nll = held_out_nll(guide, test_x, test_y)
        print(f"held-out NLL {nll:.4f} nats per point, ELBO {trace.final():.1f} ({world.size} process(es))")
    if dist_.is_initialized():
        dist_.destroy_process_group()


if __name__ == "__main__":
    main()
