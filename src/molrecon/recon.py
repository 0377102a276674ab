"""The reconstruction job: raw scan → coil maps → zero-filled | CG-SENSE | MOL → image.

``reconstruct(scan, config)`` is what ``molrecon reconstruct`` runs. Steps:

1. k-space (already prewhitened and oversampling-free, see ``io``) goes to the
   device in chunks of slices (``batch_size``; all slices at once by default).
2. An intensity scale ``s`` per slice (``physics.scaling``) divides the data, so
   learned priors always see the intensity range they were trained on; the
   final image is multiplied back by ``s`` (the output is in scanner units).
3. ESPIRiT coil maps are estimated from the calibration region (``coils``).
4. The chosen method:
   * ``zf``: inverse FFT of the zero-filled k-space, root-sum-of-squares over coils;
   * ``sense``: CG-SENSE, (AᴴA + λI)x = Aᴴb with a small Tikhonov λ;
   * ``mol``: the MOL fixed point, F(x) + λAᴴ(Ax − b) = 0 with F = I − H,
     initialised from CG-SENSE and solved by the deep-equilibrium engine.
5. A plain-JSON report records what ran and how it converged.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .config import ENSEMBLE_SIZES, SENSE_ITERS, SENSE_LAMBDA
from .errors import CheckpointError, ConfigError, ConvergenceWarning, MolreconError
from .io.types import ImageVolume, RawScan
from .memory import ANDERSON_MEMORY, plan_batches

if TYPE_CHECKING:
    import torch

    from .deq.inference import MolEngine
    from .physics.compression import Compression
from .kinds import spatial_dims

Method = Literal["mol", "sense", "zf"]
#: The λ a user may set (``--lam L``): λ is stored as a float32 logarithm.
LAM_RANGE = (1e-6, 1e6)
METHODS: tuple[str, ...] = ("mol", "sense", "zf")


@dataclass(frozen=True)
class ReconConfig:
    """Options of one reconstruction (built by the CLI, or by hand from Python).

    ``max_iter``/``tol`` govern the MOL fixed-point iteration: it stops when the
    relative fixed-point residual ‖T(x) − x‖/‖x‖ ≤ ``tol`` for every slice.
    ``alpha``/``solver``/``cg_iters`` override the checkpoint's values (the
    fixed point does not depend on α; only the speed does); ``anderson_memory`` is
    the number of past iterates the Anderson solver mixes (speed and memory only);
    ``ensemble`` (1, 2 or 4) overrides the number of image flips the prior averages over
    (:class:`molrecon.models.cnn.CNNConfig`; 1 is the fastest, the fixed point moves).
    ``sense_lambda`` is the Tikhonov weight of CG-SENSE relative to the data
    scale (the data are normalised first, so it is dimensionless).
    ``compile``/``precision`` select MOL's fast step (:mod:`molrecon.deq.accel`):
    a compiled step, and the prior in bf16 (``auto``: only on CUDA where the model
    records a passed accuracy gate); both off by default.
    ``espirit_crop`` zeroes the ESPIRiT maps where the eigenvalue is below it (BART
    ``ecalib -c``, default 0.8 as ``ecalib -m1``; 0 keeps the maps everywhere).
    ``lam`` is MOL's data weight: ``auto`` sets it per slice (series, volume) from the
    data's noise level and acceleration by the checkpoint's rule (:mod:`molrecon.physics.noise`; the
    checkpoint's λ when it has no rule), ``fixed`` uses the checkpoint's λ everywhere,
    and a number (in ``LAM_RANGE``) replaces it everywhere.
    """

    method: Method = "mol"
    weights: str | None = None
    device: str = "auto"
    max_iter: int = 100
    tol: float = 1e-4
    alpha: float | None = None
    solver: Literal["anderson", "plain"] = "anderson"
    anderson_memory: int = ANDERSON_MEMORY
    cg_iters: int | None = None
    ensemble: int | None = None
    sense_lambda: float = SENSE_LAMBDA
    sense_iters: int = SENSE_ITERS
    espirit_crop: float = 0.8
    batch_size: int | None = None
    keep_baselines: bool = False
    seed: int = 0
    coils: int | str | None = None
    coil_compression: str = "auto"
    maps: str | None = None
    compile: bool = False
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    lam: float | Literal["auto", "fixed"] = "auto"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.max_iter < 1:
            raise ConfigError("--max-iter must be at least 1")
        if not (0.0 < self.tol < 1.0):
            raise ConfigError("--tol must lie in (0, 1)")
        if self.alpha is not None and not (0.0 < self.alpha <= 1.0):
            raise ConfigError("--alpha must lie in (0, 1]")
        if (isinstance(self.anderson_memory, bool) or not isinstance(self.anderson_memory, int)
                or self.anderson_memory < 1):
            raise ConfigError(f"--anderson-memory must be a positive integer, got "
                              f"{self.anderson_memory!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        if self.sense_lambda < 0:
            raise ConfigError("--sense-lambda must be >= 0")
        if self.sense_iters < 1:
            raise ConfigError("--sense-iters must be at least 1")
        if not (0.0 <= self.espirit_crop < 1.0):
            raise ConfigError("--espirit-crop must lie in [0, 1)")
        if self.cg_iters is not None and self.cg_iters < 1:
            raise ConfigError("--cg-iters must be at least 1")
        if self.ensemble is not None and (isinstance(self.ensemble, bool)
                                          or self.ensemble not in ENSEMBLE_SIZES):
            raise ConfigError(f"--ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}, "
                              f"got {self.ensemble!r}")
        if self.coils is not None and self.coils != "auto" and (
                isinstance(self.coils, bool) or not isinstance(self.coils, int) or self.coils < 1):
            raise ConfigError(f"--coils must be a positive integer or 'auto', got {self.coils!r}")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"--compile must be a bool, got {self.compile!r}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"--precision must be fp32, bf16 or auto, got {self.precision!r}")
        if isinstance(self.lam, str):
            bad = self.lam not in ("auto", "fixed")
        else:
            bad = isinstance(self.lam, bool) or not (isinstance(self.lam, (int, float))
                                                     and LAM_RANGE[0] <= self.lam <= LAM_RANGE[1])
        if bad:
            raise ConfigError(f"--lam must be auto, fixed or a number in [{LAM_RANGE[0]:g}, "
                              f"{LAM_RANGE[1]:g}], got {self.lam!r}")
        if self.coil_compression not in ("auto", "scc", "gcc"):
            raise ConfigError(f"--coil-compression must be auto, scc or gcc, got "
                              f"{self.coil_compression!r}")


@dataclass
class ReconResult:
    image: ImageVolume
    report: dict[str, Any]
    baselines: dict[str, ImageVolume] = field(default_factory=dict)


ProgressFn = Callable[[str, int, int], None]


def _noop_progress(stage: str, done: int, total: int) -> None:
    return None


def _zero_filled_numpy(scan: RawScan, config: ReconConfig, compression: Compression | None,
                       progress: ProgressFn) -> ReconResult:
    """``--method zf`` without torch: the same image as :func:`zero_filled_rss`."""
    import resource

    t0 = time.perf_counter()
    progress("zero filling", 0, 1)
    axes = spatial_dims(scan.kind)
    k = np.fft.ifftshift(scan.kspace, axes=axes)
    coil = np.fft.fftshift(np.fft.ifftn(k, axes=axes, norm="ortho"), axes=axes)
    out = np.sqrt(np.sum(np.abs(coil) ** 2, axis=1)).astype(np.complex64)    # (B, D, Y, X)
    progress("done", 1, 1)
    wall = time.perf_counter() - t0
    report: dict[str, Any] = {
        "method": "zf", "source": scan.source, "kind": scan.kind,
        "shape_bcdyx": list(scan.shape), "acceleration": round(scan.acceleration, 3),
        "prewhitened": bool(scan.whitened), "device": "cpu", "torch_threads": None,
        "wall_time_s": round(wall, 3), "timings_s": {"maps_s": 0.0, "sense_s": 0.0, "mol_s": 0.0},
        "peak_memory_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024,
        "config": asdict(config), "batch_size": scan.shape[0],
        "chunks": [{"slices": [0, scan.shape[0]]}], "coil_maps": None,
    }
    if compression is not None:
        report["coil_compression"] = compression.report()
    image = ImageVolume(data=out, kind=scan.kind, geometry=scan.geometry, method="zf")
    return ReconResult(image=image, report=report)


def zero_filled_rss(kspace: torch.Tensor, kind: str) -> torch.Tensor:
    """Root-sum-of-squares of the coil images of zero-filled k-space: (B,C,D,Y,X) → (B,D,Y,X)."""
    import torch

    from .physics.fft import ifftc

    coil_images = ifftc(kspace, spatial_dims(kind))          # (B, C, D, Y, X)
    return torch.sqrt(torch.sum(coil_images.abs() ** 2, dim=1))  # (B, D, Y, X)


def reconstruct(scan: RawScan | str | Path, config: ReconConfig | None = None, *,
                method: Method | None = None, progress: ProgressFn | None = None,
                engines: dict[Any, Any] | None = None) -> ReconResult:
    """Reconstruct a raw scan (or a raw file path) into an :class:`ImageVolume`.

    ``method`` is a shortcut that overrides ``config.method``. Errors about the
    data (no signal, no usable calibration region, ...) name the scan's file.
    ``engines``: a dict that keeps the loaded MOL models between calls (a batch of
    files loads each model once); pass the same dict with the same config.
    """
    try:
        return _reconstruct(scan, config, method=method, progress=progress, engines=engines)
    except MolreconError as exc:
        if exc.path is None and isinstance(scan, RawScan) and scan.source:
            exc.path = scan.source
        elif exc.path is None and isinstance(scan, (str, Path)):
            exc.path = str(scan)
        raise


def _reconstruct(scan: RawScan | str | Path, config: ReconConfig | None, *,
                 method: Method | None, progress: ProgressFn | None,
                 engines: dict[Any, Any] | None = None) -> ReconResult:
    config = config or ReconConfig()
    if method is not None:
        config = ReconConfig(**{**asdict(config), "method": method})
    progress = progress or _noop_progress
    scan, user_maps, compression = _inputs(scan, config, progress)
    if config.method == "zf" and not config.keep_baselines and config.device in ("auto", "cpu"):
        # Zero filling is two FFTs and a sum: numpy does it without importing torch
        # (about 2 s of a command's start-up), on the CPU whatever the machine has.
        return _zero_filled_numpy(scan, config, compression, progress)
    import torch

    from .device import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_start = time.perf_counter()
    engine = _engine(config, scan, device, engines, progress) if config.method == "mol" else None
    run = _Run(scan=scan, config=config, device=device, engine=engine, user_maps=user_maps,
               progress=progress)
    batch = config.batch_size
    if batch is None:
        channels = engine.loaded.model.config.channels if engine is not None else 64
        batch = plan_batches(scan.shape, scan.kind, config.method, device, cnn_channels=channels,
                             anderson_memory=config.anderson_memory)
    per_chunk, batch, halvings = _run_chunks(run, batch)
    progress("done", len(per_chunk), len(per_chunk))
    report = _report(run, per_chunk, batch=batch, wall=time.perf_counter() - t_start,
                     compression=compression)
    if halvings:
        report["out_of_memory_halvings"] = halvings
    image = ImageVolume(data=run.out, kind=scan.kind, geometry=scan.geometry, method=config.method)
    base_vols = {name: ImageVolume(data=arr, kind=scan.kind, geometry=scan.geometry, method=name)
                 for name, arr in run.baselines.items()}
    return ReconResult(image=image, report=report, baselines=base_vols)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure of torch (CUDA or CPU allocator)."""
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in text.lower()
        or "can't allocate memory" in text or "DefaultCPUAllocator" in text)


def _run_chunks(run: _Run, batch: int) -> tuple[list[dict[str, Any]], int, int]:
    """Every chunk of ``batch`` slices; when one runs out of memory (the plan is an
    estimate), the batch is halved and the same slices are tried again, down to one
    slice. Returns (per-chunk reports, the final batch size, number of halvings)."""
    import torch

    n = run.scan.shape[0]
    per_chunk: list[dict[str, Any]] = []
    start, halvings = 0, 0
    batch = max(1, min(batch, n))
    while start < n:
        sl = slice(start, min(start + batch, n))
        done = len(per_chunk)
        total = done + -(-(n - start) // batch)
        try:
            per_chunk.append(_reconstruct_chunk(run, sl, done, total))
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc) or batch == 1:
                raise
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
            batch //= 2
            halvings += 1
            run.progress(f"out of memory: batch of {batch} slices", done, total)
            continue
        start = sl.stop
    return per_chunk, batch, halvings


def _inputs(scan: RawScan | str | Path, config: ReconConfig, progress: ProgressFn
            ) -> tuple[RawScan, np.ndarray | None, Compression | None]:
    """The scan (read when a path), the user's coil maps, and both coil-compressed when
    ``config.coils`` asks; returns (scan, maps or None, compression or None)."""
    from .io.detect import read_raw

    if not isinstance(scan, RawScan):
        scan = read_raw(scan)
    user_maps = None
    if config.maps is not None:
        from .io.maps import load_maps

        user_maps = load_maps(config.maps, scan)                          # (B, C, D|1, Y, X)
    compression = None
    if config.coils is not None:
        from .physics.compression import compress_maps, compress_scan

        progress("compressing coils", 0, 1)
        scan, compression = compress_scan(scan, config.coils,
                                          method=config.coil_compression)  # type: ignore[arg-type]
        if user_maps is not None:
            user_maps = compress_maps(compression, user_maps)
    return scan, user_maps, compression


def _engine(config: ReconConfig, scan: RawScan, device: torch.device,
            engines: dict[Any, Any] | None, progress: ProgressFn) -> MolEngine:
    """The MOL engine for ``scan``, from ``engines`` when a batch already loaded it."""
    key = (config, scan.kind, str(device), scan.shape[-1] == 1)
    engine = None if engines is None else engines.get(key)
    if engine is None:
        progress("loading the model", 0, 1)
        engine = load_engine(config, scan.kind, device, one_readout=scan.shape[-1] == 1)
        if engines is not None:
            engines[key] = engine
    return engine


@dataclass
class _Run:
    """One reconstruction in progress: its inputs and the arrays the chunks fill."""

    scan: RawScan
    config: ReconConfig
    device: torch.device
    engine: MolEngine | None
    user_maps: np.ndarray | None
    progress: ProgressFn
    out: np.ndarray = field(init=False)                                   # (B, D, Y, X)
    baselines: dict[str, np.ndarray] = field(init=False)
    timings: dict[str, float] = field(init=False)

    def __post_init__(self) -> None:
        self.out = np.zeros((self.scan.shape[0],) + self.scan.shape[2:], dtype=np.complex64)
        self.baselines = {}
        if self.config.keep_baselines:
            for name in ("zf", "sense"):
                if name != self.config.method:
                    self.baselines[name] = np.zeros_like(self.out)
        self.timings = {"maps_s": 0.0, "sense_s": 0.0, "mol_s": 0.0}


def _reconstruct_chunk(run: _Run, sl: slice, ci: int, n_chunks: int) -> dict[str, Any]:
    """Zero filling, maps + CG-SENSE and MOL for the slices ``sl``, written into ``run``;
    returns the chunk's report entry."""
    import torch

    from .physics.sense import cg_sense
    from .problem import from_scan

    scan, config, progress = run.scan, run.config, run.progress
    part = "" if n_chunks == 1 else f" (batch {ci + 1}/{n_chunks})"
    progress("reconstructing" + part, ci, n_chunks)
    k = torch.from_numpy(np.ascontiguousarray(scan.kspace[sl])).to(run.device)  # (b, C, D, Y, X)
    chunk_info: dict[str, Any] = {"slices": [sl.start, sl.stop]}
    if config.method == "zf" or "zf" in run.baselines:
        zf = zero_filled_rss(k, scan.kind)
        (run.out if config.method == "zf" else run.baselines["zf"])[sl] = zf.cpu().numpy()
    if config.method == "zf" and "sense" not in run.baselines:
        return chunk_info
    progress(("coil maps" if run.user_maps is None else "coil maps (yours)") + part, ci, n_chunks)
    t0 = time.perf_counter()
    from .physics.espirit import EspiritConfig

    espirit = EspiritConfig(crop=config.espirit_crop)
    prob = from_scan(scan, sl, run.device, maps=run.user_maps, espirit=espirit)
    run.timings["maps_s"] += time.perf_counter() - t0
    scale, kn, op = prob.scale, prob.kspace, prob.op
    progress("CG-SENSE" + part, ci, n_chunks)
    t0 = time.perf_counter()
    sense = cg_sense(op, kn, lam=config.sense_lambda, max_iter=config.sense_iters)
    run.timings["sense_s"] += time.perf_counter() - t0
    x_sense = sense.x                                                      # (b, D, Y, X)
    chunk_info["sense_iterations"] = sense.iterations
    unscale = scale.reshape(-1, 1, 1, 1).to(x_sense.dtype)
    if config.method == "sense":
        run.out[sl] = (x_sense * unscale).cpu().numpy()
    elif "sense" in run.baselines:
        run.baselines["sense"][sl] = (x_sense * unscale).cpu().numpy()
    if config.method == "mol":
        assert run.engine is not None                  # loaded by _reconstruct for MOL
        t0 = time.perf_counter()

        def on_iteration(it: int, residual: float) -> None:
            progress(f"MOL{part}: residual {residual:.1e} (tol {config.tol:g})", it,
                     config.max_iter)

        scales = run.engine.lam_scales(kn, op.mask, scan.kind)
        res = run.engine.solve(op, kn, x_sense, on_iteration=on_iteration,
                               lam_scale=None if scales is None else scales[2])
        run.timings["mol_s"] += time.perf_counter() - t0
        run.out[sl] = (res.x * unscale).cpu().numpy()
        chunk_info.update(run.engine.describe(res))
        lam0 = float(run.engine.step.lam)          # λ is stored as a float32 logarithm
        if scales is None:
            chunk_info["lambda"] = [float(f"{lam0:.6g}")] * int(kn.shape[0])
        else:
            chunk_info["noise_sigma"] = scales[0]
            chunk_info["effective_acceleration"] = [round(r, 4) for r in scales[1]]
            chunk_info["lambda"] = [float(f"{lam0 * f:.6g}") for f in scales[2]]
    return chunk_info


def _report(run: _Run, per_chunk: list[dict[str, Any]], *, batch: int, wall: float,
            compression: Compression | None) -> dict[str, Any]:
    """The plain-JSON report of a finished reconstruction; warns when MOL did not converge."""
    import torch

    from .device import peak_memory_bytes

    scan, config = run.scan, run.config
    report: dict[str, Any] = {
        "method": config.method,
        "source": scan.source,
        "kind": scan.kind,
        "shape_bcdyx": list(scan.shape),
        "acceleration": round(scan.acceleration, 3),
        "prewhitened": bool(scan.whitened),
        "device": str(run.device),
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": round(wall, 3),
        "timings_s": {k_: round(v, 3) for k_, v in run.timings.items()},
        "peak_memory_bytes": peak_memory_bytes(run.device),
        "config": asdict(config),
        "batch_size": batch,
        "chunks": per_chunk,
        "coil_maps": "user" if run.user_maps is not None else "espirit",
    }
    if compression is not None:
        report["coil_compression"] = compression.report()
    if run.engine is not None:
        report.update(run.engine.report_header())
        conv = all(c.get("converged", True) for c in per_chunk)
        report["converged"] = conv
        its = [int(i) for c in per_chunk for i in c.get("iterations", [])]
        report["iterations_per_item"] = its
        report["lambda_per_item"] = [float(v) for c in per_chunk for v in c.get("lambda", [])]
        for key in ("noise_sigma", "effective_acceleration"):
            if any(key in c for c in per_chunk):
                report[key + "_per_item"] = [v for c in per_chunk
                                             for v in c.get(key, [None] * len(c["lambda"]))]
        report["iterations"] = max(its) if its else 0
        report["final_residual"] = max((r for c in per_chunk for r in c.get("final_residual", [])),
                                       default=None)
        if not conv:
            warnings.warn(f"MOL did not reach --tol {config.tol:g} within --max-iter "
                          f"{config.max_iter} on every slice (see the report)",
                          ConvergenceWarning, stacklevel=4)
    return report


def load_engine(config: ReconConfig, kind: str, device: torch.device, *,
                one_readout: bool = False) -> MolEngine:
    """The MOL engine of ``config`` for ``kind`` data (:class:`molrecon.deq.inference.MolEngine`):
    its ``--weights`` or the bundled default (:func:`molrecon.models.bundled.checkpoint_for`),
    refused when the model does not declare ``kind``."""
    from .deq.fixed_point import FixedPointConfig
    from .deq.inference import MolEngine
    from .models.bundled import checkpoint_for
    from .models.checkpoint import load_checkpoint

    path = checkpoint_for(kind, config.weights, one_readout=one_readout)
    loaded = load_checkpoint(path, map_location=device)
    if kind not in loaded.kinds:
        raise CheckpointError(f"model is for {'/'.join(loaded.kinds)} data, the scan is {kind} "
                              "(pick a matching --weights)", path=path)
    fixed_point = FixedPointConfig(method=config.solver, tol=config.tol,
                                   max_iter=config.max_iter, memory=config.anderson_memory,
                                   warn=False)
    return MolEngine.from_loaded(loaded, fixed_point, device, alpha=config.alpha,
                                 cg_iters=config.cg_iters, ensemble=config.ensemble,
                                 compile=config.compile,
                                 precision=config.precision,
                                 lam=None if isinstance(config.lam, str) else float(config.lam),
                                 lam_from_noise=config.lam == "auto")
