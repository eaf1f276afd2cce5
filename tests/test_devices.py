"""napari_mtml.devices: the thread rule, device choice, per-device model set-up."""

from __future__ import annotations

import pytest
import torch

from napari_mtml import devices
from napari_mtml.model import UNet


@pytest.mark.parametrize(
    ("cores", "workers", "busy", "expected"),
    [
        (2, 0, 0.0, 2),
        (2, 0, 1.0, 1),
        (2, 1, 0.0, 1),
        (2, 2, 0.0, 1),
        (8, 2, 0.0, 6),
        (8, 2, 2.6, 3),
        (8, 0, 0.4, 8),
        (8, 0, 0.5, 7),
        (1, 0, 3.0, 1),
        (16, 15, 4.0, 1),
    ],
)
def test_thread_rule(cores, workers, busy, expected):
    assert devices.torch_thread_count(workers, cores=cores, busy=busy) == expected


def test_thread_rule_rejects_negative_workers():
    with pytest.raises(ValueError, match="workers"):
        devices.torch_thread_count(-1, cores=2, busy=0)


def test_busy_and_cores_are_sane():
    assert 1 <= devices.available_cores() <= (torch.get_num_threads() + 1024)
    assert devices.busy_cores_elsewhere(window=0.05) >= 0.0


def test_apply_thread_rule_precedence(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MTML_THREADS", "1")
        assert devices.apply_thread_rule(0) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("MTML_THREADS", "zero")
        with pytest.raises(ValueError, match="MTML_THREADS"):
            devices.apply_thread_rule(0)
        monkeypatch.delenv("MTML_THREADS")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert devices.apply_thread_rule(5) == 1  # OMP_NUM_THREADS set: torch's own kept
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(devices, "torch_thread_count", lambda workers: 1 + workers)
        assert devices.apply_thread_rule(0) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_thread_watch_follows_the_load_without_sleeping(monkeypatch):
    """Another job taking both cores mid-fold drops torch to 1 thread; when it ends, back to
    every core. The load comes from /proc/stat differences between checks (faked here)."""
    for var in ("MTML_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    clock, machine, own = [0.0], [(0, 0)], [0.0]
    monkeypatch.setattr(devices.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(devices, "_cpu_times", lambda: machine[0])
    monkeypatch.setattr(devices, "_own_cpu_seconds", lambda: own[0])
    monkeypatch.setattr(devices, "available_cores", lambda: 2)
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(devices.time, "sleep", lambda s: pytest.fail("ThreadWatch slept"))
    before = torch.get_num_threads()
    try:
        watch = devices.ThreadWatch(workers=0, every_s=5.0)
        assert watch.active
        clock[0] = 1.0
        assert watch.check() is None  # not due yet
        # 5 s: the machine fully busy (2 cores x 5 s = 1000 of 1000 jiffies), this process 1
        # core of it: another process keeps one core busy -> 2 - 1 = 1 thread
        clock[0], machine[0], own[0] = 5.0, (1000, 1000), 5.0
        assert watch.check() == 1 and torch.get_num_threads() == 1
        # 5 s more, only this process busy (one core): nothing elsewhere -> 2 threads
        clock[0], machine[0], own[0] = 10.0, (1500, 2000), 10.0
        assert watch.check() == 2 and torch.get_num_threads() == 2
        # a pinned count stays pinned
        monkeypatch.setenv("MTML_THREADS", "1")
        assert not devices.ThreadWatch(workers=0).active
        monkeypatch.delenv("MTML_THREADS")
        assert not devices.ThreadWatch(workers=2).active  # workers: the fold-start rule stands
    finally:
        torch.set_num_threads(before)


def test_old_import_paths_still_work():
    from napari_mtml.inference import resolve_device
    from napari_mtml.training.trainer import pick_device

    assert resolve_device is devices.resolve_device and pick_device is devices.pick_device
    assert devices.resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device"):
        devices.resolve_device("quantum")


def test_cpu_autocast_follows_the_cpu_and_the_variable(monkeypatch):
    monkeypatch.delenv("MTML_CPU_BF16", raising=False)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert devices.autocast_dtype("cpu") is None  # emulated bf16 would be slower
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert devices.autocast_dtype("cpu") is torch.bfloat16
    monkeypatch.setenv("MTML_CPU_BF16", "0")
    assert devices.autocast_dtype("cpu") is None
    monkeypatch.setenv("MTML_CPU_BF16", "1")
    assert devices.autocast_dtype("cpu") is torch.bfloat16
    monkeypatch.setenv("MTML_CPU_BF16", "yes")
    with pytest.raises(ValueError, match="MTML_CPU_BF16"):
        devices.autocast_dtype("cpu")
    assert devices.autocast_dtype(torch.device("meta")) is None


def test_channels_last_3d_same_function():
    net = UNet(3, (16, 16, 16), base_features=4, depth=3, max_features=8, init_seed=0).eval()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = net(x)
    devices.prepare_model_for_device(net, "cpu")  # the CPU keeps the default layout
    assert net.encoder[1][0].conv.weight.is_contiguous()
    devices.prepare_model_for_device(net, "cpu", channels_last=True)
    assert net.encoder[1][0].conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        got = net(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    net2d = UNet(2, (16, 16), base_features=4, depth=3, max_features=8, init_seed=0)
    devices.prepare_model_for_device(net2d, "cpu")  # 2D keeps the default layout
    assert net2d.encoder[1][0].conv.weight.is_contiguous()


def test_uninitialised_unet_loads_the_same_model():
    ref = UNet(2, (32, 32), base_features=4, depth=3, max_features=8, init_seed=3)
    empty = UNet(2, (32, 32), base_features=4, depth=3, max_features=8, initialise=False)
    assert all(p.device.type == "cpu" for p in empty.parameters())
    empty.load_state_dict(ref.state_dict())
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(empty(x), ref(x))


def test_compile_model_falls_back_cleanly(monkeypatch):
    net = torch.nn.Linear(2, 2)
    monkeypatch.delattr(torch, "compile")
    model, reason = devices.compile_model(net)
    assert model is net and "torch.compile" in reason


def test_training_channels_last_follows_the_cpu_the_dims_and_the_variable(monkeypatch):
    """Channels-last training: 2D models on a bf16 CPU without AMX (measured faster there,
    slower with AMX); never 3D, float32 CPUs or GPUs; MTML_CHANNELS_LAST forces it."""
    monkeypatch.delenv("MTML_CHANNELS_LAST", raising=False)
    monkeypatch.delenv("MTML_CPU_BF16", raising=False)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: False)
    rule = devices.training_channels_last
    assert rule("cpu", 2) and rule(torch.device("cpu"), 2)
    assert not rule("cpu", 3) and not rule("cpu", None) and not rule("cuda", 2)
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: True)
    assert not rule("cpu", 2)
    monkeypatch.setattr(devices, "cpu_has_amx", lambda: False)
    monkeypatch.setenv("MTML_CPU_BF16", "0")  # float32 training
    assert not rule("cpu", 2)
    monkeypatch.setenv("MTML_CHANNELS_LAST", "1")
    assert rule("cpu", 2) and not rule("cpu", 3)
    monkeypatch.delenv("MTML_CPU_BF16")
    monkeypatch.setenv("MTML_CHANNELS_LAST", "0")
    assert not rule("cpu", 2)
    monkeypatch.setenv("MTML_CHANNELS_LAST", "yes")
    with pytest.raises(ValueError, match="MTML_CHANNELS_LAST"):
        rule("cpu", 2)


def test_cpu_flags_read_amx_and_bf16(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nflags : fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    real = devices.Path

    def fake_path(p):
        return info if str(p) == "/proc/cpuinfo" else real(p)

    monkeypatch.setattr(devices, "Path", fake_path)
    assert devices.cpu_has_amx() and devices.cpu_supports_bf16()
    info.write_text("processor : 0\nflags : fpu avx512f avx512_bf16\n")
    assert not devices.cpu_has_amx() and devices.cpu_supports_bf16()
    info.write_text("processor : 0\nflags : fpu avx2\n")
    assert not devices.cpu_has_amx() and not devices.cpu_supports_bf16()
