"""Deep-equilibrium training of MOL on a folder of raw scans (``molrecon train``).

One training step, for each sample of the step's batch:

1. draw a retrospective mask (and optional extra noise) for a fully sampled
   scan and normalise the undersampled k-space exactly as reconstruction does
   (``physics.scaling`` on the *undersampled* data, so the network sees at
   training time the intensities it will see at inference);
2. start from the regularised SENSE image (the MOL equation with H ≡ 0);
3. solve x* = T(x*) with Anderson acceleration and no autograd graph, then
   attach the implicit gradient (``deq.implicit``): the memory is that of one
   MOL step, whatever the number of iterations;
4. loss against the ground truth (complex MSE by default — it keeps the
   phase consistent, which the data-consistency step relies on — or the MSE
   of magnitudes, or L1), plus for ``lr`` the Lipschitz penalty;
5. Adam on H's weights and on log λ, gradients averaged over the batch.

MOL-LR penalty (MOL.md): at the detached fixed point u, an adversarial
search (10 ascent steps from u + 0.01·noise) finds v maximising
L̂ = ‖H(u) − H(v)‖/‖u − v‖; the loss gets ``w · φ(L̂)`` with the log barrier
φ(L) = −log(T − L) for L < T − δ, continued linearly (with the barrier's
slope at T − δ) beyond, δ = 1e-3, T = 0.98, w = 1e-6 by default (the
reference's values); ``penalty_every`` > 1 applies it on every n-th step
only, and ``penalty_crop`` evaluates it on a random window of the fixed point
(the ascent steps cost more than the rest of a step on a CPU; a convolutional
H's local behaviour is the same on a window). MOL-SN needs no penalty: its layers are constrained so
that the certified bound stays below the target throughout.

Determinism and resuming: the mask, noise and Lipschitz-search randomness of
step ``s`` come from generators seeded with ``(seed, s)``, and the sample
order of epoch ``e`` from ``(seed, e)``, so a resumed run (weights, optimiser
state and step from the state file) continues exactly where it stopped.

Faults: a non-finite loss or gradient, or a forward solve whose residual is
above ``diverge_tol`` after its cap, skips the step (the weights are not
touched), halves the learning rate, and is logged; ``max_skips`` consecutive
skips stop the run with a clear error, keeping the last good checkpoint.

Outputs beside ``--out MODEL.pt`` (all written atomically):
``MODEL.pt`` best-by-validation model (or the latest when there is no
validation split), ``MODEL.last.pt`` the latest model, ``MODEL.state.pt`` the
resume state, ``MODEL.log.jsonl`` one JSON record per step and validation.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import CheckpointError, ConfigError, InputDataError, MolreconError, OutputError
from .train_data import FolderDataset, MaskSpec, Sample, draw_mask, list_raw_files, load_folder, split_files

Loss = Literal["mse", "mse_mag", "l1"]
STATE_VERSION = 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (recorded in the checkpoint's metadata)."""

    data: str
    out: str
    kind: str | None = None
    constraint: Literal["sn", "lr"] = "lr"
    lipschitz_target: float = 0.99
    spectral_grid: int | None = None
    layers: int = 5
    channels: int = 64
    mask: MaskSpec = field(default_factory=MaskSpec)
    extra_noise: float = 0.0
    loss: Loss = "mse"
    lr: float = 1e-4
    lam_lr: float = 1e-2
    lam_init: float = 10.0
    alpha: float = 1.0
    cg_iters: int = 5
    init_iters: int = 10
    fwd_tol: float = 1e-4
    fwd_max_iter: int = 40
    bwd_tol: float = 1e-4
    bwd_max_iter: int = 30
    diverge_tol: float = 1e-2
    penalty_threshold: float = 0.98
    penalty_weight: float = 1e-6
    penalty_steps: int = 10
    penalty_every: int = 1
    penalty_crop: int | None = 96
    batch_size: int = 1
    max_steps: int = 1000
    time_budget_s: float | None = None
    val_fraction: float = 0.15
    val_every: int = 50
    val_samples: int = 8
    checkpoint_every: int = 25
    max_skips: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    init_weights: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.constraint not in ("sn", "lr"):
            raise ConfigError(f"--constraint must be sn or lr, got {self.constraint!r}")
        if self.loss not in ("mse", "mse_mag", "l1"):
            raise ConfigError(f"--loss must be mse, mse_mag or l1, got {self.loss!r}")
        for name in ("lr", "lam_init", "alpha", "fwd_tol", "bwd_tol", "lipschitz_target"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("max_steps", "batch_size", "cg_iters", "val_every", "checkpoint_every",
                     "penalty_every", "val_samples",
                     "fwd_max_iter", "bwd_max_iter", "max_skips"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must lie in [0, 1)")
        if self.kind is not None and self.kind not in ("2d", "3d", "2dt"):
            raise ConfigError(f"--dims must be 2d, 3d or 2dt, got {self.kind!r}")


@dataclass
class TrainResult:
    out: Path
    steps: int
    best_val_psnr: float | None
    val_sense_psnr: float | None
    log: Path
    skipped_files: list[tuple[str, str]]


def output_paths(out: str | Path) -> dict[str, Path]:
    p = Path(out)
    stem = p.name[:-3] if p.name.endswith(".pt") else p.name
    return {"best": p, "last": p.with_name(stem + ".last.pt"), "state": p.with_name(stem + ".state.pt"),
            "log": p.with_name(stem + ".log.jsonl")}


# ------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: Any) -> Dist:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


def _all_reduce_mean(values: list[Any], dist_info: Dist) -> None:
    if dist_info.world == 1:
        return
    import torch.distributed as dist

    for v in values:
        dist.all_reduce(v, op=dist.ReduceOp.SUM)
        v /= dist_info.world


# ------------------------------------------------------------------------------- the model
def _build(config: TrainConfig, kind: str, device: Any) -> tuple[Any, Any]:
    from .deq.mol import MolConfig, MolStep
    from .models.cnn import CNNConfig, MolCNN

    dims = 2 if kind == "2d" else 3
    cnn = MolCNN(CNNConfig(dims=dims, layers=config.layers, channels=config.channels),
                 constraint=config.constraint, lipschitz_target=config.lipschitz_target,
                 spectral_grid=config.spectral_grid)
    step = MolStep(cnn, MolConfig(alpha=config.alpha, lam=config.lam_init,
                                  cg_iters=config.cg_iters, learn_lam=True))
    if config.init_weights:
        from .models.checkpoint import load_checkpoint

        loaded = load_checkpoint(config.init_weights)
        if loaded.model.config != cnn.config:
            raise CheckpointError("architecture differs from the one asked for", path=config.init_weights)
        cnn.load_state_dict(loaded.model.state_dict())
        with __import__("torch").no_grad():
            step.log_lam.fill_(math.log(loaded.mol_config.lam))
    return step.to(device), cnn


def _loss(x: Any, target: Any, kind: Loss) -> Any:
    import torch

    if kind == "mse":
        return torch.mean((x - target).abs() ** 2) / torch.mean(target.abs() ** 2)
    if kind == "mse_mag":
        return torch.mean((x.abs() - target.abs()) ** 2) / torch.mean(target.abs() ** 2)
    return torch.mean((x - target).abs()) / torch.mean(target.abs())


def _penalty(lip: Any, threshold: float, delta: float = 1e-3) -> Any:
    """Log barrier −log(T − L), continued linearly beyond L = T − δ."""
    import torch

    edge = threshold - delta
    if float(lip.detach()) < edge:
        return -torch.log(threshold - lip)
    return -math.log(delta) + (lip - edge) / delta


# ------------------------------------------------------------------------------- one problem
@dataclass
class Problem:
    op: Any
    y: Any
    aty: Any
    target: Any
    scale: float


def make_problem(sample: Sample, kind: str, spec: MaskSpec, rng: np.random.Generator,
                 extra_noise: float, device: Any) -> Problem:
    """Undersample ``sample`` with a fresh mask and normalise it as reconstruction would."""
    import torch

    from .physics.scaling import scale_factor
    from .physics.sense import SenseOperator

    mask_np = draw_mask(sample, kind, spec, rng)
    mask = torch.from_numpy(np.array(mask_np, dtype=bool)).to(device)                            # (1, 1, D, Y, 1)
    k = sample.kspace.to(device)                                           # (1, C, D, Y, X)
    if extra_noise > 0:
        seed = int(rng.integers(2**31 - 1))
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.complex(torch.randn(k.shape, generator=g), torch.randn(k.shape, generator=g))
        k = k + (extra_noise / math.sqrt(2.0)) * noise.to(device=device, dtype=k.dtype)
    y = k * mask
    s = float(scale_factor(y, mask, kind).reshape(-1)[0])
    y = y / s
    op = SenseOperator(sample.maps.to(device), mask, kind)
    aty = op.adjoint(y)                                                    # (1, D, Y, X)
    return Problem(op=op, y=y, aty=aty, target=sample.target.to(device) / s, scale=s)


def _val_problems(val: FolderDataset, config: TrainConfig, device: Any) -> list[Problem]:
    """Fixed validation problems (masks seeded per item, the same for every evaluation)."""
    out = []
    n = min(config.val_samples, len(val))
    idx = np.linspace(0, len(val) - 1, n).round().astype(int) if n else []
    spec = replace(config.mask, accelerations=()) if config.mask.accelerations else config.mask
    if config.mask.accelerations:
        spec = replace(spec, acceleration=max(config.mask.accelerations))
    for j, i in enumerate(idx):
        rng = np.random.default_rng([config.seed, 7_777_777, j])
        out.append(make_problem(val.samples[int(i)], val.kind, spec, rng, 0.0, device))
    return out


def evaluate(step: Any, problems: list[Problem], config: TrainConfig,
             fixed_points: list[Any] | None = None) -> dict[str, float]:
    """Mean PSNR/SSIM of MOL and of CG-SENSE on fixed validation problems (magnitudes).

    The fixed points are appended to ``fixed_points`` when a list is given.
    """
    import torch

    from .deq.fixed_point import FixedPointConfig, solve_fixed_point
    from .deq.mol import regularised_sense
    from .metrics import compare
    from .physics.sense import cg_sense

    if not problems:
        return {}
    psnr, ssim, s_psnr, s_ssim, iters = [], [], [], [], []
    was_training = step.training
    step.eval()
    with torch.no_grad():
        for p in problems:
            x0 = regularised_sense(p.op.normal, p.aty, lam=step.lam, iters=config.init_iters)
            fp = FixedPointConfig(tol=config.fwd_tol, max_iter=max(config.fwd_max_iter, 100), warn=False)
            res = solve_fixed_point(step.bind(normal=p.op.normal, aty=p.aty), x0, config=fp)
            sense = cg_sense(p.op, p.y, lam=1e-3, max_iter=30).x
            tgt = p.target.cpu().numpy()
            m = compare(res.x.cpu().numpy(), tgt)
            ms = compare(sense.cpu().numpy(), tgt)
            psnr.append(m.psnr)
            ssim.append(m.ssim)
            s_psnr.append(ms.psnr)
            s_ssim.append(ms.ssim)
            iters.append(res.iterations)
            if fixed_points is not None:
                fixed_points.append(res.x)
    if was_training:
        step.train()
    return {"val_psnr": float(np.mean(psnr)), "val_ssim": float(np.mean(ssim)),
            "val_sense_psnr": float(np.mean(s_psnr)), "val_sense_ssim": float(np.mean(s_ssim)),
            "val_iterations": float(np.mean(iters))}


# ------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, on_record: Callable[[dict[str, Any]], None] | None = None,
          warn: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume) a training job; see the module docstring."""
    import torch

    from .deq.fixed_point import FixedPointConfig
    from .deq.implicit import deq_solve
    from .deq.mol import regularised_sense
    from .device import resolve_device
    from .io.atomic import atomic_path, check_output
    from .models.checkpoint import save_checkpoint
    from .models.lipschitz import local_lipschitz_ratio

    on_record = on_record or (lambda rec: None)
    warn = warn or (lambda msg: None)
    device = resolve_device(config.device)
    dist_info = _init_distributed(device)
    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    paths = output_paths(config.out)
    if not paths["best"].name.endswith(".pt"):
        raise ConfigError(f"{config.out}: --out must end in .pt")
    if dist_info.main:
        if config.resume:
            if not paths["state"].is_file():
                raise OutputError(f"nothing to resume: {paths['state']} does not exist", path=config.out)
        else:
            for key in ("best", "last", "state", "log"):
                check_output(paths[key], force=config.force)

    files = list_raw_files(config.data)
    if not files:
        raise InputDataError("no raw files (*.h5, *.hdf5, *.mrd) in this folder", path=config.data)
    train_files, val_files = split_files(files, config.val_fraction, config.seed)
    train_set = load_folder(train_files, config.kind, warn=warn)
    if not train_set.samples:
        raise InputDataError("no usable fully sampled scans for training "
                             f"({len(train_set.skipped)} skipped)", path=config.data)
    kind = train_set.kind
    val_set = load_folder(val_files, kind, warn=warn) if val_files else FolderDataset(kind, [], [])
    skipped = train_set.skipped + val_set.skipped

    torch.manual_seed(config.seed)
    step, cnn = _build(config, kind, device)
    params = [p for n, p in step.named_parameters() if n != "log_lam"]
    optim = torch.optim.Adam([{"params": params, "lr": config.lr},
                              {"params": [step.log_lam], "lr": config.lam_lr}])
    start_step = 0
    best = -math.inf
    skips = 0
    if config.resume:
        state = _load_state(paths["state"])
        if state["kind"] != kind or state["config"]["constraint"] != config.constraint:
            raise CheckpointError("resume state belongs to a different run (kind/constraint)",
                                  path=paths["state"])
        step.load_state_dict(state["step"])
        optim.load_state_dict(state["optim"])
        start_step = int(state["steps"])
        best = float(state["best"])
    model_for_grad = step
    if dist_info.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model_for_grad = DistributedDataParallel(step)  # broadcasts rank 0's weights

    val_problems = _val_problems(val_set, config, device)
    fwd = FixedPointConfig(tol=config.fwd_tol, max_iter=config.fwd_max_iter, warn=False)
    bwd = FixedPointConfig(tol=config.bwd_tol, max_iter=config.bwd_max_iter, warn=False)
    log_mode = "a" if config.resume else "w"
    t0 = time.perf_counter()
    n_train = len(train_set)
    global_batch = config.batch_size * dist_info.world
    steps_per_epoch = max(1, n_train // global_batch)
    last_record: dict[str, Any] = {}
    best_sense = None
    val_fixed_points: list[Any] = []

    def order_for(epoch: int) -> np.ndarray:
        return np.random.default_rng([config.seed, 1, epoch]).permutation(n_train)

    def save_all(steps_done: int, metrics: dict[str, Any], is_best: bool) -> None:
        if not dist_info.main:
            return
        meta = _metadata(config, kind, train_set, val_set, steps_done, metrics)
        cert = _certificate(cnn, val_fixed_points)
        save_checkpoint(paths["last"], cnn, step.to_config(), metadata=meta, certificate=cert,
                        kinds=_kinds(kind), force=True)
        if is_best or not val_problems:
            save_checkpoint(paths["best"], cnn, step.to_config(), metadata=meta, certificate=cert,
                            kinds=_kinds(kind), force=True)
        state = {"version": STATE_VERSION, "kind": kind, "config": _plain(asdict(config)),
                 "steps": steps_done, "best": best, "step": step.state_dict(),
                 "optim": optim.state_dict()}
        with atomic_path(paths["state"], force=True) as tmp:
            torch.save(state, tmp)

    logf = open(paths["log"], log_mode, encoding="utf-8") if dist_info.main else None
    try:
        s = start_step
        step.train()
        while s < config.max_steps:
            if config.time_budget_s is not None and time.perf_counter() - t0 > config.time_budget_s:
                break
            epoch, within = divmod(s, steps_per_epoch)
            order = order_for(epoch)
            t_step = time.perf_counter()
            optim.zero_grad(set_to_none=True)
            losses, iters, bwd_iters, lips = [], [], [], []
            bad = None
            for j in range(config.batch_size):
                gi = (within * global_batch + dist_info.rank * config.batch_size + j) % n_train
                sample = train_set.samples[int(order[gi])]
                rng = np.random.default_rng([config.seed, 2, s, dist_info.rank, j])
                prob = make_problem(sample, kind, config.mask, rng, config.extra_noise, device)
                with torch.no_grad():
                    x0 = regularised_sense(prob.op.normal, prob.aty, lam=step.lam.detach(),
                                           iters=config.init_iters)

                def fn(x: Any, _p: Problem = prob) -> Any:
                    return model_for_grad(x, normal=_p.op.normal, aty=_p.aty)

                out = deq_solve(fn, x0, forward=fwd, backward=bwd)
                res = float(out.forward.final_residual.max())
                if not math.isfinite(res) or res > config.diverge_tol:
                    bad = f"forward fixed point diverged (residual {res:.3g} after {out.forward.iterations} iterations)"
                    break
                loss = _loss(out.x, prob.target, config.loss)
                if (config.constraint == "lr" and config.penalty_weight > 0
                        and s % config.penalty_every == 0):
                    g = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31 - 1)))
                    u = _random_crop(out.x.detach(), config.penalty_crop, rng)
                    lip, _ = local_lipschitz_ratio(cnn, u, steps=config.penalty_steps, generator=g)
                    loss = loss + config.penalty_weight * _penalty(lip, config.penalty_threshold)
                    lips.append(float(lip.detach()))
                if not torch.isfinite(loss):
                    bad = "non-finite loss"
                    break
                (loss / config.batch_size).backward()
                losses.append(float(loss.detach()))
                iters.append(out.forward.iterations)
                bwd_iters.extend(out.backward.iterations)
            grads = [p.grad for p in step.parameters() if p.grad is not None]
            if bad is None and any(not bool(torch.isfinite(g).all()) for g in grads):
                bad = "non-finite gradient"
            if bad is not None:
                skips += 1
                for group in optim.param_groups:
                    group["lr"] *= 0.5
                rec = {"step": s, "skipped": bad, "lr": optim.param_groups[0]["lr"]}
                warn(f"step {s}: skipped: {bad}; learning rate halved")
                if logf:
                    logf.write(json.dumps(rec) + "\n")
                    logf.flush()
                on_record(rec)
                if skips >= config.max_skips:
                    raise MolreconError(f"training stopped: {skips} consecutive steps failed ({bad}); "
                                        f"the last good checkpoint is {paths['last']}",
                                        path=config.data)
                s += 1
                continue
            skips = 0
            torch.nn.utils.clip_grad_norm_(list(step.parameters()), config.grad_clip)
            optim.step()
            cnn.clear_spectral_cache() if hasattr(cnn, "clear_spectral_cache") else None
            s += 1
            rec = {"step": s, "epoch": epoch, "loss": float(np.mean(losses)),
                   "fwd_iterations": float(np.mean(iters)),
                   "bwd_iterations": float(np.mean(bwd_iters)) if bwd_iters else None,
                   "lambda": float(step.lam.detach()), "step_s": round(time.perf_counter() - t_step, 3)}
            if lips:
                rec["lipschitz_local"] = float(np.max(lips))
            do_val = val_problems and (s % config.val_every == 0 or s == config.max_steps)
            is_best = False
            if do_val and dist_info.main:
                val_fixed_points.clear()
                vm = evaluate(step, val_problems, config, val_fixed_points)
                rec.update(vm)
                best_sense = vm.get("val_sense_psnr")
                if vm["val_psnr"] > best:
                    best = vm["val_psnr"]
                    is_best = True
            last_record = rec
            if logf:
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            on_record(rec)
            if s % config.checkpoint_every == 0 or is_best or s == config.max_steps:
                save_all(s, rec, is_best)
        if last_record and last_record.get("step") != start_step:
            save_all(s, last_record, False)
        elif not paths["best"].exists():
            save_all(s, last_record, True)
    finally:
        if logf:
            logf.close()
    return TrainResult(out=paths["best"], steps=s, best_val_psnr=None if best == -math.inf else best,
                       val_sense_psnr=best_sense, log=paths["log"], skipped_files=skipped)


def _random_crop(x: Any, size: int | None, rng: np.random.Generator) -> Any:
    """A random (Y, X) window of ``size`` pixels of a (B, D, Y, X) image (all of it if smaller)."""
    if size is None:
        return x
    ny, nx = x.shape[-2:]
    cy, cx = min(size, ny), min(size, nx)
    y0 = int(rng.integers(ny - cy + 1))
    x0 = int(rng.integers(nx - cx + 1))
    return x[..., y0:y0 + cy, x0:x0 + cx].contiguous()


def _kinds(kind: str) -> list[str]:
    return [kind]


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _metadata(config: TrainConfig, kind: str, train_set: FolderDataset, val_set: FolderDataset,
              steps: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "trained_with": "molrecon train",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "steps": steps,
        "train_files": [Path(f).name for f in train_set.files],
        "val_files": [Path(f).name for f in val_set.files],
        "train_samples": len(train_set),
        "val_samples": len(val_set),
        "mask": _plain(asdict(config.mask)),
        "config": _plain(asdict(config)),
        "last_metrics": _plain(metrics),
    }


def _certificate(cnn: Any, fixed_points: list[Any]) -> dict[str, Any]:
    """Local Lipschitz estimates at validation fixed points (the global bound is added on save)."""
    from .models.lipschitz import local_lipschitz_power

    if not fixed_points:
        return {}
    est = [float(local_lipschitz_power(cnn, x.detach(), iters=10)) for x in fixed_points[:4]]
    return {"local_power_at_validation_fixed_points": est, "local_max": max(est),
            "points": len(est)}


def _load_state(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable state is the same problem to a user
        raise CheckpointError(f"unreadable resume state: {exc}", path=path) from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError("not a molrecon resume state (or a different version)", path=path)
    return state
