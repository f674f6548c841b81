"""Fit FlowDensity to the 2-d toy densities and plot samples, fitted densities and learning curves.

Usage::

    python examples/density_2d.py                    # MAF on every toy, figure in examples/density_2d.png
    python examples/density_2d.py --flow spline_iaf --epochs 60 --out spline.png

For the checkerboard the test NLL is compared with the true differential entropy log 32 nats (5 bits).
"""

from __future__ import annotations

import argparse
import logging
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from pyro_flows.density import CHECKERBOARD_ENTROPY, TOY_DATASETS, FlowDensity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow", default="maf")
    parser.add_argument("--num-flows", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--n", type=int, default=20_000, help="training points per toy")
    parser.add_argument("--out", default="examples/density_2d.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    torch.manual_seed(0)

    names = list(TOY_DATASETS)
    fig, axes = plt.subplots(len(names), 4, figsize=(13, 3.2 * len(names)))
    for row, name in zip(axes, names, strict=True):
        sampler = TOY_DATASETS[name]
        x = sampler(args.n, generator=torch.Generator().manual_seed(1))
        test = sampler(10_000, generator=torch.Generator().manual_seed(2))
        density = FlowDensity(2, flow=args.flow, num_flows=args.num_flows, hidden_dims=(args.hidden, args.hidden))
        history = density.fit(x, epochs=args.epochs, batch_size=256, lr=2e-3, lr_schedule="cosine", seed=0)
        nll = density.evaluate(test)
        title = f"{name}: test NLL {nll:.3f} nats"
        if name == "checkerboard":
            title += f"\n(entropy {CHECKERBOARD_ENTROPY:.3f}, gap {nll - CHECKERBOARD_ENTROPY:.3f})"
        print(title)

        lim = 1.1 * test.abs().max().item()
        grid = torch.linspace(-lim, lim, 300)
        mesh = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
        with torch.no_grad():
            dens = density.log_prob(mesh).exp().reshape(300, 300)
        samples = density.sample(5000)
        row[0].hist2d(*test[:5000].T.numpy(), bins=150, range=[[-lim, lim]] * 2, cmap="viridis")
        row[0].set_title(f"{name}: data")
        row[1].imshow(dens.numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis")
        row[1].set_title(f"{args.flow}: density")
        row[2].hist2d(*samples.T.numpy(), bins=150, range=[[-lim, lim]] * 2, cmap="viridis")
        row[2].set_title("samples")
        history.plot(row[3])
        row[3].set_title(title, fontsize=8)
        for ax in row[:3]:
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(args.out, dpi=80)
    print(f"saved {args.out} (checkerboard entropy {CHECKERBOARD_ENTROPY / math.log(2):.2f} bits)")


if __name__ == "__main__":
    main()
