"""`molrecon train --data DIR --out MODEL.pt`: deep-equilibrium training of MOL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DebugOpt, app, console, user_errors, warn


def _accelerations(text: str) -> tuple[float, tuple[float, ...]]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"expected a number or a comma-separated list, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise typer.BadParameter("accelerations must be >= 1")
    return values[0], (values if len(values) > 1 else ())


@app.command("train")
def train_cmd(
    data: Annotated[Path, typer.Option("--data", help="Folder of fully sampled raw scans (ISMRMRD / fastMRI).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model to write (.pt); .last.pt, .state.pt, .log.jsonl beside it.")],
    dims: Annotated[Optional[str], typer.Option("--dims", help="2d | 3d | 2dt (default: from the data).")] = None,
    constraint: Annotated[str, typer.Option("--constraint", help="sn (certified, spectral normalisation) | lr (Lipschitz penalty).")] = "lr",
    mask: Annotated[str, typer.Option("--mask", help="equispaced | random | poisson | interleaved.")] = "equispaced",
    acceleration: Annotated[str, typer.Option("--acceleration", "-R", help="R, or a list like 4,6 (one drawn per sample).")] = "4",
    acs: Annotated[int, typer.Option("--acs", help="Fully sampled centre lines.")] = 16,
    noise: Annotated[float, typer.Option("--noise", help="Extra complex noise std added to the normalised k-space.")] = 0.0,
    loss: Annotated[str, typer.Option("--loss", help="mse (complex) | mse_mag | l1.")] = "mse",
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate of H.")] = 1e-4,
    lam_init: Annotated[float, typer.Option("--lam", help="Initial data-consistency weight λ (learned).")] = 10.0,
    alpha: Annotated[float, typer.Option("--alpha", help="MOL step size α.")] = 1.0,
    cg_iters: Annotated[int, typer.Option("--cg-iters", help="CG iterations per MOL step.")] = 5,
    layers: Annotated[int, typer.Option("--layers")] = 5,
    channels: Annotated[int, typer.Option("--channels")] = 64,
    lipschitz_target: Annotated[float, typer.Option("--lipschitz-target", help="SN: certified bound target L < 1.")] = 0.99,
    spectral_grid: Annotated[Optional[int], typer.Option("--spectral-grid", help="SN: frequency grid per axis of the certified bound (coarser is faster and looser).")] = None,
    penalty_weight: Annotated[float, typer.Option("--penalty-weight", help="LR: weight of the log-barrier penalty.")] = 1e-6,
    penalty_threshold: Annotated[float, typer.Option("--penalty-threshold", help="LR: barrier threshold T.")] = 0.98,
    penalty_every: Annotated[int, typer.Option("--penalty-every", help="LR: apply the penalty every n-th step.")] = 1,
    val_samples: Annotated[int, typer.Option("--val-samples", help="Validation problems per evaluation.")] = 8,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per step (per process).")] = 1,
    max_steps: Annotated[int, typer.Option("--max-steps")] = 1000,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", help="Stop after this many seconds.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Files held out for validation.")] = 0.15,
    val_every: Annotated[int, typer.Option("--val-every")] = 50,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = 25,
    fwd_max_iter: Annotated[int, typer.Option("--fwd-max-iter", help="Forward fixed-point cap per step.")] = 40,
    init_weights: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint's weights.")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run whose state file is beside --out.")] = False,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an earlier run's outputs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No per-step lines.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Train a MOL prior through the deep equilibrium with implicit gradients.

    Fully sampled scans are ground truth; each step undersamples one retrospectively
    with a fresh mask. Runs unchanged under `torchrun --nproc-per-node N`.
    """
    r, rs = _accelerations(acceleration)
    with user_errors(debug):
        from ..train import TrainConfig, train
        from ..train_data import MaskSpec

        config = TrainConfig(
            data=str(data), out=str(out), kind=dims, constraint=constraint,  # type: ignore[arg-type]
            lipschitz_target=lipschitz_target, spectral_grid=spectral_grid, layers=layers, channels=channels,
            mask=MaskSpec(family=mask, acceleration=r, acs=acs, accelerations=rs),
            extra_noise=noise, loss=loss, lr=lr, lam_init=lam_init, alpha=alpha,  # type: ignore[arg-type]
            cg_iters=cg_iters, penalty_weight=penalty_weight, penalty_threshold=penalty_threshold,
            penalty_every=penalty_every, val_samples=val_samples,
            batch_size=batch_size, max_steps=max_steps, time_budget_s=time_budget,
            val_fraction=val_fraction, val_every=val_every, checkpoint_every=checkpoint_every,
            fwd_max_iter=fwd_max_iter, init_weights=None if init_weights is None else str(init_weights),
            seed=seed, device=device, resume=resume, force=force,
        )

        def show(rec: dict) -> None:
            if quiet:
                return
            if "skipped" in rec:
                return
            line = (f"step {rec['step']:>6}  loss {rec['loss']:.4g}  DEQ it {rec['fwd_iterations']:.0f}"
                    f"/{rec['bwd_iterations'] or 0:.0f}  λ {rec['lambda']:.3g}  {rec['step_s']:.2f} s")
            if "lipschitz_local" in rec:
                line += f"  L̂ {rec['lipschitz_local']:.3f}"
            if "val_psnr" in rec:
                line += (f"  [val MOL {rec['val_psnr']:.2f} dB / SSIM {rec['val_ssim']:.3f}; "
                         f"CG-SENSE {rec['val_sense_psnr']:.2f} dB]")
            console.print(line, highlight=False, markup=False)

        result = train(config, on_record=show, warn=warn)
        msg = f"[green]wrote[/green] {result.out} after {result.steps} steps (log {result.log})"
        if result.best_val_psnr is not None:
            msg += f"; best validation PSNR {result.best_val_psnr:.2f} dB"
            if result.val_sense_psnr is not None:
                msg += f" vs CG-SENSE {result.val_sense_psnr:.2f} dB"
        if result.skipped_files:
            msg += f"; {len(result.skipped_files)} file(s) skipped"
        console.print(msg)
