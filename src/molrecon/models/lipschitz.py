"""Local Lipschitz estimates of the prior H (lower estimates, not certificates).

Both estimators work on complex images ``(B, D, Y, X)`` through their real
view (the complex ↔ two-channel map is an isometry), treat every batch item
separately (H acts on items independently) and take their randomness from an
explicit ``torch.Generator``.

* :func:`jacobian_norm` / :func:`local_lipschitz_power` — the spectral norm of the
  Jacobian of H at x, by power iteration on JᵀJ (to convergence, or a fixed count) (Jacobian–vector and vector–Jacobian
  products by reverse-mode autograd). For a ReLU network this is the Lipschitz
  constant of the linear piece containing x.
* :func:`local_lipschitz_ratio` — the adversarial ratio search used by MOL-LR
  training: start at v = u + ε·s·n (n complex white noise, s the RMS of u) and
  take gradient-ascent steps on ‖H(u) − H(v)‖ / ‖u − v‖.

Every value either function returns is attained by some pair of points (or
some direction), so it is a lower bound of the global Lipschitz constant; the
certified upper bound is :func:`molrecon.models.spectral.conv_norm_bound`
multiplied over layers (``molrecon.models.certified_bound``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Prior = Callable[[torch.Tensor], torch.Tensor]


def _item_norm(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of every batch item, shape (B,)."""
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _real_map(prior: Prior) -> Callable[[torch.Tensor], torch.Tensor]:
    """H on the real view: (B, D, Y, X, 2) real → (B, D, Y, X, 2) real."""
    def f(xr: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(prior(torch.view_as_complex(xr)))
    return f


def _complex_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Circular complex white noise with E|n|² = 1 (drawn on the generator's device)."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    real_dtype = like.real.dtype
    noise = torch.randn((*like.shape, 2), generator=generator, dtype=real_dtype,
                        device=gen_device) * (0.5 ** 0.5)
    return torch.view_as_complex(noise).to(like.device)


def _linearised(prior: Prior, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """H at ``x`` on the real view, ready for Jacobian products (call with grad enabled):
    ``(xr, y, u, jt_u)``, y = H(xr) and jt_u = Jᵀu for a zero u that requires grad. Jᵀu is
    linear in u, so differentiating it with respect to u gives J v (the double-vjp form of
    a Jacobian-vector product, no forward-mode AD needed); Jᵀw is ``grad(y, xr, w)``."""
    xr = torch.view_as_real(x.detach()).clone().requires_grad_(True)
    y = _real_map(prior)(xr)
    u = torch.zeros_like(y, requires_grad=True)
    (jt_u,) = torch.autograd.grad(y, xr, u, create_graph=True)
    return xr, y, u, jt_u


def _jtj(xr: torch.Tensor, y: torch.Tensor, u: torch.Tensor, jt_u: torch.Tensor,
         v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(J v, Jᵀ J v) for the linearisation of :func:`_linearised` (no graph kept for H)."""
    (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
    (w,) = torch.autograd.grad(y, xr, jv.detach(), retain_graph=True)
    return jv, w


def _check_lanczos_args(name: str, x: torch.Tensor, iters: int, top: int) -> None:
    if x.shape[0] != 1:
        raise ValueError(f"{name} takes one image (batch of 1)")
    if iters < 1 or top < 1:
        raise ValueError("iters and top must be >= 1")


@dataclass(frozen=True)
class _Lanczos:
    """What :func:`_lanczos_top` found: the unit Ritz vectors ``(top, D, Y, X, 2)`` of the
    ``top`` largest Ritz values (descending), and the smallest Ritz value."""

    vectors: torch.Tensor
    smallest: float


def _lanczos_top(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 xr: torch.Tensor, *, iters: int, top: int,
                 generator: torch.Generator | None, start: torch.Tensor | None) -> _Lanczos:
    """Lanczos with full reorthogonalisation on the symmetric real operator ``op`` (acting
    on vectors shaped like ``xr``), from white noise drawn from ``generator`` or from
    ``start`` plus a tenth of its norm in that noise (so that no direction is missing from
    the Krylov space). Returns the ``top`` largest Ritz pairs, detached."""
    q = torch.view_as_real(_complex_noise(x, generator)).clone().to(xr)
    q = q / torch.linalg.vector_norm(q)
    if start is not None:
        v0 = start.detach().reshape(q.shape).to(q)
        q = v0 / torch.linalg.vector_norm(v0) + 0.1 * q
    basis = [q / torch.linalg.vector_norm(q)]
    alphas: list[float] = []
    betas: list[float] = []
    tiny = torch.finfo(xr.dtype).eps
    for _ in range(iters):
        w = op(basis[-1]).detach()
        alphas.append(float(torch.sum(w * basis[-1])))
        for _pass in range(2):                        # full reorthogonalisation, twice
            for b in basis:
                w = w - torch.sum(w * b) * b
        beta = float(torch.linalg.vector_norm(w))
        if beta <= tiny * max(1.0, abs(alphas[0])) or len(alphas) == iters:
            break                                     # an invariant subspace, or done
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[:k - 1], dtype=torch.float64)
        tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
    evals, vecs = torch.linalg.eigh(tri)              # ascending
    n = min(top, k)
    stack = torch.stack(basis[:k])                    # (k, 1, D, Y, X, 2)
    ritz = []
    for i in range(n):
        s = vecs[:, k - 1 - i].to(stack.dtype)
        v = torch.tensordot(s, stack, dims=1)
        ritz.append(v / torch.linalg.vector_norm(v).clamp_min(tiny))
    return _Lanczos(torch.cat(ritz).detach(),
                    float(evals[0]))


@dataclass(frozen=True)
class PowerEstimate:
    """The Jacobian-norm estimate of :func:`jacobian_norm`: its value (the largest over
    batch items), the power iterations it took, and whether it met its tolerance."""

    value: float
    iterations: int
    converged: bool


def jacobian_norm(prior: Prior, x: torch.Tensor, *, max_iters: int = 300,
                  rtol: float | None = 1e-4, window: int = 10,
                  generator: torch.Generator | None = None) -> PowerEstimate:
    """‖J_H(x)‖₂ by power iteration on JᵀJ, run until it stops rising.

    ``x``: complex (B, D, Y, X). Every iterate ‖J v‖ (v a unit vector) is a lower bound of
    the Jacobian norm and they increase towards it, but slowly where the top of the
    spectrum is crowded: at four validation fixed points of a trained 2D prior, 20
    iterations read 0.971–0.995 where 98–315 converge to 1.009–1.017
    (``benchmarks/bench_lipschitz_estimates.py``). The iteration stops when no item's
    estimate rose by more than ``rtol`` (relative) over the last ``window`` iterations, or
    after ``max_iters`` (then ``converged`` is False); ``rtol=None`` runs exactly
    ``max_iters`` iterations (``converged`` False). H's parameters receive no gradients.
    """
    if max_iters < 1:
        raise ValueError("max_iters must be >= 1")
    if window < 1:
        raise ValueError("window must be >= 1")
    v = torch.view_as_real(_complex_noise(x, generator)).clone()       # (B, D, Y, X, 2)
    v = v / _bcast(_item_norm(v), v)
    history: list[torch.Tensor] = []
    converged = False
    with torch.enable_grad():
        xr, y, u, jt_u = _linearised(prior, x)
        sigma = torch.zeros(x.shape[0], dtype=xr.dtype, device=xr.device)
        it = 0
        while True:
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)     # J v
            sigma = torch.maximum(sigma, _item_norm(jv.detach()))
            history.append(sigma)
            if rtol is not None and len(history) > window:
                before = history[-1 - window]
                converged = bool(torch.all(sigma <= before * (1.0 + rtol)))
            if converged or it == max_iters:
                break
            (w,) = torch.autograd.grad(y, xr, jv.detach(), retain_graph=True)   # Jᵀ J v
            norm_w = _item_norm(w)
            # An item with J v = 0 keeps its vector (its estimate stays 0).
            safe = norm_w > 0
            v = torch.where(_bcast(safe, v), w / _bcast(torch.where(safe, norm_w, 1.0), w), v)
            it += 1
    return PowerEstimate(float(sigma.detach().max()), it, converged)


def local_lipschitz_power(prior: Prior, x: torch.Tensor, *, iters: int = 20,
                          generator: torch.Generator | None = None) -> float:
    """‖J_H(x)‖₂ after exactly ``iters`` power iterations on JᵀJ; the maximum over batch
    items (a lower bound, see :func:`jacobian_norm` for the estimate run to convergence).
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    return jacobian_norm(prior, x, max_iters=iters, rtol=None, generator=generator).value


def local_lipschitz_ratio(
    prior: Prior,
    u: torch.Tensor,
    *,
    steps: int = 10,
    eps: float = 0.01,
    lr: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial ratio search around ``u`` (complex (B, D, Y, X)).

    Start: v = u + eps·s·n, s = RMS of the item (1 where the item is zero),
    n complex white noise from ``generator``. Each of ``steps`` ascent steps
    moves every item by ``lr·‖v − u‖`` along the normalised gradient of its
    ratio r(v) = ‖H(u) − H(v)‖ / ‖u − v‖ (a step relative to the current
    distance keeps the search local and scale-free). The best v per item is
    kept.

    Returns ``(value, v)``: ``value`` is the largest ratio over the batch, a
    0-dim tensor that carries gradients to H's parameters when grad mode is
    on (so a training penalty can use it); ``v`` (detached) holds the best
    point of every item.
    """
    if steps < 0:
        raise ValueError("steps must be >= 0")
    if eps <= 0:
        raise ValueError("eps must be > 0")
    u = u.detach()
    rms = _item_norm(u) / (u[0].numel() ** 0.5)
    scale = torch.where(rms > 0, rms, torch.ones_like(rms))
    v = u + eps * _bcast(scale, u) * _complex_noise(u, generator)

    def ratio(hu: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        tiny = torch.finfo(scale.dtype).tiny
        return _item_norm(hu - prior(vv)) / _item_norm(u - vv).clamp_min(tiny)

    with torch.no_grad():
        hu = prior(u)
        best_r = ratio(hu, v)
    best_v = v.clone()
    with torch.enable_grad():
        for _ in range(steps):
            vv = v.detach().requires_grad_(True)
            r = ratio(hu, vv)
            (g,) = torch.autograd.grad(r.sum(), vv)
            norm_g = _item_norm(g)
            dist = _item_norm(vv.detach() - u)
            safe = norm_g > 0
            step = torch.where(safe, lr * dist / torch.where(safe, norm_g, 1.0), 0.0)
            v = vv.detach() + _bcast(step, g) * g
            with torch.no_grad():
                r_new = ratio(hu, v)
            better = r_new > best_r
            best_r = torch.where(better, r_new, best_r)
            best_v = torch.where(_bcast(better, v), v, best_v)
    value = ratio(prior(u), best_v).max()
    return value, best_v.detach()


def tracked_jacobian_norm(prior: Prior, x: torch.Tensor, v: torch.Tensor | None, *,
                          iters: int, generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A training penalty's Jacobian-norm estimate at ``x``, carried from step to step.

    ``x``: complex (1, D, Y, X), a point the estimate follows (e.g. a fixed point that moves
    slowly as H trains); ``v``: the unit real-view vector (1, D, Y, X, 2) this estimate left
    last time, or None to start from white noise drawn from ``generator``. ``iters`` power
    iterations on JᵀJ continue from ``v``, then ‖J v‖ is returned as a 0-dim tensor that
    carries gradients to H's parameters, with the new unit vector (detached). Continued
    over training steps, the iteration converges as spectral normalisation's persistent
    vectors do: after a few visits it reads the converged norm that
    :func:`jacobian_norm` finds, where a fresh start of a few iterations reads well below it.
    """
    if iters < 0:
        raise ValueError("iters must be >= 0")
    with torch.enable_grad():
        xr, y, u, jt_u = _linearised(prior, x)
        if v is None or v.shape != xr.shape:
            v = torch.view_as_real(_complex_noise(x, generator)).clone()
        v = (v / _item_norm(v).clamp_min(torch.finfo(v.dtype).tiny)).to(xr)
        for _ in range(iters):
            _, w = _jtj(xr, y, u, jt_u, v)
            norm_w = _item_norm(w)
            if not bool(norm_w.max() > 0):
                break
            v = (w / norm_w.reshape(-1, *([1] * (w.ndim - 1)))).detach()
        (jv,) = torch.autograd.grad(jt_u, u, v, create_graph=True)        # J v, H-differentiable
    return torch.linalg.vector_norm(jv), v.detach()


def lanczos_jacobian_norm(prior: Prior, x: torch.Tensor, *, iters: int = 20, top: int = 1,
                          generator: torch.Generator | None = None,
                          start: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``top`` largest singular values of H's Jacobian at ``x`` by Lanczos on JᵀJ,
    as differentiable ‖J v‖ of their Ritz vectors v.

    ``x``: complex (1, D, Y, X). ``iters`` Lanczos steps (one JᵀJ product each, with full
    reorthogonalisation) from white noise drawn from ``generator``, or, given ``start`` (a
    real (1, D, Y, X, 2) vector such as an earlier call's top Ritz vector at a nearby point),
    from ``start`` plus a tenth of its norm in that noise (so that no direction is missing
    from the Krylov space); the Ritz vectors of the
    ``top`` largest Ritz values then give ‖J vᵢ‖ (each a lower bound of the Jacobian norm,
    the first one close to it), returned as a ``(top,)`` tensor that carries gradients to
    H's parameters, with the Ritz vectors ``(top, D, Y, X, 2)`` (detached, unit norm).

    Why Lanczos: where the top of the spectrum is crowded, as at the MOL fixed points of a
    trained 2D prior, the power iteration needs 100–400 products to converge and a few
    reads several per cent low, while Lanczos reads the top singular value to four digits
    in about 20 products (``benchmarks/bench_lipschitz_estimates.py``). A training penalty
    on several of the top Ritz values presses the whole top of the spectrum down, not just
    the one direction a short power iteration happens to find.
    """
    _check_lanczos_args("lanczos_jacobian_norm", x, iters, top)
    with torch.enable_grad():
        xr, y, u, jt_u = _linearised(prior, x)
        ritz = _lanczos_top(lambda v: _jtj(xr, y, u, jt_u, v)[1], x, xr, iters=iters,
                            top=top, generator=generator, start=start).vectors
        values = []
        for v in ritz.split(1):
            (jv,) = torch.autograd.grad(jt_u, u, v, create_graph=True)    # J v, H-differentiable
            values.append(torch.linalg.vector_norm(jv))
    return torch.stack(values), ritz                                  # (top,), (top, D, Y, X, 2)


@dataclass(frozen=True)
class NumericalRange:
    """What :func:`monotonicity_estimate` read at one image: ``top`` (a ``(k,)`` tensor of
    the largest values of ⟨v, J v⟩ over the Ritz vectors v, carrying gradients to H's
    parameters), ``vectors`` (those unit vectors, detached) and ``smallest`` (the smallest
    Ritz value of the symmetric part, a float)."""

    top: torch.Tensor
    vectors: torch.Tensor
    smallest: float


def monotonicity_estimate(prior: Prior, x: torch.Tensor, *, iters: int = 20, top: int = 1,
                          generator: torch.Generator | None = None,
                          start: torch.Tensor | None = None) -> NumericalRange:
    """The largest eigenvalues μ of the symmetric part S = ½(J + Jᵀ) of H's Jacobian at ``x``,
    by Lanczos on S (one J v and one Jᵀ v per step; arguments as
    :func:`lanczos_jacobian_norm`).

    Why: MOL's uniqueness and robustness rest on F = I − H being m-monotone,
    ⟨F(x) − F(y), x − y⟩ ≥ m‖x − y‖², and locally that is μ ≤ 1 − m: the top of H's
    numerical range sup ⟨v, J v⟩/‖v‖², not its spectral norm ‖J‖. Always μ ≤ ‖J‖, so a
    Lipschitz constant L < 1 gives m ≥ 1 − L (the method's sufficient condition), while a
    prior whose Jacobian has norm above 1 only through negative or rotational directions
    is still monotone. A lower estimate of μ at ``x``, like the Jacobian norm's: the value
    of ⟨v, J v⟩ at unit vectors that Lanczos found.
    """
    _check_lanczos_args("monotonicity_estimate", x, iters, top)
    with torch.enable_grad():
        xr, y, u, jt_u = _linearised(prior, x)

        def sym(v: torch.Tensor) -> torch.Tensor:
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            (jtv,) = torch.autograd.grad(y, xr, v, retain_graph=True)
            return 0.5 * (jv + jtv)

        found = _lanczos_top(sym, x, xr, iters=iters, top=top, generator=generator,
                             start=start)
        values = []
        for v in found.vectors.split(1):
            (jv,) = torch.autograd.grad(jt_u, u, v, create_graph=True)    # J v, H-differentiable
            values.append(torch.sum(v * jv))
    return NumericalRange(torch.stack(values), found.vectors, found.smallest)
