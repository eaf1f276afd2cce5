"""The run folder's bookkeeping: what `train` writes besides the weights, and what it checks
before it trains again in a folder.

```
RUN/config.json        the resolved TrainConfig
RUN/folds.json         the task and data split of every fold
RUN/fold_K/last.pt     resumable state (checkpoint.py), written at every validation
RUN/fold_K/best.pt     the selected weights
RUN/fold_K/log.jsonl   one JSON line per step and per validation
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from napari_mtml.anomalies import TASKS
from napari_mtml.config import TrainConfig
from napari_mtml.data import HealthyCollection
from napari_mtml.files import write_atomic
from napari_mtml.training.crossval import FoldSplit, task_folds

__all__ = [
    "FoldPaths",
    "RESUMABLE_CHANGES",
    "check_resumable",
    "prepare_run_dir",
    "task_names",
    "truncate_log",
]

#: Settings that may change between a run and its resumption without changing what is trained.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "device",
        "workers",
        "max_steps",
        "fold",
        "patience",
        "val_interval",
        "time_budget",
        "plan",
        "fold_steps",
    }
)


@dataclass(frozen=True)
class FoldPaths:
    """The files of fold `index` of the run in `run_dir` (`FoldPaths.of(run_dir, index)`)."""

    index: int
    folder: Path
    last: Path
    best: Path
    log: Path
    config: Path

    @classmethod
    def of(cls, run_dir: Path, index: int) -> FoldPaths:
        folder = Path(run_dir) / f"fold_{index}"
        return cls(
            index,
            folder,
            last=folder / "last.pt",
            best=folder / "best.pt",
            log=folder / "log.jsonl",
            config=Path(run_dir) / "config.json",
        )


def task_names(ids) -> tuple[str, ...]:
    """The names of task ids (`napari_mtml.anomalies.TASKS`).

    Parameters
    ----------
    ids : iterable of int

    Returns
    -------
    tuple of str

    Examples
    --------
    >>> task_names([2, 0])
    ('sink', 'intra_blend')
    """
    return tuple(TASKS[int(t)] for t in ids)


def prepare_run_dir(
    run_dir: Path, cfg: TrainConfig, splits: list[FoldSplit], collection: HealthyCollection
) -> None:
    """Create `run_dir` and write `config.json` and `folds.json`, after checking that the
    folder may be trained in: a resumed run must keep its settings (but `RESUMABLE_CHANGES`)
    and every fold's `last.pt` (`check_resumable`); a new run must not overwrite a fold's
    training.

    Parameters
    ----------
    run_dir : Path
    cfg : TrainConfig
        Resolved.
    splits : list of FoldSplit
        The folds to train.
    collection : HealthyCollection
        The data (its names go to folds.json).

    Raises
    ------
    ValueError
        Naming the file and what to do.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.json"
    if cfg.resume and cfg_path.is_file():
        saved = TrainConfig.from_json(cfg_path).to_dict()
        now = cfg.to_dict()
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
        if changed:
            raise ValueError(
                f"{cfg_path}: cannot resume, these settings differ from the saved "
                f"run: {', '.join(changed)}; use the same settings or a new --out"
            )
    if cfg.resume:
        check_resumable(run_dir, splits)
    if not cfg.resume:
        for s in splits:
            if FoldPaths.of(run_dir, s.index).last.exists():
                raise ValueError(
                    f"{run_dir / f'fold_{s.index}'}: already holds a training; pass "
                    "--resume to continue it or choose another --out"
                )
    cfg.to_json(cfg_path)
    folds = []
    for s in task_folds(cfg.train_tasks):
        d = s.to_dict()
        d["train_task_names"] = list(task_names(s.train_tasks))
        d["val_task_names"] = list(task_names(s.val_tasks))
        d["train_data"] = collection.names(s.train_data)
        d["val_data"] = collection.names(s.val_data)
        folds.append(d)
    doc = {
        "train_tasks": cfg.train_tasks,
        "n_folds": cfg.n_folds,
        "split_by": collection.split_by,
        "data_folds": {str(k): collection.names([k]) for k in range(5)},
        "folds": folds,
    }
    write_atomic(run_dir / "folds.json", json.dumps(doc, indent=2) + "\n")


def check_resumable(run_dir: Path, splits: list[FoldSplit]) -> None:
    """`--resume` continues from each fold's last.pt; a fold that has a best.pt but lost its
    last.pt would silently restart at step 0 and overwrite that best.pt: refuse, naming the file.
    A fold with no checkpoint at all (not started, or stopped before its first validation)
    starts from scratch.

    Parameters
    ----------
    run_dir : Path
    splits : list of FoldSplit
        The folds to train.

    Raises
    ------
    ValueError
        Naming the missing last.pt.
    """
    for s in splits:
        paths = FoldPaths.of(run_dir, s.index)
        if paths.best.exists() and not paths.last.is_file():
            raise ValueError(
                f"{paths.last}: missing, but the fold has a best.pt; "
                "cannot resume this fold (restore last.pt, or move the fold's "
                "folder away to train it again from scratch)"
            )


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of a fold's `log.jsonl` up to `step` (a resumed fold goes on from its
    last.pt; step 0: a fresh start). Lines torn by a hard kill or not JSON are dropped.

    Parameters
    ----------
    path : Path
        A fold's log.jsonl (nothing happens when it is missing).
    step : int
    """
    if not path.is_file():
        return
    keep = []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("step", 0) <= step:
                keep.append(line)
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError):
            continue  # a line torn by a hard kill, or bytes that are not a log line
    write_atomic(path, "".join(f"{line}\n" for line in keep))
