"""`molrecon train --data DIR --out MODEL.pt`: deep-equilibrium training of MOL."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ..config import MAPS_FROM
from ._common import (
    ACCEL_HELP,
    DebugOpt,
    app,
    bad_option,
    check_option,
    choice,
    console,
    parse_accelerations,
    user_errors,
    warn,
)


def _accelerations(text: str) -> tuple[float, tuple[float, ...]]:
    values = parse_accelerations(text, "-R")
    return values[0], (values if len(values) > 1 else ())


def _masks(text: str) -> str:
    families = [f.strip() for f in text.split(",") if f.strip()]
    check_option(bool(families), "expected a family or a comma list like equispaced,random",
                 "--mask")
    for family in families:
        choice(family, _MASKS, "--mask")
    return ",".join(families)


def _sigmas(text: str) -> tuple[float, float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise bad_option(f"expected LOW,HIGH noise levels, got {text!r}", "--sigma") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise bad_option(f"expected 0 < LOW <= HIGH, got {text!r}", "--sigma")
    return values[0], values[1]


def _levels(text: str, option: str, *, most: int | None = None) -> tuple[float, ...]:
    """Comma-separated noise levels (>= 0, finite), at most ``most`` of them."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise bad_option(f"expected comma-separated noise levels, got {text!r}", option) from None
    check_option(bool(values) and all(0 <= v < math.inf for v in values),
                 f"expected noise levels >= 0, got {text!r}", option)
    check_option(most is None or len(values) <= most,
                 f"expected STD or LOW,HIGH, got {text!r}", option)
    return values


def _duration(seconds: float) -> str:
    minutes = round(seconds) // 60
    if minutes < 60:
        return f"{seconds:.0f} s" if seconds < 60 else f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _progress_line(rec: dict[str, Any], max_steps: int) -> str:
    """One console line for a log record (start, validation or step)."""
    if rec.get("event") == "start":
        if rec["resumed"]:
            best = rec.get("best_val_psnr")
            head = (f"resuming at step {rec['step']} of {rec['max_steps']} "
                    f"({_duration(rec.get('resumed_elapsed_s') or 0.0)} trained so far"
                    + (f", best validation PSNR {best:.2f} dB" if best is not None else "")
                    + ")")
        else:
            head = f"training from step {rec['step']} of {rec['max_steps']}"
        return (f"{head}: {rec['kind']} data, "
                f"{rec['train_samples']} training samples from {rec['train_files']} file(s), "
                f"{rec['val_samples']} validation samples from {rec['val_files']} file(s); "
                f"{rec['model_dims']}D {rec['constraint'].upper()} network on {rec['device']}"
                + (f", {rec['world_size']} processes" if rec["world_size"] > 1 else ""))
    val = ""
    if "val_sense_psnr" in rec:
        mol = ("failed" if rec.get("val_psnr") is None
               else f"{rec['val_psnr']:.2f} dB / SSIM {rec['val_ssim']:.3f}")
        norm = (f", L̂ {rec['val_lipschitz']:.3f} at its fixed points"
                if rec.get("val_lipschitz") is not None else "")
        val = (f"[val MOL {mol}{norm}; CG-SENSE {rec['val_sense_psnr']:.2f} dB / SSIM "
               f"{rec['val_sense_ssim']:.3f}]")
    if rec.get("event") == "validation":
        return f"before training: {val}"
    line = f"step {rec['step']:>6}/{max_steps}  loss {rec['loss']:.4g}  "
    if rec.get("fwd_iterations") is not None:          # None in the denoising stage
        line += f"DEQ it {rec['fwd_iterations']:.0f}/{rec['bwd_iterations'] or 0:.0f}  "
    line += f"λ {rec['lambda']:.3g}  {rec['step_s']:.2f} s"
    if "lipschitz_local" in rec:
        line += f"  L̂ {rec['lipschitz_local']:.3f}"
    return line + (f"  {val}" if val else "")


_MASKS = ("equispaced", "random", "poisson", "interleaved")


@contextlib.contextmanager
def _option_errors() -> Iterator[None]:
    """A ConfigError while the options become a TrainConfig is a usage error (exit 2) naming
    the option: the message starts with the option (``--alpha must ...``) or the field
    (``cg_iters must ...``, named through :data:`molrecon.train.OPTION_NAMES`)."""
    from ..errors import ConfigError

    try:
        yield
    except ConfigError as exc:
        from ..train import OPTION_NAMES

        first, _, rest = exc.message.partition(" ")
        option = first if first.startswith("-") else {
            **OPTION_NAMES, "patch": "--patch", "sense_fraction": "--sense-fraction",
            "depth": "--patch-depth"}.get(first)
        if option is None:
            raise typer.BadParameter(exc.message) from None
        raise bad_option(rest if rest.startswith("must") else exc.message, option) from None


# Over 80 lines: the signature declares every command-line option (typer reads it).
@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option("--data", metavar="DIR", help="Folder of fully sampled raw scans (ISMRMRD / fastMRI).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="MODEL.pt", help="Model to write (.pt); .last.pt, .state.pt, .log.jsonl beside it.")],
    dims: Annotated[str | None, typer.Option("--dims", help="2d | 3d | 2dt (default: from the data).", show_default=False)] = None,
    constraint: Annotated[str, typer.Option("--constraint", help="sn (certified, spectral normalisation) | lr (Lipschitz penalty).")] = "lr",
    mask: Annotated[str, typer.Option("--mask", metavar="FAMILY[,FAMILY...]", help="Mask family, or a comma list like equispaced,random (one drawn per sample): equispaced | random | poisson (3d) | interleaved (2dt).")] = "equispaced",
    acceleration: Annotated[str, typer.Option("--acceleration", "-R", metavar="R", help=ACCEL_HELP + " A comma list like 4,6 draws one per training sample.")] = "4",
    acs: Annotated[int, typer.Option("--acs", help="Fully sampled centre (ACS) lines of every training mask: a fixed count, as the bundled models were trained (`simulate` defaults to about 8 % of the phase lines instead).")] = 16,
    noise: Annotated[str, typer.Option("--noise", metavar="STD|LOW,HIGH", help="Extra complex noise std added to each training problem's normalised k-space; LOW,HIGH draws it log-uniformly per problem (train on nearly noise-free scans with a spread of noise levels: the targets then hold none of it).")] = "0",
    val_noise: Annotated[str, typer.Option("--val-noise", metavar="STD[,STD...]", help="Extra noise std of the validation problems, cycled over them (fixed per problem, like their masks).")] = "0",
    maps: Annotated[str, typer.Option("--maps", help="Coil maps of the training problems: reference (the fully sampled scan's: an exact data term) | calibration (ESPIRiT from each problem's own calibration lines, as reconstruction estimates them: the prior sees their errors).")] = "reference",
    val_maps: Annotated[str, typer.Option("--val-maps", help="Coil maps of the validation problems: reference | calibration (as --maps).")] = "reference",
    lam_from_noise: Annotated[bool, typer.Option("--lam-from-noise", help="Train and validate with λ set per problem by the --init checkpoint's noise rule (as `reconstruct --lam auto`), and keep that rule in the saved models.")] = False,
    loss: Annotated[str, typer.Option("--loss", help="mse (complex) | mse_mag | l1.")] = "mse",
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of H.")] = 1e-4,
    lam_lr: Annotated[float, typer.Option("--lam-lr", help="Adam learning rate of log λ (0 keeps λ fixed).")] = 1e-2,
    lam_init: Annotated[float | None, typer.Option("--lam", help="Initial data-consistency weight λ, then learned (default: 100, or the --init checkpoint's λ); on --resume, a value other than the saved run's restarts λ there.", show_default=False)] = None,
    alpha: Annotated[float, typer.Option("--alpha", help="MOL step size α.")] = 1.0,
    cg_iters: Annotated[int, typer.Option("--cg-iters", help="CG iterations per MOL step (data consistency), in training and validation; the bundled models use 10.")] = 10,
    layers: Annotated[int, typer.Option("--layers", help="Convolution layers of the CNN prior H.")] = 5,
    channels: Annotated[int, typer.Option("--channels", help="Feature channels of H's hidden layers.")] = 64,
    skip: Annotated[bool, typer.Option("--skip", help="LR: an identity path around the network, H(x) = x + N(x) (N learns the correction, as residual denoisers do; a fresh model starts at H = I; with --init, the path keeps that model's gain, and an --init model that has one keeps it without --skip). Its certified bound adds the path's gain to the layers' product: like any LR model it rests on the penalty and check-lipschitz's local estimates.")] = False,
    lipschitz_target: Annotated[float, typer.Option("--lipschitz-target", help="SN: certified bound target L < 1.")] = 0.99,
    spectral_grid: Annotated[int | None, typer.Option("--spectral-grid", help="SN: frequency grid per axis of the certified bound (coarser is faster and looser).", show_default=False)] = None,
    penalty_weight: Annotated[float, typer.Option("--penalty-weight", help="LR: weight of the log-barrier penalty.")] = 1e-6,
    penalty_threshold: Annotated[float, typer.Option("--penalty-threshold", help="LR: barrier threshold T.")] = 0.98,
    penalty_every: Annotated[int, typer.Option("--penalty-every", help="LR: apply the penalty every n-th step.")] = 1,
    penalty_estimator: Annotated[Literal["ratio", "power", "sample", "lanczos", "monotone"], typer.Option("--penalty-estimator", help="LR: what the penalty measures: ratio (a ratio search on a crop of each training fixed point; reads low), power (the Jacobian norm at the fixed points of a few fixed probe problems, its power iteration carried from step to step; deep-equilibrium stage only), sample (the Jacobian norm at every training sample's own fixed point, --penalty-steps power iterations from noise each time; reads low), lanczos (there, the --penalty-top largest singular values of the Jacobian by --penalty-steps Lanczos steps) or monotone (there, the largest eigenvalues μ of the Jacobian's symmetric part likewise: F = I − H is monotone where μ < 1, whatever the norm; the L̂ of the progress lines is then μ).")] = "ratio",
    penalty_steps: Annotated[int, typer.Option("--penalty-steps", min=0, help="LR: ascent steps of the ratio search, power iterations per probe visit or per sample, or Lanczos steps.")] = 10,
    penalty_probes: Annotated[int, typer.Option("--penalty-probes", min=1, help="LR: fixed probe problems (the power estimator visits them in turn; --project-bound measures them all).")] = 4,
    penalty_top: Annotated[int, typer.Option("--penalty-top", min=1, help="LR, lanczos or monotone estimator: how many of the largest singular values (or of μ) are penalised.")] = 1,
    penalty_norm_cap: Annotated[float | None, typer.Option("--penalty-norm-cap", metavar="C", show_default=False, help="LR, monotone estimator: also the Jacobian norm at the same point, through a barrier at C (F stays monotone with a norm above 1, but a norm far above 1 slows the fixed-point iteration); logged as norm_local.")] = None,
    penalty_norm_weight: Annotated[float | None, typer.Option("--penalty-norm-weight", metavar="W", show_default=False, help="LR, with --penalty-norm-cap: the weight of the norm's barrier (default: --penalty-weight, which the μ barrier keeps).")] = None,
    penalty_at: Annotated[str, typer.Option("--penalty-at", metavar="WHERE[,WHERE...]", help="LR, stage 0: where the penalty measures H: noisy (the network's input patch), clean (the clean patch: MOL's fixed points are nearly clean images, and a denoiser held only at noisy inputs can grow expansive there), both (clean and noisy), or a comma list of noisy, clean and image (a whole clean image of the same scan: the largest norm over a whole image, where a patch samples one window; costs a whole-image Lanczos run).")] = "noisy",
    val_samples: Annotated[int, typer.Option("--val-samples", help="Validation problems per evaluation.")] = 8,
    val_points: Annotated[int, typer.Option("--val-points", min=1, help="How many validation fixed points (spread over the problems, each whole) the certificate reads with Lanczos at every validation (val_lipschitz, val_monotone, --best-max-lipschitz). A whole 2D+time series or volume costs minutes each on a CPU. May change on resume.")] = 4,
    best_max_lipschitz: Annotated[float | None, typer.Option("--best-max-lipschitz", show_default=False, help="The best model (MODEL.pt) only among validations whose largest local Lipschitz estimate at their own fixed points is at most this (e.g. 0.99): an LR run's best at the bound, not a more expansive model whose PSNR comes from leaving it. May change on resume.")] = None,
    ema: Annotated[float, typer.Option("--ema", metavar="DECAY", help="Keep an exponential moving average of the weights and λ with this decay (e.g. 0.999; 0: off): validation, the certificate and the saved models (MODEL.pt, MODEL.last.pt) are the average's, smoother than the last step's weights; the optimiser and the Lipschitz penalty act on the raw weights, which the resume state keeps beside the average. May change on resume (the average starts at the resumed weights where the state has none).")] = 0.0,
    project_bound: Annotated[float | None, typer.Option("--project-bound", metavar="T", show_default=False, help="LR (the deep-equilibrium stage or stage 0): train at the bound. Every --project-every steps, measure the largest singular value of H's Jacobian at the MOL fixed points of --penalty-probes fixed whole training scans (20 Lanczos steps each), and where it exceeds T (e.g. 0.985) scale H's output down to T. The model trains as it will be used, instead of being scaled to the bound afterwards. Not with --ema. May change on resume.")] = None,
    project_every: Annotated[int, typer.Option("--project-every", min=1, help="Steps between two --project-bound measurements.")] = 5,
    bound_measure: Annotated[Literal["lipschitz", "monotone"], typer.Option("--bound-measure", help="What --project-bound and --best-max-lipschitz hold at the fixed points: lipschitz (the largest singular value of H's Jacobian) or monotone (the top of the spectrum of its symmetric part, ½(J + Jᵀ): what F = I − H's monotonicity, and so the fixed point's uniqueness and robustness, needs below 1; never above the Jacobian norm). Validation logs both (val_lipschitz, val_monotone). May change on resume.")] = "lipschitz",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per step (per process).")] = 1,
    max_steps: Annotated[int, typer.Option("--max-steps", help="Optimiser steps in all; a resumed run continues up to this count (raise it to train on).")] = 1000,
    time_budget: Annotated[float | None, typer.Option("--time-budget", metavar="SECONDS", help="Wall-clock seconds for this invocation (loading included): no step starts that would not end in time (the slowest of the last 10 steps, plus the last validation's time when the step validates, plus the last save's), then the state is saved (continue with --resume).", show_default=False)] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Files held out for validation.")] = 0.15,
    readout_block: Annotated[int | None, typer.Option("--readout-block", show_default=False, help="Train on blocks of this many readout positions (exact, since the readout is fully sampled; much cheaper per step); validation uses whole scans.")] = None,
    val_data: Annotated[Path | None, typer.Option("--val-data", metavar="DIR", show_default=False, help="Folder of validation scans kept apart from --data (then --val-fraction is not used).")] = None,
    val_every: Annotated[int, typer.Option("--val-every", help="Validate (full MOL reconstructions of the validation problems) every this many steps, and at the last; the best model by validation PSNR is MODEL.pt.")] = 50,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save MODEL.last.pt and the resume state every this many steps (a killed run loses at most the steps since).")] = 25,
    fwd_max_iter: Annotated[int, typer.Option("--fwd-max-iter", help="Forward fixed-point cap per step.")] = 40,
    max_skips: Annotated[int, typer.Option("--max-skips", help="Stop after this many consecutive failed (skipped) steps.")] = 10,
    init_weights: Annotated[Path | None, typer.Option("--init", metavar="MODEL", show_default=False, help="Start from this checkpoint's weights and λ (a file, or a bundled model's name); ignored on --resume, whose state holds the weights. A 2D checkpoint may start a 2dt or 3d network (its kernels on the centre plane), and a shallower LR checkpoint of the same width a deeper --layers network (identity layers inserted before the last): both start as exactly the given model.")] = None,
    gradient: Annotated[str, typer.Option("--gradient", help="deq: implicit (exact implicit gradient, one backward fixed-point solve per sample) | jfb (Jacobian-free: the gradient through one MOL step at the fixed point; cheaper, approximate).")] = "implicit",
    stage: Annotated[str, typer.Option("--stage", help="deq (deep-equilibrium steps) | denoise (stage 0: pretrain H alone as a denoiser of noisy image patches of the targets; 2d data, or blocks of --patch-depth frames or partitions for 2dt and 3d data; --batch-size counts patches). Validation is the full MOL reconstruction in both.")] = "deq",
    patch: Annotated[int, typer.Option("--patch", help="denoise: patch size in pixels.")] = 64,
    patch_depth: Annotated[int, typer.Option("--patch-depth", help="denoise, 2dt and 3d data: frames or partitions per patch (all of them where a scan has fewer).")] = 8,
    sense_fraction: Annotated[float, typer.Option("--sense-fraction", help="denoise: fraction of the patches cut from regularised SENSE images of the training scans under the run's masks (aliasing and g-factor noise) instead of the target plus white noise.")] = 0.0,
    sigma: Annotated[str, typer.Option("--sigma", metavar="LOW,HIGH", help="denoise: LOW,HIGH std of the complex noise, relative to the normalised intensity (bright tissue ≈ 1); drawn log-uniformly.")] = "0.01,0.12",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the validation split, the sample order, the masks, the noise and the initial weights (same seed and options, same run).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run whose state file is beside --out, with the options it was started with (a changed one is refused, naming it).")] = False,
    override: Annotated[bool, typer.Option("--override", help="With --resume: continue with changed options (not the network's); a changed --lr or --lam-lr replaces the saved learning rate.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an earlier run's outputs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-step lines (the start and end lines stay).")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Train a MOL prior through the deep equilibrium with implicit gradients.

    Fully sampled scans are ground truth; each step undersamples one retrospectively with a fresh mask. Unusable files are skipped with a warning each.

    A run stopped by --time-budget, Ctrl-C, SIGTERM or a crash continues exactly with --resume and the same options (it prints the step, the time trained and the best validation it resumes from; the saved learning rates continue). A changed option is refused, naming it with its saved and new values, unless --override; --max-steps, --time-budget, --val-every, --checkpoint-every, --max-skips, --device, --init and --lam may change freely.

    Progress lines: step N/MAX, the loss (relative to the target's energy), DEQ it F/B = the forward / backward fixed-point iterations of the step (mean over its samples; absent in stage 0), λ the data-consistency weight, the step's seconds, L̂ the local Lipschitz constant of H found by the LR penalty's search (on the steps that apply it; below 1: monotone there), and on validation steps the mean PSNR / SSIM of MOL and of CG-SENSE. MODEL.log.jsonl holds every record.

    Runs unchanged under `torchrun --nproc-per-node N` (N processes of --batch-size samples each).
    """
    # Usage errors (exit 2, naming the option) before any work.
    r, rs = _accelerations(acceleration)
    families = _masks(mask)
    sigma_lo, sigma_hi = _sigmas(sigma)
    noise_levels = _levels(noise, "--noise", most=2)
    check_option(len(noise_levels) == 1 or 0 < noise_levels[0] <= noise_levels[1],
                 f"a range LOW,HIGH needs 0 < LOW <= HIGH, got {noise!r}", "--noise")
    val_levels = _levels(val_noise, "--val-noise")
    choice(maps, MAPS_FROM, "--maps")
    choice(val_maps, MAPS_FROM, "--val-maps")
    check_option(not lam_from_noise or init_weights is not None,
                 "takes the noise rule of the --init checkpoint: give --init", "--lam-from-noise")
    if dims is not None:
        choice(dims, ("2d", "3d", "2dt"), "--dims")
    choice(constraint, ("sn", "lr"), "--constraint")
    choice(loss, ("mse", "mse_mag", "l1"), "--loss")
    choice(stage, ("deq", "denoise"), "--stage")
    choice(gradient, ("implicit", "jfb"), "--gradient")
    choice(device, ("auto", "cpu", "cuda"), "--device")
    check_option(acs >= 0, f"must be >= 0, got {acs}", "--acs")
    check_option(not override or resume, "belongs to --resume", "--override")
    check_option(out.name.endswith(".pt") and len(out.name) > 3, "must end in .pt", "--out")
    with user_errors(debug), _option_errors():
        from ..train import TrainConfig
        from ..train.data import MaskSpec
        from ..train.patches import PatchSpec

        config = TrainConfig(
            data=str(data), out=str(out), kind=dims, constraint=constraint,  # type: ignore[arg-type]
            lipschitz_target=lipschitz_target, spectral_grid=spectral_grid, layers=layers, channels=channels,
            skip=skip, mask=MaskSpec(family=families, acceleration=r, acs=acs, accelerations=rs),
            extra_noise=noise_levels[0],
            extra_noise_max=noise_levels[1] if len(noise_levels) == 2 else None,
            val_noise=() if val_levels == (0.0,) else val_levels, maps=maps, val_maps=val_maps,
            lam_from_noise=lam_from_noise, loss=loss, lr=lr, lam_lr=lam_lr, lam_init=lam_init, alpha=alpha,  # type: ignore[arg-type]
            cg_iters=cg_iters, penalty_weight=penalty_weight, penalty_threshold=penalty_threshold,
            penalty_every=penalty_every, penalty_estimator=penalty_estimator,
            penalty_steps=penalty_steps, penalty_probes=penalty_probes, penalty_top=penalty_top,
            penalty_norm_cap=penalty_norm_cap, penalty_norm_weight=penalty_norm_weight,
            penalty_at=penalty_at,
            val_samples=val_samples, val_points=val_points, best_max_lipschitz=best_max_lipschitz, ema=ema,
            project_bound=project_bound, project_every=project_every, bound_measure=bound_measure,
            batch_size=batch_size, max_steps=max_steps, time_budget_s=time_budget,
            val_fraction=val_fraction, val_data=None if val_data is None else str(val_data),
            readout_block=readout_block,
            val_every=val_every, checkpoint_every=checkpoint_every,
            fwd_max_iter=fwd_max_iter, max_skips=max_skips, init_weights=None if init_weights is None else str(init_weights),
            seed=seed, device=device, resume=resume, override=override, force=force,
            stage=stage,  # type: ignore[arg-type]
            gradient=gradient,  # type: ignore[arg-type]
            patch=PatchSpec(size=patch, sigma_min=sigma_lo, sigma_max=sigma_hi,
                            sense_fraction=sense_fraction, depth=patch_depth),
        )
    with user_errors(debug):
        from ..train import train

        def show(rec: dict[str, Any]) -> None:
            if "skipped" in rec or (quiet and rec.get("event") != "start"):
                return                          # skipped steps arrive as warnings
            console.print(_progress_line(rec, max_steps), highlight=False, markup=False,
                          soft_wrap=True)

        previous = signal.getsignal(signal.SIGTERM)
        if threading.current_thread() is threading.main_thread():
            # SIGTERM (a scheduler's stop) saves the state like Ctrl-C does.
            signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            result = train(config, on_record=show, warn=warn)
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, previous)
        if not result.main_process:
            return
        msg = f"[green]wrote[/green] {result.out} after {result.steps} steps (log {result.log})"
        if result.stopped == "time_budget":
            msg += "; stopped by --time-budget (continue with --resume)"
        if result.skipped_steps:
            msg += f"; {result.skipped_steps} step(s) skipped"
        if result.best_val_psnr is not None:
            msg += f"; best validation PSNR {result.best_val_psnr:.2f} dB"
            if result.val_sense_psnr is not None:
                msg += f" vs CG-SENSE {result.val_sense_psnr:.2f} dB"
        if result.skipped_files:
            msg += f"; {len(result.skipped_files)} file(s) skipped"
        console.print(msg, soft_wrap=True)
