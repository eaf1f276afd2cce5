"""Every bad or odd input of issue 9, through the `mtml` command in-process.

One table: each row builds its input in a temporary folder (small, seconds at most) and says
what must come out. A refused input must give exit status 2, exactly one `error:` line on stderr
that names the path (or the flag) at fault, and no traceback; an input that is now accepted (a
NaN voxel size, a pipe among the files, a comma in a file name...) must give exit 0 and the right
result. Every call runs in a thread with a generous time-out, so that an input that hangs (a named
pipe) fails the test instead of hanging the suite; it is a guard, not a speed measurement.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import threading
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cli_fixtures import FAST, TINY_TOML
from napari_mtml.cli import main

HANG_GUARD_S = 120  # far above any row's time; only a hang (a blocking open) reaches it


def _disc(shape=(28, 28), seed=0, radius=0.3):
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in shape], indexing="ij")
    inside = sum(g**2 for g in grids) < radius**2
    return np.where(inside, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)


def _save(path, array_yx, spacing=1.0):
    data = np.asarray(array_yx).T.copy()
    nib.save(nib.Nifti1Image(data, np.diag([spacing] * 3 + [1.0])), path)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run, its healthy folder, a test image, labels and a config."""
    root = tmp_path_factory.mktemp("bad")
    healthy = root / "healthy"
    healthy.mkdir()
    for i in range(6):
        _save(healthy / f"h{i}.nii.gz", _disc(seed=i, radius=0.3 + 0.02 * i))
    (root / "test").mkdir()
    _save(root / "test" / "case1.nii.gz", _disc(seed=7))
    (root / "labels").mkdir()
    _save(root / "labels" / "case1.nii.gz", (_disc(seed=7) > 0).astype(np.uint8))
    toml = root / "tiny.toml"
    toml.write_text(TINY_TOML)
    run = root / "run"
    assert main(["train", str(healthy), "--out", str(run), "--config", str(toml), *FAST]) == 0
    return {
        "root": root,
        "healthy": healthy,
        "run": run,
        "toml": toml,
        "image": root / "test" / "case1.nii.gz",
        "labels": root / "labels",
    }


@pytest.fixture
def world(trained, nifti_with_pixdim):
    return {**trained, "nifti_with_pixdim": nifti_with_pixdim}


@dataclass
class Outcome:
    rc: int | None
    out: str
    err: str
    error: BaseException | None = None


def _run_cli(argv: list[str], release: Callable[[], None] | None = None) -> Outcome:
    """`main(argv)` in a thread with the hang guard; stdout/stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    box: dict = {}

    def target():
        try:
            with redirect_stdout(out), redirect_stderr(err):
                box["rc"] = main(argv)
        except BaseException as exc:  # SystemExit from argparse, or a traceback's exception
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    if thread.is_alive():
        if release is not None:
            release()  # unblock the stuck open() so the thread can end
        pytest.fail(f"mtml {' '.join(argv)} did not return within {HANG_GUARD_S} s (hangs)")
    return Outcome(box.get("rc"), out.getvalue(), err.getvalue(), box.get("error"))


def _release_fifo(path: Path) -> Callable[[], None]:
    def release():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        except OSError:
            pass

    return release


def _mkfifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("named pipes need a POSIX system")
    os.mkfifo(path)
    return path


def _copy_run(w, tmp: Path) -> Path:
    """A copy of the trained run; its config.json names the copy (as if trained there)."""
    run = tmp / "run"
    shutil.copytree(w["run"], run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["out"] = str(run)
    (run / "config.json").write_text(json.dumps(cfg))
    return run


# ----------------------------------------------------------------------------------- the table


@dataclass
class Case:
    name: str
    build: Callable  # (world, tmp) -> argv, or (argv, extra) with extra a dict
    needles: tuple[str, ...] = ()  # in the error line (refusals) or in stdout+stderr (accepted)
    ok: bool = False  # accepted now: exit 0
    check: Callable | None = None  # (world, tmp, outcome) -> None, more assertions
    absent: tuple[str, ...] = ()  # must not be in the error line
    fifo: str | None = None  # relative path of a FIFO to release if the call hangs
    marks: list = field(default_factory=list)


def _pixdim_case(pixdim, command):
    def build(w, tmp):
        img = w["nifti_with_pixdim"](tmp / "odd.nii.gz", _disc(), pixdim)
        if command == "preview":
            return ["preview", str(img), "--out", str(tmp / "g.png")]
        return ["predict", str(w["run"]), str(img), "--out", str(tmp / "p"), "--no-png"]

    return build


def _check_warned_1mm(w, tmp, o):
    assert "warning:" in o.err and "odd.nii.gz" in o.err and "1 mm" in o.err


def _fifo_folder(w, tmp):
    d = tmp / "d"
    d.mkdir()
    _mkfifo(d / "x.dcm")
    return ["predict", str(w["run"]), str(d), "--out", str(tmp / "x")]


def _fifo_file(command):
    def build(w, tmp):
        fifo = _mkfifo(tmp / "x.dcm")
        if command == "predict":
            return ["predict", str(w["run"]), str(fifo), "--out", str(tmp / "x")]
        return ["preview", str(fifo), "--out", str(tmp / "g.png")]

    return build


def _fifo_in_healthy(w, tmp):
    d = tmp / "healthy"
    d.mkdir()
    _mkfifo(d / "a.nii.gz")
    return ["train", str(d), "--out", str(tmp / "r"), *FAST]


def _fifo_config(w, tmp):
    fifo = _mkfifo(tmp / "run.toml")
    return ["train", str(w["healthy"]), "--out", str(tmp / "r"), "--config", str(fifo), *FAST]


def _fifo_gallery_out(w, tmp):
    fifo = _mkfifo(tmp / "g.png")
    return ["preview", str(w["image"]), "--out", str(fifo)]


def _fifo_among_predictions(w, tmp):
    d = tmp / "pred"
    d.mkdir()
    _mkfifo(d / "case1_anomaly.nii.gz")
    return ["evaluate", str(d), str(w["labels"])]


def _a_file(tmp):
    f = tmp / "FILE"
    f.write_text("x")
    return f


def _train_out_file(w, tmp):
    return [
        "train",
        str(w["healthy"]),
        "--out",
        str(_a_file(tmp)),
        "--config",
        str(w["toml"]),
        *FAST,
    ]


def _train_out_under_file(w, tmp):
    return [
        "train",
        str(w["healthy"]),
        "--out",
        str(_a_file(tmp) / "sub"),
        "--config",
        str(w["toml"]),
        *FAST,
    ]


def _train_config_dir(w, tmp):
    return ["train", str(w["healthy"]), "--out", str(tmp / "r"), "--config", str(tmp), *FAST]


def _predict_out_file(w, tmp):
    return ["predict", str(w["run"]), str(w["image"]), "--out", str(_a_file(tmp))]


def _evaluate_out_under_file(w, tmp):
    pred = tmp / "pred"
    assert (
        main(
            [
                "predict",
                str(w["run"]),
                str(w["image"]),
                "--out",
                str(pred),
                "--no-png",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    return ["evaluate", str(pred), str(w["labels"]), "--out", str(_a_file(tmp) / "metrics.json")]


def _config_not_utf8(w, tmp):
    bad = tmp / "run.toml"
    bad.write_bytes(b"max_steps = 2\n# caf\xe9 \xff\n")
    return ["train", str(w["healthy"]), "--out", str(tmp / "r"), "--config", str(bad), *FAST]


def _run_config(text: str | None):
    def build(w, tmp):
        run = _copy_run(w, tmp)
        (run / "config.json").write_text(text)
        return ["predict", str(run), str(w["image"]), "--out", str(tmp / "p")]

    return build


def _garbage_log(w, tmp):
    run = _copy_run(w, tmp)
    with open(run / "fold_0" / "log.jsonl", "ab") as fh:
        fh.write(b"\x00\xff\xfe garbage \x80\x81\n\xc3\x28\n")
    return [
        "train",
        str(w["healthy"]),
        "--out",
        str(run),
        "--config",
        str(w["toml"]),
        *FAST,
        "--max-steps",
        "4",
        "--resume",
    ]


def _check_log_clean(w, tmp, o):
    for k in range(5):
        lines = (tmp / "run" / f"fold_{k}" / "log.jsonl").read_text(encoding="utf-8").splitlines()
        steps = [json.loads(x)["step"] for x in lines if json.loads(x)["type"] == "step"]
        assert steps == [1, 2, 3, 4]


def _predict_batch(b):
    def build(w, tmp):
        return [
            "predict",
            str(w["run"]),
            str(w["image"]),
            "--out",
            str(tmp / "p"),
            "--batch-size",
            b,
        ]

    return build


def _nan_weights(w, tmp):
    run = _copy_run(w, tmp)
    path = run / "fold_3" / "best.pt"
    state = torch.load(path, weights_only=True)
    weights = state["model"] if "model" in state else state
    first = next(iter(weights))
    weights[first] = torch.full_like(weights[first], float("nan"))
    torch.save(state, path)
    return ["predict", str(run), str(w["image"]), "--out", str(tmp / "p")]


def _thin_png(w, tmp):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp / "thin.png"
    Image.fromarray(rng.integers(0, 255, (2000, 10), dtype=np.uint8)).save(path)
    return ["preview", str(path), "--out", str(tmp / "g.png")]


def _blank(w, tmp):
    return [
        "predict",
        str(w["run"]),
        str(_save(tmp / "blank.nii.gz", np.zeros((28, 28)))),
        "--out",
        str(tmp / "p"),
    ]


def _odd_names(w, tmp):
    a = _save(tmp / "a,1.nii.gz", _disc(seed=1))
    b = _save(tmp / 'b"2.nii.gz', _disc(seed=2))
    return ["predict", str(w["run"]), str(a), str(b), "--out", str(tmp / "p"), "--no-png"]


def _check_csv(w, tmp, o):
    with open(tmp / "p" / "scores.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0][:2] == ["name", "score"]
    assert [r[0] for r in rows[1:]] == ["a,1", 'b"2'] and all(len(r) == len(rows[0]) for r in rows)


def _preview_into_dir(w, tmp):
    (tmp / "prev").mkdir()
    return ["preview", str(w["image"]), "--out", str(tmp / "prev")]


def _check_preview_in_dir(w, tmp, o):
    written = tmp / "prev" / "case1_preview.png"
    assert written.stat().st_size > 1000 and f"wrote {written}" in o.out


def _good_bad_good(w, tmp):
    a = _save(tmp / "a.nii.gz", _disc(seed=1))
    bad = tmp / "b.nii.gz"
    bad.write_bytes(b"\x1f\x8b not a NIfTI at all")
    c = _save(tmp / "c.nii.gz", _disc(seed=2))
    return ["predict", str(w["run"]), str(a), str(bad), str(c), "--out", str(tmp / "p"), "--no-png"]


def _check_partial_scores(w, tmp, o):
    rows = (tmp / "p" / "scores.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["a", "c"]
    assert (tmp / "p" / "c_anomaly.nii.gz").is_file()


def _resume_without_last(w, tmp):
    run = _copy_run(w, tmp)
    (run / "fold_1" / "last.pt").unlink()
    return [
        "train",
        str(w["healthy"]),
        "--out",
        str(run),
        "--config",
        str(w["toml"]),
        *FAST,
        "--resume",
    ]


def _edited_frame(w, tmp):
    run = _copy_run(w, tmp)
    cfg = json.loads((run / "config.json").read_text())
    cfg["frame"] = [32, 32]
    (run / "config.json").write_text(json.dumps(cfg))
    return ["predict", str(run), str(w["image"]), "--out", str(tmp / "p")]


def _huge_batch(w, tmp):
    return [
        "train",
        str(w["healthy"]),
        "--out",
        str(tmp / "r"),
        "--config",
        str(w["toml"]),
        *FAST,
        "--batch-size",
        "100000",
    ]


def _tiny_foreground_png(w, tmp):
    from PIL import Image

    d = tmp / "slices"
    d.mkdir()
    for i in range(6):
        Image.fromarray((_disc(seed=i, radius=0.35) * 1.5).clip(0, 255).astype(np.uint8)).save(
            d / f"s{i}.png"
        )
    speck = np.zeros((28, 28), np.uint8)
    speck[3:6, 3:6] = np.random.default_rng(0).integers(150, 250, (3, 3))  # top of the head
    Image.fromarray(speck).save(d / "top.png")
    return ["train", str(d), "--out", str(tmp / "r"), "--config", str(w["toml"]), *FAST]


def _check_dropped_named(w, tmp, o):
    assert "note: dropped 1 2D image(s)" in o.out and "top.png" in o.out
    assert (tmp / "r" / "fold_4" / "best.pt").is_file()


CASES = [
    # 1. voxel sizes: NaN / zero / negative pixdim, no qform/sform -> 1 mm and a warning
    Case("nan-pixdim-preview", _pixdim_case(np.nan, "preview"), ok=True, check=_check_warned_1mm),
    Case("nan-pixdim-predict", _pixdim_case(np.nan, "predict"), ok=True, check=_check_warned_1mm),
    Case("zero-pixdim-preview", _pixdim_case(0.0, "preview"), ok=True, check=_check_warned_1mm),
    Case(
        "negative-pixdim-preview",
        _pixdim_case([1.0, -2.0, 1.0], "preview"),
        ok=True,
        check=_check_warned_1mm,
    ),
    # 2. named pipes are never opened
    Case(
        "fifo-in-series-folder", _fifo_folder, ("d", "x.dcm", "not a regular file"), fifo="d/x.dcm"
    ),
    Case(
        "fifo-as-image-predict",
        _fifo_file("predict"),
        ("x.dcm", "not a regular file"),
        fifo="x.dcm",
    ),
    Case(
        "fifo-as-image-preview",
        _fifo_file("preview"),
        ("x.dcm", "not a regular file"),
        fifo="x.dcm",
    ),
    Case(
        "fifo-in-healthy-folder", _fifo_in_healthy, ("healthy", "holds no"), fifo="healthy/a.nii.gz"
    ),
    Case("fifo-as-config", _fifo_config, ("run.toml", "not a regular file"), fifo="run.toml"),
    Case("fifo-as-gallery-out", _fifo_gallery_out, ("g.png", "not a regular file"), fifo="g.png"),
    Case(
        "fifo-among-predictions",
        _fifo_among_predictions,
        ("pred", "NAME_anomaly"),
        fifo="pred/case1_anomaly.nii.gz",
    ),
    # 3. operating-system errors: one line naming the path
    Case("train-out-is-file", _train_out_file, ("FILE", "not a folder")),
    Case("train-out-under-file", _train_out_under_file, ("FILE/sub", "FILE is a file")),
    Case("train-config-is-dir", _train_config_dir, ("is a folder",)),
    Case("predict-out-is-file", _predict_out_file, ("FILE", "not a folder")),
    Case(
        "evaluate-out-under-file", _evaluate_out_under_file, ("FILE/metrics.json", "FILE is a file")
    ),
    # 4. messages that name the file and the problem
    Case("config-not-utf8", _config_not_utf8, ("run.toml", "UTF-8", "0xe9")),
    Case("run-config-empty", _run_config(""), ("config.json", "empty"), absent=("directory",)),
    Case(
        "run-config-array",
        _run_config("[1, 2]"),
        ("config.json", "JSON object"),
        absent=("not found",),
    ),
    Case("log-garbage-then-resume", _garbage_log, ok=True, check=_check_log_clean),
    Case("predict-batch-negative", _predict_batch("-4"), ("batch size -4",), absent=("NaN",)),
    Case("predict-batch-zero", _predict_batch("0"), ("batch size 0",)),
    Case("checkpoint-nan-weights", _nan_weights, ("fold_3", "best.pt", "NaN")),
    Case("preview-2000x10-png", _thin_png, ("thin.png",)),
    Case("blank-image", _blank, ("blank.nii.gz", "empty"), absent=("--frame",)),
    # 5. silent odd results
    Case("comma-and-quote-names", _odd_names, ok=True, check=_check_csv),
    Case("preview-out-existing-dir", _preview_into_dir, ok=True, check=_check_preview_in_dir),
    Case("predict-good-bad-good", _good_bad_good, ("b.nii.gz",), check=_check_partial_scores),
    Case("resume-without-last-pt", _resume_without_last, ("fold_1", "last.pt", "missing")),
    Case("edited-frame", _edited_frame, ("best.pt", "config.json", "(16, 16)", "(32, 32)")),
    Case("batch-far-larger-than-data", _huge_batch, ("100000",)),
    # 6. an image that cannot take the smallest anomaly is dropped up front, named
    Case("tiny-foreground-2d-file", _tiny_foreground_png, ok=True, check=_check_dropped_named),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, world, tmp_path):
    argv = case.build(world, tmp_path)
    release = _release_fifo(tmp_path / case.fifo) if case.fifo else None
    o = _run_cli(argv, release)
    assert o.error is None, f"raised {type(o.error).__name__}: {o.error}\n{o.err}"
    both = o.out + o.err
    assert "Traceback" not in both
    if case.ok:
        assert o.rc == 0, o.err
        for needle in case.needles:
            assert needle in both, (needle, both)
    else:
        assert o.rc == 2, (o.rc, o.out, o.err)
        lines = [x for x in o.err.strip().splitlines() if ": warning: " not in x]
        assert len(lines) == 1, o.err  # one line
        line = lines[0]
        assert line.startswith(f"mtml {argv[0]}: error: ")
        for needle in case.needles:
            assert needle in line, (needle, line)
        for word in case.absent:
            assert word not in line, (word, line)
    if case.check is not None:
        case.check(world, tmp_path, o)
