"""The training loop: loss goes down, resume, cancel, checkpoints, run folder, config."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from napari_mtml.config import TrainConfig
from napari_mtml.data import HealthyCollection
from napari_mtml.training import (
    FoldFinished,
    FoldStarted,
    Notice,
    RunFinished,
    StepEvent,
    ValidationEvent,
    WarmupExponentialLR,
    train,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _collection(shape=(32, 32), n=10, seed=0):
    rng = np.random.default_rng(seed)
    fg = np.zeros(shape, bool)
    fg[tuple(slice(s // 8, s - s // 8) for s in shape)] = True
    ims = [(rng.normal(size=shape) * 0.1 * fg).astype(np.float32) for _ in range(n)]
    return HealthyCollection.from_arrays(ims, [fg] * n)


def _config(tmp_path, **kw):
    base = dict(
        out=str(tmp_path / "run"),
        fold=0,
        max_steps=6,
        batch_size=4,
        device="cpu",
        base_features=4,
        depth=3,
        max_features=8,
        lr=5e-3,
        warmup_steps=2,
        val_interval=3,
        val_size=4,
        seed=1,
    )
    base.update(kw)
    return TrainConfig(**base)


def _run(gen):
    events = []
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        return events, stop.value


# --------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("shape, steps", [((32, 32), 24), ((16, 16, 16), 10)])
def test_a_few_steps_lower_the_loss(tmp_path, shape, steps):
    cfg = _config(tmp_path, max_steps=steps, val_interval=steps, batch_size=4, lr=1e-2)
    events, result = _run(train(cfg, collection=_collection(shape, n=10)))
    losses = [e.loss for e in events if isinstance(e, StepEvent)]
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:2])
    assert [type(e) for e in events if not isinstance(e, (StepEvent, Notice))] == [
        FoldStarted,
        ValidationEvent,
        FoldFinished,
        RunFinished,
    ]
    started = next(e for e in events if isinstance(e, FoldStarted))
    # the small (CPU) recipe's 4/1 split: fold 0 trains on tasks 0-3, validates on task 4
    assert len(started.train_tasks) == 4 and started.val_tasks == ("smooth_intensity",)
    val = next(e for e in events if isinstance(e, ValidationEvent))
    assert val.best and set(val.ap) <= set(started.val_tasks)
    assert result.folds[0].best_step == steps


def test_run_folder_layout_and_weights_only_loading(tmp_path):
    from napari_mtml.model import UNet

    cfg = _config(tmp_path)
    events, _ = _run(train(cfg, collection=_collection()))
    run = tmp_path / "run"
    saved = TrainConfig.from_json(run / "config.json")
    assert saved.dims == 2 and saved.frame == (32, 32) and saved.batch_size == 4
    folds = json.loads((run / "folds.json").read_text())
    assert folds["n_folds"] == 5 and len(folds["folds"]) == 5
    f0 = folds["folds"][0]
    # the recipe's split is recorded, so that the run replays and resumes as it was
    assert saved.train_tasks == 4 and folds["train_tasks"] == 4
    assert f0["train_tasks"] == [0, 1, 2, 3] and f0["train_data_folds"] == [0, 1, 2, 3]
    assert not set(f0["train_data"]) & set(f0["val_data"])
    best = torch.load(run / "fold_0" / "best.pt", weights_only=True)
    net = UNet(**saved.model_kwargs())
    # the best checkpoint: the weights of the config's model and the frame they were trained on
    assert best["frame"] == [32, 32] and best["dims"] == 2
    net.load_state_dict(best["model"])
    last = torch.load(run / "fold_0" / "last.pt", weights_only=True)
    assert last["step"] == 6 and last["finished"] and set(last["rng"]) >= {"torch_cpu", "data"}
    lines = [json.loads(x) for x in (run / "fold_0" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["type"] == "step"] == list(range(1, 7))
    assert [x["step"] for x in lines if x["type"] == "validation"] == [3, 6]
    assert not list((run / "fold_0").glob(".*"))  # no temporary files left


def _recording_factory(record):
    from napari_mtml.model import UNet

    def factory(cfg, seed):
        net = UNet(**cfg.model_kwargs(), init_seed=seed)
        net.register_forward_pre_hook(
            lambda m, args: record.append(args[0].detach().clone()) if m.training else None
        )
        return net

    return factory


def test_cancel_then_resume_continues_with_the_same_batches(tmp_path):
    col = _collection()
    full_inputs: list[torch.Tensor] = []
    _run(
        train(
            _config(tmp_path / "a"), collection=col, model_factory=_recording_factory(full_inputs)
        )
    )
    assert len(full_inputs) == 6

    # Cancel right after the first validation (step 3): the last good checkpoint must load.
    cut_inputs: list[torch.Tensor] = []
    gen = train(
        _config(tmp_path / "b"), collection=col, model_factory=_recording_factory(cut_inputs)
    )
    for event in gen:
        if isinstance(event, StepEvent) and event.step == 4:
            gen.close()
            break
    fold_dir = tmp_path / "b" / "run" / "fold_0"
    state = torch.load(fold_dir / "last.pt", weights_only=True)
    assert state["step"] == 3 and not state["finished"]
    assert not list(fold_dir.glob(".*"))

    with pytest.raises(ValueError, match="--resume"):
        next(train(_config(tmp_path / "b"), collection=col))

    resumed_inputs: list[torch.Tensor] = []
    events, _ = _run(
        train(
            _config(tmp_path / "b", resume=True),
            collection=col,
            model_factory=_recording_factory(resumed_inputs),
        )
    )
    started = next(e for e in events if isinstance(e, FoldStarted))
    assert started.start_step == 3
    assert [e.step for e in events if isinstance(e, StepEvent)] == [4, 5, 6]
    for a, b in zip(resumed_inputs, full_inputs[3:], strict=True):
        assert torch.equal(a, b)
    # optimiser and weights restored: the resumed run ends where the uninterrupted one did
    wa = torch.load(tmp_path / "a" / "run" / "fold_0" / "last.pt", weights_only=True)["model"]
    wb = torch.load(fold_dir / "last.pt", weights_only=True)["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    # the log holds each step once
    steps = [
        json.loads(x)["step"]
        for x in (fold_dir / "log.jsonl").read_text().splitlines()
        if json.loads(x)["type"] == "step"
    ]
    assert steps == list(range(1, 7))


class _Constant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x * 0 + self.p * 0


def test_early_stopping(tmp_path):
    cfg = _config(tmp_path, max_steps=50, val_interval=2, patience=4)
    events, result = _run(
        train(cfg, collection=_collection(), model_factory=lambda c, s: _Constant())
    )
    # the val loss never improves after step 2: stop 4 steps later
    assert max(e.step for e in events if isinstance(e, StepEvent)) == 6
    assert result.folds[0].best_step == 2 and result.folds[0].stopped_early


def test_resume_refuses_changed_settings(tmp_path):
    col = _collection()
    _run(train(_config(tmp_path, max_steps=3), collection=col))
    with pytest.raises(ValueError, match="lr"):
        next(train(_config(tmp_path, max_steps=3, resume=True, lr=1e-4), collection=col))


def test_no_external_dataset_is_announced(tmp_path):
    events, _ = _run(train(_config(tmp_path, max_steps=1), collection=_collection()))
    assert any(isinstance(e, Notice) and "external" in e.text for e in events)


def test_schedule_matches_the_paper():
    s = WarmupExponentialLR()
    assert s.factor(0) == pytest.approx(0.01)
    assert s.factor(50) == pytest.approx(0.505)
    assert s.factor(100) == pytest.approx(1.0)
    assert s.factor(10400) > 0.05 and s.factor(10520) == 0.05 == s.factor(10**6)


def test_bad_train_inputs(tmp_path):
    with pytest.raises(ValueError, match="no healthy"):
        next(train(TrainConfig(out=str(tmp_path / "r"), device="cpu")))
    with pytest.raises(ValueError, match="frame"):
        next(train(_config(tmp_path, frame=(64, 64)), collection=_collection()))
    with pytest.raises(ValueError, match="2D but dims = 3"):
        next(train(_config(tmp_path, dims=3), collection=_collection()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu(tmp_path):
    with pytest.raises(ValueError, match="no CUDA GPU"):
        next(train(_config(tmp_path, device="cuda"), collection=_collection()))


# --------------------------------------------------------------------------- config


def test_config_json_roundtrip_and_resolve(tmp_path):
    cfg = TrainConfig(
        healthy=["a.nii.gz"], frame="80,112,80", fold="2", preset="light", recipe="paper"
    )
    assert cfg.frame == (80, 112, 80) and cfg.fold == 2
    assert TrainConfig.from_json(text=cfg.to_json()) == cfg
    r = cfg.resolve(3, "mri", (80, 112, 80))
    assert (r.batch_size, r.lr, r.max_push, r.flip) == (8, 1e-3, 5.0, True)
    assert r.model_kwargs() == {
        "dims": 3,
        "frame": (80, 112, 80),
        "base_features": 16,
        "max_features": 160,
        "depth": 5,
        "pos_encoding": True,
    }
    assert (r.max_steps, r.lr_schedule, r.warmup_steps, r.val_interval) == (
        20000,
        "paper",
        100,
        250,
    )
    paper = TrainConfig(recipe="paper")
    x = paper.resolve(2, "cxr", (256, 256))
    assert (x.batch_size, x.lr, x.max_push, x.flip, x.depth) == (50, 5e-3, 10.0, False, 7)
    # the depth follows the frame when the preset's does not divide it
    assert paper.resolve(2, "mri", (112, 80)).depth == 5
    # ... and when the bottleneck would shrink to a single voxel (64 / 2**6 = 1)
    assert paper.resolve(2, "mri", (64, 64)).depth == 6
    r.to_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == r


def test_config_from_toml_and_args(tmp_path):
    (tmp_path / "run.toml").write_text(
        'healthy = ["scans"]\ntrain-tasks = 2\n[model]\npreset = "light"\n'
        "[training]\nmax_steps = 99\nlr = 2e-3\n"
    )
    cfg = TrainConfig.from_toml(tmp_path / "run.toml")
    assert cfg.healthy == (str(tmp_path / "scans"),) and cfg.train_tasks == 2
    assert (cfg.preset, cfg.max_steps, cfg.lr) == ("light", 99, 2e-3)
    ns = argparse.Namespace(
        command="train",
        func=None,
        config=str(tmp_path / "run.toml"),
        healthy=None,
        max_steps=5,
        fold=None,
        resume=False,
        seed=None,
    )
    merged = TrainConfig.from_args(ns)
    assert (merged.max_steps, merged.lr, merged.resume) == (5, 2e-3, False)
    # the task parameters go from the file to the synthesis, fold_steps too
    (tmp_path / "tasks.toml").write_text(
        "min_size = 0.02\nmax_anomalies = 2\n[fold_steps]\n3 = 40\n"
    )
    tasks = TrainConfig.from_toml(tmp_path / "tasks.toml")
    assert tasks.task_params()["min_size"] == 0.02 and tasks.task_params()["max_anomalies"] == 2
    assert tasks.steps_of(3) == 40 and tasks.steps_of(0) is None
    with pytest.raises(ValueError, match="min_size"):
        TrainConfig(min_size=0.9)
    (tmp_path / "bad.toml").write_text("learning_rate = 1\n")
    with pytest.raises(ValueError, match=r"bad\.toml.*unknown setting.*learning_rate"):
        TrainConfig.from_toml(tmp_path / "bad.toml")
    (tmp_path / "broken.toml").write_text("lr = = 1\n")
    with pytest.raises(ValueError, match=r"broken\.toml.*not valid TOML"):
        TrainConfig.from_toml(tmp_path / "broken.toml")


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"train_tasks": 5}, "train_tasks"),
        ({"fold": 5}, "0..4"),
        ({"train_tasks": 2, "fold": 10}, "0..9"),
        ({"fold": "first"}, "fold"),
        ({"max_steps": 0}, "max_steps"),
        ({"device": "tpu"}, "device"),
        ({"dims": 4}, "dims"),
        ({"frame": (4, 4)}, "frame"),
        ({"frame": "80;112"}, "frame"),
        ({"dims": 3, "frame": (64, 64)}, "one size per spatial axis"),
        ({"preset": "huge"}, "preset"),
        ({"lr": -1.0}, "lr"),
        ({"max_push": 0.1}, "max_push"),
        ({"lr_decay": 1.5}, "lr_decay"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)
    with pytest.raises(ValueError, match="unknown setting"):
        TrainConfig().replace(learning_rate=1)


def test_resume_with_more_steps_extends_a_finished_fold(tmp_path):
    col = _collection()
    _run(train(_config(tmp_path, max_steps=3), collection=col))
    events, result = _run(train(_config(tmp_path, max_steps=6, resume=True), collection=col))
    assert [e.step for e in events if isinstance(e, StepEvent)] == [4, 5, 6]
    # resuming a finished fold with the same budget trains nothing more
    events, _ = _run(train(_config(tmp_path, max_steps=6, resume=True), collection=col))
    assert not [e for e in events if isinstance(e, StepEvent)]
    assert torch.load(tmp_path / "run" / "fold_0" / "last.pt", weights_only=True)["step"] == 6


class _Exploding(_Constant):
    def forward(self, x):
        return x * 0 + self.p * float("nan")


def test_divergence_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="diverged at step 1.*lower the learning rate"):
        _run(
            train(
                _config(tmp_path), collection=_collection(), model_factory=lambda c, s: _Exploding()
            )
        )


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path):
    from napari_mtml.training.checkpoint import load_checkpoint, save_atomic

    path = tmp_path / "last.pt"
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails mid-write
        save_atomic({"step": 2, "bad": lambda: 0}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    path.write_bytes(b"torn")
    with pytest.raises(ValueError, match=r"last\.pt: not a loadable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "best.pt")


class _OutOfMemory(_Constant):
    def forward(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_suggests_a_smaller_batch(tmp_path):
    from napari_mtml.training import TrainingOutOfMemory

    with pytest.raises(TrainingOutOfMemory, match="smaller --batch-size or --preset light"):
        _run(
            train(
                _config(tmp_path),
                collection=_collection(),
                model_factory=lambda c, s: _OutOfMemory(),
            )
        )


def test_a_3d_cpu_fold_keeps_freed_memory_while_it_trains(tmp_path, monkeypatch):
    from napari_mtml import heap

    seen = []

    class Lib:
        def mallopt(self, param, value):
            seen.append(("mallopt", param, value))

        def malloc_trim(self, pad):
            seen.append(("trim", pad))

    monkeypatch.setattr(heap, "_libc_cache", [Lib()])
    monkeypatch.delenv("MTML_KEEP_FREED", raising=False)
    cfg = _config(tmp_path, max_steps=2, val_interval=2, batch_size=2)
    gen = train(cfg, collection=_collection((16, 16, 16), n=10))
    inside = []
    for event in gen:
        if isinstance(event, StepEvent):
            inside.append(heap._depth)
    assert inside == [1, 1]  # on during every step
    assert seen[0] == ("mallopt", heap._M_MMAP_MAX, 0) and seen[-1] == ("trim", 0)
    assert heap._depth == 0
    # a 2D fold leaves the allocator alone
    seen.clear()
    cfg2 = _config(tmp_path / "2d", max_steps=2, val_interval=2, batch_size=2)
    _run(train(cfg2, collection=_collection((32, 32), n=10)))
    assert seen == []


@pytest.mark.parametrize("flag", ["1", "0"])
def test_a_fold_trains_channels_last_where_the_rule_says(tmp_path, monkeypatch, flag):
    """`devices.training_channels_last` reaches the fold's model (and the budget warm-up's):
    its 2D weights are channels-last while it trains; the checkpoint predicts like any other."""
    from napari_mtml.inference import load_ensemble
    from napari_mtml.model import UNet

    monkeypatch.setenv("MTML_CHANNELS_LAST", flag)
    seen = []

    def factory(cfg, seed):
        net = UNet(**cfg.model_kwargs(), init_seed=seed)

        def hook(module, args):
            if module.training:
                w = next(p for p in module.parameters() if p.ndim == 4 and p.shape[1] > 1)
                seen.append(w.is_contiguous(memory_format=torch.channels_last))
                seen.append(not w.is_contiguous())

        net.register_forward_pre_hook(hook)
        return net

    _run(train(_config(tmp_path, max_steps=3), collection=_collection(), model_factory=factory))
    assert seen and all(s == (flag == "1") for s in seen)
    ens = load_ensemble(tmp_path / "run", device="cpu", folds="available")
    image = np.pad(np.ones((24, 24), np.float32), 4)
    heat = ens.predict_array(image + 0.01 * np.arange(32)).anomaly
    assert heat.shape == (32, 32) and np.isfinite(heat).all() and 0 <= heat.min() <= heat.max() <= 1
