"""Where the models run: device choice, torch's CPU thread count, and per-device model set-up.

Device choice
    `pick_device` (training: ``"auto"`` = CUDA > MPS > CPU, with a notice when it falls back to
    the CPU) and `resolve_device` (inference, the same order, no notice). An explicit device
    that is not available is a `ValueError`.

The thread rule (`torch_thread_count`, applied by `apply_thread_rule`)
    torch's intra-op threads = the cores this process may use, minus the data-loader workers
    (each runs its anomaly synthesis on one core), minus the cores other processes keep busy
    right now; at least 1::

        threads = max(1, cores - workers - busy_elsewhere)

    ``cores`` is the CPUs this process is allowed on (its affinity mask, capped by a cgroup CPU
    quota, e.g. a container's ``--cpus``); ``busy_elsewhere`` is the CPU time other processes
    used over a short window (``/proc/stat`` on Linux, sampled for 0.2 s; 0 where it cannot be
    read), rounded to whole cores.

    Why: torch's OpenMP threads meet at a barrier after every operation, so one thread that
    shares its core with another busy process holds all of them back; on 2 cores a training
    step with 2 threads ran 5-10x slower beside another busy process than with 1 thread
    (benchmarks/bench_training.py --contention). Giving the threads only the cores nobody else
    uses keeps the step rate close to the free share of the machine.

    Precedence: ``MTML_THREADS`` (a positive integer) wins; otherwise, when ``OMP_NUM_THREADS``
    is set, torch's own setting from it is kept; otherwise the rule. The CLI and the training
    generator apply it at the start of every fold (so a long run follows the machine's load
    fold by fold), inference when it loads an ensemble.

Model set-up for a device (`prepare_model_for_device`, `autocast_dtype`, `compile_model`)
    Measured on CPU (benchmarks/bench_training.py --variants, benchmarks/bench_inference.py):
    channels-last pays for 3D forward passes (~1.2x), not for the 2D training step (0.98x);
    torch.compile gave the demo step nothing (1.01x) after minutes of compiling, so nothing
    compiles by default; bf16 autocast gave 1.6-1.8x on a CPU with AMX (2x in a whole
    quality_unseen run, same AP), so it is on where the CPU has native bf16
    (``MTML_CPU_BF16=0`` turns it off).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "apply_thread_rule",
    "ThreadWatch",
    "autocast_dtype",
    "available_cores",
    "compile_model",
    "busy_cores_elsewhere",
    "cpu_supports_bf16",
    "device_choices",
    "DeviceChoices",
    "pick_device",
    "prepare_model_for_device",
    "training_channels_last",
    "cpu_has_amx",
    "resolve_device",
    "with_device_recipe",
    "torch_thread_count",
]

CPU_NOTICE = (
    "no GPU found: training on the CPU (recipe 'auto' picks the small CPU recipe; "
    "--time plans the steps to a budget)"
)


# ------------------------------------------------------------------------------------ devices


def _auto_kind() -> str:
    """The device type "auto" means on this machine: CUDA, else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if _mps_available():
        return "mps"
    return "cpu"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` -> CUDA if available, else Apple MPS if available, else CPU; others as given.

    Parameters
    ----------
    device : str or torch.device

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        A device name torch does not know, or one that is not available here.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device(_auto_kind())
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} requested but torch sees no CUDA GPU; use --device cpu or auto"
        )
    if dev.type == "mps" and not _mps_available():
        raise ValueError(
            f"device {device!r} requested but it is not available; use --device cpu or auto"
        )
    return dev


def with_device_recipe(config):
    """`config` (a `TrainConfig`) with the recipe of the device it names filled in, as `train`
    will resolve it (`TrainConfig.with_recipe`): what a message before training can show (the
    split, the number of models). A device name torch does not know or cannot use leaves
    `config` as it is; `train` raises on it with the reason.

    Examples
    --------
    >>> from napari_mtml.config import TrainConfig
    >>> with_device_recipe(TrainConfig(device="cpu")).resolved_recipe
    'small'
    """
    try:
        return config.with_recipe(resolve_device(config.device).type)
    except ValueError:
        return config


def pick_device(name: str = "auto", local_rank: int = 0) -> tuple[torch.device, str | None]:
    """The torch device for `name` (`resolve_device`: "auto" = cuda > mps > cpu) and a notice
    when auto falls back to the CPU. An explicit device that is not available raises
    `ValueError`.

    ``local_rank`` picks the GPU of a distributed rank (``cuda`` and ``auto`` on CUDA).

    Parameters
    ----------
    name : str
        "auto", "cpu", "cuda", "cuda:N" or "mps".
    local_rank : int
        The distributed rank's local index.

    Returns
    -------
    device : torch.device
    notice : str or None
        Said when auto falls back to the CPU.

    Raises
    ------
    ValueError
        An explicit device that is not available.
    """
    dev = resolve_device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    auto = str(name).strip().lower() == "auto"
    return dev, (CPU_NOTICE if auto and dev.type == "cpu" else None)


@dataclass(frozen=True)
class DeviceChoices:
    """What a device menu offers on this machine: `names` ("auto", "cpu", then "cuda",
    "cuda:1", ... or "mps"), `auto` (the device type "auto" picks) and a `note` for the user
    that says what auto picks; `cpu_only` when that is the CPU (training there is slow)."""

    names: tuple[str, ...]
    auto: str
    note: str

    @property
    def cpu_only(self) -> bool:
        return self.auto == "cpu"


def device_choices() -> DeviceChoices:
    """The `DeviceChoices` of this machine (the widgets' device menus)."""
    kind = _auto_kind()
    names = ["auto", "cpu"]
    if kind == "cuda":
        names += ["cuda"] + [f"cuda:{i}" for i in range(1, torch.cuda.device_count())]
        note = f"auto = cuda ({torch.cuda.get_device_name(0)})"
    elif kind == "mps":
        names.append("mps")
        note = "auto = mps (Apple GPU)"
    else:
        note = (
            "No GPU found (CUDA or MPS): training falls back to the CPU, where the 'auto' "
            "recipe trains the small CPU model; give it minutes, not seconds."
        )
    return DeviceChoices(tuple(names), kind, note)


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


# ------------------------------------------------------------------------------------ threads


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by a cgroup v2 (``cpu.max``) or v1 (``cpu.cfs_quota_us``) quota, or None."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _own_cpu_seconds() -> float:
    """CPU seconds used by this process (all its threads) and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


#: (monotonic time, value) of the last measurement, reused for `_BUSY_REUSE_S` seconds: folds of
#: a small run (and tests) start in quick succession
_busy_memo: tuple[float, float] | None = None
_BUSY_REUSE_S = 10.0


def busy_cores_elsewhere(window: float = 0.2) -> float:
    """How many cores other processes kept busy over the last ``window`` seconds.

    Machine-wide busy time from /proc/stat minus this process's own, in cores (0 where
    /proc/stat is unavailable, e.g. macOS and Windows). Sleeps ``window`` seconds, unless a
    measurement of the last 10 s can be reused.

    Parameters
    ----------
    window : float
        Seconds to measure over.

    Returns
    -------
    float
    """
    global _busy_memo
    now = time.monotonic()
    if _busy_memo is not None and now - _busy_memo[0] < _BUSY_REUSE_S:
        return _busy_memo[1]
    value = _measure_busy(window)
    _busy_memo = (time.monotonic(), value)
    return value


def _measure_busy(window: float) -> float:
    first = _cpu_times()
    if first is None:
        return 0.0
    own0, t0 = _own_cpu_seconds(), time.monotonic()
    time.sleep(window)
    second = _cpu_times()
    own1, t1 = _own_cpu_seconds(), time.monotonic()
    busy = _busy_between(first, own0, t0, second, own1, t1)
    return 0.0 if busy is None else busy


def _busy_between(first, own0: float, t0: float, second, own1: float, t1: float) -> float | None:
    """Cores other processes kept busy between two samples of (`_cpu_times()`,
    `_own_cpu_seconds()`, `time.monotonic()`); None when the machine's counters say nothing."""
    if first is None or second is None or second[1] <= first[1]:
        return None
    ncpu = os.cpu_count() or 1
    busy_fraction = (second[0] - first[0]) / (second[1] - first[1])
    elsewhere = busy_fraction * ncpu - (own1 - own0) / max(t1 - t0, 1e-6)
    return max(0.0, elsewhere)


def torch_thread_count(
    workers: int = 0, *, cores: int | None = None, busy: float | None = None
) -> int:
    """The thread rule: ``max(1, cores - workers - round(busy))`` (see the module docstring).

    Parameters
    ----------
    workers : data-loader worker processes of this run (each keeps one core busy).
    cores : CPUs this process may use (default `available_cores()`).
    busy : cores other processes keep busy (default `busy_cores_elsewhere()`, 0.2 s to measure).
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    cores = available_cores() if cores is None else int(cores)
    busy = busy_cores_elsewhere() if busy is None else float(busy)
    # a core counts as taken from 0.5 of it on: one thread that shares a core stalls the rest
    return max(1, cores - int(workers) - int(math.floor(busy + 0.5)))


def _env_threads() -> int | None:
    value = os.environ.get("MTML_THREADS", "").strip()
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"MTML_THREADS={value!r}: give a positive number of threads")
    return n


def apply_thread_rule(workers: int = 0, device: torch.device | str | None = None) -> int:
    """Set torch's intra-op thread count by the rule and return it.

    ``MTML_THREADS`` wins; with ``OMP_NUM_THREADS`` set, torch's current setting is kept;
    otherwise `torch_thread_count(workers)`. On a GPU the same rule applies (the CPU threads
    then mostly feed the device).

    Parameters
    ----------
    workers : int
        Data loader worker processes.
    device : torch.device or str, optional

    Returns
    -------
    int
        The thread count set.

    Raises
    ------
    ValueError
        A malformed ``MTML_THREADS``.
    """
    del device  # the rule is the same everywhere; kept for callers that pass it
    forced = _env_threads()
    if forced is not None:
        n = forced
    elif os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    else:
        n = torch_thread_count(workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


class ThreadWatch:
    """The thread rule applied again during a long loop, without sleeping to measure.

    `apply_thread_rule` measures the load once, at a fold's start; a job that starts later on
    the same cores then meets torch threads that wait for each other behind it (a 2-core run
    went 4.7x slower than planned). `check()`, called after every step, measures how many
    cores other processes kept busy since its last measurement (at most every `every_s`
    seconds, from /proc/stat: no sleep) and sets torch's threads by the rule, up or down.
    ``MTML_THREADS`` or ``OMP_NUM_THREADS`` set: it does nothing (a pinned count stays pinned,
    e.g. for bit-identical reruns).

    Parameters
    ----------
    workers : int
        Data loader worker processes (their own CPU time counts as busy elsewhere while they
        run, so only ``workers == 0`` is watched; with workers the fold-start rule stands).
    every_s : float
        Seconds between measurements.

    Examples
    --------
    >>> watch = ThreadWatch(workers=0, every_s=5.0)
    >>> watch.check() is None   # too soon after the start: nothing measured yet
    True
    """

    def __init__(self, workers: int = 0, every_s: float = 5.0) -> None:
        pinned = _env_threads() is not None or bool(os.environ.get("OMP_NUM_THREADS", "").strip())
        self._mark = (_cpu_times(), _own_cpu_seconds(), time.monotonic())
        self.active = workers == 0 and not pinned and self._mark[0] is not None
        self.workers = int(workers)
        self.every_s = float(every_s)

    def check(self) -> int | None:
        """The thread count set when a measurement was due (else None)."""
        if not self.active:
            return None
        now = time.monotonic()
        first, own0, t0 = self._mark
        if now - t0 < self.every_s:
            return None
        second, own1 = _cpu_times(), _own_cpu_seconds()
        self._mark = (second, own1, now)
        busy = _busy_between(first, own0, t0, second, own1, now)
        if busy is None:
            return None
        n = torch_thread_count(self.workers, busy=busy)
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        return n


# ------------------------------------------------------------------------------ model set-up


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16), where
    oneDNN runs bf16 convolutions faster than float32; elsewhere bf16 is emulated and slower."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles for bf16 (Intel Sapphire Rapids and later)."""
    return "amx_bf16" in _cpu_flags()


def training_channels_last(device: torch.device | str, dims: int | None) -> bool:
    """Whether a training fold runs its U-Net channels-last (`torch.channels_last`).

    Yes for 2D models on a CPU training in bf16 autocast (`autocast_dtype`) without AMX: there
    oneDNN's bf16 kernels for the small recipe's narrow layers (8-16 channels at full size) run
    faster on channels-last activations. Measured on a 2-core AVX512-BF16 CPU (AMD EPYC, no
    AMX): the demo U-Net's step 1.19x faster than bf16 alone (`python
    benchmarks/bench_training.py --variants --threads 2 --cases demo`: 11.82 against 9.91
    steps/s), and in real folds of the small recipe on the unseen-lesion benchmark's 16 volumes
    (`mtml train DIR --max-steps 500 --fold 0`, alternated twice) 7.09 / 7.77 against 5.93 /
    6.66 steps/s. On a 2-core AMX CPU it was slower (0.92x of bf16 alone), so AMX CPUs, float32
    CPUs, 3D models and GPUs keep the default layout. ``MTML_CHANNELS_LAST=1`` / ``=0`` forces
    it on / off. The rule is per machine, so a replay (`--max-steps`) on the same machine trains
    the same layout.
    """
    import os

    flag = os.environ.get("MTML_CHANNELS_LAST", "").strip()
    if flag in ("0", "1"):
        return flag == "1" and dims == 2
    if flag:
        raise ValueError(f"MTML_CHANNELS_LAST={flag!r}: use 1 (channels-last training) or 0")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    return dev.type == "cpu" and dims == 2 and autocast_dtype(dev) is not None and not cpu_has_amx()


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The training autocast dtype on ``device``, or None for plain float32.

    CUDA: bf16. CPU: bf16 where the CPU has native bf16 instructions (`cpu_supports_bf16`:
    AVX512-BF16 or AMX), float32 elsewhere (emulated bf16 is slower); ``MTML_CPU_BF16=0``
    forces float32, ``=1`` forces bf16. Measured on a 2-core AMX machine
    (benchmarks/quality_unseen.py, 300 steps per fold, the same seed): the small recipe ran at
    0.31 s/step in bf16 against 0.63 s/step in float32, and pixel AP on unseen lesions 0.022
    against 0.013 (no loss) -- twice the steps in a time budget. MPS: None.

    Parameters
    ----------
    device : torch.device or str

    Returns
    -------
    torch.dtype or None
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type == "cuda":
        return torch.bfloat16
    if dev.type != "cpu":
        return None
    flag = os.environ.get("MTML_CPU_BF16", "").strip()
    if flag == "1":
        return torch.bfloat16
    if flag == "0":
        return None
    if flag:
        raise ValueError(f"MTML_CPU_BF16={flag!r}: use 1 (bf16 autocast on the CPU) or 0")
    return torch.bfloat16 if cpu_supports_bf16() else None


def prepare_model_for_device(
    model: torch.nn.Module, device: torch.device | str, *, channels_last: bool | None = None
) -> torch.nn.Module:
    """Move ``model`` to ``device`` in the memory format that runs fastest there; returns it.

    ``channels_last`` None (default) = on for 3D models on CUDA, off otherwise. Measured on a
    quiet 2-core CPU (oneDNN, `python benchmarks/bench_inference.py --threads 2`, interleaved):
    5-fold 3D prediction took 21.0 s channels-last against 16.2 s in the default layout with
    the paper U-Net, 7.7 s against 7.3 s with the light one (an earlier ~1.2x gain was measured
    on a loaded machine and did not hold), and for the 2D float32 training step it made no
    difference (bench_training.py --variants: 0.98x); so CPUs keep the default layout here
    (2D training folds in bf16 follow `training_channels_last`). Inputs need not be
    converted: a convolution whose weights are channels-last gives channels-last activations.

    Parameters
    ----------
    model : torch.nn.Module
    device : torch.device or str
    channels_last : bool, optional

    Returns
    -------
    torch.nn.Module
        `model`, moved.
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if channels_last is None:
        channels_last = dev.type == "cuda" and _spatial_dims(model) == 3
    model.to(dev)
    if channels_last:
        dims = _spatial_dims(model)
        if dims == 2:
            model.to(memory_format=torch.channels_last)
        elif dims == 3:
            model.to(memory_format=torch.channels_last_3d)
    return model


def _spatial_dims(model: torch.nn.Module) -> int | None:
    dims = getattr(model, "dims", None)
    if dims in (2, 3):
        return int(dims)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            return 2
        if isinstance(m, torch.nn.Conv3d):
            return 3
    return None


def compile_model(model: torch.nn.Module):
    """``(torch.compile(model), None)``, or ``(model, reason)`` where compiling is unavailable
    (no compiler, an unsupported platform or torch version). Compiling itself happens on the
    first call; a caller should be ready for that call to fail too (see bench_training).

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    (model, reason)
        The compiled model and None, or the model itself and why it was not compiled.
    """
    compile_fn = getattr(torch, "compile", None)
    if compile_fn is None:
        return model, "torch.compile is not in this torch version"
    try:
        return compile_fn(model), None
    except Exception as exc:  # e.g. RuntimeError on an unsupported Python
        return model, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
