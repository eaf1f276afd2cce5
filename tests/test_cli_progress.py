"""`mtml predict` shows one progress bar over the images on a terminal, and none otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cli_fixtures import TINY_TOML
from napari_mtml.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _disc(shape, rng, radius):
    yy, xx = np.meshgrid(*[np.linspace(-0.5, 0.5, n) for n in shape], indexing="ij")
    inside = yy**2 + xx**2 < radius**2
    return np.where(inside, 100 + 10 * rng.standard_normal(shape), 0).astype(np.float32)


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    rng = np.random.default_rng(2)
    for folder, n in (("healthy", 6), ("test", 3)):
        (root / folder).mkdir()
        for i in range(n):
            nib.save(
                nib.Nifti1Image(_disc((28, 28), rng, 0.3 + 0.02 * i).T, np.eye(4)),
                root / folder / f"{folder[0]}{i}.nii.gz",
            )
    (root / "tiny.toml").write_text(TINY_TOML)
    rc = main(
        [
            "train",
            str(root / "healthy"),
            "--out",
            str(root / "run"),
            "--config",
            str(root / "tiny.toml"),
            "--dims",
            "2",
            "--kind",
            "mri",
            "--frame",
            "16,16",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    return root


def _predict_argv(root, out):
    return [
        "predict",
        str(root / "run"),
        str(root / "test"),
        "--out",
        str(out),
        "--no-png",
        "--device",
        "cpu",
    ]


def test_no_bar_when_not_a_terminal(run_and_images, capsys):
    rc = main(_predict_argv(run_and_images, run_and_images / "quiet"))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "image/s" not in captured.err and "3/3" not in captured.err  # no bar in a log
    lines = [ln for ln in captured.out.splitlines() if ln.startswith("[")]
    assert [ln[:5] for ln in lines] == ["[1/3]", "[2/3]", "[3/3]"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a pseudo-terminal")
def test_bar_over_images_on_a_terminal(run_and_images):
    import fcntl
    import pty
    import struct
    import termios

    out = run_and_images / "tty"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), COLUMNS="100")
    primary, secondary = pty.openpty()
    # a real terminal has a size (a fresh pseudo-terminal says 0 columns)
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_mtml.cli", *_predict_argv(run_and_images, out)],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
        close_fds=True,
    )
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "predict: 100%" in text and "3/3" in text and "image" in text
    assert (out / "scores.csv").read_text().count("\n") == 4  # header + 3 images
