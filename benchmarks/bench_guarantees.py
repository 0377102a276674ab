"""The guarantees of a MOL checkpoint, measured, as one markdown report.

Usage::

    python benchmarks/bench_guarantees.py MODEL.pt [--data FILE] [--points 1]
        [--eps 0.01,0.02,0.05] [--steps 5] [--unrolled-k 10] [--device cpu|cuda] [--double]

``--data`` defaults to the bundled example scan (2D brain, 8 coils, R = 4).

Reported (markdown):
1. the certificate: certified global bound (∏ of certified layer bounds, all
   image sizes), the layer bounds, the monotonicity margin and the MOL step's
   contraction factor and admissible α range;
2. local estimates at the MOL fixed points (power iteration on JᵀJ and the
   adversarial ratio search; min / median / max over slices) and the verdict;
3. uniqueness: the largest relative distance between the fixed points reached
   from zero, zero-filled, CG-SENSE and random starts, next to the bound the
   solver tolerance implies (‖rᵢ‖ + ‖rⱼ‖)/(m‖x‖);
4. robustness: the worst amplification ‖Δx‖/‖Δb‖ found by projected gradient
   ascent for MOL (implicit gradient through the equilibrium) and for the same
   CNN unrolled for K steps, at every ε, beside the bounds ½√(λ/m) and
   (λ/m)‖A‖ (guarantees when m is certified, estimates otherwise);
5. wall time of each part and the device.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from molrecon.device import resolve_device
from molrecon.guarantees import (
    CheckConfig,
    RobustnessConfig,
    check_lipschitz,
    example_scan,
    load_problems,
    robustness,
)
from molrecon.models import load_checkpoint


def _f(v: float | None, spec: str = ".4g") -> str:
    return "—" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--points", type=int, default=1)
    ap.add_argument("--eps", default="0.01,0.02,0.05")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--unrolled-k", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--double", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = resolve_device(args.device)
    loaded = load_checkpoint(args.checkpoint, map_location=device)
    data = args.data if args.data is not None else example_scan()
    eps = tuple(float(e) for e in args.eps.split(",") if e.strip())

    t0 = time.perf_counter()
    problems = load_problems([data], kinds=loaded.kinds, points=args.points, device=device,
                             double=args.double)
    t_prep = time.perf_counter() - t0
    t0 = time.perf_counter()
    rep = check_lipschitz(loaded, problems, CheckConfig(uniqueness=True, seed=args.seed))
    t_check = time.perf_counter() - t0
    t0 = time.perf_counter()
    rob = robustness(loaded, problems, RobustnessConfig(eps=eps, steps=args.steps,
                                                        unrolled_k=args.unrolled_k,
                                                        seed=args.seed))
    t_rob = time.perf_counter() - t0

    gb, cc, cl = rep.global_bound, rep.contraction_certified, rep.contraction_local
    shape = tuple(problems[0].kspace.shape)
    print(f"## Guarantees of `{args.checkpoint.name}` on `{data.name}`\n")
    print(f"{rep.constraint.upper()} prior ({loaded.model.config.layers} layers × "
          f"{loaded.model.config.channels} channels), α = {rep.alpha:g}, λ = {rep.lam:.4g}, "
          f"{rep.cg_iters} CG iterations per step; data (B, C, D, Y, X) = {shape}, "
          f"{'float64' if args.double else 'float32'}, device {device}.\n")
    print("| quantity | certified | local (at the data) |")
    print("|---|---|---|")
    print(f"| Lipschitz constant L of H | {_f(gb.bound)} (all image sizes) | "
          f"{_f(rep.local.max)} (max) |")
    print(f"| layer bounds | {', '.join(f'{v:.3f}' for v in gb.layer_bounds)} | |")
    pw, ra = rep.local.power, rep.local.ratio
    print(f"| power iteration ‖J_H(x*)‖ min / median / max | | {pw.min:.4f} / {pw.median:.4f} "
          f"/ {pw.max:.4f} |")
    print(f"| ratio search min / median / max | | {ra.min:.4f} / {ra.median:.4f} / "
          f"{ra.max:.4f} |")
    print(f"| margin m = 1 − L | {_f(cc.margin)} | {_f(cl.margin)} |")
    print(f"| step contraction ρ(α = {rep.alpha:g}) | {_f(cc.factor)} | {_f(cl.factor)} |")
    print(f"| admissible α | (0, {_f(cc.alpha_max)}) | (0, {_f(cl.alpha_max)}) |")
    print(f"| verdict | **{rep.verdict}** | |\n")

    u = rep.uniqueness
    if u is not None:
        print("| uniqueness | value |")
        print("|---|---|")
        print(f"| largest pairwise ‖xᵢ − xⱼ‖/‖x‖ ({u.worst_pair[0]} vs {u.worst_pair[1]}) | "
              f"{_f(u.max_distance, '.3g')} |")
        print(f"| tolerance-implied bound (m: {u.basis}) | {_f(u.bound, '.3g')} |")
        print(f"| iterations per start ({', '.join(u.starts)}) | "
              f"{', '.join(str(i) for i in u.iterations)} |")
        print(f"| consistent | {u.consistent} |\n")

    b = rob.bounds
    unrolled = {a.eps: a for a in rob.unrolled}
    print(f"Robustness ({rob.steps} ascent steps per ε; ‖A‖ = {b.op_norm:.4g}; bounds with m "
          f"from the {b.basis} L = {b.lipschitz:.4g}):\n")
    print(f"| ε = ‖Δb‖/‖b‖ | MOL ‖Δx‖/‖Δb‖ | unrolled K = {rob.unrolled_k} ‖Δx‖/‖Δb‖ | "
          "MOL ‖Δx‖/‖x‖ | unrolled ‖Δx‖/‖x‖ | ½√(λ/m) | (λ/m)‖A‖ |")
    print("|---|---|---|---|---|---|---|")
    for a in rob.mol:
        un = unrolled.get(a.eps)
        print(f"| {a.eps:g} | {a.amplification:.4g} | "
              f"{'—' if un is None else f'{un.amplification:.4g}'} | {a.relative_change:.3g} | "
              f"{'—' if un is None else f'{un.relative_change:.3g}'} | {_f(b.tight)} | "
              f"{_f(b.paper)} |")
    print(f"\nWall time: data preparation {t_prep:.1f} s, check-lipschitz with uniqueness "
          f"{t_check:.1f} s, robustness {t_rob:.1f} s ({torch.get_num_threads()} CPU threads).")


if __name__ == "__main__":
    main()
