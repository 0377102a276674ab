"""MOL reconstruction speed and memory on one device: throughput, breakdown, fast-step variants,
a 3D volume, training memory and a plain PyTorch baseline, in one run.

Usage::

    python benchmarks/gpu.py [--device cuda|cpu] [--small] [--out DIR] [--no-compile]

Sections (a markdown table each; everything also goes to ``DIR/gpu.json`` and
``DIR/gpu.md`` when ``--out`` is given):

1. **2D throughput**: slices/s and ms/slice of the MOL solve (from the CG-SENSE
   start, to tol 1e-4) at batch 1 and at the batch :func:`molrecon.memory.plan_batches`
   plans, for the eager step, the compiled step (``--compile``) and the bf16 prior
   (``--precision bf16``); ``--small`` compiles at the planned batch only. The model is the bundled 2D model; the data a simulated
   scan (``molrecon simulate``'s simulator), 256² × 8 coils, R = 4 (``--small``: 64² × 4).
2. **Breakdown** of one 2D batch: coil maps and scaling (``problem.from_scan``),
   CNN (one prior evaluation × iterations), CG (one data-consistency solve ×
   iterations) and the rest of the solver (Anderson, residuals, stopping).
3. **bf16 gate** of the bundled 2D model on that case (PSNR against the simulated
   truth changes by ≤ 0.05 dB and the fixed-point distance is ≤ 1e-3;
   :func:`molrecon.deq.inference.precision_gate`).
4. **3D volume** end to end (``recon.reconstruct``: maps, CG-SENSE, MOL with the
   bundled 3D model): 256×256×128 × 12 coils on CUDA, 32×32×16 × 4 on the CPU
   (``--small``: 24×24×12 × 4); wall time and peak memory.
5. **Training memory**: DEQ vs unrolled, by ``benchmarks/bench_memory.py``
   (its own subprocesses).
6. **Baseline**: a plain batched PyTorch unrolled-network iteration written here
   (a 5×64 real CNN on (re, im) and 10 CG steps whose AᴴA uses 1D FFTs along the
   phase encoding of readout-transformed data), ms per iteration beside the MOL
   step's, same batch and shapes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from molrecon.deq import FixedPointConfig
from molrecon.deq.inference import MolEngine, precision_gate
from molrecon.device import peak_memory_bytes
from molrecon.io.detect import read_raw
from molrecon.io.types import Geometry, RawScan, ScanInfo
from molrecon.memory import plan_batches
from molrecon.models.bundled import bundled_checkpoint
from molrecon.models.checkpoint import load_checkpoint
from molrecon.physics.sense import cg_sense
from molrecon.problem import from_scan
from molrecon.recon import ReconConfig, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file

HERE = Path(__file__).resolve().parent


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeat: int = 1) -> tuple[float, Any]:
    """Seconds per call (mean of ``repeat``) and the last result."""
    sync(device)
    t0 = time.perf_counter()
    out = None
    for _ in range(repeat):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat, out


# -- data --------------------------------------------------------------------------------------


def scan_2d(n: int, coils: int, slices: int, tmp: Path) -> tuple[RawScan, np.ndarray]:
    """A simulated 2D scan (one slice repeated ``slices`` times: the same work per slice)
    and its noise-free truth (B, D, Y, X)."""
    path = tmp / f"scan_{n}_{coils}.h5"
    sim = simulate_to_file(SimulationConfig(kind="2d", matrix=(n, n), coils=coils,
                                            acceleration=4.0, seed=3), path)
    scan = read_raw(path)
    rep = (slices, 1, 1, 1, 1)
    truth = np.tile(np.asarray(sim.truth.data), rep[:4])
    return scan.replace(kspace=np.tile(scan.kspace, rep), mask=np.tile(scan.mask, rep),
                        calib=np.tile(scan.calib, rep)), truth


def volume_3d(shape_dyx: tuple[int, int, int], coils: int) -> RawScan:
    """A synthetic 3D scan: an ellipsoid with inner structure, smooth coil maps on a ring,
    R = 2 × 2 (kz, ky) plus a fully sampled 24 × 24 centre, 1 % noise."""
    d, y, x = shape_dyx
    g = torch.Generator().manual_seed(0)
    zz, yy, xx = torch.meshgrid(*(torch.linspace(-1, 1, s) for s in (d, y, x)), indexing="ij")
    r2 = (zz / 0.8) ** 2 + (yy / 0.9) ** 2 + (xx / 0.7) ** 2
    img = (r2 <= 1).float() * (1.0 - 0.5 * ((r2 <= 0.4).float())) \
        + 0.3 * ((zz - 0.2) ** 2 + yy ** 2 + (xx + 0.3) ** 2 <= 0.05).float()
    img = img * torch.exp(1j * (0.5 * xx + 0.3 * yy))
    maps = []
    for c in range(coils):
        a = 2 * math.pi * c / coils
        mag = torch.exp(-((yy - 1.3 * math.sin(a)) ** 2 + (xx - 1.3 * math.cos(a)) ** 2
                          + (zz * 0.5) ** 2) / 1.6)
        maps.append(mag * torch.exp(1j * (a + 0.4 * xx)))
    s = torch.stack(maps)
    s = s / s.abs().square().sum(0, keepdim=True).sqrt()
    coil_img = (s * img).to(torch.complex64)                              # (C, D, Y, X)
    k = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(coil_img, dim=(1, 2, 3)),
                                          dim=(1, 2, 3), norm="ortho"), dim=(1, 2, 3))
    mask = torch.zeros(d, y, dtype=torch.bool)
    mask[::2, ::2] = True
    cd, cy = min(24, d) // 2, min(24, y) // 2
    mask[d // 2 - cd:d // 2 + cd, y // 2 - cy:y // 2 + cy] = True
    calib = torch.zeros_like(mask)
    calib[d // 2 - cd:d // 2 + cd, y // 2 - cy:y // 2 + cy] = True
    noise = torch.randn(k.shape, generator=g, dtype=torch.complex64)
    k = (k + 0.01 * k.abs().max() * noise) * mask[None, :, :, None]
    kspace = k.numpy()[None]                                              # (1, C, D, Y, X)
    m5 = mask.numpy()[None, None, :, :, None]
    return RawScan(kspace=np.ascontiguousarray(kspace), mask=m5,
                   calib=calib.numpy()[None, None, :, :, None], kind="3d",
                   geometry=Geometry.default((x, y, d)), info=ScanInfo(format="ismrmrd"),
                   source="synthetic-3d")


# -- 1 to 3: 2D ---------------------------------------------------------------------------------


VARIANTS = {"eager": {}, "compiled": {"compile": True}, "bf16": {"precision": "bf16"}}


def bench_2d(args: argparse.Namespace, device: torch.device, tmp: Path) -> dict[str, Any]:
    n, coils = (64, 4) if args.small else (256, 8)
    cap = 4 if args.small else 64
    scan, truth = scan_2d(n, coils, cap, tmp)
    loaded = load_checkpoint(bundled_checkpoint("2d"), map_location=device)
    channels = loaded.model.config.channels
    planned = min(cap, plan_batches(scan.shape, "2d", "mol", device, cnn_channels=channels))
    fp = FixedPointConfig(tol=1e-4, max_iter=args.max_iter, warn=False)
    out: dict[str, Any] = {"case": f"{n}x{n}, {coils} coils, R=4", "planned_batch": planned,
                           "throughput": [], "breakdown": {}, "gate": None}
    variants = [v for v in VARIANTS if not (v == "compiled" and args.no_compile)]
    for batch in sorted({1, planned}):
        t_maps, prob = timed(lambda b=batch: from_scan(scan, slice(0, b), device), device)
        x0 = cg_sense(prob.op, prob.kspace).x
        for name in variants:
            if name == "compiled" and args.small and batch != planned:
                continue                         # the smoke test compiles once
            engine = MolEngine.from_loaded(loaded, fp, device, **VARIANTS[name])
            def solve(e: MolEngine = engine, p: Any = prob, x: torch.Tensor = x0) -> Any:
                return e.solve(p.op, p.kspace, x)

            t_first, _ = timed(solve, device)
            t, res = timed(solve, device)
            out["throughput"].append({
                "variant": name, "batch": batch, "slices_per_s": batch / t,
                "ms_per_slice": 1e3 * t / batch, "iterations": int(res.iterations),
                "first_call_s": t_first, "converged": bool(res.converged)})
        if batch == planned:
            out["breakdown"] = breakdown(loaded, prob, x0, fp, device, t_maps)
            out["baseline"] = baseline(prob, x0, device, loaded.mol_config.cg_iters,
                                       out["breakdown"]["per_iteration_ms"])
            gate = precision_gate(loaded, prob.op, prob.kspace, x0,
                                  torch.from_numpy(truth[:batch]), fixed_point=fp, device=device)
            out["gate"] = gate.record()
    return out


def breakdown(loaded: Any, prob: Any, x0: torch.Tensor, fp: FixedPointConfig,
              device: torch.device, t_maps: float) -> dict[str, Any]:
    """Where one eager solve of the batch spends its time."""
    engine = MolEngine.from_loaded(loaded, fp, device)
    t_total, res = timed(lambda: engine.solve(prob.op, prob.kspace, x0), device)
    its = int(res.iterations)
    mol = engine.step
    with torch.no_grad():
        aty = prob.op.adjoint(prob.kspace)
        t_cnn, _ = timed(lambda: mol.prior(x0), device, repeat=5)
        from molrecon.deq.accel import FastDataConsistency

        dc = FastDataConsistency(mol.cg_iters, compile=False, device=device)
        parts = prob.op.normal_parts()
        shift = 1.0 / (mol.alpha * mol.lam)
        t_cg_pe, _ = timed(lambda: dc(aty, x0, shift, parts), device, repeat=5)
        from molrecon.solvers import conjugate_gradient

        t_cg, _ = timed(lambda: conjugate_gradient(prob.op.normal, aty, x0=x0, shift=shift,
                                                   max_iter=mol.cg_iters), device, repeat=5)
    rest = max(t_total - its * (t_cnn + t_cg), 0.0)
    return {"batch": int(x0.shape[0]), "iterations": its, "maps_s": t_maps,
            "cnn_s": its * t_cnn, "cg_s": its * t_cg, "solver_overhead_s": rest,
            "mol_total_s": t_total, "per_iteration_ms": 1e3 * t_total / max(its, 1),
            "cg_pe_fft_per_solve_ms": 1e3 * t_cg_pe, "cg_full_fft_per_solve_ms": 1e3 * t_cg}


# -- 6: the plain PyTorch baseline -----------------------------------------------------------


class PlainCNN(nn.Module):
    """5 conv layers, 64 channels, ReLU, on (re, im) as two channels; residual output."""

    def __init__(self, channels: int = 64, layers: int = 5) -> None:
        super().__init__()
        widths = [2] + [channels] * (layers - 1) + [2]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                   for a, b in itertools.pairwise(widths))

    def forward(self, x: torch.Tensor) -> torch.Tensor:               # (B, Y, X) complex
        h = torch.view_as_real(x).permute(0, 3, 1, 2)                  # (B, 2, Y, X)
        for i, conv in enumerate(self.convs):
            h = conv(h)
            if i < len(self.convs) - 1:
                h = torch.relu(h)
        return x + torch.view_as_complex(h.permute(0, 2, 3, 1).contiguous())


def baseline(prob: Any, x0: torch.Tensor, device: torch.device, cg_iters: int,
             mol_ms: float) -> dict[str, Any]:
    """One iteration of a plain unrolled network (CNN + 10 CG steps, 1D FFTs along the phase
    encoding on readout-transformed data), timed on the MOL batch's shapes."""
    maps = prob.op.maps[:, :, 0]                                           # (B, C, Y, X)
    mask = prob.op.mask[:, :, 0].to(maps.real.dtype)                       # (B|1, 1, Y, 1)
    x = x0[:, 0]                                                           # (B, Y, X)
    net = PlainCNN().to(device).eval()
    lam = 0.05

    def normal(v: torch.Tensor) -> torch.Tensor:
        k = torch.fft.fft(maps * v[:, None], dim=-2, norm="ortho") * mask
        return (maps.conj() * torch.fft.ifft(k, dim=-2, norm="ortho")).sum(1) + lam * v

    def cg(rhs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = rhs - normal(y)
        p, rr = r, (r.conj() * r).real.sum((1, 2))
        for _ in range(10):
            ap = normal(p)
            a = rr / (p.conj() * ap).real.sum((1, 2))
            y = y + a[:, None, None] * p
            r = r - a[:, None, None] * ap
            rr_new = (r.conj() * r).real.sum((1, 2))
            p = r + (rr_new / rr)[:, None, None] * p
            rr = rr_new
        return y

    aty = normal(x)

    def iteration() -> torch.Tensor:
        z = net(x)
        return cg(aty + lam * z, z)

    with torch.no_grad():
        iteration()
        t, _ = timed(iteration, device, repeat=3)
    return {"batch": int(x.shape[0]), "baseline_ms_per_iteration": 1e3 * t,
            "mol_ms_per_iteration": mol_ms, "cg_steps": 10, "mol_cg_iters": cg_iters}


# -- 4: 3D --------------------------------------------------------------------------------------


def bench_3d(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    if args.small:
        shape, coils = (12, 24, 24), 4
    elif device.type == "cuda":
        shape, coils = (128, 256, 256), 12
    else:
        shape, coils = (16, 32, 32), 4
    scan = volume_3d(shape, coils)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cfg = ReconConfig(method="mol", device=device.type, max_iter=args.max_iter)
    t, res = timed(lambda: reconstruct(scan, cfg), device)
    return {"shape_dyx": list(shape), "coils": coils, "wall_s": t,
            "report_wall_s": res.report["wall_time_s"], "timings_s": res.report["timings_s"],
            "iterations": res.report.get("iterations"),
            "peak_memory_mib": peak_memory_bytes(device) / 2**20}


# -- 5: training memory --------------------------------------------------------------------------


def bench_training_memory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    size = 32 if args.small else 256
    cmd = [sys.executable, str(HERE / "bench_memory.py"), "--size", str(size), "--coils",
           "4" if args.small else "8", "--steps", "1" if args.small else "1,5,10",
           "--max-iter", "10" if args.small else "50", "--device", device.type]
    if args.small:
        cmd += ["--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          timeout=args.memory_timeout)
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ") and "---" not in ln]
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "table": rows[1:],
            "header": rows[0] if rows else "", "stderr_tail": proc.stderr[-400:]}


# -- report --------------------------------------------------------------------------------------


def markdown(res: dict[str, Any]) -> str:
    lines = [f"# MOL on {res['device']} ({res['torch']}, {'small' if res['small'] else 'full'})",
             "", (f"## 2D throughput ({res['2d']['case']}, planned batch "
                  f"{res['2d']['planned_batch']})"), "",
             "| variant | batch | slices/s | ms/slice | iterations | converged | first call (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in res["2d"]["throughput"]:
        lines.append(f"| {r['variant']} | {r['batch']} | {r['slices_per_s']:.2f} | "
                     f"{r['ms_per_slice']:.1f} | {r['iterations']} | {r['converged']} | "
                     f"{r['first_call_s']:.2f} |")
    b = res["2d"]["breakdown"]
    lines += ["", f"## Breakdown (eager, batch {b['batch']}, {b['iterations']} iterations)", "",
              "| part | seconds |", "|---|---|"]
    for key in ("maps_s", "cnn_s", "cg_s", "solver_overhead_s", "mol_total_s"):
        lines.append(f"| {key[:-2]} | {b[key]:.3f} |")
    lines.append(f"| CG solve, FFT over (Y, X) / Y only (ms) | {b['cg_full_fft_per_solve_ms']:.2f}"
                 f" / {b['cg_pe_fft_per_solve_ms']:.2f} |")
    g = res["2d"]["gate"]
    lines += ["", "## bf16 gate (bundled 2D model)", "",
              (f"PSNR change {g['psnr_change_db']:+.4f} dB, fixed-point distance "
               f"{g['distance']:.2e}: {'pass' if g['passed'] else 'fail'}")]
    bl = res["2d"]["baseline"]
    lines += ["", f"## Baseline (batch {bl['batch']})", "", "| iteration | ms |", "|---|---|",
              f"| plain PyTorch (5×64 CNN + 10 CG, 1D FFT) | {bl['baseline_ms_per_iteration']:.1f} |",
              f"| MOL step (eager, {bl['mol_cg_iters']} CG) | {bl['mol_ms_per_iteration']:.1f} |"]
    v = res["3d"]
    lines += ["", f"## 3D volume {v['shape_dyx']} × {v['coils']} coils", "",
              "| wall (s) | maps (s) | CG-SENSE (s) | MOL (s) | iterations | peak (MiB) |",
              "|---|---|---|---|---|---|",
              (f"| {v['wall_s']:.2f} | {v['timings_s']['maps_s']:.2f} | "
               f"{v['timings_s']['sense_s']:.2f} | {v['timings_s']['mol_s']:.2f} | "
               f"{v['iterations']} | {v['peak_memory_mib']:.0f} |")]
    m = res["training_memory"]
    lines += ["", "## Training memory (bench_memory.py)", "", m["header"]]
    lines += ["|" + "---|" * max(m["header"].count("|") - 1, 1)] + m["table"]
    if m["returncode"] != 0:
        lines.append(f"(bench_memory.py failed: {m['stderr_tail']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes: a smoke test")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu.json and gpu.md")
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled step")
    ap.add_argument("--max-iter", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--memory-timeout", type=float, default=300.0)
    args = ap.parse_args(argv)
    if args.max_iter is None:
        args.max_iter = 20 if args.small else 100
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    res: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                           "small": bool(args.small)}
    if device.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(device)

    def save() -> None:
        # after every section, so that a run stopped by a time limit keeps what it measured
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu.json").write_text(json.dumps(res, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        res["2d"] = bench_2d(args, device, Path(tmp))
    save()
    res["3d"] = bench_3d(args, device)
    save()
    res["training_memory"] = bench_training_memory(args, device)
    save()
    text = markdown(res)
    print(text)
    if args.out is not None:
        (args.out / "gpu.md").write_text(text)
    return res


if __name__ == "__main__":
    main()
