"""Checkpoints that are safe to load and never half-written.

Every file is written to a temporary name beside its target, flushed to disk, then moved into
place with `os.replace` (atomic on POSIX and Windows): a crash or a cancelled run leaves either
the previous checkpoint or the new one, never a torn file. Contents are tensors, plain containers,
numbers and strings only, so `torch.load(path, weights_only=True)` loads them without unpickling
arbitrary objects.

`best.pt`: `{"format", "model", "dims", "frame"}`: the model's `state_dict()` (keys without a
DDP `module.` prefix) and the dimensionality and input frame it was trained on (`frame_record`),
so that a run whose config.json was edited afterwards is refused rather than run on a frame the
model never saw. (Older runs hold the bare state dict; they load without that check.)
`last.pt`: a dict with `model`, `optimizer`, `scheduler` (plain dicts), `step`, `best_step`,
`best_val_loss`, `finished`, `stopped_early`, `rng` (`torch_cpu`, `torch_cuda` states and the
data stream position `{"seed", "rank", "world_size", "next_item"}`), `dims`, `frame` and
`format` (an int, 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from napari_mtml.files import write_atomic

__all__ = [
    "save_atomic",
    "load_checkpoint",
    "FORMAT_VERSION",
    "frame_record",
    "check_frame",
    "model_checkpoint",
]

FORMAT_VERSION = 1


def save_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj)` to `path` via a temporary file, `fsync` and `os.replace`
    (`napari_mtml.files.write_atomic`): an interrupted save keeps the old file.

    Parameters
    ----------
    obj
        What `torch.save` takes.
    path : str or Path

    Returns
    -------
    Path
    """
    return write_atomic(path, lambda fh: torch.save(obj, fh), durable=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with `weights_only=True`; `ValueError` naming the file on failure.

    Parameters
    ----------
    path : str or Path
    map_location : str or torch.device

    Returns
    -------
    the saved object

    Raises
    ------
    ValueError
        Naming the file, when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{path}: checkpoint not found; was this fold trained (see the run's folds.json)?"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc}); "
            "retrain this fold or restore the file"
        ) from None


def frame_record(dims: int, frame) -> dict[str, Any]:
    """What a checkpoint records about the input it was trained on: `{"dims", "frame"}`.

    Parameters
    ----------
    dims : int
    frame : sequence of int

    Returns
    -------
    dict
    """
    return {"dims": int(dims), "frame": [int(f) for f in frame]}


def model_checkpoint(state_dict: dict[str, torch.Tensor], dims: int, frame) -> dict[str, Any]:
    """`best.pt`'s content: the weights with the frame they were trained on.

    Parameters
    ----------
    state_dict : dict of str to Tensor
    dims : int
    frame : sequence of int

    Returns
    -------
    dict
    """
    return {"format": FORMAT_VERSION, "model": state_dict, **frame_record(dims, frame)}


def check_frame(
    path: str | Path,
    checkpoint: Any,
    dims: int,
    frame,
    config_path: str | Path,
) -> None:
    """`ValueError` naming both files when the frame a checkpoint was trained on differs from the
    run's config.json (edited after training); checkpoints that record no frame pass.

    Parameters
    ----------
    path : str or Path
        The checkpoint's file (for the message).
    checkpoint
        Its loaded content.
    dims, frame
        What config.json says.
    config_path : str or Path
        config.json (for the message).

    Raises
    ------
    ValueError
        The frames differ.
    """
    if not isinstance(checkpoint, dict) or "frame" not in checkpoint:
        return
    saved = (
        int(checkpoint.get("dims", len(checkpoint["frame"]))),
        tuple(int(f) for f in checkpoint["frame"]),
    )
    now = (int(dims), tuple(int(f) for f in frame))
    if saved != now:
        raise ValueError(
            f"{path} was trained on the {saved[0]}D frame {saved[1]} but {config_path} says "
            f"the {now[0]}D frame {now[1]}; was config.json edited? restore frame = "
            f"{list(saved[1])} there (a model only works on the frame it was trained on)"
        )
