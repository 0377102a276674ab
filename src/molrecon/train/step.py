"""One training step on one process, and the model it trains.

:func:`_build` makes the MOL step T (the prior H and a learnable λ) as a run starts: H's last
layer at zero and λ = 100 (so the untrained model is the regularised SENSE solution), or the
weights and λ of ``--init`` (a 2D prior may start a 3D one, :func:`inflate_state_2d_to_3d`).

:func:`_local_step` is a deep-equilibrium step's share of this process: for each of its
samples a fresh problem, the regularised SENSE start, the fixed point with its implicit
gradient (or the unrolled baseline), the loss and the MOL-LR penalty, gradients accumulated
in the parameters; :func:`_denoise_step` is stage 0's (H alone on noisy patches). Every
random draw comes from a generator seeded with the run's seed, the step and the sample's
place in the global batch, so a step is the same whichever process computes it and whenever.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..deq.implicit import deq_solve, unrolled
from ..deq.mol import MolConfig, MolStep, regularised_sense
from ..errors import CheckpointError, ConfigError
from ..models.bundled import resolve_weights
from ..models.checkpoint import load_checkpoint
from ..models.cnn import CNNConfig, MolCNN
from ..models.lipschitz import (
    lanczos_jacobian_norm,
    local_lipschitz_ratio,
    monotonicity_estimate,
    tracked_jacobian_norm,
)
from ..problem import Problem
from .config import DEFAULT_LAM, Loss, TrainConfig
from .data import FolderDataset, make_problem
from .patches import draw_patch, whole_image
from .probes import PenaltyProbes

if TYPE_CHECKING:
    from .distributed import Dist


@dataclass
class _StepOutcome:
    """One process's share of a step."""

    bad: str | None = None
    loss_sum: float = 0.0
    count: int = 0
    fwd_iterations: list[int] = field(default_factory=list)
    bwd_iterations: list[int] = field(default_factory=list)
    lipschitz: list[float] = field(default_factory=list)   # this process's estimates only
    norms: list[float] = field(default_factory=list)       # the Jacobian norms under the cap


# ------------------------------------------------------------------------------- the model
def load_init(config: TrainConfig) -> Any:
    """The ``--init`` checkpoint (a bundled name or a file), or None without one."""
    return load_checkpoint(resolve_weights(config.init_weights)) if config.init_weights else None


def _build(config: TrainConfig, kind: str, device: Any, *, loaded: Any = None
           ) -> tuple[Any, Any]:
    """The MOL step (prior + learnable λ) on ``device``, and its prior; ``loaded`` the
    ``--init`` checkpoint when the caller has loaded it (:func:`load_init`), else loaded here.

    With ``skip``, the identity path's gain is 1 for a new network and the ``--init``
    checkpoint's otherwise (a model scaled to the bound keeps its scale). An LR ``--init``
    model that has an identity path (the bundled ``mol_2d_lr``) keeps it without ``skip``:
    the checkpoint decides the network's form, as it decides its weights. Training trains the
    network alone: an ``--init`` checkpoint's flip ensemble (``CNNConfig.ensemble``, an
    inference setting) is not carried over."""
    gain = 1.0 if config.skip else 0.0
    if loaded is None:
        loaded = load_init(config)
    if loaded is not None and loaded.model.config.skip > 0 and config.constraint == "lr":
        gain = loaded.model.config.skip
    cnn = MolCNN(CNNConfig(dims=_model_dims(kind), layers=config.layers, channels=config.channels,
                           skip=gain),
                 constraint=config.constraint, lipschitz_target=config.lipschitz_target,
                 spectral_grid=config.spectral_grid)
    lam = DEFAULT_LAM if config.lam_init is None else config.lam_init
    step = MolStep(cnn, MolConfig(alpha=config.alpha, lam=lam,
                                  cg_iters=config.cg_iters, learn_lam=True))
    if loaded is None:
        # Last layer zero: the untrained plain model is H ≡ 0 (the regularised SENSE
        # solution); with the identity skip it is H = I (F ≡ 0: the prior is silent and
        # training starts at a monotone operator's boundary).
        last = cnn.convs[-1]
        with torch.no_grad():
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()
    else:
        source = replace(loaded.model.config, ensemble=cnn.config.ensemble)
        if source == cnn.config:
            cnn.load_state_dict(loaded.model.state_dict())
        elif replace(source, dims=cnn.config.dims) == cnn.config and source.dims == 2:
            # A 2D prior starts a 3D (or 2D+time) one: every kernel goes to the centre
            # plane of a 3D kernel, so the new network is exactly the 2D one applied plane
            # by plane (same operator norm per layer) until training mixes the planes.
            cnn.load_state_dict(inflate_state_2d_to_3d(loaded.model.state_dict()))
        elif (replace(source, layers=cnn.config.layers) == cnn.config
              and 3 <= source.layers < cnn.config.layers
              and config.constraint == "lr" and loaded.model.constraint == "lr"):
            # A shallower prior starts a deeper one: the new hidden layers are identities,
            # so the deeper network is exactly the shallower one until training uses them
            # (LR to LR only: an SN checkpoint stores free weights that its normalisation
            # rescales, and the normalisation of a deeper network differs).
            cnn.load_state_dict(deepen_state(loaded.model.state_dict(), source.layers,
                                             cnn.config.layers))
        else:
            raise CheckpointError(f"architecture {source} differs from the one asked "
                                  f"for ({cnn.config})", path=config.init_weights)
        if config.lam_init is None:       # λ continues from the checkpoint unless given
            with torch.no_grad():
                step.log_lam.fill_(math.log(loaded.mol_config.lam))
    # Implicit gradients at the fixed point: differentiate data consistency as the exact
    # inverse (deq/mol.py, _ExactSolveGrad); the unrolled baseline differentiates what it ran.
    step.exact_dc_grad = config.unroll == 0
    return step.to(device), cnn


def noise_rule(config: TrainConfig, loaded: Any) -> Any:
    """The λ noise rule of ``loaded`` (the ``--init`` checkpoint) when ``--lam-from-noise``
    asks for it (else None); a :class:`ConfigError` naming the file when it carries none."""
    if not config.lam_from_noise:
        return None
    if loaded is None or loaded.lam_noise is None:
        raise ConfigError(f"--lam-from-noise: {config.init_weights} carries no noise rule for λ "
                          "(scripts/set_lambda_rule.py measures and adds one)")
    return loaded.lam_noise


def problem_lam(step: Any, prob: Problem) -> Any:
    """The λ of one single-item problem's regularised-SENSE start: the step's λ times the
    problem's noise-rule factor, when it has one (detached)."""
    lam = step.lam.detach()
    if prob.lam_scale is not None:
        lam = lam * prob.lam_scale.reshape(-1)[0].to(lam.dtype)
    return lam


def inflate_state_2d_to_3d(state: dict[str, Any]) -> dict[str, Any]:
    """2D convolution weights (O, I, k, k) as 3D ones (O, I, k, k, k), zero off the centre plane."""
    out: dict[str, Any] = {}
    for name, value in state.items():
        if name.endswith("weight") and value.ndim == 4:
            k = value.shape[-1]
            w = torch.zeros((*value.shape[:2], k, *value.shape[2:]), dtype=value.dtype)
            w[:, :, k // 2] = value
            out[name] = w
        else:
            out[name] = value.clone()
    return out


def deepen_state(state: dict[str, Any], layers: int, new_layers: int) -> dict[str, Any]:
    """The state of a ``layers``-layer network as one of ``new_layers`` layers computing the
    same function: identity C → C convolutions (the centre tap an identity matrix, zero
    bias) are inserted before the last layer. Their input has just been through a ReLU, so
    it is non-negative and the inserted layer's own ReLU passes it unchanged. Each inserted
    layer's operator norm is 1, so the product of the layer norms (the certified bound of
    an unconstrained network) is unchanged too. (Under spectral normalisation every layer's
    target norm depends on the depth, so the function would change: LR only.)"""
    if not 3 <= layers <= new_layers:
        raise ValueError(f"cannot deepen a {layers}-layer network to {new_layers} layers")
    out: dict[str, Any] = {}
    last = layers - 1
    for name, value in state.items():
        index, rest = _conv_index(name)
        if index == last:                  # the output layer moves to the new end
            name = f"convs.{new_layers - 1}.{rest}"
        out[name] = value.clone()
    ref = state[f"convs.{last - 1}.weight"]          # a hidden C → C layer: its shape
    channels, kernel = ref.shape[0], ref.shape[2:]
    centre = tuple(k // 2 for k in kernel)
    for index in range(last, last + new_layers - layers):
        weight = torch.zeros_like(ref)
        weight[(slice(None), slice(None), *centre)] = torch.eye(channels, dtype=ref.dtype)
        out[f"convs.{index}.weight"] = weight
        if f"convs.{last - 1}.bias" in state:
            out[f"convs.{index}.bias"] = torch.zeros(channels, dtype=ref.dtype)
    return out


def _conv_index(name: str) -> tuple[int | None, str]:
    """``convs.I.REST`` → (I, REST); any other parameter name → (None, name)."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "convs" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


def _model_dims(kind: str) -> int:
    """2D convolutions for 2d data; 3D for 3d and 2dt data (time as the third axis)."""
    return 2 if kind == "2d" else 3


def _kinds(kind: str) -> list[str]:
    """The data kinds a model trained on ``kind`` is declared for in its checkpoint: a 2D
    prior also serves 2D+time frame by frame and 3D partition by partition (as the bundled
    2D models do); a 3D network only the kind it was trained on."""
    return ["2d", "2dt", "3d"] if kind == "2d" else [kind]


def _loss(x: Any, target: Any, kind: Loss) -> Any:
    """Loss relative to the target's energy (mse, mse_mag) or mean magnitude (l1)."""
    if kind == "mse":
        return torch.mean((x - target).abs() ** 2) / torch.mean(target.abs() ** 2)
    if kind == "mse_mag":
        return torch.mean((x.abs() - target.abs()) ** 2) / torch.mean(target.abs() ** 2)
    return torch.mean((x - target).abs()) / torch.mean(target.abs())


def _penalty(lip: Any, threshold: float, delta: float = 1e-3) -> Any:
    """Log barrier −log(T − L), continued linearly beyond L = T − δ."""
    edge = threshold - delta
    if float(lip.detach()) < edge:
        return -torch.log(threshold - lip)
    return -math.log(delta) + (lip - edge) / delta


# ------------------------------------------------------------------------------- one step
def _local_step(step: Any, cnn: Any, config: TrainConfig, train_set: FolderDataset,
                order: np.ndarray, s: int, within: int, global_batch: int, dist_info: Dist,
                device: Any, fwd: Any, bwd: Any, lam_rule: Any = None) -> _StepOutcome:
    """Forward and backward passes of this process's samples of step ``s``.

    Gradients accumulate in the parameters (each sample's loss divided by the batch size).
    ``lam_rule`` (``--lam-from-noise``): each problem's λ factor from its noise level.
    """
    out = _StepOutcome()
    n_train = len(train_set)
    kind = train_set.kind
    for j in range(config.batch_size):
        g_index = dist_info.rank * config.batch_size + j         # position in the global batch
        gi = (within * global_batch + g_index) % n_train
        sample = train_set.samples[int(order[gi])]
        rng = np.random.default_rng([config.seed, 2, s, 0, g_index])
        prob = make_problem(sample, kind, config.mask, rng, config.draw_noise(rng), device,
                            config.readout_block, maps_from=config.maps, lam_rule=lam_rule)
        with torch.no_grad():
            x0 = regularised_sense(prob.op.normal, prob.aty, lam=problem_lam(step, prob),
                                   iters=config.init_iters)         # (1, D, Y, X)

        support = prob.op.support()                                  # (1, D|1, Y, X)

        def fn(x: Any, _p: Problem = prob, _s: Any = support) -> Any:
            return step(x, normal=_p.op.normal, aty=_p.aty, support=_s, lam_scale=_p.lam_scale)

        stats = None
        if config.unroll > 0:
            x = unrolled(fn, x0, config.unroll)
            out.fwd_iterations.append(config.unroll)
        else:
            res = deq_solve(fn, x0, forward=fwd, backward=bwd, gradient=config.gradient)
            r = float(res.forward.final_residual.max())
            if not math.isfinite(r) or r > config.diverge_tol:
                out.bad = (f"forward fixed point diverged (relative residual {r:.3g} after "
                           f"{res.forward.iterations} iterations)")
                return out
            x, stats = res.x, res.backward
            out.fwd_iterations.append(res.forward.iterations)
        loss = _loss(x, prob.target, config.loss)
        crop = config.penalty_crop if config.penalty_estimator == "ratio" else None
        penalty = _lipschitz_penalty(
            cnn, config, s, rng, out,
            lambda _x=x, _r=rng, _c=crop: _random_crop(_x.detach(), _c, _r))
        if penalty is not None:
            loss = loss + penalty
        if not bool(torch.isfinite(loss)):
            out.bad = "non-finite loss"
            return out
        (loss / config.batch_size).backward()
        out.loss_sum += float(loss.detach())
        out.count += 1
        if stats is not None:
            out.bwd_iterations.extend(stats.iterations)
    return out


def _denoise_step(cnn: Any, config: TrainConfig, train_set: FolderDataset, scales: list[float],
                  bank: list[Any], order: np.ndarray, s: int, within: int, global_batch: int,
                  dist_info: Dist, device: Any) -> _StepOutcome:
    """Stage 0: this process's ``batch_size`` degraded patches through H, loss against the
    clean patches (``config.loss``, over the whole batch), plus the LR penalty on one patch.
    ``bank``: the regularised SENSE images per sample (empty: noise patches only)."""
    out = _StepOutcome()
    n_train = len(train_set)
    noisy, clean, items = [], [], []
    volume = cnn.config.dims == 3                      # 2dt or 3d data: (d, P, P) blocks
    rng = np.random.default_rng([config.seed, 3, s, dist_info.rank])
    for j in range(config.batch_size):
        g_index = dist_info.rank * config.batch_size + j
        gi = int(order[(within * global_batch + g_index) % n_train])
        pair_rng = np.random.default_rng([config.seed, 2, s, 0, g_index])
        a, b = draw_patch(train_set.samples[gi], scales[gi], config.patch, pair_rng,
                          bank[gi] if bank else None, volume=volume)
        noisy.append(a)
        clean.append(b)
        items.append(gi)
    p = min(min(x.shape[-2:]) for x in noisy)         # images smaller than the patch size
    d = min(x.shape[0] for x in noisy)                # series or volumes with fewer planes
    x_in = torch.stack([x[:d, :p, :p] for x in noisy]).to(device)         # (B, 1|d, P, P)
    target = torch.stack([x[:d, :p, :p] for x in clean]).to(device)       # (B, 1|d, P, P)
    loss = _loss(cnn(x_in), target, config.loss)
    # The penalty measures H at one item of the batch: its noisy patch, its clean patch
    # (MOL's fixed points are nearly clean) and/or a whole clean image of its scan, in the
    # order asked (config.penalty_points()).
    i = int(rng.integers(x_in.shape[0]))
    gi = items[i]

    def whole() -> Any:
        return whole_image(train_set.samples[gi], scales[gi], rng, volume,
                           config.patch.depth).to(device)
    points = {"clean": lambda: target[i][None], "noisy": lambda: x_in[i][None], "image": whole}
    terms = [_lipschitz_penalty(cnn, config, s, rng, out, points[name])
             for name in config.penalty_points()]                        # (1, 1|d, ·, ·)
    penalty = None if terms[0] is None else sum(terms)
    if penalty is not None:
        loss = loss + penalty
    if not bool(torch.isfinite(loss)):
        out.bad = "non-finite loss"
        return out
    loss.backward()
    out.loss_sum = float(loss.detach())
    out.count = 1
    return out


def _lipschitz_penalty(cnn: Any, config: TrainConfig, s: int, rng: np.random.Generator,
                       out: _StepOutcome, point: Callable[[], Any]) -> Any | None:
    """MOL-LR's penalty term on step ``s`` (None when the step has none): a local Lipschitz
    estimate at ``point()`` through the log barrier; the estimate is recorded in ``out``.

    "ratio": the adversarial ratio search of ``penalty_steps`` steps. "sample": the Jacobian
    norm ‖J v‖ after ``penalty_steps`` power iterations from white noise, at the point itself
    (every training sample's own fixed point, or a stage-0 patch). "lanczos": the
    ``penalty_top`` largest singular values of the Jacobian there by ``penalty_steps``
    Lanczos steps, each through the barrier; "monotone": likewise the largest eigenvalues μ
    of its symmetric part ½(J + Jᵀ), which F = I − H's monotonicity needs below 1 (then
    ``out.lipschitz`` records μ), and with ``penalty_norm_cap`` the Jacobian norm there
    through a barrier at the cap as well, weighted by ``penalty_norm_weight`` (by
    ``penalty_weight`` when that is None; recorded in ``out.norms``). The ratio search and a short power iteration
    read below the converged norm (``benchmarks/bench_lipschitz_estimates.py``); Lanczos
    reads it. None keeps state between steps, so a resumed run repeats them exactly."""
    if not (config.constraint == "lr" and config.penalty_weight > 0
            and config.penalty_estimator in ("ratio", "sample", "lanczos", "monotone")
            and s % config.penalty_every == 0):
        return None
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31 - 1)))
    if config.penalty_estimator == "lanczos":
        values, _ = lanczos_jacobian_norm(cnn, point(), iters=config.penalty_steps,
                                          top=config.penalty_top, generator=gen)
        out.lipschitz.append(float(values.detach().max()))
        return config.penalty_weight * sum(_penalty(v, config.penalty_threshold) for v in values)
    if config.penalty_estimator == "monotone":
        x = point()
        found = monotonicity_estimate(cnn, x, iters=config.penalty_steps,
                                      top=config.penalty_top, generator=gen)
        out.lipschitz.append(float(found.top.detach().max()))
        penalty = config.penalty_weight * sum(_penalty(v, config.penalty_threshold)
                                              for v in found.top)
        if config.penalty_norm_cap is not None:
            norm, _ = lanczos_jacobian_norm(cnn, x, iters=config.penalty_steps, generator=gen)
            out.norms.append(float(norm.detach().max()))
            weight = config.penalty_weight if config.penalty_norm_weight is None \
                else config.penalty_norm_weight
            penalty = penalty + weight * _penalty(norm.max(), config.penalty_norm_cap)
        return penalty
    if config.penalty_estimator == "sample":
        lip, _ = tracked_jacobian_norm(cnn, point(), None, iters=config.penalty_steps,
                                       generator=gen)
    else:
        lip, _ = local_lipschitz_ratio(cnn, point(), steps=config.penalty_steps, generator=gen)
    out.lipschitz.append(float(lip.detach()))
    return config.penalty_weight * _penalty(lip, config.penalty_threshold)


def _probe_penalty(step: Any, cnn: Any, config: TrainConfig, probes: PenaltyProbes | None,
                   s: int, out: _StepOutcome, fwd: Any) -> None:
    """The "power" estimator's penalty on step ``s`` (:mod:`.probes`): its gradient is added
    to the parameters' and its estimate recorded in ``out`` (the logged loss leaves it out)."""
    if probes is None or not (config.constraint == "lr" and config.penalty_weight > 0
                              and s % config.penalty_every == 0):
        return
    lip, _ = probes.estimate(step, cnn, s, iters=config.penalty_steps,
                             init_iters=config.init_iters, fwd=fwd)
    value = float(lip.detach())
    out.lipschitz.append(value)
    if not math.isfinite(value):
        out.bad = "non-finite Lipschitz estimate"
        return
    (config.penalty_weight * _penalty(lip, config.penalty_threshold)).backward()


def _random_crop(x: Any, size: int | None, rng: np.random.Generator) -> Any:
    """A random (Y, X) window of ``size`` pixels of a (B, D, Y, X) image (all of it if smaller)."""
    if size is None:
        return x
    ny, nx = x.shape[-2:]
    cy, cx = min(size, ny), min(size, nx)
    y0 = int(rng.integers(ny - cy + 1))
    x0 = int(rng.integers(nx - cx + 1))
    return x[..., y0:y0 + cy, x0:x0 + cx].contiguous()

