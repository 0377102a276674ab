"""Start-up cost of the command line: wall time of short commands, as a user runs them.

Each command runs as a fresh process (``python -m molrecon ...``), ``--repeats`` times,
on the bundled example scan (2D, 8 coils, 256²); the table gives the median wall time,
the work the command itself reports where it does (``wall_time_s`` of the reconstruction
report), and whether torch was imported (found with ``-X importtime``). Compare rows
of the same run only.

    python benchmarks/bench_startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path


def run(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "molrecon", *args],
                          capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr[-500:]}")
    return wall, done.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    example = Path(str(resources.files("molrecon") / "data" / "examples" / "brain_2d_r4.h5"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONWARNINGS": "ignore"}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        commands = [
            ("molrecon --help", ["--help"], False),
            ("molrecon info EXAMPLE", ["info", str(example)], False),
            ("molrecon reconstruct EXAMPLE --method zf", ["reconstruct", str(example),
             str(Path(tmp) / "zf.nii"), "-m", "zf", "-f", "--report", str(report)], True),
            ("molrecon reconstruct EXAMPLE --method sense", ["reconstruct", str(example),
             str(Path(tmp) / "sense.nii"), "-m", "sense", "-f", "--report", str(report)], True),
        ]
        for label, argv, reports in commands:
            walls, work, torch_in = [], [], False
            for _ in range(args.repeats):
                wall, err = run(argv, env)
                walls.append(wall)
                torch_in = torch_in or any(line.rstrip().endswith("| torch")
                                           for line in err.splitlines())
                if reports:
                    work.append(json.loads(report.read_text())["wall_time_s"])
            row = {"command": label, "wall_s": statistics.median(walls),
                   "work_s": statistics.median(work) if work else None, "torch": torch_in}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmachine: {platform.machine()}, python {sys.version.split()[0]}, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, median of {args.repeats}")
    print("| command | wall time (s) | of which the job's own work (s) | imports torch |")
    print("|---|---:|---:|---|")
    for r in rows:
        work = "" if r["work_s"] is None else f"{r['work_s']:.2f}"
        print(f"| `{r['command']}` | {r['wall_s']:.2f} | {work} | {'yes' if r['torch'] else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
