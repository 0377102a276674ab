"""`molrecon check-lipschitz` and `molrecon robustness`: the guarantees of MOL, measured.

check-lipschitz: the certified global Lipschitz bound of H, local estimates at
the fixed points of real reconstructions, the margins, step contraction and
robustness bounds that follow, optionally the uniqueness of the fixed point
(``--uniqueness``), and a verdict with an exit code:

    certified  global bound < 1                               exit 0
    empirical  no certificate, local estimates < 1            exit 0 (warning; 1 with --strict)
    monotone   a local Lipschitz estimate >= 1, but the top
               of H's numerical range (½(J + Jᵀ)) < 1: F =
               I − H monotone at the data                     exit 0 (warning; 1 with --strict)
    violated   a local estimate >= 1 and not monotone, or
               fixed points from different starts disagree
               beyond the margin                              exit 1

robustness: worst-case measurement perturbations of MOL (implicit gradient
through the equilibrium) and of the same CNN unrolled for K steps, next to the
bounds (λ/m)‖A‖ and ½√(λ/m).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import ConfigError
from ..kinds import KINDS
from ._common import (
    DebugOpt,
    app,
    bad_option,
    check_option,
    choice,
    console,
    stage_logger,
    stdout,
    user_errors,
    warn,
)

if TYPE_CHECKING:
    from ..guarantees import LipschitzReport, RobustnessReport


def _parse_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    parts = text.lower().replace("×", "x").split("x")
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        raise bad_option(f"expected YxX or DxYxX, got {text!r}", "--size") from None
    if len(size) not in (2, 3) or any(s < 1 for s in size):
        raise bad_option(f"expected YxX or DxYxX with positive sizes, got {text!r}", "--size")
    return size


def _parse_eps(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise bad_option(f"expected a comma-separated list of numbers, got {text!r}",
                         "--eps") from None
    if not values or any(not (v > 0) or v == float("inf") for v in values):
        raise bad_option("every eps must be a positive number", "--eps")
    if len(set(values)) != len(values):
        raise bad_option(f"each eps once, got {text!r}", "--eps")
    return values


_MODEL_HELP = "MOL checkpoint (.pt), or a bundled model's name (`molrecon models`)."
_DATA_DEFAULT = ("repeatable; default: the bundled example scan, or for a 3D or 2D+time model a "
                 "scan simulated from the validation anatomy")
_DATA_HELP = f"Raw scan whose MOL fixed points are the test points ({_DATA_DEFAULT})."
_DEVICES = ("auto", "cpu", "cuda")


@contextlib.contextmanager
def _live(title: str) -> Iterator[Callable[[str], None]]:
    """A progress callback: on a terminal, a spinner whose text follows the stages; without
    one, a plain line per stage on stderr (``[elapsed] check: stage``)."""
    log = stage_logger("check")
    with console.status(f"{title}…") as status:
        def say(text: str) -> None:
            status.update(f"{title}: {text}")
            log(text)

        yield say


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


# ------------------------------------------------------------------------------ check-lipschitz
@app.command("check-lipschitz")
def check_lipschitz_cmd(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help=_MODEL_HELP)],
    data: Annotated[list[Path] | None, typer.Option(
        "--data", "-d", metavar="FILE", help=_DATA_HELP, show_default=False)] = None,
    size: Annotated[str | None, typer.Option(
        "--size", metavar="YxX", help="Also measure every layer's norm on a YxX (3D: DxYxX) "
                                      "image, to show how tight the certificate is.")] = None,
    points: Annotated[int, typer.Option(
        "--points", help="Slices per file used as test points (spread over the scan).")] = 4,
    uniqueness: Annotated[bool, typer.Option(
        "--uniqueness", help="Also solve from zero, zero-filled, CG-SENSE and random starts "
                             "and compare the fixed points.")] = False,
    power_iters: Annotated[int, typer.Option(
        "--power-iters", help="Most power iterations on JᵀJ per point.")] = 300,
    power_tol: Annotated[float, typer.Option(
        "--power-tol", help="Stop a point's power iteration when its estimate rose by less "
                            "than this (relative) over 10 iterations; 0: run exactly "
                            "--power-iters.")] = 1e-4,
    ratio_steps: Annotated[int, typer.Option(
        "--ratio-steps", help="Ascent steps of the ratio search per point.")] = 10,
    lanczos_steps: Annotated[int, typer.Option(
        "--lanczos-steps", help="Lanczos steps on JᵀJ per point (0: none); reads the top of "
                                "a crowded spectrum where the power iteration still "
                                "climbs.")] = 30,
    tol: Annotated[float, typer.Option(
        "--tol", help="Fixed-point tolerance ‖T(x)−x‖/‖x‖ of the MOL solves.")] = 1e-5,
    max_iter: Annotated[int, typer.Option("--max-iter", help="Fixed-point iteration cap.")] = 200,
    double: Annotated[bool, typer.Option(
        "--double", help="Compute in double precision (slower; tighter fixed points).")] = False,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of random probes and starts.")] = 0,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Exit 1 unless the bound is certified (an empirical or monotone verdict fails).")
    ] = False,
    kind: Annotated[str | None, typer.Option(
        "--kind", metavar="KIND", show_default=False,
        help="Measure the prior on data of this kind (2d, 3d or 2dt), also one its "
             "checkpoint was not trained on, if its network can serve it (a 3×3×3 prior of "
             "2D+time series on 3D volumes); without --data the simulated scan is of this "
             "kind.")] = None,
    full: Annotated[bool, typer.Option(
        "--full", help="Without --data, test a 3D or 2D+time model on the full-size simulated "
                       "scan (minutes on a CPU) instead of the quick coarse one.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Certify, estimate and test the Lipschitz constant of a checkpoint's prior H.

    Prints the certified global bound (product of certified layer bounds; valid
    for every image size), local estimates at the fixed points of real MOL
    reconstructions, the monotonicity margin m = 1 − L, the MOL step's
    contraction factor and admissible α range, and the robustness bounds
    ‖Δx‖ ≤ (λ/m)‖A‖‖Δb‖ and ‖Δx‖ ≤ ½√(λ/m)‖Δb‖. Exit 0: certified (or
    empirical without --strict); exit 1: violated, or empirical with --strict.
    """
    size_t = _parse_size(size)
    check_option(points >= 1, "must be at least 1", "--points")
    check_option(power_iters >= 1, "must be at least 1", "--power-iters")
    check_option(0.0 <= power_tol < 1.0, "must lie in [0, 1)", "--power-tol")
    check_option(ratio_steps >= 0, "must be >= 0", "--ratio-steps")
    check_option(lanczos_steps >= 0, "must be >= 0", "--lanczos-steps")
    check_option(0.0 < tol < 1.0, "must lie in (0, 1)", "--tol")
    check_option(max_iter >= 1, "must be at least 1", "--max-iter")
    choice(device, _DEVICES, "--device")
    if kind is not None:
        choice(kind, KINDS, "--kind")
    with user_errors(debug):
        from ..guarantees import CheckConfig, check_lipschitz

        config = CheckConfig(power_iters=power_iters, power_tol=power_tol or None,
                             ratio_steps=ratio_steps, lanczos_steps=lanczos_steps, tol=tol,
                             max_iter=max_iter, uniqueness=uniqueness, size=size_t, seed=seed)
        loaded, problems = _model_and_problems(model, data, device, points, double, full=full,
                                               kind=kind)
        with _live(f"measuring the prior at {len(problems)} MOL problem(s)") as say:
            report = check_lipschitz(loaded, problems, config, progress=say)
        if as_json:
            stdout.print_json(json.dumps(report.as_dict()))
        else:
            _print_check(report)
        _finish(report, strict=strict)


def _model_and_problems(model: Path, data: list[Path] | None, device: str, points: int,
                        double: bool, *, full: bool = True, kind: str | None = None
                        ) -> tuple[Any, list[Any]]:
    """The checkpoint (loaded without running code) and the MOL problems of the data.

    Without data: the bundled example for a model of 2D data, else a scan of the model's
    kind simulated from the validation slab (:func:`~molrecon.sim.simulated_example`;
    its coarse quick version unless ``full``), named on stderr. ``kind`` replaces the kinds
    the checkpoint declares (:func:`~molrecon.models.checkpoint.with_kinds`).
    """
    import tempfile

    from ..device import resolve_device
    from ..guarantees import example_scan, load_problems
    from ..models.bundled import resolve_weights
    from ..models.checkpoint import load_checkpoint, with_kinds
    from ..sim import simulated_example

    dev = resolve_device(device)
    loaded = load_checkpoint(resolve_weights(model), map_location=dev)
    if kind is not None:
        try:
            loaded = with_kinds(loaded, [kind])
        except ConfigError as exc:
            raise ConfigError(f"--kind {kind}: {exc}") from exc
    kinds = loaded.kinds
    with tempfile.TemporaryDirectory(prefix="molrecon-example-") as tmp:
        if data:
            paths = list(data)
        elif "2d" in kinds:
            paths = [example_scan()]
        else:
            from ..sim import EXAMPLE_MATRIX

            kind = kinds[0]
            shown = "×".join(map(str, EXAMPLE_MATRIX[(kind, not full)]))
            other = "×".join(map(str, EXAMPLE_MATRIX[(kind, full)]))
            console.print(f"test data: a {kind} scan simulated from the validation anatomy, "
                          f"{shown}" + ("" if full else f" (quick; --full for {other})"),
                          highlight=False, soft_wrap=True)
            paths = [simulated_example(kind, tmp, quick=not full)]
        return loaded, load_problems(paths, kinds=kinds, points=points, device=dev,
                                     double=double)


def _finish(report: LipschitzReport, *, strict: bool) -> None:
    if report.verdict == "certified":
        console.print(f"[green]certified:[/green] {report.reasons[0]}", soft_wrap=True)
        for note in report.reasons[1:]:
            warn(note)
        return
    if report.verdict in ("empirical", "monotone"):
        what = "empirical only" if report.verdict == "empirical" else "monotone, not contractive"
        warn(f"{what}: {report.reasons[0]}; the fixed point's uniqueness and the "
             "robustness bounds are not guaranteed")
        for note in report.reasons[1:]:
            warn(note)
        if strict:
            raise typer.Exit(1)
        return
    for reason in report.reasons:
        console.print(f"[red]violated:[/red] {reason}", soft_wrap=True)
    raise typer.Exit(1)


def _print_check(r: LipschitzReport) -> None:
    from rich.table import Table

    gb = r.global_bound
    t = Table(title=f"Lipschitz check: {Path(r.model).name}", show_header=True)
    t.add_column("quantity")
    t.add_column("value", justify="right")
    t.add_column("note")
    t.add_row("model", f"{r.constraint}, α={r.alpha:g}, λ={r.lam:.4g}",
              f"CG {r.cg_iters}, target {gb.lipschitz_target:g}")
    t.add_row("certified bound ∏σ̂ᵢ", _fmt(gb.bound), "all image sizes")
    t.add_row("layer bounds σ̂ᵢ", ", ".join(f"{v:.3f}" for v in gb.layer_bounds),
              f"grid {gb.spectral_grid}")
    if gb.measured_layer_norms is not None and gb.size is not None:
        t.add_row(f"layer norms at {'x'.join(map(str, gb.size))}",
                  ", ".join(f"{v:.3f}" for v in gb.measured_layer_norms),
                  f"lower est.; ∏ {_fmt(gb.measured_product)}")
    pw, ra = r.local.power, r.local.ratio
    t.add_row("local ‖J_H(x*)‖", f"{pw.min:.4f} / {pw.median:.4f} / {pw.max:.4f}",
              f"min/med/max, {len(r.local.points)} pt(s)")
    its = [p.power_iterations for p in r.local.points if p.power_iterations is not None]
    if its:
        state = {True: "converged", False: "NOT converged (raise --power-iters)",
                 None: "fixed count"}[r.local.power_converged]
        t.add_row("power iterations", f"{min(its)}–{max(its)}", state)
    t.add_row("local ratio search", f"{ra.min:.4f} / {ra.median:.4f} / {ra.max:.4f}",
              "min/med/max")
    lz = r.local.lanczos
    if lz is not None:
        steps = r.local.points[0].lanczos_steps
        t.add_row("local Lanczos ‖J_H(x*)‖", f"{lz.min:.4f} / {lz.median:.4f} / {lz.max:.4f}",
                  f"min/med/max, {steps} steps")
    mono = r.local.monotone
    if mono is not None:
        t.add_row("local μ, top of ½(J+Jᵀ)",
                  f"{mono.min:.4f} / {mono.median:.4f} / {mono.max:.4f}",
                  "min/med/max; F = I − H monotone where < 1")
    fallback = sum(p.point != "fixed point" for p in r.local.points)
    if fallback:
        t.add_row("points not at a fixed point", str(fallback), "CG-SENSE used")
    cc, cl = r.contraction_certified, r.contraction_local
    t.add_row("margin m = 1 − L", f"{_fmt(cc.margin)} / {_fmt(cl.margin)}", "certified / local")
    if r.local.monotone_max is not None:
        t.add_row("margin m = 1 − μ", _fmt(1.0 - r.local.monotone_max),
                  "local; uniqueness, robustness")
    t.add_row(f"step contraction ρ(α={r.alpha:g})", f"{_fmt(cc.factor)} / {_fmt(cl.factor)}",
              "certified / local")
    t.add_row("admissible α", f"(0, {_fmt(cc.alpha_max)}) / (0, {_fmt(cl.alpha_max)})",
              "certified / local")
    rb = r.robustness
    t.add_row("‖A‖", _fmt(rb.op_norm), "power iteration")
    t.add_row("‖Δx‖/‖Δb‖ ≤ (λ/m)‖A‖", _fmt(rb.paper), f"m: {rb.basis}")
    t.add_row("‖Δx‖/‖Δb‖ ≤ ½√(λ/m)", _fmt(rb.tight), f"m: {rb.basis}")
    if r.uniqueness is not None:
        u = r.uniqueness
        rel = {True: "≤", False: ">", None: "no"}[u.consistent]
        t.add_row("uniqueness ‖xᵢ − xⱼ‖/‖x‖", _fmt(u.max_distance, ".3g"),
                  f"{rel} bound {_fmt(u.bound, '.3g')}")
    colour = {"certified": "green", "empirical": "yellow", "monotone": "yellow",
              "violated": "red"}[r.verdict]
    t.add_row("verdict", f"[{colour}]{r.verdict}[/{colour}]", "")
    stdout.print(t)
    notes = [
        ("The certified bound is the product of certified per-layer bounds of the zero-padded "
         "convolutions (supremum over continuous frequencies): it holds for every image size."),
        ("Local estimates are attained values (lower estimates) at the MOL fixed points of "
         f"{', '.join(r.data)}; ρ is the contraction factor with the exact data-consistency "
         "resolvent, best at α = 1."),
    ]
    if r.uniqueness is not None:
        u = r.uniqueness
        notes.append(f"Uniqueness: starts {', '.join(u.starts)}; worst pair {u.worst_pair[0]} "
                     f"vs {u.worst_pair[1]}; bound (‖rᵢ‖ + ‖rⱼ‖)/(m‖x‖) with m: {u.basis}.")
    for line in notes:
        stdout.print(line, soft_wrap=True)


# ------------------------------------------------------------------------------ robustness
@app.command("robustness")
def robustness_cmd(
    model: Annotated[Path, typer.Argument(metavar="MODEL", help=_MODEL_HELP)],
    data_arg: Annotated[Path | None, typer.Argument(
        metavar="FILE", show_default=False, hidden=True,
        help="The same as --data FILE (kept for older scripts).")] = None,
    data: Annotated[list[Path] | None, typer.Option(
        "--data", "-d", metavar="FILE", show_default=False,
        help=f"Raw scan whose measurements are attacked ({_DATA_DEFAULT}).")] = None,
    eps: Annotated[str | None, typer.Option(
        "--eps", metavar="EPS[,EPS...]", show_default=False,
        help="Perturbation sizes ‖Δb‖/‖b‖, comma-separated (default 0.05; with --full 0.01,0.05).")
    ] = None,
    steps: Annotated[int | None, typer.Option(
        "--steps", show_default=False,
        help="Gradient-ascent steps per eps, one forward and backward solve each (default 3; "
             "with --full 5).")] = None,
    kind: Annotated[str | None, typer.Option(
        "--kind", metavar="KIND", show_default=False,
        help="Attack the prior on data of this kind (2d, 3d or 2dt), also one its "
             "checkpoint was not trained on, if its network can serve it; without --data "
             "the simulated scan is of this kind.")] = None,
    full: Annotated[bool, typer.Option(
        "--full", help="The thorough attack (two sizes, 5 steps; the full-size simulated scan "
                       "for a 3D or 2D+time model): minutes to a quarter of an hour on a CPU.")
    ] = False,
    unrolled_k: Annotated[int, typer.Option(
        "--unrolled-k", help="Steps K of the unrolled comparison network (0: none).")] = 10,
    points: Annotated[int, typer.Option(
        "--points", help="Slices attacked (spread over the scan).")] = 1,
    lanczos_steps: Annotated[int, typer.Option(
        "--lanczos-steps", help="Lanczos steps on JᵀJ at each fixed point (0: none); the local "
                                "Lipschitz estimate behind the bounds is the larger of it and "
                                "the power iteration.")] = 30,
    double: Annotated[bool, typer.Option("--double", help="Compute in double precision.")] = False,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the initial perturbation.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    debug: bool = DebugOpt,
) -> None:
    """Worst-case k-space perturbations: MOL (implicit gradient) vs the same CNN unrolled.

    Projected gradient ascent on ‖Δx‖ over Δb on the sampled k-space locations
    with ‖Δb‖ ≤ eps·‖b‖ per slice; reports the amplification ‖Δx‖/‖Δb‖ beside
    the bounds (λ/m)‖A‖ and ½√(λ/m) of the monotone theory.

    The scan is --data FILE, as in check-lipschitz; a FILE after MODEL is still
    accepted.
    """
    eps_t = _parse_eps(eps if eps is not None else ("0.01,0.05" if full else "0.05"))
    steps = steps if steps is not None else (5 if full else 3)
    check_option(steps >= 0, "must be >= 0", "--steps")
    check_option(unrolled_k >= 0, "must be >= 0", "--unrolled-k")
    check_option(points >= 1, "must be at least 1", "--points")
    check_option(lanczos_steps >= 0, "must be >= 0", "--lanczos-steps")
    if kind is not None:
        choice(kind, KINDS, "--kind")
    choice(device, _DEVICES, "--device")
    if data_arg is not None and data:
        raise bad_option("give the scan once: --data FILE (or FILE after MODEL, not both)",
                         "--data")
    files = list(data or []) or ([data_arg] if data_arg is not None else None)
    with user_errors(debug):
        from ..guarantees import RobustnessConfig, robustness

        config = RobustnessConfig(eps=eps_t, steps=steps, unrolled_k=unrolled_k,
                                  lanczos_steps=lanczos_steps, seed=seed)
        loaded, problems = _model_and_problems(model, files, device, points, double, full=full,
                                               kind=kind)
        with _live(f"attacking the measurements: {len(eps_t)} size(s) × {steps} ascent "
                   "steps") as say:
            report = robustness(loaded, problems, config, progress=say)
        if as_json:
            stdout.print_json(json.dumps(report.as_dict()))
        else:
            _print_robustness(report)
        if any(not a.converged for a in report.mol):
            warn("some MOL solves stopped at the iteration cap: the measured amplification "
                 "is that of the iterates reached")


def _print_robustness(r: RobustnessReport) -> None:
    from rich.table import Table

    b = r.bounds
    t = Table(title=f"Robustness: {Path(r.model).name} on {', '.join(r.data)} "
                    f"({r.steps} ascent steps)", show_header=True,
              caption="amp = ‖Δx‖/‖Δb‖ (worst found), rel = ‖Δx‖/‖x‖; "
                      "K = the same CNN unrolled for K steps (no monotone guarantee)")
    t.add_column("ε", justify="right")
    t.add_column("MOL amp", justify="right")
    t.add_column("MOL rel", justify="right")
    unrolled: dict[float, Any] = {a.eps: a for a in r.unrolled}
    if unrolled:
        t.add_column(f"K={r.unrolled_k} amp", justify="right")
        t.add_column(f"K={r.unrolled_k} rel", justify="right")
    t.add_column("½√(λ/m)", justify="right")
    t.add_column("(λ/m)‖A‖", justify="right")
    for a in r.mol:
        row = [f"{a.eps:g}", f"{a.amplification:.4g}", f"{a.relative_change:.3g}"]
        if unrolled:
            u = unrolled.get(a.eps)
            row += ["—", "—"] if u is None else [f"{u.amplification:.4g}",
                                                 f"{u.relative_change:.3g}"]
        row += [_fmt(b.tight), _fmt(b.paper)]
        t.add_row(*row)
    stdout.print(t)
    kind = {"certified": "guarantees",
            "monotone": "estimates (m = 1 − μ, μ the top of H's numerical range at the data)",
            }.get(b.basis, "estimates (m from the local estimate)")
    name = "μ" if b.basis == "monotone" else "L"
    stdout.print(f"bounds are {kind}: {name} = {b.lipschitz:.4g}, m = {b.margin:.4g}, "
                 f"λ = {b.lam:.4g}, ‖A‖ = {b.op_norm:.4g}", soft_wrap=True)
