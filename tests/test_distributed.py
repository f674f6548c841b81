"""Data-parallel training on torch.distributed (2 CPU processes, gloo), DataLoader input, checkpoints and resume.

The two-process checks (marked slow: starting the processes and their imports take most of their 15-30 s) launch
the workers once (`two_ranks`, with ``torch.multiprocessing`` and the environment variables ``torchrun`` sets, so the
library initializes the process group itself) and compare what they return with the same scenarios run here in one
process. Tolerances: the ranks end bit-identical; two processes match one process at the same global batch and seed
to 1e-5 in every parameter and NLL (only the order of floating-point sums differs); a resumed run equals the
uninterrupted one bit for bit.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.multiprocessing as mp
from pyro.infer import Trace_ELBO
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pyro_flows.density import FlowDensity, two_moons
from pyro_flows.diagnostics import fit_svi
from pyro_flows.guides import AutoFlow
from pyro_flows.training import Checkpoint, World, train

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


class KilledError(Exception):
    """Stands for the signal that kills a run: raised from inside the fit after a number of steps."""


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def kill_after(density: FlowDensity, calls: int) -> None:
    """Make the density's ``log_prob`` (training steps and validation chunks) raise `KilledError` at call ``calls``."""
    original, count = density.log_prob, [0]

    def log_prob(*args: Any) -> torch.Tensor:
        count[0] += 1
        if count[0] == calls:
            raise KilledError
        return original(*args)

    density.log_prob = log_prob


def density_run(folder: Path | None = None, kill: int | None = None, init_seed: int = 0, **options: Any) -> dict:
    """An in-memory fit (validation split, cosine schedule, early-stopping bookkeeping): weights and history."""
    torch.manual_seed(init_seed)
    density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(8,))
    x = two_moons(600, generator=gen(0))
    if kill is not None:
        kill_after(density, kill)
    # eager passes: the kill hook patches log_prob, which a traced pass does not call
    settings = {"epochs": 4, "batch_size": 64, "lr": 1e-2, "lr_schedule": "cosine", "seed": 0, "progress": False}
    settings["jit"] = False
    settings |= options
    checkpoint = None if folder is None else folder / "density.pt"
    try:
        history = density.fit(x, checkpoint=checkpoint, **settings)
    except KilledError:
        return {"killed": True}
    return {"state": density.state_dict(), "history": vars(history)}


def loader_run(world_size: int, rank: int) -> dict:
    """A conditional density from DataLoaders with a DistributedSampler: the rank's shards of train and validation."""
    torch.manual_seed(0)
    x = two_moons(512, generator=gen(1))
    context = x[:, :1] + 0.1 * torch.randn(512, 1, generator=gen(2))
    train_set, val_set = TensorDataset(x[:384], context[:384]), TensorDataset(x[384:], context[384:])
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(train_set, batch_size=64 // world_size, sampler=sampler)
    val_sampler = DistributedSampler(val_set, num_replicas=world_size, rank=rank, shuffle=False)
    val_loader = DataLoader(val_set, batch_size=50, sampler=val_sampler)
    density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(8,), context_dim=1)
    history = density.fit(loader, validation_data=val_loader, epochs=3, lr=1e-2, progress=False)
    return {"state": density.state_dict(), "history": vars(history)}


def uneven_run(world_size: int, rank: int) -> dict:
    """Shards of unequal length (3 batches on rank 0, 2 on rank 1); alone, the unions of the ranks' k-th batches."""
    torch.manual_seed(0)
    chunks = two_moons(160, generator=gen(5)).split(32)
    together = [torch.cat(chunks[0:2]), torch.cat(chunks[2:4]), chunks[4]]
    batches = list(chunks[rank::2]) if world_size == 2 else together
    density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(8,))
    history = density.fit(Reiterable(batches), epochs=2, lr=1e-2, progress=False)
    return {"state": density.state_dict(), "history": vars(history)}


def regression(world_size: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of a linear-regression data set (200 rows, 3 features)."""
    features = torch.randn(200, 3, generator=gen(3))
    y = features @ torch.tensor([1.0, -2.0, 0.5]) + 0.5 * torch.randn(200, generator=gen(4))
    return features.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]


def regression_model(features: torch.Tensor, y: torch.Tensor) -> None:
    weight = pyro.sample("weight", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", len(features)):
        pyro.sample("y", dist.Normal(features @ weight, 0.5), obs=y)


def svi_run(world_size: int, rank: int, **options: Any) -> dict:
    """A flow guide fitted on this rank's shard (global latents only, no subsampling: the one-process run exactly).

    The cold start keeps the guide's set-up independent of the data (the Laplace start would fit each rank's shard).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoFlow(regression_model, flow="maf", num_flows=1, hidden_dims=(8,), start="cold")
    shard = regression(world_size, rank)
    sharded = {"shard_plate": "data"} if world_size > 1 else {}
    trace = fit_svi(regression_model, guide, *shard, num_steps=30, lr=0.02, progress=False, **sharded, **options)
    store = pyro.get_param_store()
    return {"params": {name: store[name].detach().clone() for name in store}, "elbo": trace.elbo}


def worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """One rank: the environment torchrun gives it, then every scenario; its results go to ``rank{rank}.pt``."""
    os.environ |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)}
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    torch.set_num_threads(1)
    path = Path(folder)
    results = {"density": density_run(), "loader": loader_run(world_size, rank), "svi": svi_run(world_size, rank)}
    results["uneven"] = uneven_run(world_size, rank)
    try:  # in-memory data must be the same on every rank
        FlowDensity(2, flow="maf", num_flows=1).fit(two_moons(64, generator=gen(rank)), epochs=1, progress=False)
    except ValueError as error:
        results["differs"] = str(error)
    # a killed two-process fit, resumed by fresh processes' objects (another initialization), ends as uninterrupted
    results["killed"] = density_run(path, kill=20)
    results["resumed"] = density_run(path, init_seed=1)
    # the DistributedDataParallel wrapper is gone after the fit: a backward on rank 0 alone needs no other rank
    density = FlowDensity(2, flow="maf", num_flows=2, hidden_dims=(8,))
    density.fit(two_moons(64, generator=gen(0)), epochs=1, progress=False, seed=0)
    if rank == 0:
        density.log_prob(torch.zeros(3, 2)).sum().backward()
    torch.distributed.barrier()
    results["world"] = World.current()
    torch.save(results, path / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(worker, args=(2, free_port(), str(folder)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail("the two ranks did not finish within 300 s")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def assert_states(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol:
            assert torch.allclose(a[name].double(), b[name].double(), atol=atol, rtol=0), name
        else:
            assert torch.equal(a[name], b[name]), name


# --------------------------------------------------------------------------- two processes on localhost (gloo)
@pytest.mark.slow
def test_the_ranks_form_a_world_of_two(two_ranks: list[dict]) -> None:
    assert [(r["world"].rank, r["world"].size) for r in two_ranks] == [(0, 2), (1, 2)]


@pytest.mark.slow
def test_in_memory_data_that_differ_across_ranks_are_refused_on_every_rank(two_ranks: list[dict]) -> None:
    for ranks in two_ranks:
        assert "x (with its context) differs across the 2 ranks" in ranks["differs"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["density", "loader", "uneven"])
def test_two_ranks_end_identical_and_match_one_process(two_ranks: list[dict], scenario: str) -> None:
    rank0, rank1 = (ranks[scenario] for ranks in two_ranks)
    assert_states(rank0["state"], rank1["state"])
    assert without_seconds(rank0["history"]) == without_seconds(rank1["history"])
    alone = {"density": density_run, "loader": partial(loader_run, 1, 0), "uneven": partial(uneven_run, 1, 0)}[
        scenario
    ]()
    assert_states(rank0["state"], alone["state"], atol=TOLERANCE)
    for key in ("losses", "val_losses"):
        assert rank0["history"][key] == pytest.approx(alone["history"][key], rel=TOLERANCE)
    assert rank0["history"]["steps"] == alone["history"]["steps"]
    assert rank0["history"]["best_epoch"] == alone["history"]["best_epoch"]


@pytest.mark.slow
def test_two_rank_svi_ends_identical_and_matches_one_process(two_ranks: list[dict]) -> None:
    rank0, rank1 = (ranks["svi"] for ranks in two_ranks)
    assert_states(rank0["params"], rank1["params"])
    assert rank0["elbo"] == rank1["elbo"]
    alone = svi_run(1, 0)
    assert_states(rank0["params"], alone["params"], atol=TOLERANCE)
    assert rank0["elbo"] == pytest.approx(alone["elbo"], rel=TOLERANCE)


@pytest.mark.slow
def test_a_killed_two_rank_fit_resumes_from_its_checkpoint(two_ranks: list[dict]) -> None:
    for ranks in two_ranks:
        assert ranks["killed"] == {"killed": True}
        assert_states(ranks["resumed"]["state"], ranks["density"]["state"])
        resumed, uninterrupted = ranks["resumed"]["history"], ranks["density"]["history"]
        assert without_seconds(resumed) == without_seconds(uninterrupted)


# --------------------------------------------------------------------------- checkpoints in one process
def without_seconds(history: dict) -> dict:
    return {key: value for key, value in history.items() if key != "seconds"}


@pytest.mark.parametrize("seed", [0, None])
def test_a_killed_fit_restarted_on_its_checkpoint_equals_the_uninterrupted_fit(
    tmp_path: Path, seed: int | None
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    uninterrupted = density_run(tmp_path / "a", seed=seed)
    # 9 training steps and 1 validation chunk per epoch: call 24 is in the middle of the third epoch
    assert density_run(tmp_path / "b", kill=24, seed=seed) == {"killed": True}
    saved = torch.load(tmp_path / "b" / "density.pt", weights_only=True)
    assert saved["epoch"] == 2 and len(saved["progress"]["result"]["losses"]) == 2
    # the restarted process builds its density from another seed: the checkpoint restores weights, order and split
    resumed = density_run(tmp_path / "b", init_seed=1, seed=seed)
    assert_states(resumed["state"], uninterrupted["state"])
    assert without_seconds(resumed["history"]) == without_seconds(uninterrupted["history"])
    # rerunning a finished fit returns its history without a step
    again = density_run(tmp_path / "b", init_seed=2, seed=seed)
    assert without_seconds(again["history"]) == without_seconds(uninterrupted["history"])
    assert_states(again["state"], uninterrupted["state"])


def test_resuming_keeps_the_best_weights_and_the_early_stopping_count(tmp_path: Path) -> None:
    options = {"epochs": 30, "patience": 2, "lr": 0.2, "lr_schedule": None}  # a large rate: it stops early
    uninterrupted = density_run(tmp_path, **options)
    (tmp_path / "density.pt").unlink()
    assert uninterrupted["history"]["stopped_early"]
    stopped = len(uninterrupted["history"]["losses"])
    assert density_run(tmp_path, kill=10 * (stopped - 1) + 3, **options) == {"killed": True}
    resumed = density_run(tmp_path, init_seed=1, **options)
    assert resumed["history"]["best_epoch"] == uninterrupted["history"]["best_epoch"]
    assert resumed["history"]["stopped_early"]
    assert_states(resumed["state"], uninterrupted["state"])


def test_checkpoint_arguments_and_files_are_checked(tmp_path: Path) -> None:
    x = two_moons(128, generator=gen(0))
    density = FlowDensity(2, flow="maf", num_flows=1, hidden_dims=(4,))
    with pytest.raises(TypeError, match="checkpoint must be a file path"):
        density.fit(x, epochs=1, checkpoint=3, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        density.fit(x, epochs=1, checkpoint=tmp_path / "c.pt", checkpoint_every=0, progress=False)
    with pytest.raises(ValueError, match="existing directory"):
        density.fit(x, epochs=1, checkpoint=tmp_path / "missing" / "c.pt", progress=False)
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        density.fit(x, epochs=1, checkpoint=tmp_path / "foreign.pt", progress=False)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pyro_flows training checkpoint"):
        density.fit(x, epochs=1, checkpoint=tmp_path / "other.pt", progress=False)
    path = tmp_path / "run.pt"
    density.fit(x, epochs=1, checkpoint=path, seed=0, progress=False)
    with pytest.raises(ValueError, match="seed=1 differs"):
        density.fit(x, epochs=2, checkpoint=path, seed=1, progress=False)
    with pytest.raises(ValueError, match="x differs from the data"):
        density.fit(x[:100], epochs=2, checkpoint=path, seed=0, progress=False)
    wider = FlowDensity(2, flow="maf", num_flows=1, hidden_dims=(6,))
    with pytest.raises(ValueError, match="holds the state of another density"):
        wider.fit(x, epochs=2, checkpoint=path, seed=0, progress=False)
    weight = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"holds parameters of shapes \["):
        train(lambda _: weight.sum(), [weight], epochs=1, progress=False, checkpoint=Checkpoint(path))


class DyingELBO(Trace_ELBO):
    """Raises `KilledError` at its ``calls``-th evaluation (fit_svi evaluates it once to set up, then once a step)."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.calls = calls

    def differentiable_loss(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls -= 1
        if not self.calls:
            raise KilledError
        return super().differentiable_loss(*args, **kwargs)


def test_a_killed_svi_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    uninterrupted = svi_run(1, 0, checkpoint=tmp_path / "a.pt", checkpoint_every=10)
    with pytest.raises(KilledError):  # during step 26 (after the set-up and 25 steps), saved after step 20
        svi_run(1, 0, checkpoint=tmp_path / "b.pt", checkpoint_every=10, loss=DyingELBO(1 + 25 + 1))
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 20
    pyro.set_rng_seed(7)
    resumed = svi_run(1, 0, checkpoint=tmp_path / "b.pt", checkpoint_every=10)
    assert_states(resumed["params"], uninterrupted["params"])
    assert resumed["elbo"] == uninterrupted["elbo"]


# --------------------------------------------------------------------------- DataLoader input in one process
def test_a_dataloader_epoch_is_one_pass_with_exact_streamed_statistics() -> None:
    x = two_moons(300, generator=gen(0)) * torch.tensor([3.0, 0.5]) + 7.0
    loader = DataLoader(TensorDataset(x), batch_size=64, shuffle=True, generator=gen(1))
    density = FlowDensity(2, flow="maf", num_flows=1, hidden_dims=(8,))
    history = density.fit(loader, epochs=2, progress=False)
    assert history.steps == 2 * 5 and history.val_nll == [] and history.best_epoch is None
    assert torch.allclose(density.data_shift, x.mean(0), atol=1e-5)
    assert torch.allclose(density.data_scale, x.std(0, correction=0), rtol=1e-5)
    # plain tensor batches, an in-memory validation set, a numpy-backed loader
    batches = Reiterable([x[i : i + 100] for i in range(0, 300, 100)])
    history = FlowDensity(2, flow="maf", num_flows=1).fit(batches, validation_data=x[:50], epochs=2, progress=False)
    assert history.steps == 6 and len(history.val_nll) == 2


class Reiterable:
    """A source of fixed batches that starts a new pass at every ``iter``, as a user's streaming source would."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches

    def __iter__(self) -> Any:
        return iter(self.batches)


def test_a_distributed_sampler_gets_a_new_epoch_every_pass() -> None:
    x = two_moons(64, generator=gen(0))
    epochs: list[int] = []

    class Recording(DistributedSampler):
        def set_epoch(self, epoch: int) -> None:
            epochs.append(epoch)
            super().set_epoch(epoch)

    loader = DataLoader(TensorDataset(x), batch_size=16, sampler=Recording(TensorDataset(x), num_replicas=1, rank=0))
    FlowDensity(2, flow="maf", num_flows=1, hidden_dims=(4,)).fit(loader, epochs=3, progress=False)
    assert epochs == [0, 1, 2]


def test_dataloader_input_errors_name_the_argument() -> None:
    x = two_moons(64, generator=gen(0))
    loader = DataLoader(TensorDataset(x), batch_size=16)
    density = FlowDensity(2, flow="maf", num_flows=1, hidden_dims=(4,))
    with pytest.raises(TypeError, match="x is a map-style Dataset; pass DataLoader"):
        density.fit(TensorDataset(x), epochs=1, progress=False)
    with pytest.raises(TypeError, match="x is a one-pass iterator"):
        density.fit(iter([x]), epochs=1, progress=False)
    with pytest.raises(ValueError, match="validation_fraction needs in-memory x"):
        density.fit(loader, validation_fraction=0.2, epochs=1, progress=False)
    with pytest.raises(ValueError, match="context must be None when x is a DataLoader"):
        density.fit(loader, torch.zeros(64, 1), epochs=1, progress=False)
    with pytest.raises(TypeError, match=r"each batch of x must be x, \(x,\) or \(x, context\)"):
        density.fit(DataLoader(TensorDataset(x, x, x), batch_size=16), epochs=1, progress=False)
    bad = x.clone()
    bad[5, 0] = math.nan
    with pytest.raises(ValueError, match=r"a batch of x has non-finite values .* \[5\]"):
        density.fit(DataLoader(TensorDataset(bad), batch_size=16), epochs=1, progress=False)
    with pytest.raises(ValueError, match="this density is unconditional"):
        density.fit(DataLoader(TensorDataset(x, x), batch_size=16), epochs=1, progress=False)


# --------------------------------------------------------------------------- the world of one process
def test_outside_torchrun_the_world_is_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert World.current() == World() and World.current(False) == World()
    with pytest.raises(ValueError, match=r"distributed=True, but no torch\.distributed process group"):
        World.current(True)
    with pytest.raises(TypeError, match="distributed must be True, False or None"):
        World.current("yes")  # type: ignore[arg-type]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"lacks \['RANK', 'MASTER_ADDR', 'MASTER_PORT'\]"):
        World.current()
    assert World.current(False) == World()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        World.current()


def test_one_process_collectives_are_the_identity() -> None:
    world = World()
    weight = torch.ones(2, requires_grad=True)
    loss = (3 * weight).sum()
    loss.backward()
    assert world.average(loss, [weight]) == 6.0 and torch.equal(weight.grad, torch.full((2,), 3.0))
    assert world.broadcast({"a": 1}) == {"a": 1} and world.gather(4) == [4]
    world.check_same(torch.arange(3.0), "anything")
    assert world.device("cuda:1") == torch.device("cuda:1") and world.device(None) is None


def test_data_parallel_svi_needs_its_shard_plate(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyro_flows.diagnostics.elbo as elbo

    monkeypatch.setattr(elbo.World, "current", classmethod(lambda cls, distributed=None: World(rank=0, size=2)))
    guide = AutoFlow(regression_model, flow="maf", num_flows=1, hidden_dims=(8,))
    with pytest.raises(ValueError, match="pass shard_plate="):
        fit_svi(regression_model, guide, *regression(2, 0), num_steps=2, progress=False)
    with pytest.raises(ValueError, match=r"shard_plate='rows' is not a plate .* \['data'\]"):
        fit_svi(regression_model, guide, *regression(2, 0), num_steps=2, shard_plate="rows", progress=False)
    with pytest.raises(TypeError, match="shard_plate must be a plate name"):
        fit_svi(regression_model, guide, *regression(2, 0), num_steps=2, shard_plate=1, progress=False)


# --------------------------------------------------------------------------- the examples under torchrun
def last_number(output: str, label: str) -> float:
    lines = output.strip().splitlines()
    match = re.search(rf"{label} (-?[0-9.]+)", lines[-1])
    assert match, f"last line {lines[-1]!r} lacks '{label} <number>'"
    return float(match.group(1))


def torchrun(script: str, processes: int, *options: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_port", str(free_port()), str(ROOT / "examples" / script), *options]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}  # torchrun sets it only for several processes
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "label"), [("distributed_density.py", "test NLL"), ("distributed_svi.py", "held-out NLL")]
)
def test_the_examples_give_the_same_result_on_one_and_two_processes(script: str, label: str) -> None:
    one, two = (last_number(torchrun(script, n, "--quick"), label) for n in (1, 2))
    assert math.isfinite(one) and abs(one - two) < 0.02
