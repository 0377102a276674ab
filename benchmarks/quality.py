"""Reconstruction quality of MOL against zero filling, CG-SENSE and BART, all in one run.

Data (never used in training; see ``molrecon.sim.anatomy`` for the split):

* held-out 2D brain slices: the *test* slab of Colin 27, simulated through the
  project's own raw-data model (8 coils, noise 0.01, 256², readout
  oversampling, correlated noise + noise scan), written as ISMRMRD and read
  back (prewhitening included), at R = 4 and R = 6 (equispaced + 16 ACS lines);
* the same slab with 12 coils, 1D variable-density masks (R = 4, 6) and 24
  calibration lines (the protocol of retrospectively undersampled real scans);
* held-out 3D slabs of the test slab: 128 × 128 × 16, variable-density Poisson
  (ky, kz) R = 4 with a 12 × 12 calibration region;
* 2D+time: the test slab with smooth periodic motion, 12 frames, 128²,
  time-interleaved R = 4 (8 ACS lines);
* cardiac-like cine (part ``cine``): short-axis slices of the procedural torso's
  *test* levels (``molrecon.sim.torso``), 160 × 128 over 320 × 256 mm, 12 frames
  over one beat (the left ventricle contracting by 40 % of its radius, 5 mm breathing
  drift), 12 coils, time-interleaved R = 6 (8 ACS lines);
* out of distribution: a macaque brain (INIA19 template, from Debian's
  ``mricron-data``) at R = 4, when installed;
* real scanner data: the Siemens 2-coil GRE phantom scan (fully sampled,
  undersampled retrospectively at R = 2 (2 coils cannot unfold more); reference = CG-SENSE of the full
  data with the same maps), and the real in-vivo 8-coil brain at R ≈ 7.9
  compared with BART's own ``pics`` reconstruction shipped beside it.

Methods: zf (zero-filled RSS), CG-SENSE (30 it, λ = 1e-3 relative), BART
``pics`` (100 iterations) with l1-wavelet (2D, 3D) or total variation along time
(2D+time), its λ tuned on *val*-slab cases of the same kind, and MOL with every
checkpoint given (``--weights name=path``) on the data kinds it declares. All on
the same data, same maps (molrecon's ESPIRiT for SENSE, MOL and BART), same
machine, same run. ``--previews DIR`` writes a PNG per data group (middle plane
of every method, and its error map × 5).

PSNR/SSIM/NRMSE follow ``molrecon.metrics`` (magnitudes, least-squares
intensity fit, data range = max of the reference).

    python benchmarks/quality.py --weights lr=src/molrecon/data/weights/mol_2d_lr.pt \
        --weights sn=src/molrecon/data/weights/mol_2d_sn.pt --json quality.json --previews docs/quality
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sense import read_cfl, write_cfl

from molrecon.physics.espirit import estimate_maps
from molrecon.io.detect import read_raw
from molrecon.metrics import compare
from molrecon.physics.masks import make_mask
from molrecon.physics.scaling import scale_factor
from molrecon.recon import ReconConfig, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


#: BART's regulariser per data kind: l1-wavelet over the image axes; for 2D+time total
#: variation along time (BART's dimension 10, flag 1024).
BART_PRIOR = {"2d": "W:3:0", "3d": "W:7:0", "2dt": "T:1024:0"}
BART_NAME = {"2d": "BART pics l1-wavelet", "3d": "BART pics l1-wavelet 3D",
             "2dt": "BART pics temporal TV"}


def _bart_layout(a: np.ndarray, kind: str) -> np.ndarray:
    """molrecon (C, D, Y, X) → BART: (X, Y, 1, C) for 2d (D = 1), (X, Y, Z, C) for 3d,
    (X, Y, 1, C, 1 … 1, T) for 2dt (frames on BART's time axis 10; shared maps keep T = 1)."""
    xyzc = np.transpose(a, (3, 2, 1, 0))                      # (X, Y, D, C)
    if kind == "2dt":
        x, y, t, c = xyzc.shape
        return np.transpose(xyzc, (0, 1, 3, 2)).reshape(x, y, 1, c, *([1] * 6), t)
    return xyzc


def bart_pics(kn: np.ndarray, maps: np.ndarray, kind: str, lam: float, iters: int = 100) -> np.ndarray:
    """BART ``pics`` with the kind's prior (:data:`BART_PRIOR`): kn (C, D, Y, X), maps
    (C, D or 1, Y, X) → image (D, Y, X)."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_cfl(d / "k", _bart_layout(kn, kind))
        write_cfl(d / "m", _bart_layout(maps, "3d" if kind == "3d" else "2d"))
        subprocess.run(["bart", "pics", "-S", "-R", f"{BART_PRIOR[kind]}:{lam:g}", "-i", str(iters),
                        str(d / "k"), str(d / "m"), str(d / "x")],
                       check=True, capture_output=True)
        x = read_cfl(d / "x")
        if kind == "2dt":
            x = x.reshape(x.shape[0], x.shape[1], -1)          # (X, Y, T)
        return np.transpose(x.reshape(x.shape[0], x.shape[1], -1), (2, 1, 0))


def checkpoint_kinds(path: str) -> tuple[str, ...]:
    from molrecon.models.checkpoint import load_checkpoint

    return tuple(load_checkpoint(path).kinds)


def problem(scan_path: Path) -> dict:
    """Normalised k-space, maps (molrecon ESPIRiT) and the scale, from a raw file."""
    return scan_problem(read_raw(scan_path))


def scan_problem(scan) -> dict:
    """:func:`problem` for a scan already read (or undersampled in memory)."""
    k = torch.from_numpy(scan.kspace)
    mask = torch.from_numpy(scan.mask)
    s = scale_factor(k, mask, scan.kind)
    kn = k / s.reshape(-1, 1, 1, 1, 1)
    maps = estimate_maps(kn, torch.from_numpy(scan.calib), scan.kind)
    return {"scan": scan, "kn": kn, "maps": maps, "mask": mask, "scale": s}


def score_molrecon(scan, truth: np.ndarray, weights: dict[str, str], rows: list[dict],
                   label: str, images: dict[str, np.ndarray] | None = None) -> None:
    """zf, CG-SENSE and MOL with every checkpoint that serves the scan's kind, on one scan
    (each image kept in ``images`` under its method name when a dict is given)."""
    usable = [n for n in weights if scan.kind in checkpoint_kinds(weights[n])]
    for method, wname in [("zf", None), ("sense", None)] + [("mol", n) for n in usable]:
        cfg = ReconConfig(method=method, weights=weights.get(wname) if wname else None,  # type: ignore[arg-type]
                          device="cpu")
        t0 = time.perf_counter()
        res = reconstruct(scan, cfg)
        dt = time.perf_counter() - t0
        m = compare(res.image.data, truth)
        name = f"MOL-{wname.upper()}" if wname else {"zf": "zero-filled", "sense": "CG-SENSE"}[method]
        row = {"data": label, "method": name, "psnr": m.psnr, "ssim": m.ssim, "nrmse": m.nrmse,
               "seconds": dt}
        if method == "mol":
            row["iterations"] = res.report.get("iterations")
            row["converged"] = res.report.get("converged")
        rows.append(row)
        if images is not None:
            images[name] = np.abs(res.image.data)


def run_methods(path: Path, truth: np.ndarray, weights: dict[str, str], bart_lam: float | None,
                rows: list[dict], label: str, preview: Path | None = None) -> None:
    """Every method on one raw file, scored against ``truth`` (B, D, Y, X); with
    ``preview``, a PNG of the middle plane of every method and its error map."""
    scan = read_raw(path)
    images: dict[str, np.ndarray] = {}
    score_molrecon(scan, truth, weights, rows, label, images)
    if bart_lam is not None and shutil.which("bart"):
        p = problem(path)
        t0 = time.perf_counter()
        x = bart_pics(p["kn"][0].numpy(), p["maps"][0].numpy(), scan.kind, bart_lam)
        dt = time.perf_counter() - t0
        m = compare(x[None], truth)
        rows.append({"data": label, "method": f"{BART_NAME[scan.kind]} (λ={bart_lam:g})", "psnr": m.psnr,
                     "ssim": m.ssim, "nrmse": m.nrmse, "seconds": dt})
        images["BART"] = np.abs(x[None])
    if preview is not None:
        write_montage(preview, truth, images, label)


def write_montage(path: Path, truth: np.ndarray, images: dict[str, np.ndarray], label: str,
                  reference: str = "truth") -> None:
    """Two rows on the truth's intensity window: truth and every method; the truth again and
    each method's error |x − truth| × 5 (after the least-squares intensity fit of the
    metrics), middle slice / partition / frame."""
    import io

    from PIL import Image

    from molrecon.preview import middle_plane, montage_png

    t = middle_plane(truth)
    top, bottom = [(reference, t)], [(reference, t)]
    for name, img in images.items():
        p = middle_plane(img)
        a = float(np.vdot(p, t).real / max(np.vdot(p, p).real, 1e-30))
        top.append((name, a * p))
        bottom.append((f"|error| x5 {name}", 5.0 * np.abs(a * p - t)))
    rows = [Image.open(io.BytesIO(montage_png(r, shared_window=True, scale=1))) for r in (top, bottom)]
    sheet = Image.new("L", (max(r.width for r in rows), sum(r.height for r in rows) + 4), color=40)
    sheet.paste(rows[0], (0, 0))
    sheet.paste(rows[1], (0, rows[0].height + 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"preview: {path} ({label})", file=sys.stderr, flush=True)


def tune_bart(tmp: Path, cases: list[SimulationConfig], grid: list[float]) -> float | None:
    """λ of the kind's BART prior with the best mean PSNR on *val*-slab cases."""
    if not shutil.which("bart"):
        return None
    scores: dict[float, list[float]] = {lam: [] for lam in grid}
    for i, cfg in enumerate(cases):
        f = tmp / f"val_{cfg.kind}_{cfg.acceleration:g}_{i}.h5"
        sim = simulate_to_file(cfg, f, tmp / f"{f.stem}_truth.nii.gz", force=True)
        truth = np.abs(sim.truth.data)
        p = problem(f)
        for lam in grid:
            x = bart_pics(p["kn"][0].numpy(), p["maps"][0].numpy(), cfg.kind, lam)
            scores[lam].append(compare(x[None], truth).psnr)
    best = max(grid, key=lambda lam: float(np.mean(scores[lam])))
    print(f"BART {cfg.kind} R={cfg.acceleration:g}: mean val PSNR by λ "
          + ", ".join(f"{lam:g}: {np.mean(v):.2f}" for lam, v in scores.items()) + f" → {best:g}",
          file=sys.stderr, flush=True)
    return best


def real_siemens(weights: dict[str, str], rows: list[dict], tmp: Path) -> None:
    """The real Siemens scan, undersampled retrospectively (R = 2, 16 ACS lines)."""
    path = REAL / "siemens_gre_2coil_full.h5"
    if not path.exists():
        return
    from molrecon.io.kspace import find_calibration_region

    full = read_raw(path)
    ref = reconstruct(full, ReconConfig(method="sense", device="cpu")).image.data
    _, _, d, y, _ = full.shape
    mask = make_mask("2d", "equispaced", (1, 1, d, y, 1), 2.0, 16, np.random.default_rng(0))
    mask = np.asarray(mask, dtype=bool)
    under = full.replace(kspace=(full.kspace * mask).astype(np.complex64), mask=mask,
                         calib=find_calibration_region(mask, "2d"))
    images: dict[str, np.ndarray] = {}
    label = "real Siemens GRE phantom, 2 coils, R=2 (ref: full CG-SENSE)"
    score_molrecon(under, np.abs(ref), weights, rows, label, images)
    if shutil.which("bart"):
        # No validation scan of this kind exists to tune BART's λ on, so it gets the best of
        # the grid on this scan itself: an oracle, which favours BART over MOL.
        p = scan_problem(under)
        best = None
        scores = []
        for lam in (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1):
            t0 = time.perf_counter()
            x = bart_pics(p["kn"][0].numpy(), p["maps"][0].numpy(), "2d", lam)
            dt = time.perf_counter() - t0
            m = compare(x[None], np.abs(ref))
            scores.append(f"{lam:g}: {m.psnr:.2f}")
            if best is None or m.psnr > best[1].psnr:
                best = (lam, m, dt, x)
        assert best is not None
        print(f"BART on the phantom, PSNR by λ {', '.join(scores)}", file=sys.stderr, flush=True)
        lam, m, dt, x = best
        rows.append({"data": label, "method": f"{BART_NAME['2d']} (λ={lam:g}, best on this scan)",
                     "psnr": m.psnr, "ssim": m.ssim, "nrmse": m.nrmse, "seconds": dt})
        images["BART"] = np.abs(x[None])
    if PREVIEWS is not None:
        write_montage(PREVIEWS / "quality_phantom.png", np.abs(ref), images, label,
                      reference="full CG-SENSE")


def real_invivo(weights: dict[str, str], rows: list[dict]) -> None:
    """The real in-vivo brain (8 coils, Poisson R ≈ 7.9, stored as 3D with one readout
    position) against BART's own pics result; 2D models see the (partition, phase) plane."""
    path = REAL / "invivo_brain_8coil_poisson_r8.h5"
    ref_path = REAL / "invivo_brain_bart_pics_reference.npy"
    if not (path.exists() and ref_path.exists()):
        return
    scan = read_raw(path)
    ref = np.load(ref_path)                                  # (180, 230, 2): (ky, kz, maps)
    ref_mag = np.sqrt(np.sum(np.abs(ref) ** 2, axis=-1)).T   # (230, 180) = (D, Y)
    images: dict[str, np.ndarray] = {}
    label = "real in-vivo brain, 8 coils, Poisson R≈7.9 (ref: BART pics)"
    score_molrecon(scan, ref_mag[None, :, :, None], weights, rows, label, images)
    if PREVIEWS is not None:
        write_montage(PREVIEWS / "quality_invivo.png", ref_mag[None, :, :, None], images, label,
                      reference="BART pics (reference)")


def markdown(rows: list[dict]) -> str:
    out = ["| data | method | PSNR (dB) | SSIM | NRMSE | time (s) | MOL iterations |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        it = "" if r.get("iterations") is None else f"{r['iterations']}" + ("" if r.get("converged") else " (not converged)")
        out.append(f"| {r['data']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                   f"{r['nrmse']:.4f} | {r['seconds']:.2f} | {it} |")
    return "\n".join(out)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean over the slices of each (data group, method)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        key = (r["data"].split(" #")[0], r["method"])
        groups.setdefault(key, []).append(r)
    out = []
    for (data, method), rs in groups.items():
        agg = {"data": f"{data} (mean of {len(rs)})" if len(rs) > 1 else data, "method": method}
        for k in ("psnr", "ssim", "nrmse", "seconds"):
            agg[k] = float(np.mean([r[k] for r in rs]))
        its = [r.get("iterations") for r in rs if r.get("iterations") is not None]
        if its:
            agg["iterations"] = int(np.max(its))
            agg["converged"] = all(r.get("converged") for r in rs)
        out.append(agg)
    return out


def sim(kind: str, accel: float, seed: int, pos: float, **extra: object) -> SimulationConfig:
    """The benchmark's acquisition of each kind (see the module docstring)."""
    base: dict[str, object] = {"coils": 8, "noise": 0.01, "acceleration": accel, "seed": seed,
                               "slice_position": pos}
    if kind == "2d":
        base.update(matrix=(256, 256), acs=16, mask="equispaced")
    elif kind == "3d":
        base.update(matrix=(128, 128, 16), fov_mm=(240.0, 240.0, 20.0), acs=12, mask="poisson")
    else:
        base.update(matrix=(128, 128), frames=12, acs=8, mask="interleaved")
    base.update(extra)
    return SimulationConfig(kind=kind, **base)  # type: ignore[arg-type]


PREVIEWS: Path | None = None     # --previews DIR

#: The cine part's acquisition beyond ``sim``'s 2D+time defaults (see the module docstring).
CINE: dict[str, object] = {"anatomy": "torso", "matrix": (160, 128), "fov_mm": (320.0, 256.0),
                           "coils": 12, "contraction": 0.4, "motion_mm": 5.0}


def run_case(tmp: Path, name: str, cfg: SimulationConfig, weights: dict[str, str],
             lam: float | None, rows: list[dict], label: str) -> None:
    f = tmp / f"{name}.h5"
    result = simulate_to_file(cfg, f, tmp / f"{name}_truth.nii.gz", force=True)
    preview = None
    if PREVIEWS is not None and (label.endswith(" #0") or " #" not in label):
        preview = PREVIEWS / f"quality_{name}.png"
    run_methods(f, np.abs(result.truth.data), weights, lam, rows, label, preview)
    print(f"done: {label}", file=sys.stderr, flush=True)


PARTS = ("2d", "ood", "vd", "3d", "2dt", "cine", "real")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", action="append", default=[],
                    help="name=path of a MOL checkpoint (used on the data kinds it declares)")
    ap.add_argument("--slices", type=int, default=4, help="held-out test slices per acceleration")
    ap.add_argument("--accelerations", default="4,6")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--previews", type=Path, help="folder for PNG montages (first case of each group)")
    args = ap.parse_args()
    global PREVIEWS
    PREVIEWS = args.previews
    torch.set_num_threads(args.threads)
    weights = dict(w.split("=", 1) for w in args.weights)
    parts = set(args.parts.split(","))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmpname:
        tmp = Path(tmpname)
        for accel in (float(a) for a in args.accelerations.split(",")) if "2d" in parts else ():
            lam = tune_bart(tmp, [sim("2d", accel, 100 + i, pos) for i, pos in enumerate((0.57, 0.63))],
                            [0.0003, 0.001, 0.003, 0.01])
            for i, pos in enumerate(np.linspace(0.72, 0.82, args.slices)):
                run_case(tmp, f"test_{accel:g}_{i}", sim("2d", accel, 500 + i, float(pos)), weights,
                         lam, rows, f"held-out brain 2D, R={accel:g} #{i}")
            if accel == 4.0 and "ood" in parts:
                try:
                    run_case(tmp, "ood", sim("2d", 4.0, 900, 0.6, anatomy="inia19"), weights, lam,
                             rows, "out-of-distribution macaque brain 2D, R=4")
                except Exception as exc:  # noqa: BLE001 - optional anatomy
                    print(f"OOD case skipped: {exc}", file=sys.stderr)
        if "vd" in parts:
            # The protocol of real 2D brain scans retrospectively undersampled elsewhere:
            # 1D variable density with 24 calibration lines, 12 coils.
            for accel in (4.0, 6.0):
                vd = {"mask": "random", "acs": 24, "coils": 12}
                lam = tune_bart(tmp, [sim("2d", accel, 120 + i, pos, **vd)
                                      for i, pos in enumerate((0.57, 0.63))],
                                [0.0003, 0.001, 0.003, 0.01])
                for i, pos in enumerate(np.linspace(0.72, 0.82, args.slices)):
                    run_case(tmp, f"vd_{accel:g}_{i}", sim("2d", accel, 520 + i, float(pos), **vd),
                             weights, lam, rows,
                             f"held-out brain 2D, 12 coils, VD R={accel:g}, 24 ACS #{i}")
        if "3d" in parts:
            lam = tune_bart(tmp, [sim("3d", 4.0, 300, 0.60)], [0.0001, 0.0003, 0.001, 0.003])
            for i, pos in enumerate((0.74, 0.80)):
                run_case(tmp, f"vol_{i}", sim("3d", 4.0, 310 + i, pos), weights, lam, rows,
                         f"held-out brain 3D (128²×16, Poisson R=4) #{i}")
        if "2dt" in parts:
            lam = tune_bart(tmp, [sim("2dt", 4.0, 600 + i, pos) for i, pos in enumerate((0.57, 0.63))],
                            [0.001, 0.003, 0.01, 0.03])
            for i, pos in enumerate((0.74, 0.80)):
                run_case(tmp, f"dyn_{i}", sim("2dt", 4.0, 700 + i, pos), weights, lam, rows,
                         f"held-out brain 2D+time (128², 12 frames, interleaved R=4) #{i}")
        if "cine" in parts:
            cine = CINE
            lam = tune_bart(tmp, [sim("2dt", 6.0, 620 + i, pos, **cine)
                                  for i, pos in enumerate((0.57, 0.63))],
                            [0.001, 0.003, 0.01, 0.03])
            for i, pos in enumerate((0.74, 0.80)):
                run_case(tmp, f"cine_{i}", sim("2dt", 6.0, 720 + i, pos, **cine), weights, lam,
                         rows, f"held-out cardiac-like cine (160×128, 12 frames, interleaved R=6) #{i}")
        if "real" in parts:
            real_siemens(weights, rows, tmp)
            real_invivo(weights, rows)
    table = summarise(rows)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, date {time.strftime('%Y-%m-%d')}")
    print(markdown(table))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": table}, indent=2))


if __name__ == "__main__":
    main()
