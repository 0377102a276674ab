"""Coil maps and CG-SENSE, map by map: molrecon's ESPIRiT against BART ``ecalib``.

Which part of the SENSE chain loses image quality — the maps or the solver — on
scans with a fully sampled reference:

* the real Siemens 2-coil GRE phantom (``../shared/data/real``), undersampled
  retrospectively (R = 2, 24 calibration lines; two coils cannot unfold more);
* held-out simulated brain slices (test slab of Colin 27, 8 and 12 coils,
  noise 0.01, 256²), fully sampled then undersampled retrospectively
  (variable-density random R = 4, 24 calibration lines), with their truth.

For each scan and each set of maps — molrecon's ESPIRiT in the variants of
:data:`VARIANTS`, and ``bart ecalib -m1`` with BART's defaults — CG-SENSE
(30 iterations) is run with molrecon's solver at its default relative λ and at
λ = 0, and ``bart pics -l2 -i 30`` (BART's defaults) with the same maps. PSNR
and SSIM come from ``molrecon.metrics`` (magnitudes, least-squares intensity fit)
against the truth (simulated) or the root-sum-of-squares of the fully sampled
coil images (real phantom). One more row runs BART's defaults end to end
(``ecalib`` with its two sets of maps, ``pics -l2``, the two images combined
by root sum of squares), what a BART user gets without options. Map agreement: mean ``|<s_m, s_b>|`` where both
keep the pixel, and the fraction of the object (reference above 10 % of its
maximum) that each crop mask zeroes.

    python benchmarks/bench_maps.py [--threads 2] [--json out.json] [--previews DIR]
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

from molrecon.physics.espirit import EspiritConfig, estimate_maps
from molrecon.io.detect import read_raw
from molrecon.io.kspace import find_calibration_region
from molrecon.metrics import compare
from molrecon.physics.fft import ifftc
from molrecon.physics.masks import make_mask
from molrecon.physics.scaling import scale_factor
from molrecon.physics.sense import SenseOperator, cg_sense
from molrecon.recon import ReconConfig
from molrecon.sim import SimulationConfig, simulate_to_file

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"

#: molrecon ESPIRiT variants compared (name → config); "default" is what reconstruct uses.
VARIANTS: dict[str, EspiritConfig] = {
    "default": EspiritConfig(),
    "full-grid eigh": EspiritConfig(eigen_grid=None),
    "no crop": EspiritConfig(crop=0.0),
}


def bart(args: list[str], threads: int) -> None:
    env = {"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"}
    subprocess.run(["bart", *args], check=True, capture_output=True, env=env)


def to_bart(a: np.ndarray) -> np.ndarray:
    """(C, 1, Y, X) → BART (X, Y, 1, C)."""
    return np.transpose(a[:, 0], (2, 1, 0))[:, :, None, :]


def from_bart_maps(a: np.ndarray, c: int) -> np.ndarray:
    """BART (X, Y, 1, C) (trailing ones dropped) → (C, 1, Y, X)."""
    a = a.reshape(a.shape[0], a.shape[1], c)
    return np.transpose(a, (2, 1, 0))[:, None]


def bart_maps(k: np.ndarray, tmp: Path, threads: int) -> np.ndarray:
    write_cfl(tmp / "k", to_bart(k))
    bart(["ecalib", "-m1", str(tmp / "k"), str(tmp / "bm")], threads)
    return from_bart_maps(read_cfl(tmp / "bm"), k.shape[0]).astype(np.complex64)


def bart_two_maps_l2(k: np.ndarray, tmp: Path, threads: int) -> np.ndarray:
    """BART's defaults end to end: ``ecalib`` (two sets of maps) and ``pics -l2 -i 30``; the
    two images combined by root sum of squares, (1, Y, X)."""
    write_cfl(tmp / "k", to_bart(k))
    bart(["ecalib", str(tmp / "k"), str(tmp / "bm2")], threads)
    bart(["pics", "-l2", "-i", "30", str(tmp / "k"), str(tmp / "bm2"), str(tmp / "x2")], threads)
    x = read_cfl(tmp / "x2")                                   # (X, Y, 1, 1, 2) → (X, Y, 2)
    x = x.reshape(x.shape[0], x.shape[1], -1)
    return np.sqrt(np.sum(np.abs(x) ** 2, axis=-1)).T[None]


def bart_pics_l2(k: np.ndarray, maps: np.ndarray, tmp: Path, threads: int) -> np.ndarray:
    write_cfl(tmp / "k", to_bart(k))
    write_cfl(tmp / "m", to_bart(maps))
    bart(["pics", "-l2", "-i", "30", str(tmp / "k"), str(tmp / "m"), str(tmp / "x")], threads)
    x = read_cfl(tmp / "x")
    return np.transpose(x.reshape(x.shape[0], x.shape[1]), (1, 0))[None]     # (1, Y, X)


def cases(tmp: Path) -> list[dict]:
    """(name, normalised undersampled k-space (C, 1, Y, X), calib, reference or None)."""
    out = []
    siemens = REAL / "siemens_gre_2coil_full.h5"
    if siemens.exists():
        out.append(undersample("real Siemens GRE phantom, 2 coils, R=2", read_raw(siemens),
                               None, "equispaced", 2.0))
    for coils, seed in ((8, 31), (12, 32)):
        cfg = SimulationConfig(kind="2d", coils=coils, noise=0.01, matrix=(256, 256),
                               acceleration=1.0, seed=seed, slice_position=0.77)
        f = tmp / f"sim{coils}.h5"
        sim = simulate_to_file(cfg, f, tmp / f"sim{coils}_truth.nii.gz", force=True)
        out.append(undersample(f"simulated test-slab brain, {coils} coils, VD R=4",
                               read_raw(f), sim.truth.data[0], "random", 4.0))
    return out


def undersample(name: str, scan, truth: np.ndarray | None, family: str, accel: float) -> dict:
    full = scan.kspace[0]                                               # (C, 1, Y, X)
    rss = np.sqrt(np.sum(np.abs(np.asarray(ifftc(torch.from_numpy(full), (-2, -1)))) ** 2, axis=0))
    mask = np.asarray(make_mask("2d", family, (1, 1, 1, full.shape[2], 1), accel, 24,
                                np.random.default_rng(0)), dtype=bool)   # (1, 1, 1, Y, 1)
    k = torch.from_numpy(full[None] * mask)
    s = float(scale_factor(k, torch.from_numpy(mask), "2d")[0])
    ref = rss if truth is None else np.abs(truth)
    return {"name": name, "k": (k[0] / s).numpy().astype(np.complex64),
            "calib": find_calibration_region(mask, "2d"), "ref": ref,
            "ref_name": "RSS of the full data" if truth is None else "truth"}


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean |<a, b>| over coils where both are non-zero; the two keep masks."""
    ka = np.sum(np.abs(a) ** 2, axis=0) > 0
    kb = np.sum(np.abs(b) ** 2, axis=0) > 0
    both = ka & kb
    inner = np.abs(np.sum(np.conj(a) * b, axis=0))
    return float(inner[both].mean()) if both.any() else float("nan"), ka, kb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--previews", type=Path, help="folder for PNGs of the crop masks")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    have_bart = shutil.which("bart") is not None
    rows: list[dict] = []
    lam = ReconConfig().sense_lambda
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        for case in cases(tmp):
            k = case["k"]                                                  # (C, D, Y, X)
            maps: dict[str, np.ndarray] = {}
            for vname, vcfg in VARIANTS.items():
                kt = torch.from_numpy(k)[None]
                cal = torch.from_numpy(case["calib"])
                t0 = time.perf_counter()
                m = estimate_maps(kt, cal, "2d", config=vcfg)[0].numpy()
                maps[f"molrecon ({vname})"] = m
                rows.append({"case": case["name"], "maps": f"molrecon ({vname})",
                             "maps_s": time.perf_counter() - t0})
            if have_bart:
                t0 = time.perf_counter()
                maps["bart ecalib -m1"] = bart_maps(k, tmp, args.threads)
                rows.append({"case": case["name"], "maps": "bart ecalib -m1",
                             "maps_s": time.perf_counter() - t0})
            ref_maps = maps.get("bart ecalib -m1")
            ref = case["ref"]
            obj = None if ref is None else ref[0] > 0.1 * ref.max()
            for row in [r for r in rows if r["case"] == case["name"]]:
                m = maps[row["maps"]]
                keep = np.sum(np.abs(m) ** 2, axis=0)[0] > 0
                row["kept_fraction"] = float(keep.mean())
                if obj is not None:
                    row["object_cropped"] = float((obj & ~keep).sum() / obj.sum())
                if ref_maps is not None:
                    row["agreement_with_bart"] = agreement(m[:, 0], ref_maps[:, 0])[0]
                if ref is None:
                    continue
                op = SenseOperator(torch.from_numpy(m)[None], torch.from_numpy(
                    (np.abs(k).sum(axis=(0, 1, 3)) > 0)[None, None, None, :, None]), "2d")
                y = torch.from_numpy(k)[None]
                for label, lam_v in (("molrecon CG", lam), ("molrecon CG λ=0", 0.0)):
                    x = cg_sense(op, y, lam=lam_v, max_iter=30).x[0].numpy()
                    mt = compare(x, ref)
                    row[f"{label} PSNR"] = mt.psnr
                    row[f"{label} SSIM"] = mt.ssim
                if have_bart:
                    x = bart_pics_l2(k, m, tmp, args.threads)
                    mt = compare(x, ref)
                    row["bart pics -l2 PSNR"] = mt.psnr
                    row["bart pics -l2 SSIM"] = mt.ssim
            if have_bart and ref is not None:
                mt = compare(bart_two_maps_l2(k, tmp, args.threads), ref)
                rows.append({"case": case["name"], "maps": "bart ecalib (2 maps, RSS of the two "
                             "images)", "bart pics -l2 PSNR": mt.psnr, "bart pics -l2 SSIM": mt.ssim})
            if args.previews is not None:
                write_masks(args.previews, case["name"], maps, ref)
            print(f"done: {case['name']}", file=sys.stderr, flush=True)
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": platform.node(), "threads": args.threads,
                                         "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                        indent=1))
    return 0


def write_masks(folder: Path, name: str, maps: dict[str, np.ndarray], ref: np.ndarray | None
                ) -> None:
    """Coil-combined map magnitude (the crop mask shows as black) of every map set, beside
    the reference."""
    from molrecon.preview import montage_png

    panels = [] if ref is None else [("reference", ref[0])]
    for mname, m in maps.items():
        panels.append((mname, np.sqrt(np.sum(np.abs(m[:, 0]) ** 2, axis=0))))
    folder.mkdir(parents=True, exist_ok=True)
    slug = "".join(ch if ch.isalnum() else "_" for ch in name.split(",")[0]).strip("_").lower()
    (folder / f"maps_{slug}.png").write_bytes(montage_png(panels, scale=1))


def markdown(rows: list[dict]) -> str:
    cols = ["case", "maps", "maps_s", "kept_fraction", "object_cropped", "agreement_with_bart",
            "molrecon CG PSNR", "molrecon CG λ=0 PSNR", "bart pics -l2 PSNR",
            "molrecon CG SSIM", "bart pics -l2 SSIM"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
