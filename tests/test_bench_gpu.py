"""benchmarks/bench_gpu.py: refuses clearly without CUDA; its --device cpu dry run works."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_refuses_without_cuda(monkeypatch, capsys):
    bench = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--device cpu" in err


def test_rejects_a_non_cuda_device(monkeypatch, capsys):
    bench = _load()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.main(["--device", "mps"]) == 2
    assert "cuda, cuda:N or cpu" in capsys.readouterr().err


def test_cpu_dry_run_prints_every_table(capsys, monkeypatch):
    monkeypatch.setenv("MTML_THREADS", "1")
    bench = _load()
    assert bench.main(["--device", "cpu", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| (\dD) [\dx]+ \| (.*)$", out, re.M)}
    assert set(rows) == {"2D", "3D"}
    for cells in rows.values():
        params, batch, steps, samples, memory, gflop, mfu, predict = (
            c.strip() for c in cells.strip(" |").split("|")
        )
        assert float(steps) > 0
        assert float(samples) == pytest.approx(float(steps) * int(batch), rel=0.05, abs=0.06)
        assert float(gflop) > 0 and float(predict) > 0
        assert memory == "n/a" and mfu == "n/a"  # no GPU: no peak memory, no peak FLOP/s
    loader = re.findall(r"^\| (\dD) \| 1 \| ([\d.]+) \| ([\d.]+) \|$", out, re.M)
    assert {r[0] for r in loader} == {"2D", "3D"} and all(float(r[1]) > 0 for r in loader)
    busy = re.findall(r"^\| (\dD) \| 1 \| ([\d.]+) \|$", out, re.M)
    assert {b[0] for b in busy} == {"2D", "3D"}
    assert all(0 < float(b[1]) <= 1.0 for b in busy)
    assert "dry run on the CPU" in out


def test_flops_are_counted_for_a_training_step():
    # the MFU estimate rests on FlopCounterMode seeing the convolutions of a training step
    bench = _load()
    dims, _, frame, batch, kwargs = bench.DRY["3D"]
    rate, peak, flops, n_params = bench.step_rate(
        dims, frame, batch, kwargs, torch.device("cpu"), 1
    )
    # the first conv alone (1 -> 4 channels, 3x3x3, every voxel) costs 2 x its MACs forward;
    # a whole step (forward + backward of every layer) must count several times more
    first_conv_flops = 2 * batch * 16**3 * 27 * 1 * 4
    assert flops > 3 * first_conv_flops and rate > 0 and peak is None and n_params > 0
