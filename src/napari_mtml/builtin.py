"""Built-in trained models, shipped inside the package, usable wherever a run folder goes.

```python
from napari_mtml.builtin import resolve_run, builtin_models
resolve_run("builtin:brain-t1")      # the package folder holding that run (config.json, fold_K/)
resolve_run("runs/mine")             # any other text is a run folder path, returned as a Path
builtin_models()                     # {"brain-t1": "what it is"}
```
`mtml predict builtin:brain-t1 IMAGE... --out DIR`, `mtml train --init builtin:brain-t1 ...`, the
Python API (`load_ensemble("builtin:brain-t1")`) and the Heatmap widget's run picker take the
same names. Each model has a card in docs/ (data, command, budget, measured figures, licence).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["BUILTIN_PREFIX", "MODELS_DIR", "builtin_models", "is_builtin", "resolve_run"]

BUILTIN_PREFIX = "builtin:"
MODELS_DIR = Path(__file__).resolve().parent / "models"

#: name -> what it is (the card is docs/model_card_NAME.md)
_DESCRIPTIONS = {
    "brain-t1": "T1-weighted brain MRI, skull on or skull-stripped, any voxel size: a 1/4 "
    "ensemble of five small 2D U-Nets on axial slices at 2 mm",
}


def builtin_models() -> dict[str, str]:
    """The built-in models present in this installation: name -> description."""
    return {
        name: text
        for name, text in _DESCRIPTIONS.items()
        if (MODELS_DIR / name / "config.json").is_file()
    }


def is_builtin(run: str | os.PathLike) -> bool:
    """Whether `run` names a built-in model ("builtin:NAME").

    Parameters
    ----------
    run : str or os.PathLike
        A run folder, or a name such as "builtin:brain-t1".

    Returns
    -------
    bool

    Examples
    --------
    >>> [is_builtin(run) for run in ("builtin:brain-t1", "runs/brain")]
    [True, False]
    """
    return str(run).startswith(BUILTIN_PREFIX)


def resolve_run(run: str | os.PathLike) -> Path:
    """The folder of a run: "builtin:NAME" -> the package's copy; anything else -> `Path(run)`.

    Parameters
    ----------
    run : str or os.PathLike
        A run folder or "builtin:NAME".

    Returns
    -------
    Path
        The run's folder (a plain path is returned as it is, unchecked).

    Raises
    ------
    ValueError
        An unknown built-in name (listing the known ones), or a built-in model missing from the
        installation.
    """
    text = str(run)
    if not is_builtin(text):
        return Path(text)
    name = text[len(BUILTIN_PREFIX) :]
    if name not in _DESCRIPTIONS:
        known = ", ".join(BUILTIN_PREFIX + n for n in _DESCRIPTIONS) or "none"
        raise ValueError(f"{text}: no such built-in model; known: {known}")
    folder = MODELS_DIR / name
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"{text}: the built-in model's files are missing from {folder}; reinstall napari-mtml"
        )
    return folder
