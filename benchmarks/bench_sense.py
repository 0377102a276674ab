"""ESPIRiT and CG-SENSE: molrecon against BART on one simulated 2D slice (+ a 3D timing).

The slice: a Shepp–Logan phantom with a smooth random phase, 8 birdcage-like
coil maps, simulated on a 2× finer grid and cropped in k-space (no inverse
crime), complex Gaussian noise, equispaced R=4 lines plus 24 ACS lines.

Timed in one run (torch limited to ``--threads`` threads, BART to the same
number of OpenMP threads):

* coil maps: ``molrecon.physics.espirit.estimate_maps`` vs ``bart ecalib -m1``;
* CG-SENSE, 30 iterations, the same Tikhonov λ: ``molrecon.physics.sense.cg_sense``
  vs ``bart pics -l2 -r λ -i 30``, both with the *same* (molrecon) maps;
* image quality: PSNR of both against the fully sampled coil combination
  with those maps, after a least-squares complex scale fit (this removes any
  difference in intensity conventions), and their difference;
* 3D: CG-SENSE on a 3D volume solved as one problem vs split into 2D
  problems along the readout (:func:`molrecon.physics.sense.decouple_readout`).

BART is called through its command line with ``.cfl/.hdr`` files; its time
includes process start-up and file I/O (a few ms).

Usage::

    python benchmarks/bench_sense.py [--size 256] [--coils 8] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------- BART .cfl files


def write_cfl(stem: Path, array: np.ndarray) -> None:
    """Write ``stem.hdr`` and ``stem.cfl`` (complex64, column-major, BART's layout)."""
    dims = list(array.shape) + [1] * max(0, 16 - array.ndim)
    stem.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, dims)) + "\n")
    np.asarray(array, dtype=np.complex64).ravel(order="F").tofile(stem.with_suffix(".cfl"))


def read_cfl(stem: Path) -> np.ndarray:
    """Read a BART ``.cfl/.hdr`` pair into a complex64 array (trailing 1s dropped)."""
    lines = stem.with_suffix(".hdr").read_text().splitlines()
    dims = [int(v) for v in lines[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(stem.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims, order="F")


def to_bart(k: np.ndarray) -> np.ndarray:
    """molrecon ``(C, Y, X)`` → BART ``(X, Y, 1, C)``."""
    return np.transpose(k, (2, 1, 0))[:, :, None, :]


def from_bart(a: np.ndarray, coils: bool) -> np.ndarray:
    """BART ``(X, Y[, 1, C])`` → molrecon ``(C, Y, X)`` (or ``(Y, X)`` for an image)."""
    if coils:
        a = a.reshape(a.shape[0], a.shape[1], -1)
        return np.transpose(a, (2, 1, 0))
    return a.reshape(a.shape[0], a.shape[1]).T


# ---------------------------------------------------------------------- simulation

# Modified Shepp–Logan: (intensity, semi-axis a, semi-axis b, centre x, centre y, angle °)
_ELLIPSES = [
    (1.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.874, 0.0, -0.0184, 0.0),
    (-0.2, 0.11, 0.31, 0.22, 0.0, -18.0),
    (-0.2, 0.16, 0.41, -0.22, 0.0, 18.0),
    (0.1, 0.21, 0.25, 0.0, 0.35, 0.0),
    (0.1, 0.046, 0.046, 0.0, 0.1, 0.0),
    (0.1, 0.046, 0.046, 0.0, -0.1, 0.0),
    (0.1, 0.046, 0.023, -0.08, -0.605, 0.0),
    (0.1, 0.023, 0.023, 0.0, -0.606, 0.0),
    (0.1, 0.023, 0.046, 0.06, -0.605, 0.0),
]


def phantom(n: int) -> np.ndarray:
    """Shepp–Logan phantom on an ``n×n`` grid spanning [-1, 1)², rows = y."""
    coords = (np.arange(n) - n // 2) / (n / 2)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    img = np.zeros((n, n))
    for val, a, b, x0, y0, ang in _ELLIPSES:
        t = np.deg2rad(ang)
        xr = (xx - x0) * np.cos(t) + (yy - y0) * np.sin(t)
        yr = -(xx - x0) * np.sin(t) + (yy - y0) * np.cos(t)
        img[(xr / a) ** 2 + (yr / b) ** 2 <= 1] += val
    return img


def coil_maps(n: int, coils: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth complex sensitivities of ``coils`` loops on a circle around the FOV: (C, n, n)."""
    coords = (np.arange(n) - n // 2) / (n / 2)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    maps = []
    for c in range(coils):
        ang = 2 * np.pi * c / coils + rng.uniform(-0.1, 0.1)
        cx, cy = 1.6 * np.cos(ang), 1.6 * np.sin(ang)
        dist2 = (xx - cx) ** 2 + (yy - cy) ** 2
        mag = 1.0 / (0.3 + dist2)
        phase = ang + 0.8 * (xx * np.cos(ang) + yy * np.sin(ang)) + rng.uniform(-np.pi, np.pi)
        maps.append(mag * np.exp(1j * phase))
    m = np.stack(maps)
    return m / np.sqrt((np.abs(m) ** 2).sum(axis=0)).max()


def simulate_slice(n: int, coils: int, accel: int, acs: int, noise: float, seed: int
                   ) -> dict[str, np.ndarray]:
    """Fully sampled and undersampled k-space ``(C, n, n)``, mask ``(n,)``, truth ``(n, n)``."""
    rng = np.random.default_rng(seed)
    fine = 2 * n
    coords = (np.arange(fine) - fine // 2) / (fine / 2)
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    img = phantom(fine) * np.exp(1j * np.pi * 0.3 * (xx + 0.5 * yy ** 2))
    coil_imgs = coil_maps(fine, coils, rng) * img
    k_fine = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(coil_imgs, axes=(-2, -1)), norm="ortho"),
                             axes=(-2, -1))
    lo = fine // 2 - n // 2
    k = k_fine[:, lo:lo + n, lo:lo + n] / 2.0        # crop: the n×n band, ortho scale kept
    scale = np.abs(k).max()
    k = k + noise * scale * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    mask = np.zeros(n, dtype=bool)
    mask[::accel] = True
    mask[n // 2 - acs // 2: n // 2 + acs // 2] = True
    truth_k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img), norm="ortho"))[lo:lo + n,
                                                                                 lo:lo + n] / 2
    truth = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(truth_k), norm="ortho"))
    return {"full": k.astype(np.complex64), "under": (k * mask[None, :, None]).astype(np.complex64),
            "mask": mask, "truth": truth.astype(np.complex64)}


# ---------------------------------------------------------------------- measures


def fit_psnr(x: np.ndarray, ref: np.ndarray, support: np.ndarray) -> float:
    """PSNR (dB) of ``x`` against ``ref`` inside ``support`` after a complex LS scale fit."""
    a, r = x[support], ref[support]
    alpha = np.vdot(a, r) / np.vdot(a, a)
    err = np.sqrt(np.mean(np.abs(alpha * a - r) ** 2))
    return float(20 * np.log10(np.abs(r).max() / err))


def run_bart(args: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run(["bart", *args], check=True, capture_output=True, env=env)


# ---------------------------------------------------------------------- benchmark


def interleaved(jobs: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Minimum wall time of each job over ``repeat`` rounds; a round runs every job once,
    so that the tools compared share the machine's conditions (other load, caches)."""
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(max(repeat, 1)):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_2d(size: int, coils: int, threads: int, repeat: int, lam: float, iters: int
             ) -> list[dict[str, object]]:
    import torch

    from molrecon.physics.espirit import estimate_maps, subspace_agreement
    from molrecon.physics.sense import SenseOperator, cg_sense

    sim = simulate_slice(size, coils, accel=4, acs=24, noise=0.0003, seed=0)
    k = torch.from_numpy(sim["under"])[None, :, None]                      # (1, C, 1, Y, X)
    mask = torch.from_numpy(sim["mask"])[None, None, None, :, None]        # (1, 1, 1, Y, 1)
    accel = size / float(sim["mask"].sum())
    task_maps = f"ESPIRiT {size}² {coils} coils, 24 ACS"
    task_cg = f"CG-SENSE {iters} it, R={accel:.2f}"

    maps_t = estimate_maps(k, None, "2d")                                  # (1, C, 1, Y, X)
    maps = maps_t.numpy()[0, :, 0]                                        # (C, Y, X)
    op = SenseOperator(maps_t, mask, "2d")
    x_ours = cg_sense(op, k, lam=lam, max_iter=iters).x.numpy()[0, 0]
    ref = SenseOperator(maps_t, torch.ones_like(mask), "2d").adjoint(
        torch.from_numpy(sim["full"])[None, :, None]).numpy()[0, 0]
    support = np.abs(maps).sum(axis=0) > 0
    zf = np.sqrt((np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(
        sim["under"], axes=(-2, -1)), norm="ortho"), axes=(-2, -1))) ** 2).sum(axis=0))
    psnr_ours = fit_psnr(x_ours, ref, support)
    lam_abs = lam * float(op.normal_diagonal().mean())
    jobs: dict[str, Callable[[], object]] = {
        "maps": lambda: estimate_maps(k, None, "2d"),
        "cg": lambda: cg_sense(op, k, lam=lam, max_iter=iters),
    }
    rows: list[dict[str, object]] = []
    have_bart = shutil.which("bart") is not None
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if have_bart:
            write_cfl(d / "k", to_bart(sim["under"]))
            write_cfl(d / "maps", to_bart(maps))
            ecalib = ["ecalib", "-m1", str(d / "k"), str(d / "bmaps")]
            # pics minimises ‖Ax − y‖² + λ‖x‖² with a unitary centred FFT, so the same
            # absolute λ gives the same normal equations; -w 1 disables its data scaling.
            pics = ["pics", "-l2", "-r", f"{lam_abs:.8g}", "-i", str(iters), "-w", "1",
                    str(d / "k"), str(d / "maps"), str(d / "x")]
            jobs["ecalib"] = lambda: run_bart(ecalib, threads)
            jobs["pics"] = lambda: run_bart(pics, threads)
        else:
            print("bart not found: BART rows skipped", file=sys.stderr)
        times = interleaved(jobs, repeat)
        rows.append({"task": task_maps, "tool": "molrecon", "seconds": times["maps"]})
        if have_bart:
            bmaps = from_bart(read_cfl(d / "bmaps"), coils=True)           # (C, Y, X)
            agree = subspace_agreement(torch.from_numpy(maps)[None],
                                       torch.from_numpy(bmaps)[None])
            both = torch.from_numpy(support & (np.abs(bmaps).sum(axis=0) > 0))
            rows.append({"task": task_maps, "tool": "bart ecalib -m1",
                         "seconds": times["ecalib"], "agreement": float(agree[0][both].mean())})
            x_bart = from_bart(read_cfl(d / "x"), coils=False)
    rows.append({"task": task_cg, "tool": "molrecon", "seconds": times["cg"],
                 "psnr_db": psnr_ours, "lambda_abs": lam_abs})
    if have_bart:
        psnr_bart = fit_psnr(x_bart, ref, support)
        rows.append({"task": task_cg, "tool": "bart pics -l2", "seconds": times["pics"],
                     "psnr_db": psnr_bart})
    rows.append({"task": "zero-filled RSS", "tool": "numpy", "seconds": 0.0,
                 "psnr_db": fit_psnr(zf.astype(np.complex64), np.abs(ref), support)})
    if have_bart:
        rows.append({"task": "PSNR difference molrecon − BART", "tool": "", "seconds": 0.0,
                     "psnr_db": psnr_ours - psnr_bart})
        rows.append({"task": "speed ratio BART/molrecon (maps, CG)", "tool": "", "seconds": 0.0,
                     "ratio": f"{times['ecalib'] / times['maps']:.2f}, "
                              f"{times['pics'] / times['cg']:.2f}"})
    return rows


def bench_3d(shape: tuple[int, int, int], coils: int, repeat: int, iters: int
             ) -> list[dict[str, object]]:
    import torch

    from molrecon.physics.espirit import EspiritConfig, estimate_maps
    from molrecon.physics.fft import fftc
    from molrecon.physics.sense import SenseOperator, cg_sense

    d, y, x = shape
    rng = np.random.default_rng(0)
    # Ellipsoid × (ring of coils in the (Y, X) plane, modulated along D); (kz, ky)
    # pattern: random 30 % + a 24×24 fully sampled centre.
    zz = (np.arange(d) - d // 2) / (d / 2)
    obj = np.stack([phantom(max(y, x))[:y, :x] * (abs(z) < 0.8) for z in zz])    # (D, Y, X)
    maps2d = coil_maps(max(y, x), coils, rng)[:, :y, :x]                         # (C, Y, X)
    maps_np = maps2d[:, None] * np.exp(0.5j * zz)[None, :, None, None] \
        * (1.2 - 0.3 * zz[None, :, None, None] ** 2)
    pattern = rng.random((d, y)) < 0.3
    pattern[d // 2 - 12: d // 2 + 12, y // 2 - 12: y // 2 + 12] = True
    mask = torch.from_numpy(pattern)[None, None, :, :, None]                      # (1,1,D,Y,1)
    k = fftc(torch.from_numpy(maps_np * obj)[None].to(torch.complex64), (-3, -2, -1)) * mask
    rows: list[dict[str, object]] = []
    for stride in (1, 4):
        cfg = EspiritConfig(readout_stride=stride)
        t0 = time.perf_counter()
        maps = estimate_maps(k, None, "3d", config=cfg)
        t = time.perf_counter() - t0
        rows.append({"task": f"3D ESPIRiT {d}×{y}×{x}, {coils} coils, 24×24 ACS",
                     "tool": f"molrecon, hybrid, readout stride {stride}", "seconds": t})
    op = SenseOperator(maps, mask, "3d")
    chunk = max(x // 4, 1)
    variants: dict[str, Callable[[], object]] = {
        "one 3D problem": lambda: cg_sense(op, k, max_iter=iters, decouple=False),
        "readout split": lambda: cg_sense(op, k, max_iter=iters, decouple=True),
        f"readout split, chunks of {chunk}":
            lambda: cg_sense(op, k, max_iter=iters, decouple=True, readout_chunk=chunk),
    }
    for label, t in interleaved(variants, repeat).items():
        rows.append({"task": f"3D CG-SENSE {iters} it {d}×{y}×{x}, {coils} coils",
                     "tool": f"molrecon, {label}", "seconds": t})
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    out = ["| task | tool | time (s) | PSNR (dB) | other |", "|---|---|---:|---:|---|"]
    for r in rows:
        sec = f"{r['seconds']:.3f}" if r.get("seconds") else ""
        ps = f"{r['psnr_db']:.2f}" if "psnr_db" in r else ""
        other = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in r.items() if k not in ("task", "tool", "seconds", "psnr_db"))
        out.append(f"| {r['task']} | {r['tool']} | {sec} | {ps} | {other} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--lam", type=float, default=1e-3, help="relative λ of cg_sense")
    parser.add_argument("--shape3d", type=int, nargs=3, default=(64, 64, 64),
                        metavar=("D", "Y", "X"))
    parser.add_argument("--skip-3d", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = bench_2d(args.size, args.coils, args.threads, args.repeat, args.lam, args.iters)
    if not args.skip_3d:
        rows += bench_3d(tuple(args.shape3d), args.coils, args.repeat, args.iters)
    print(markdown(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
