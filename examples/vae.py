"""VAE with flow-enriched amortized posteriors (planar, radial, Householder, ccLinIAF, IAF, Sylvester).

Reproduces the set-up of the posterior-enrichment papers (Rezende & Mohamed 2015; Tomczak & Welling 2016, 2017;
Kingma et al. 2016; van den Berg et al. 2018) at a size a CPU can run: Bernoulli decoder, dynamic binarization,
KL warm-up, early stopping on the validation −ELBO, Adamax (or Adam), and the test NLL from the importance-weighted
bound. The guide is `pyro_flows.guides.amortized.AmortizedFlowGuide` trained by Pyro's ``SVI``.

Examples::

    python examples/vae.py --flow sylvester_orthogonal --epochs 200 --json out.json
    python examples/vae.py --compare --seeds 0 1 2 --epochs 150
    python examples/vae.py --dataset mnist --data-path ../shared/data/mnist --flow iaf
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vae_data import binarize, load_digits, load_mnist, split

from pyro_flows.diagnostics.iwae import elbo_estimate, iwae_bound
from pyro_flows.guides.amortized import AmortizedFlowGuide
from pyro_flows.transforms import conditional_registry

FLOWS = (
    "none",
    "planar",
    "radial",
    "householder",
    "convex_triangular",
    "iaf",
    "sylvester_orthogonal",
    "sylvester_householder",
    "sylvester_triangular",
)
DEFAULTS = {"digits": {"latent_dim": 8, "hidden": 256}, "mnist": {"latent_dim": 32, "hidden": 300}}


class SiteScale(Messenger):
    """Multiply the log-density of one sample site by ``scale`` (KL warm-up: β on the latent site of both sides)."""

    def __init__(self, site: str, scale: float = 1.0) -> None:
        super().__init__()
        self.site = site
        self.scale = scale

    def _process_message(self, msg: dict[str, Any]) -> None:
        if msg["type"] == "sample" and msg["name"] == self.site:
            msg["scale"] = self.scale * msg["scale"]


class VAE(nn.Module):
    """Bernoulli-decoder VAE: MLP decoder ``z → hidden → hidden → logits``, flow guide with an MLP encoder."""

    def __init__(
        self, data_dim: int, latent_dim: int, hidden: int, flow: str, num_flows: int, flow_kwargs: dict[str, Any]
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, data_dim)
        )
        encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU())
        self.guide = AmortizedFlowGuide(
            encoder, hidden, latent_dim, flow=None if flow == "none" else flow, num_flows=num_flows,
            flow_kwargs=flow_kwargs,
        )  # fmt: skip

    def model(self, x: Tensor, full_size: int | None = None) -> None:
        """``z ~ N(0, I)``, ``x | z ~ Bernoulli(sigmoid(decoder(z)))`` inside the data plate."""
        pyro.module("decoder", self.decoder)
        batch = x.shape[0]
        with pyro.plate("data", full_size or batch, subsample=torch.arange(batch, device=x.device)):
            prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


def load_dataset(name: str, data_path: str | None) -> list[Tensor]:
    """Train / validation / test grey-level images: digits 70/10/20 %, MNIST test images 70/10/20 % (7k/1k/2k)."""
    if name == "digits":
        return split(load_digits())
    if data_path is None:
        raise SystemExit("--dataset mnist needs --data-path (a folder or file with the MNIST IDX images)")
    return split(load_mnist(data_path))


def evaluate(vae: VAE, x: Tensor, elbo_samples: int, iw_samples: int) -> tuple[float, float]:
    """Mean −ELBO and NLL (−IWAE bound with ``iw_samples``) in nats per data point."""
    neg_elbo = -elbo_estimate(vae.model, vae.guide, x, num_samples=elbo_samples).mean().item()
    nll = -iwae_bound(vae.model, vae.guide, x, num_samples=iw_samples, particle_batch_size=250).mean().item()
    return neg_elbo, nll


def train_one(args: argparse.Namespace, flow: str, seed: int, data: list[Tensor]) -> dict[str, Any]:
    """Train one VAE with early stopping and return its test results."""
    device = torch.device(args.device)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    train, val, test = (d.to(device) for d in data)
    gen = torch.Generator(device=device).manual_seed(1234)  # one fixed binarization of val/test for every run
    val_bin, test_bin = binarize(val, gen), binarize(test, gen)
    flow_kwargs = args.flow_kwargs if flow != "none" else {}
    vae = VAE(train.shape[1], args.latent_dim, args.hidden, flow, args.num_flows, flow_kwargs).to(device)
    optim_cls = pyro.optim.Adamax if args.optimizer == "adamax" else pyro.optim.Adam
    beta = SiteScale("z", 1.0)
    svi = SVI(beta(vae.model), beta(vae.guide), optim_cls({"lr": args.lr}), Trace_ELBO())
    n = train.shape[0]
    best, best_state, best_epoch, bad, train_seconds, epochs_run = math.inf, None, 0, 0, 0.0, 0
    bar = tqdm(range(1, args.epochs + 1), desc=f"{flow} seed {seed}", disable=args.quiet, leave=False)
    for epoch in bar:
        beta.scale = min(1.0, epoch / args.warmup) if args.warmup > 0 else 1.0
        start = time.perf_counter()
        vae.train()
        batches = torch.randperm(n, device=device).split(args.batch_size)
        total = sum(svi.step(binarize(train[idx]), full_size=n) for idx in batches) / (n * len(batches))
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - start
        epochs_run = epoch
        vae.eval()
        val_loss = -elbo_estimate(vae.model, vae.guide, val_bin, num_samples=args.val_samples).mean().item()
        bar.set_postfix(train=f"{total:.2f}", val=f"{val_loss:.2f}", beta=f"{beta.scale:.2f}")
        if val_loss < best:
            best, best_state, best_epoch, bad = val_loss, copy.deepcopy(vae.state_dict()), epoch, 0
        elif epoch > args.warmup:
            bad += 1
            if bad >= args.patience:
                break
    if best_state is not None:
        vae.load_state_dict(best_state)
    vae.eval()
    neg_elbo, nll = evaluate(vae, test_bin, args.elbo_samples, args.iw_samples)
    return {
        "dataset": args.dataset,
        "flow": flow,
        "num_flows": 0 if flow == "none" else args.num_flows,
        "flow_kwargs": flow_kwargs,
        "latent_dim": args.latent_dim,
        "seed": seed,
        "neg_elbo": neg_elbo,
        "nll": nll,
        "val_neg_elbo": best,
        "epochs": epochs_run,
        "best_epoch": best_epoch,
        "seconds": train_seconds,
        "seconds_per_epoch": train_seconds / max(epochs_run, 1),
        "iw_samples": args.iw_samples,
        "device": str(device),
        "guide_parameters": sum(p.numel() for p in vae.guide.parameters()),
    }


def _mean_sd(values: Sequence[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """Mean ± sd over seeds of −ELBO and NLL per flow, the NLL gain over the plain VAE paired by seed, s/epoch."""
    flows = list(dict.fromkeys(r["flow"] for r in results))
    base = {r["seed"]: r["nll"] for r in results if r["flow"] == "none"}
    lines = [
        "| posterior | −ELBO | NLL | NLL gain vs VAE (paired) | seeds better | s/epoch | epochs | guide params |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for flow in flows:
        rows = [r for r in results if r["flow"] == flow]
        gains = [base[r["seed"]] - r["nll"] for r in rows if r["seed"] in base]
        gain = _mean_sd(gains) if gains and flow != "none" else "—"
        better = f"{sum(g > 0 for g in gains)}/{len(gains)}" if gains and flow != "none" else "—"
        label = flow if flow == "none" else f"{flow} × {rows[0]['num_flows']}"
        lines.append(
            f"| {label} | {_mean_sd([r['neg_elbo'] for r in rows])} | {_mean_sd([r['nll'] for r in rows])} | "
            f"{gain} | {better} | {statistics.mean(r['seconds_per_epoch'] for r in rows):.3f} | "
            f"{statistics.mean(r['epochs'] for r in rows):.0f} | {rows[0]['guide_parameters']} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("digits", "mnist"), default="digits")
    p.add_argument("--data-path", default=None, help="MNIST IDX image file or folder (.gz/.zip/raw)")
    p.add_argument("--flow", choices=FLOWS, default="planar")
    p.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS), help="flows run by --compare")
    p.add_argument("--num-flows", type=int, default=4)
    p.add_argument(
        "--flow-kwargs",
        type=json.loads,
        default={},
        help="JSON keyword arguments of every flow layer, e.g. '{\"gated\": false}'",
    )
    p.add_argument("--latent-dim", type=int, default=None, help="default: 8 (digits), 32 (mnist)")
    p.add_argument("--hidden", type=int, default=None, help="encoder/decoder width; default 256 (digits), 300 (mnist)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=None, help="KL warm-up epochs (default: epochs // 5)")
    p.add_argument("--patience", type=int, default=30, help="early stopping patience in epochs after warm-up")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=("adamax", "adam"), default="adamax")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds for --compare (default: --seed)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--iw-samples", type=int, default=5000, help="importance samples K of the test NLL")
    p.add_argument("--elbo-samples", type=int, default=100, help="samples of the test −ELBO estimate")
    p.add_argument("--val-samples", type=int, default=4, help="samples of the validation −ELBO (early stopping)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="write the results (a list with --compare) to this file")
    p.add_argument("--compare", action="store_true", help="run every flow of --flows for every seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup is None:
        args.warmup = args.epochs // 5
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    wanted = args.flows if args.compare else [args.flow]
    missing = [f for f in wanted if f != "none" and f not in conditional_registry]
    if missing:
        p.error(f"flows not registered in this installation: {missing}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run one configuration (or the comparison) and print/write the results."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_path)
    flows = args.flows if args.compare else [args.flow]
    seeds = (args.seeds or [args.seed]) if args.compare else [args.seed]
    results = []
    for seed in seeds:
        for flow in flows:
            result = train_one(args, flow, seed, data)
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json:  # rewrite after every run so a long comparison keeps what it has
                Path(args.json).write_text(json.dumps(results if args.compare else result, indent=2))
    if args.compare:
        print(markdown_table(results))
    return results


if __name__ == "__main__":
    main()
