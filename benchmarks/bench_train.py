"""Training throughput and training-step memory through the real ``molrecon.train`` code path.

Usage::

    python benchmarks/bench_train.py [--cases 2d128,2d256,3d,2dt] [--constraints sn,lr]
        [--steps 2] [--warmup 1] [--layers 5] [--channels 64] [--coils 8] [--threads N]
        [--memory-case 2d256] [--unroll 1,5,10] [--device cpu|cuda] [--json OUT.json]

Cases (simulated fully sampled data, ``--coils`` coils, retrospective R = 4 with 8
ACS lines):

=========  ==============================  ==================
case       data                            mask
=========  ==============================  ==================
2d128      2D slice 128×128                equispaced
2d256      2D slice 256×256                equispaced
3d         3D slab 64×64×16                Poisson disc (ky, kz)
2dt        2D+time 96×96 × 8 frames        time-interleaved
2dt-large  2D+time 128×128 × 16 frames     time-interleaved
3d-large   3D slab 128×128×16              Poisson disc (ky, kz)
=========  ==============================  ==================

Every configuration runs ``molrecon.train.train`` in a fresh subprocess for
``warmup + steps`` steps (no validation, one checkpoint at the end) and
reports the median of the measured steps' wall time as steps per hour, with the
mean forward/backward fixed-point iterations of those steps (an untrained
network: the iteration counts, and so the speed, change as H trains).

Memory: the peak resident set size of the subprocess
(``getrusage(RUSAGE_SELF).ru_maxrss``) when the training loop starts (data,
ESPIRiT maps, model) and at the end; their difference is what the training
steps added. For ``--memory-case`` the deep-equilibrium step is compared with
the unrolled baseline through K recorded steps (``TrainConfig.unroll = K``),
the same code path otherwise. On a GPU the table also gives
``torch.cuda.max_memory_allocated``. When the set-up (ESPIRiT) peaks higher than
a step, the difference is 0: read it as "no more than the set-up". On Linux the
memory table also gives the steps' own peak: the peak RSS is reset when the
steps begin (``/proc/self/clear_refs``) and read at the end (``VmHWM``), less the
resident size at their start; this is the number to compare, because memory the
set-up freed and a step reused does not show in the lifetime peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES: dict[str, dict[str, Any]] = {
    "2d128": {"kind": "2d", "matrix": (128, 128), "mask": "equispaced"},
    "2d256": {"kind": "2d", "matrix": (256, 256), "mask": "equispaced"},
    "3d": {"kind": "3d", "matrix": (64, 64, 16), "mask": "poisson"},
    "2dt": {"kind": "2dt", "matrix": (96, 96), "frames": 8, "mask": "interleaved"},
    # The memory claim's cases: large enough that ten unrolled 3D-convolution steps weigh
    # gigabytes on this machine.
    "2dt-large": {"kind": "2dt", "matrix": (128, 128), "frames": 16, "mask": "interleaved"},
    "3d-large": {"kind": "3d", "matrix": (128, 128, 16), "mask": "poisson"},
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # Linux: KiB


def _status_mib(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0                     # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's peak RSS (Linux ≥ 4.0: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_data(case: str, root: Path, coils: int) -> Path:
    """One fully sampled simulated file for ``case`` in its own folder."""
    from molrecon.sim import SimulationConfig, simulate_to_file

    spec = CASES[case]
    folder = root / case
    if folder.is_dir():
        return folder
    folder.mkdir(parents=True)
    extra = {"frames": spec["frames"]} if "frames" in spec else {}
    simulate_to_file(SimulationConfig(kind=spec["kind"], matrix=spec["matrix"], coils=coils,
                                      acceleration=1.0, seed=1, **extra), folder / f"{case}.h5")
    return folder


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``warmup + steps`` steps of one configuration; measure time and memory."""
    import torch

    from molrecon.train import TrainConfig, train
    from molrecon.train.data import MaskSpec

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = CASES[args.case]
    records: list[dict[str, Any]] = []
    marks: dict[str, float] = {}

    def on_record(rec: dict[str, Any]) -> None:
        if rec.get("event") == "start":
            marks["setup_rss_mib"] = _rss_mib()
            # The set-up (ESPIRiT on a volume) can peak above a step and free that memory,
            # which the steps then reuse: the lifetime peak would hide them. Reset the peak
            # where the steps begin and measure from the resident size there.
            if _reset_peak():
                marks["steps_start_rss_mib"] = _status_mib("VmRSS") or 0.0
            if torch.cuda.is_available() and args.device.startswith("cuda"):
                torch.cuda.synchronize()
                marks["setup_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
                torch.cuda.reset_peak_memory_stats()
        records.append(rec)

    with tempfile.TemporaryDirectory() as out_dir:
        config = TrainConfig(
            data=args.data, out=str(Path(out_dir) / "bench.pt"), constraint=args.constraint,
            layers=args.layers, channels=args.channels,
            mask=MaskSpec(family=spec["mask"], acceleration=4.0, acs=8),
            max_steps=args.warmup + args.steps, val_fraction=0.0,
            checkpoint_every=args.warmup + args.steps, device=args.device, seed=0,
            unroll=args.unroll, penalty_every=1)
        t0 = time.perf_counter()
        train(config, on_record=on_record)
        total = time.perf_counter() - t0
    steps = [r for r in records if "loss" in r][args.warmup:]
    times = sorted(float(r["step_s"]) for r in steps)
    median = times[len(times) // 2] if times else float("nan")
    out: dict[str, Any] = {
        "case": args.case, "constraint": args.constraint, "unroll": args.unroll,
        "threads": torch.get_num_threads(), "device": args.device,
        "step_s_median": median, "steps_per_hour": 3600.0 / median if median > 0 else None,
        "fwd_iterations": [r["fwd_iterations"] for r in steps],
        "bwd_iterations": [r["bwd_iterations"] for r in steps],
        "wall_s": total, "peak_rss_mib": _rss_mib(), **marks,
    }
    if "steps_start_rss_mib" in marks:
        out["steps_peak_rss_mib"] = _status_mib("VmHWM")
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        out["step_cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _run_child(args: argparse.Namespace, case: str, data: Path, constraint: str,
               unroll: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--case", case, "--data", str(data),
           "--constraint", constraint, "--unroll", str(unroll), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--layers", str(args.layers), "--channels",
           str(args.channels), "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"case": case, "constraint": constraint, "unroll": unroll, "error": tail[:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mean(values: list[Any]) -> str:
    vals = [float(v) for v in values if v is not None]
    return f"{sum(vals) / len(vals):.1f}" if vals else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="2d128,2d256,3d,2dt")
    ap.add_argument("--constraints", default="sn,lr")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per configuration")
    ap.add_argument("--warmup", type=int, default=1, help="steps run before measuring")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-case", default="2d256", help="case of the DEQ-vs-unrolled table "
                    "('' to skip)")
    ap.add_argument("--unroll", default="1,5,10", help="unrolled depths K of the memory table")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="also write every result here")
    ap.add_argument("--data-dir", default=None, help="keep the simulated data here")
    # child-only arguments
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--constraint", default="sn", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.unroll = int(args.unroll)
        print(json.dumps(child(args)))
        return

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    wanted = cases + ([args.memory_case] if args.memory_case else [])
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {sorted(CASES)}")
    constraints = [c.strip() for c in args.constraints.split(",") if c.strip()]
    depths = [int(k) for k in args.unroll.split(",") if k.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp)
        results: list[dict[str, Any]] = []
        threads = args.threads or "default"
        print(f"# molrecon train throughput ({args.layers}×{args.channels} network, {args.coils} "
              f"coils, R = 4, device {args.device}, torch threads {threads}, "
              f"{args.warmup} warm-up + {args.steps} measured steps)\n")
        print("| case | constraint | s/step (median) | steps/hour | fwd/bwd iterations | "
              "peak RSS (MiB) | after set-up (MiB) |")
        print("|---|---|---|---|---|---|---|")
        for case in cases:
            data = make_data(case, root, args.coils)
            for constraint in constraints:
                r = _run_child(args, case, data, constraint, 0)
                results.append(r)
                if "error" in r:
                    print(f"| {case} | {constraint} | failed: {r['error']} |")
                    continue
                print(f"| {case} | {constraint} | {r['step_s_median']:.2f} | "
                      f"{r['steps_per_hour']:.0f} | {_mean(r['fwd_iterations'])}/"
                      f"{_mean(r['bwd_iterations'])} | {r['peak_rss_mib']:.0f} | "
                      f"{r.get('setup_rss_mib', float('nan')):.0f} |", flush=True)
        if args.memory_case:
            case = args.memory_case
            data = make_data(case, root, args.coils)
            print(f"\n# Training-step memory, {case}, SN: deep equilibrium vs unrolled K steps\n")
            head = ("| training | peak RSS (MiB) | after set-up (MiB) | added by the steps (MiB) |"
                    " steps' own peak above their start (MiB) |")
            cuda = args.device.startswith("cuda")
            print(head + (" CUDA step peak (MiB) |" if cuda else "") + " s/step |")
            print("|---|---|---|---|---|" + ("---|" if cuda else "") + "---|")
            for k in [0, *depths]:
                r = _run_child(args, case, data, "sn", k)
                results.append(r)
                name = "DEQ (implicit)" if k == 0 else f"unrolled K={k}"
                if "error" in r:
                    print(f"| {name} | failed: {r['error']} |")
                    continue
                peak, setup = float(r["peak_rss_mib"]), float(r.get("setup_rss_mib", 0.0))
                own = "–"
                if r.get("steps_peak_rss_mib") is not None:
                    own = f"{float(r['steps_peak_rss_mib']) - float(r['steps_start_rss_mib']):.0f}"
                row = (f"| {name} | {peak:.0f} | {setup:.0f} | {max(0.0, peak - setup):.0f} | "
                       f"{own} |")
                if cuda:
                    row += f" {float(r.get('step_cuda_peak_mib', float('nan'))):.0f} |"
                print(row + f" {r['step_s_median']:.2f} |", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
