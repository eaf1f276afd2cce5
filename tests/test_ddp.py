"""Distributed training: two CPU processes with gloo train one fold like a single process."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from napari_mtml.config import TrainConfig
from napari_mtml.data import HealthyCollection
from napari_mtml.training import StepEvent, train

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)

STEPS = 4


def _collection() -> HealthyCollection:
    rng = np.random.default_rng(0)
    fg = np.zeros((32, 32), bool)
    fg[4:28, 4:28] = True
    return HealthyCollection.from_arrays(
        [(rng.normal(size=(32, 32)) * fg).astype(np.float32) for _ in range(10)], [fg] * 10
    )


def _config(out) -> TrainConfig:
    return TrainConfig(
        out=str(out),
        fold=1,
        max_steps=STEPS,
        batch_size=4,
        device="cpu",
        base_features=4,
        depth=3,
        max_features=8,
        lr=5e-3,
        warmup_steps=2,
        val_interval=2,
        val_size=2,
        seed=5,
    )


def _as_rank(rank: int, world: int, port: int) -> None:
    """This process as rank `rank` of `world` (what torchrun sets), on one thread."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    _as_rank(rank, world, port)
    models = []

    def factory(cfg, seed):
        from napari_mtml.model import UNet

        models.append(UNet(**cfg.model_kwargs(), init_seed=seed + rank))  # DDP must sync these
        return models[-1]

    events = list(
        train(_config(os.path.join(out, "run")), collection=_collection(), model_factory=factory)
    )
    steps = sum(isinstance(e, StepEvent) for e in events)
    torch.save(
        {"state": models[0].state_dict(), "steps": steps}, os.path.join(out, f"rank{rank}.pt")
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_single_process_steps_and_agree(tmp_path, monkeypatch):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    last = torch.load(tmp_path / "run" / "fold_1" / "last.pt", weights_only=True)
    assert last["rng"]["data"]["world_size"] == 2
    # rank 0 reports and writes; the other rank trains silently
    assert r0["steps"] == STEPS and r1["steps"] == 0
    assert not (tmp_path / "run" / "fold_0").exists()

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            monkeypatch.delenv(key, raising=False)
        events = list(train(_config(tmp_path / "single"), collection=_collection()))
    finally:
        torch.set_num_threads(before)
    single = torch.load(tmp_path / "single" / "fold_1" / "last.pt", weights_only=True)
    assert sum(isinstance(e, StepEvent) for e in events) == STEPS
    assert single["step"] == last["step"] == STEPS
    # both runs saw the same global batch size per step: different draws, same schedule
    assert single["scheduler"] == last["scheduler"]


def _spawn_two(worker, tmp_path, seconds: int, hung: str) -> None:
    """Run `worker(rank, 2, port, tmp_path)` on two ranks; fail (killing them) after `seconds`
    instead of blocking the suite when a rank hangs."""
    ctx = mp.spawn(worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=False)
    for _ in range(seconds):
        if ctx.join(timeout=1):
            return
    for p in ctx.processes:
        p.kill()
    pytest.fail(hung)


def _budget_worker(rank: int, world: int, port: int, out: str) -> None:
    _as_rank(rank, world, port)
    cfg = _config(os.path.join(out, "budget")).replace(
        fold="all", max_steps=None, time_budget=20.0, warmup_steps=None, val_interval=None
    )
    events = list(train(cfg, collection=_collection()))
    started = [e.max_steps for e in events if type(e).__name__ == "FoldStarted"]
    torch.save({"started": started}, os.path.join(out, f"budget{rank}.pt"))


def test_a_time_budget_plans_and_replans_alike_on_every_rank(tmp_path):
    """The plan and each fold's re-plan are made on rank 0 and broadcast: both ranks train
    every fold to the same steps (a rank deciding alone would hang the other)."""
    _spawn_two(_budget_worker, tmp_path, 180, "a time-budgeted run did not finish: a rank hung")
    started = torch.load(tmp_path / "budget0.pt", weights_only=True)["started"]
    assert len(started) == 5 and all(n >= 1 for n in started)
    assert torch.load(tmp_path / "budget1.pt", weights_only=True)["started"] == []
    saved = TrainConfig.from_json(tmp_path / "budget" / "config.json")
    assert started == [saved.steps_of(k) for k in range(5)]
    for k in range(5):
        last = torch.load(tmp_path / "budget" / f"fold_{k}" / "last.pt", weights_only=True)
        assert last["step"] == started[k]


def _short_budget_worker(rank: int, world: int, port: int, out: str) -> None:
    _as_rank(rank, world, port)
    # 10 ms: less than reading the data and the warm-up take on any machine (1 s was, before
    # the warm-up stopped charging the first optimiser's one-time import to every fold, but
    # would fit 10 steps per fold of this tiny model on a fast one now)
    cfg = _config(os.path.join(out, "short")).replace(
        fold="all", max_steps=None, time_budget=0.01, warmup_steps=None, val_interval=None
    )
    try:
        list(train(cfg, collection=_collection()))
    except ValueError as exc:
        torch.save({"error": str(exc)}, os.path.join(out, f"short{rank}.pt"))


def test_a_budget_too_short_stops_every_rank_with_the_reason(tmp_path):
    _spawn_two(_short_budget_worker, tmp_path, 120, "a rank waited for a plan rank 0 never made")
    errors = [torch.load(tmp_path / f"short{r}.pt", weights_only=True)["error"] for r in (0, 1)]
    assert "too short" in errors[0] and "rank 0" in errors[1]
