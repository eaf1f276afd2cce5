"""Does `mtml train --time` end on time when the machine gets busy in the middle of the run?

    python benchmarks/bench_budget.py                       # 2 min budget, load from 45 s
    python benchmarks/bench_budget.py --time 4m --load-at 60 --hogs 2 --src OTHER_CHECKOUT/src

Trains the demo's data (the lesion-free slices of the built-in brain tumour MRI, small recipe,
all 5 folds) with `--time`, and `--load-at` seconds after the start launches `--hogs` busy
processes (a Python loop each, as another user's job would be) that run until training ends.
Prints the wall time against the budget, the steps every fold trained (config.json's
`max_steps` and `fold_steps`) and the re-planning notices. `--src` runs another checkout's
package (e.g. an older commit, to compare), `--hogs 0` a quiet run. Each run is one
measurement on a shared machine: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOG = "while True:\n    pass\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", default="2m", help="the budget, as `mtml train --time`")
    parser.add_argument("--load-at", type=float, default=45.0, help="seconds before the load")
    parser.add_argument("--hogs", type=int, default=2, help="busy processes started then")
    parser.add_argument("--src", default=None, help="a checkout's src folder to run instead")
    parser.add_argument("--work", default=None, help="folder for the data and the run")
    args = parser.parse_args(argv)

    from napari_mtml.config import parse_duration
    from napari_mtml.io import Scan, write_image
    from napari_mtml.samples import load_sample

    budget = parse_duration(args.time)
    work = Path(args.work or tempfile.mkdtemp(prefix="mtml-budget-"))
    work.mkdir(parents=True, exist_ok=True)
    scan = load_sample("brain_tumour_image")
    tumour = load_sample("brain_tumour_label").array > 0.5
    free = ~tumour.reshape(len(tumour), -1).any(axis=1)
    healthy = work / "lesion_free_slices.nii.gz"
    write_image(healthy, scan.array[free], like=Scan(array=scan.array[free], spacing=scan.spacing))
    run = work / "run"
    cmd = [sys.executable, "-m", "napari_mtml.cli", "train", str(healthy), "--out", str(run)]
    cmd += ["--time", args.time, "--recipe", "small"]
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.path.abspath(args.src)
    log = work / "train.log"
    hogs: list[subprocess.Popen] = []
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                if not hogs and args.hogs and time.perf_counter() - start >= args.load_at:
                    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs)]
                time.sleep(0.2)
        finally:
            for h in hogs:
                h.kill()
            if proc.poll() is None:
                proc.kill()
    wall = time.perf_counter() - start
    if proc.returncode:
        print(log.read_text()[-2000:])
        raise SystemExit(f"training failed (exit {proc.returncode}); log: {log}")
    cfg = json.loads((run / "config.json").read_text())
    fold_steps = cfg.get("fold_steps") or {}
    steps = [fold_steps.get(str(k), cfg["max_steps"]) for k in range(5)]
    notes = [
        line.strip()
        for line in log.read_text().replace("\r", "\n").splitlines()
        if line.startswith("note: time budget")
    ]
    load = f"{args.hogs} busy process(es) from {args.load_at:g} s" if args.hogs else "none"
    print(f"package: {args.src or 'installed'}; cores: {os.cpu_count()}; load: {load}")
    print("| budget s | wall s | over budget | steps per fold |")
    print("|---|---|---|---|")
    print(f"| {budget:.0f} | {wall:.1f} | {100 * (wall / budget - 1):+.0f} % | {steps} |")
    for line in notes:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
