"""Implicit gradient of the MOL fixed point: exact-inverse data consistency against
differentiating through the CG iterations, both checked by central differences of x*(θ).

A small random multicoil problem (3 coils, 12 × 10, R = 3) and a 3-layer prior; for each
λ and CG count per step, prints the backward iterations and the relative error of the
directional derivative of ⟨w, x*(θ)⟩ along a random parameter direction.

    python benchmarks/bench_gradient.py --lams 30,300 --cg 2,5,60
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "deq"))
from molrecon.deq import FixedPointConfig, MolConfig, MolStep, regularised_sense
from molrecon.deq.implicit import deq_solve
from test_deq import make_problem, sn_prior


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lams", default="30,300")
    ap.add_argument("--cg", default="2,5,60", help="CG iterations per MOL step")
    args = ap.parse_args()
    torch.set_num_threads(1)
    op, aty = make_problem(seed=8)
    weight = torch.randn(aty.shape, dtype=aty.dtype, generator=torch.Generator().manual_seed(1))
    tight = FixedPointConfig(tol=1e-12, max_iter=500)
    print("| λ | CG/step | backward | backward iterations | converged | relative error vs central differences |")
    print("|---:|---:|---|---:|---|---:|")
    for lam in (float(v) for v in args.lams.split(",")):
        for cg in (int(v) for v in args.cg.split(",")):
            mol = MolStep(sn_prior(target=0.9, seed=8).double(),
                          MolConfig(alpha=1.0, lam=lam, cg_iters=cg)).double()
            params = [p for _, p in mol.named_parameters()]
            x0 = regularised_sense(op.normal, aty, lam=lam)

            def loss(exact: bool, backward: FixedPointConfig, mol: MolStep = mol,
                     x0: torch.Tensor = x0) -> tuple[torch.Tensor, object]:
                mol.exact_dc_grad = exact
                out = deq_solve(mol.bind(normal=op.normal, aty=aty), x0, forward=tight,
                                backward=backward)
                return (weight.conj() * out.x).real.sum(), out.backward

            # reference: central differences of x*(θ), solved with exact data consistency
            direction = [torch.randn(p.shape, dtype=p.dtype,
                                     generator=torch.Generator().manual_seed(3 + i))
                         for i, p in enumerate(params)]
            eps, values, cg_run = 1e-6, [], mol.cg_iters
            mol.cg_iters = 60
            with torch.no_grad():
                for sign in (1.0, -1.0):
                    for p, d in zip(params, direction):
                        p.add_(sign * eps * d)
                    values.append(float(loss(True, tight)[0]))
                    for p, d in zip(params, direction):
                        p.sub_(sign * eps * d)
            mol.cg_iters = cg_run
            fd = (values[0] - values[1]) / (2 * eps)
            for exact in (True, False):
                value, stats = loss(exact, FixedPointConfig(tol=1e-10, max_iter=300, warn=False))
                grads = torch.autograd.grad(value, params)
                analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
                name = "exact inverse" if exact else "through CG"
                print(f"| {lam:g} | {cg} | {name} | {stats.iterations[0]} | {stats.converged[0]} | "
                      f"{abs(analytic - fd) / abs(fd):.2e} |", flush=True)


if __name__ == "__main__":
    main()
