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
   of magnitudes, or L1), each normalised by the target's energy, plus for
   ``lr`` the Lipschitz penalty;
5. Adam on H's weights and on log λ, gradients averaged over the batch and
   clipped to a global norm of ``grad_clip``.

``unroll = K > 0`` replaces steps 3–4's equilibrium by K recorded MOL steps
from the same start (the unrolled baseline, whose memory grows with K); it
exists for memory and speed comparisons (``benchmarks/bench_train.py``).

MOL-LR penalty (MOL.md): at the detached fixed point u, an adversarial
search (10 ascent steps from u + 0.01·noise) finds v maximising
L̂ = ‖H(u) − H(v)‖/‖u − v‖; the loss gets ``w · φ(L̂)`` with the log barrier
φ(L) = −log(T − L) for L < T − δ, continued linearly (with the barrier's
slope at T − δ) beyond, δ = 1e-3, T = 0.98, w = 1e-6 by default (the
reference's values); ``penalty_every`` > 1 applies it on every n-th step
only, and ``penalty_crop`` evaluates it on a random window of the fixed point
(the ascent steps cost more than the rest of a step on a CPU; a convolutional
H's local behaviour is the same on a window). MOL-SN needs no penalty: its
layers are constrained so that the certified bound stays below the target
throughout.

Initialisation: the network's last layer starts at zero, so H ≡ 0 and the
untrained model's fixed point is the regularised SENSE image
(AᴴA + I/λ)x = Aᴴb, and λ starts at 100 (the reference's value). Both matter
for short runs: on 48×48 4-coil brain slices at R = 3 (normalised data), a
randomly initialised last layer started 2.8 dB below H ≡ 0, and λ = 10 (a
Tikhonov shift 1/λ = 0.1) started 3.3 dB below CG-SENSE, while with λ = 100 the
untrained model starts level with CG-SENSE and training improves from there.

Models and data kinds: 2d data train a 2D network (``dims=2``); 3d data and
2dt data train a 3D network (3×3×3 convolutions over (D, Y, X): partitions,
or time as the third axis). The checkpoint lists the one kind it was trained on.

Determinism and resuming: the mask, noise and Lipschitz-search randomness of
the ``g``-th sample of step ``s`` (``g`` counts over all processes) come from
a generator seeded with ``(seed, s, g)``, and the sample order of epoch ``e``
from ``(seed, e)``. The resume state (``MODEL.state.pt``) holds the weights,
λ, the optimiser (moments, step counts and the current, possibly halved,
learning rates) and the step count, so a resumed run continues exactly where
the state was saved: on the CPU, an interrupted and resumed run ends with
weights bitwise equal to an uninterrupted one. A resume must repeat the options
that define the problem (data, masks, network, solver, loss, learning rates,
batch, seed...; :func:`resume_changes`): a change is refused in one line naming
each option with its saved and new value, unless ``override`` (``--override``),
which is then logged and warned about; the saved learning rates continue unless
``--lr``/``--lam-lr`` is overridden. A run killed at any moment loses at most
the steps since its last checkpoint (every ``checkpoint_every`` steps): every
file is written to a temporary file and renamed (``io.atomic``), so a kill
mid-write leaves the previous file intact; a resume rewrites the log without
the records of the lost steps and removes temporary files a kill left
behind. Ctrl-C (or SIGTERM through the CLI) saves the state of the last
completed step before stopping.

Faults: a non-finite loss or gradient, or a forward solve whose relative
residual is above ``diverge_tol`` (or not finite) after ``fwd_max_iter``
iterations, skips the step: the optimiser does not step, so nothing of it
reaches the weights; every learning rate is halved (for the rest of the run,
resumed runs included), and the skip is logged (``{"step", "skipped", "lr"}``)
and reported as a warning. ``max_skips`` consecutive skips save the state (the
weights of the last good step) and stop the run with a clear error. A
checkpoint that cannot be written (unwritable folder, full disk) stops the
run with :class:`~molrecon.errors.OutputError`; the previous file stays.

Distributed: under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) every
process joins the default process group (NCCL on CUDA, gloo on the CPU), takes
``batch_size`` samples of each global batch of ``N · batch_size``, and the
gradients are averaged with one all-reduce per step that also carries every
process's fault flag, so all processes skip (or step) together. This is the
gradient average DistributedDataParallel computes, done explicitly because a
step may have to be skipped on every process when one process's sample
fails (DDP's reducer would wait for the failed process's backward pass).
N processes with batch size b compute the same step as one process with
batch size N·b (up to floating-point summation order). Only rank 0 reads the
clock (for ``time_budget_s``), validates and writes files.

Outputs beside ``--out MODEL.pt`` (all written atomically):
``MODEL.pt`` best-by-validation model (or the latest when there is no
validation split), ``MODEL.last.pt`` the latest model, ``MODEL.state.pt`` the
resume state, ``MODEL.log.jsonl`` one JSON record per line: a ``start``
record per invocation, a ``validation`` record of the untrained model
(step 0), and one record per step (loss, iterations, λ, learning rate, and on
validation steps the mean PSNR/SSIM of MOL and of CG-SENSE on the same
validation problems). ``elapsed_s`` in every step record is the run's wall-clock
time so far, summed over resumed invocations (the state carries it), so a
learning curve can be drawn against compute time; the ``start`` record gives
the torch thread count it ran with.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ..errors import CheckpointError, ConfigError, InputDataError, MolreconError, OutputError
from .data import (
    FolderDataset,
    MaskSpec,
    Sample,
    check_masks,
    draw_mask,
    list_raw_files,
    load_folder,
    split_dataset,
)
from .patches import PatchSpec

if TYPE_CHECKING:
    from ..problem import Problem

Loss = Literal["mse", "mse_mag", "l1"]
Stage = Literal["deq", "denoise"]
STAGES: tuple[str, ...] = ("deq", "denoise")
#: Initial λ of a run that neither gives one nor starts from a checkpoint.
DEFAULT_LAM = 100.0
STATE_VERSION = 1
RecordFn = Callable[[dict[str, Any]], None]
WarnFn = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (recorded in the checkpoint's metadata).

    data, out         folder of fully sampled raw scans; the model file (.pt)
    kind              "2d" | "3d" | "2dt", or None to take it from the data
    constraint        "sn" (certified spectral normalisation) | "lr" (Lipschitz penalty)
    spectral_grid     SN: frequency grid per axis of the certified layer bounds (None: default)
    mask              retrospective masks (family, R, ACS)
    extra_noise       std of extra complex noise added to the normalised k-space
    loss              "mse" (complex) | "mse_mag" | "l1", each relative to the target
    lr, lam_lr        Adam learning rates of H and of log λ; lam_init the initial λ
                      (None: the --init checkpoint's λ, else DEFAULT_LAM)
    alpha, cg_iters   MOL step size and CG iterations per step
    init_iters        CG iterations of the regularised-SENSE start
    fwd_*, bwd_*      tolerance (relative residual) and cap of the forward / backward solves
    diverge_tol       a forward residual above this after the cap skips the step
    penalty_*         MOL-LR penalty (see the module docstring)
    unroll            0: deep equilibrium; K ≥ 1: the unrolled baseline through K steps
    gradient          deep equilibrium: "implicit" (exact implicit gradient, a backward
                      solve) or "jfb" (Jacobian-free: the gradient through one step at x*)
    stage             "deq": deep-equilibrium steps; "denoise": stage-0 pretraining of H
                      alone on noisy patches of the targets (2D data; ``patch`` says how,
                      ``batch_size`` counts patches); validation is the full MOL
                      reconstruction in both
    batch_size        samples per step and process
    max_steps         steps in all (a resumed run continues up to it)
    time_budget_s     wall-clock seconds of this invocation (loading included); the run
                      does not start a step it cannot finish in time (the slowest of the
                      last 10 steps, plus the last validation's time if the step validates,
                      plus the last save's time), then saves and stops
    readout_block     train on blocks of this many readout positions (exact
                      hybrid-space problems, :func:`make_problem`); validation uses whole scans
    val_*             validation split (fraction of files), cadence and problem count;
                      val_data: a separate folder of validation scans (then the whole
                      of ``data`` trains and val_fraction is not used)
    checkpoint_every  steps between saves; max_skips consecutive skips stop the run
    grad_clip         global gradient-norm clip
    resume            continue the run whose state is beside ``out``; the options that
                      define the problem must be those the state was saved with
                      (:func:`resume_changes`), else the run is refused, unless
                      ``override`` (then the new values apply; a changed lr or lam_lr
                      replaces the saved learning rates). The network's options
                      (constraint, layers, channels, lipschitz_target, spectral_grid,
                      stage) can never change on resume.
    """

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
    lam_init: float | None = None
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
    val_data: str | None = None
    readout_block: int | None = None
    val_every: int = 50
    val_samples: int = 8
    checkpoint_every: int = 25
    max_skips: int = 10
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    override: bool = False
    init_weights: str | None = None
    force: bool = False
    unroll: int = 0
    stage: Stage = "deq"
    gradient: Literal["implicit", "jfb"] = "implicit"
    patch: PatchSpec = field(default_factory=PatchSpec)

    def __post_init__(self) -> None:
        if self.gradient not in ("implicit", "jfb"):
            raise ConfigError(f"--gradient must be implicit or jfb, got {self.gradient!r}")
        if self.stage not in STAGES:
            raise ConfigError(f"--stage must be deq or denoise, got {self.stage!r}")
        if self.constraint not in ("sn", "lr"):
            raise ConfigError(f"--constraint must be sn or lr, got {self.constraint!r}")
        if self.loss not in ("mse", "mse_mag", "l1"):
            raise ConfigError(f"--loss must be mse, mse_mag or l1, got {self.loss!r}")
        if self.readout_block is not None and (isinstance(self.readout_block, bool) or not
                                               isinstance(self.readout_block, int)
                                               or self.readout_block < 1):
            raise ConfigError(f"readout_block must be a positive integer, got {self.readout_block!r}")
        if self.lam_init is not None and not (math.isfinite(self.lam_init) and self.lam_init > 0):
            raise ConfigError(f"lam_init must be positive and finite, got {self.lam_init!r}")
        for name in ("lr", "alpha", "fwd_tol", "bwd_tol", "lipschitz_target",
                     "diverge_tol", "grad_clip", "penalty_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ConfigError(f"{name} must be positive and finite, got {value!r}")
        for name in ("lam_lr", "extra_noise", "penalty_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ConfigError(f"{name} must be >= 0 and finite, got {value!r}")
        for name in ("max_steps", "batch_size", "cg_iters", "init_iters", "val_every",
                     "checkpoint_every", "penalty_every", "val_samples", "fwd_max_iter",
                     "bwd_max_iter", "max_skips", "layers", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.unroll, bool) or not isinstance(self.unroll, int) or self.unroll < 0:
            raise ConfigError(f"unroll must be an integer >= 0, got {self.unroll!r}")
        if isinstance(self.penalty_steps, bool) or not isinstance(self.penalty_steps, int) \
                or self.penalty_steps < 0:
            raise ConfigError(f"penalty_steps must be an integer >= 0, got {self.penalty_steps!r}")
        if self.penalty_crop is not None and self.penalty_crop < 8:
            raise ConfigError(f"penalty_crop must be at least 8 pixels, got {self.penalty_crop}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("--val-fraction must lie in [0, 1)")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"--time-budget must be positive, got {self.time_budget_s}")
        if self.kind is not None and self.kind not in ("2d", "3d", "2dt"):
            raise ConfigError(f"--dims must be 2d, 3d or 2dt, got {self.kind!r}")
        if not 0.0 < self.alpha < 2.0:
            raise ConfigError(f"--alpha must lie in (0, 2), got {self.alpha}")
        if self.stage == "denoise" and self.unroll:
            raise ConfigError("--stage denoise trains H alone: it has no unrolled variant")


@dataclass
class TrainResult:
    """What a run did. ``steps``: steps done in all (resumed runs included);
    ``stopped``: "max_steps" or "time_budget"; ``skipped_steps``: steps skipped
    by this invocation; ``skipped_files``: (file, reason) of unusable files;
    ``main_process``: False on the ranks > 0 of a distributed run (they write nothing)."""

    out: Path
    steps: int
    best_val_psnr: float | None
    val_sense_psnr: float | None
    log: Path
    skipped_files: list[tuple[str, str]]
    stopped: str = "max_steps"
    skipped_steps: int = 0
    train_files: list[str] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)
    main_process: bool = True


def output_paths(out: str | Path) -> dict[str, Path]:
    """``best`` (MODEL.pt), ``last``, ``state`` and ``log`` paths beside ``out``."""
    p = Path(out)
    stem = p.name.removesuffix(".pt")
    return {"best": p, "last": p.with_name(stem + ".last.pt"),
            "state": p.with_name(stem + ".state.pt"), "log": p.with_name(stem + ".log.jsonl")}


# ------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class Dist:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: Any) -> tuple[Dist, bool]:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1).

    Returns the rank/world and whether this call created the group (and so
    must destroy it).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size()), created


def _agree(flag: bool, dist_info: Dist, device: Any) -> bool:
    """True on every process if ``flag`` is true on any (one all-reduce)."""
    if dist_info.world == 1:
        return flag
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _broadcast_parameters(module: Any, dist_info: Dist) -> None:
    """Give every process rank 0's parameters."""
    if dist_info.world == 1:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, src=0)


@dataclass
class _StepOutcome:
    """One process's share of a step."""

    bad: str | None = None
    loss_sum: float = 0.0
    count: int = 0
    fwd_iterations: list[int] = field(default_factory=list)
    bwd_iterations: list[int] = field(default_factory=list)
    lipschitz: list[float] = field(default_factory=list)   # this process's estimates only


def _reduce_gradients(params: list[Any], outcome: _StepOutcome, dist_info: Dist
                      ) -> tuple[bool, dict[str, float | None]]:
    """Average gradients over processes; return (any process failed, step statistics).

    One all-reduce carries every gradient (zeros where a parameter has none)
    and each process's failure flag and sums of losses and iteration counts,
    so the statistics are those of the global batch: ``loss``,
    ``fwd_iterations`` and ``bwd_iterations`` (means; None without samples).
    """
    import torch

    sums = [1.0 if outcome.bad else 0.0, outcome.loss_sum, float(outcome.count),
            float(sum(outcome.fwd_iterations)), float(len(outcome.fwd_iterations)),
            float(sum(outcome.bwd_iterations)), float(len(outcome.bwd_iterations))]
    if dist_info.world > 1:
        import torch.distributed as dist

        device = params[0].device
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                 for p in params]
        extra = torch.tensor(sums, dtype=torch.float64).to(device=device, dtype=grads[0].dtype)
        flat = torch.cat([*grads, extra])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = (flat[offset:offset + n] / dist_info.world).reshape(p.shape).clone()
            offset += n
        sums = [float(v) for v in flat[offset:].tolist()]

    def mean(total: float, n: float) -> float | None:
        return total / n if n > 0 else None

    return sums[0] > 0, {"loss": mean(sums[1], sums[2]), "fwd_iterations": mean(sums[3], sums[4]),
                         "bwd_iterations": mean(sums[5], sums[6])}


# ------------------------------------------------------------------------------- the model
def _build(config: TrainConfig, kind: str, device: Any) -> tuple[Any, Any]:
    """The MOL step (prior + learnable λ) on ``device``, and its prior."""
    import torch

    from ..deq.mol import MolConfig, MolStep
    from ..models.cnn import CNNConfig, MolCNN

    cnn = MolCNN(CNNConfig(dims=_model_dims(kind), layers=config.layers, channels=config.channels),
                 constraint=config.constraint, lipschitz_target=config.lipschitz_target,
                 spectral_grid=config.spectral_grid)
    lam = DEFAULT_LAM if config.lam_init is None else config.lam_init
    step = MolStep(cnn, MolConfig(alpha=config.alpha, lam=lam,
                                  cg_iters=config.cg_iters, learn_lam=True))
    if not config.init_weights:
        # H ≡ 0 at the start: the untrained model is the regularised SENSE solution.
        last = cnn.convs[-1]
        with torch.no_grad():
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()
    else:
        from ..models.bundled import resolve_weights
        from ..models.checkpoint import load_checkpoint

        loaded = load_checkpoint(resolve_weights(config.init_weights))
        source = loaded.model.config
        if source == cnn.config:
            cnn.load_state_dict(loaded.model.state_dict())
        elif replace(source, dims=cnn.config.dims) == cnn.config and source.dims == 2:
            # A 2D prior starts a 3D (or 2D+time) one: every kernel goes to the centre
            # plane of a 3D kernel, so the new network is exactly the 2D one applied plane
            # by plane (same operator norm per layer) until training mixes the planes.
            cnn.load_state_dict(inflate_state_2d_to_3d(loaded.model.state_dict()))
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


def inflate_state_2d_to_3d(state: dict[str, Any]) -> dict[str, Any]:
    """2D convolution weights (O, I, k, k) as 3D ones (O, I, k, k, k), zero off the centre plane."""
    import torch

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


def _load_validation(folder: str, kind: str, train_folder: str,
                     warn: WarnFn | None) -> FolderDataset:
    """The scans of a separate validation folder; their kind must be the training data's."""
    if Path(folder).resolve() == Path(train_folder).resolve():
        raise ConfigError(f"--val-data {folder} is the training folder: validation scans must be "
                          "held out")
    files = list_raw_files(folder)
    if not files:
        raise InputDataError("no raw files (*.h5, *.hdf5, *.mrd) in the validation folder",
                             path=folder)
    val = load_folder(files, kind, warn=warn)
    if not val.samples:
        raise InputDataError(f"no usable fully sampled {kind} scans among {len(files)} validation "
                             "file(s)", path=folder)
    return val


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
def make_problem(sample: Sample, kind: str, spec: MaskSpec, rng: np.random.Generator,
                 extra_noise: float, device: Any, readout_block: int | None = None) -> Problem:
    """Undersample ``sample`` with a fresh mask drawn from ``spec`` and normalise it as
    reconstruction would (:func:`molrecon.problem.undersampled`; ``readout_block`` keeps an
    exact hybrid-space block of readout positions)."""
    from ..problem import undersampled

    mask = draw_mask(sample, kind, spec, rng)                              # (1, 1, D, Y, 1)
    return undersampled(sample.kspace, sample.maps, sample.target, mask, kind, rng,
                        extra_noise, device, readout_block)


def _val_problems(val: FolderDataset, config: TrainConfig, device: Any) -> list[Problem]:
    """Fixed validation problems (masks seeded per item, the same for every evaluation).

    With several accelerations the highest is used.
    """
    out = []
    n = min(config.val_samples, len(val))
    idx = np.linspace(0, len(val) - 1, n).round().astype(int) if n else []
    spec = config.mask
    if spec.accelerations:
        spec = replace(spec, acceleration=max(spec.accelerations), accelerations=())
    for j, i in enumerate(idx):
        rng = np.random.default_rng([config.seed, 7_777_777, j])
        out.append(make_problem(val.samples[int(i)], val.kind, spec, rng, 0.0, device))
    return out


def evaluate(step: Any, problems: list[Problem], config: TrainConfig,
             fixed_points: list[Any] | None = None) -> dict[str, float | None]:
    """Mean PSNR/SSIM of MOL and of CG-SENSE on fixed validation problems (magnitudes).

    CG-SENSE uses the settings of ``molrecon reconstruct --method sense``
    (:data:`~molrecon.problem.SENSE_LAMBDA`, :data:`~molrecon.problem.SENSE_ITERS`).
    MOL solves the fixed point to ``fwd_tol`` (at most max(fwd_max_iter, 100)
    iterations). A problem whose MOL image is not finite counts in
    ``val_failed`` and makes ``val_psnr``/``val_ssim`` None. The fixed points are
    appended to ``fixed_points`` when a list is given.
    """
    import torch

    from ..deq.fixed_point import FixedPointConfig, solve_fixed_point
    from ..deq.mol import regularised_sense
    from ..metrics import compare
    from ..physics.sense import cg_sense
    from ..problem import SENSE_ITERS, SENSE_LAMBDA

    if not problems:
        return {}
    psnr, ssim, s_psnr, s_ssim, iters = [], [], [], [], []
    failed = 0
    was_training = step.training
    step.eval()
    fp = FixedPointConfig(tol=config.fwd_tol, max_iter=max(config.fwd_max_iter, 100), warn=False)
    try:
        with torch.no_grad():
            for p in problems:
                x0 = regularised_sense(p.op.normal, p.aty, lam=step.lam, iters=config.init_iters)
                res = solve_fixed_point(step.bind(normal=p.op.normal, aty=p.aty,
                                                  support=p.op.support()), x0, config=fp)
                sense = cg_sense(p.op, p.kspace, lam=SENSE_LAMBDA, max_iter=SENSE_ITERS).x
                tgt = p.target.cpu().numpy()
                ms = compare(sense.cpu().numpy(), tgt)
                s_psnr.append(ms.psnr)
                s_ssim.append(ms.ssim)
                iters.append(res.iterations)
                if not bool(torch.isfinite(res.x).all()):
                    failed += 1
                    continue
                m = compare(res.x.cpu().numpy(), tgt)
                psnr.append(m.psnr)
                ssim.append(m.ssim)
                if fixed_points is not None:
                    fixed_points.append(res.x)
    finally:
        if was_training:
            step.train()
    ok = failed == 0
    return {"val_psnr": float(np.mean(psnr)) if ok else None,
            "val_ssim": float(np.mean(ssim)) if ok else None,
            "val_sense_psnr": float(np.mean(s_psnr)), "val_sense_ssim": float(np.mean(s_ssim)),
            "val_iterations": float(np.mean(iters)), "val_failed": failed}


# ------------------------------------------------------------------------------- files
class _RunLog:
    """The JSON-lines log (rank 0 only); a write failure becomes an OutputError."""

    def __init__(self, path: Path, *, resume_at: int | None) -> None:
        self.path = path
        try:
            if resume_at is None:
                self._fh = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
            else:
                self._rewrite_upto(resume_at)
                self._fh = open(path, "a", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise OutputError(f"cannot write the training log ({exc.strerror or exc})",
                              path=path) from exc

    def _rewrite_upto(self, steps: int) -> None:
        """Keep the records of steps ≤ ``steps`` (those the resume state includes)."""
        from ..io.atomic import write_text_atomic

        kept: list[str] = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    at = int(rec.get("step", 0)) if isinstance(rec, dict) else None
                except (json.JSONDecodeError, TypeError, ValueError):
                    continue              # a line cut short by a kill
                if at is not None and at <= steps:
                    kept.append(line)
        write_text_atomic(self.path, "".join(k + "\n" for k in kept), force=True)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        except OSError as exc:
            raise OutputError(f"cannot write the training log ({exc.strerror or exc})",
                              path=self.path) from exc

    def close(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass


def _remove_stale_temporaries(paths: dict[str, Path]) -> None:
    """Delete temporary files (``.NAME.*``) that a killed run left beside its outputs."""
    for target in paths.values():
        prefix = f".{target.name}."
        folder = target.parent if str(target.parent) else Path(".")
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if f.name.startswith(prefix) and f.is_file():
                try:
                    f.unlink()
                except OSError:
                    pass


def _write(path: Path, what: str, steps: int, writer: Callable[[], Any]) -> None:
    """Run ``writer`` (an atomic write of ``path``); a failed write becomes an OutputError
    that says training stopped and the previous file is kept."""
    try:
        writer()
    except (OSError, OutputError) as exc:
        # io.atomic turns an OSError of the write into an OutputError naming the target;
        # its cause keeps the system's reason.
        cause = exc.__cause__ if isinstance(exc, OutputError) else exc
        reason = (cause.strerror if isinstance(cause, OSError) else None) or str(cause or exc)
        raise OutputError(f"cannot write the {what} after step {steps} ({reason}); training "
                          "stopped, the previous file is kept", path=path) from exc


# ------------------------------------------------------------------------------- the loop
def train(config: TrainConfig, *, on_record: RecordFn | None = None,
          warn: WarnFn | None = None) -> TrainResult:
    """Run (or resume) a training job; see the module docstring.

    ``on_record`` receives every log record (rank 0 only), ``warn`` one-line
    warnings (skipped files and steps). Raises :class:`MolreconError`
    subclasses for everything a user can fix.
    """
    t_start = time.perf_counter()
    from ..device import resolve_device

    device = resolve_device(config.device)
    dist_info, created = _init_distributed(device)
    try:
        return _train(config, device, dist_info, t_start,
                      on_record if (on_record and dist_info.main) else (lambda rec: None),
                      warn if (warn and dist_info.main) else (lambda msg: None))
    finally:
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _train(config: TrainConfig, device: Any, dist_info: Dist, t_start: float,
           on_record: RecordFn, warn: WarnFn) -> TrainResult:
    import torch

    from ..deq.fixed_point import FixedPointConfig
    from ..io.atomic import check_output

    if device.type == "cuda" and dist_info.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    paths = output_paths(config.out)
    if not paths["best"].name.endswith(".pt"):
        raise ConfigError(f"{config.out}: --out must end in .pt")
    state: dict[str, Any] | None = None
    changes: list[Change] = []
    if config.resume:
        if not paths["state"].is_file():
            raise OutputError(f"nothing to resume: {paths['state']} does not exist (start the "
                              "run without --resume)", path=config.out)
        for key in ("best", "last", "log"):
            check_output(paths[key], force=True)
        # Before any data is read: a resume with other options is refused at once.
        state = _load_state(paths["state"])
        changes = _check_resume_options(state, config, paths["state"])
        if changes:
            warn("resuming with changed options (--override): " + "; ".join(map(str, changes)))
    elif dist_info.main:
        for key in ("best", "last", "state", "log"):
            check_output(paths[key], force=config.force)

    files = list_raw_files(config.data)
    if not files:
        raise InputDataError("no raw files (*.h5, *.hdf5, *.mrd) in this folder", path=config.data)
    data = load_folder(files, config.kind, warn=warn)
    if not data.samples:
        what = f"{config.kind} " if config.kind else ""
        raise InputDataError(f"no usable fully sampled {what}scans: all {len(files)} raw file(s) "
                             "were skipped (see the warnings above)", path=config.data)
    if data.skipped:
        warn(f"using {len(data.files)} of {len(files)} raw files ({len(data.skipped)} skipped)")
    kind = data.kind
    check_masks(data, config.mask)
    if config.val_data is None:
        train_set, val_set = split_dataset(data, config.val_fraction, config.seed)
    else:
        train_set, val_set = data, _load_validation(config.val_data, kind, config.data, warn)

    scales: list[float] = []
    if config.stage == "denoise":
        if kind != "2d":
            raise ConfigError(f"--stage denoise pretrains a 2D prior on 2d data; this folder "
                              f"holds {kind} data")
        from .patches import sample_scales

        scales = sample_scales(train_set.samples, kind, config.mask, config.seed)

    if state is not None:
        config = _check_state(state, config, kind, paths["state"])
    torch.manual_seed(config.seed)
    step, cnn = _build(config, kind, device)
    params = [p for n, p in step.named_parameters() if n != "log_lam"]
    optim = torch.optim.Adam([{"params": params, "lr": config.lr},
                              {"params": [step.log_lam], "lr": config.lam_lr}])
    all_params = [p for p in step.parameters() if p.requires_grad]
    start_step = 0
    best = -math.inf
    skips = 0
    elapsed_before = 0.0          # wall-clock seconds of the earlier invocations of this run

    def elapsed() -> float:
        return round(elapsed_before + time.perf_counter() - t_start, 1)
    if state is not None:
        try:
            step.load_state_dict(state["step"])
            optim.load_state_dict(state["optim"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"resume state does not fit this model: {exc}",
                                  path=paths["state"]) from exc
        start_step = int(state["steps"])
        best = float(state["best"])
        skips = int(state.get("skips", 0))
        elapsed_before = float(state.get("elapsed_s", 0.0))
        # --override with a new learning rate: it replaces the saved (possibly halved) one.
        for option, group in (("--lr", 0), ("--lam-lr", 1)):
            if any(c.option == option for c in changes):
                optim.param_groups[group]["lr"] = config.lr if group == 0 else config.lam_lr
    _broadcast_parameters(step, dist_info)
    bank: list[Any] = []
    if config.stage == "denoise" and config.patch.sense_fraction > 0:
        from .patches import degraded_bank

        bank = degraded_bank(train_set.samples, kind, config.mask, float(step.lam.detach()),
                             config.init_iters, config.patch.sense_masks, config.seed)

    if dist_info.main:
        _remove_stale_temporaries(paths)
    log = _RunLog(paths["log"], resume_at=start_step if config.resume else None) \
        if dist_info.main else None
    val_problems = _val_problems(val_set, config, device) if dist_info.main else []
    fwd = FixedPointConfig(tol=config.fwd_tol, max_iter=config.fwd_max_iter, warn=False)
    bwd = FixedPointConfig(tol=config.bwd_tol, max_iter=config.bwd_max_iter, warn=False)
    n_train = len(train_set)
    global_batch = config.batch_size * dist_info.world
    steps_per_epoch = max(1, n_train // global_batch)
    last_record: dict[str, Any] = {}
    best_sense: float | None = None
    val_fixed_points: list[Any] = []
    skipped_here = 0
    stopped = "max_steps"

    def emit(record: dict[str, Any]) -> None:
        if log is not None:
            log.write(record)
        on_record(record)

    def save_all(steps_done: int, metrics: dict[str, Any], is_best: bool) -> None:
        from ..models.checkpoint import save_checkpoint

        if not dist_info.main:
            return
        meta = _metadata(config, kind, train_set, val_set, steps_done, metrics, dist_info)
        cert = _certificate(cnn, val_fixed_points, config.seed,
                            data=[Path(f).name for f in val_set.files])
        model_cfg = step.to_config()
        _write(paths["last"], "latest model", steps_done,
               lambda: save_checkpoint(paths["last"], cnn, model_cfg, metadata=meta,
                                       certificate=cert, kinds=_kinds(kind), force=True))
        if is_best or not val_problems or not paths["best"].exists():
            _write(paths["best"], "best model", steps_done,
                   lambda: save_checkpoint(paths["best"], cnn, model_cfg, metadata=meta,
                                           certificate=cert, kinds=_kinds(kind), force=True))
        state = {"version": STATE_VERSION, "kind": kind, "config": _plain(asdict(config)),
                 "steps": steps_done, "best": best, "skips": skips, "elapsed_s": elapsed(),
                 "step": step.state_dict(),
                 "optim": optim.state_dict()}
        _write(paths["state"], "resume state", steps_done,
               lambda: _save_state(paths["state"], state))

    emit({"event": "start", "step": start_step, "kind": kind, "model_dims": _model_dims(kind),
          "constraint": config.constraint, "resumed": bool(config.resume),
          "train_files": len(train_set.files), "val_files": len(val_set.files),
          "train_samples": n_train, "val_samples": len(val_set),
          "skipped_files": len(data.skipped), "device": str(device),
          "world_size": dist_info.world, "max_steps": config.max_steps, "stage": config.stage,
          "threads": torch.get_num_threads(), "elapsed_s": elapsed(),
          **({"resumed_elapsed_s": round(elapsed_before, 1),
              "best_val_psnr": None if best == -math.inf else best,
              "changed": [str(c) for c in changes]} if config.resume else {})})
    # Seconds of the recent steps, of the last validation and of the last save: the time
    # budget starts no step that these say cannot end (and be saved) within it.
    recent_steps: deque[float] = deque(maxlen=10)
    timing = {"val": 0.0, "save": 0.0}

    if val_problems and not config.resume:
        t0 = time.perf_counter()
        vm = evaluate(step, val_problems, config, val_fixed_points if config.init_weights else None)
        timing["val"] = time.perf_counter() - t0
        emit({"event": "validation", "step": 0, **vm})
        if config.init_weights and vm.get("val_psnr") is not None:
            # Started from trained weights: they are the model to beat, and the best model
            # until a step beats them (a fine-tuning run never ends worse than it began).
            best = float(vm["val_psnr"])
            t0 = time.perf_counter()
            save_all(0, {"step": 0, **vm}, True)
            timing["save"] = time.perf_counter() - t0

    s = start_step
    saved_at = start_step if config.resume else -1
    updating = False
    order_epoch, order = -1, np.arange(n_train)
    try:
        step.train()
        while s < config.max_steps:
            validates = bool(val_problems) and ((s + 1) % config.val_every == 0
                                                or s + 1 == config.max_steps)
            over = (dist_info.main and config.time_budget_s is not None
                    and not next_step_fits(time.perf_counter() - t_start, config.time_budget_s,
                                           list(recent_steps),
                                           (timing["val"] if validates else 0.0)
                                           + timing["save"]))
            if _agree(over, dist_info, device):
                stopped = "time_budget"
                break
            epoch, within = divmod(s, steps_per_epoch)
            if epoch != order_epoch:
                order = np.random.default_rng([config.seed, 1, epoch]).permutation(n_train)
                order_epoch = epoch
            t_step = time.perf_counter()
            optim.zero_grad(set_to_none=True)
            if config.stage == "denoise":
                outcome = _denoise_step(cnn, config, train_set, scales, bank, order, s, within,
                                        global_batch, dist_info, device)
            else:
                outcome = _local_step(step, cnn, config, train_set, order, s, within,
                                      global_batch, dist_info, device, fwd, bwd)
            bad = outcome.bad
            if bad is None and dist_info.world == 1:
                grads = [p.grad for p in all_params if p.grad is not None]
                if any(not bool(torch.isfinite(g).all()) for g in grads):
                    bad = "non-finite gradient"
            outcome.bad = bad
            any_bad, stats = _reduce_gradients(all_params, outcome, dist_info)
            loss_mean = stats["loss"]
            if any_bad or loss_mean is None or not math.isfinite(loss_mean) or not all(
                    bool(torch.isfinite(p.grad).all()) for p in all_params if p.grad is not None):
                reason = bad or ("non-finite gradient" if dist_info.world == 1
                                 else "a sample failed on another process")
                skips += 1
                skipped_here += 1
                for group in optim.param_groups:
                    group["lr"] *= 0.5
                s += 1
                recent_steps.append(time.perf_counter() - t_step)
                warn(f"step {s}: skipped: {reason}; learning rates halved "
                     f"(H: {optim.param_groups[0]['lr']:.3g})")
                emit({"step": s, "skipped": reason, "lr": optim.param_groups[0]["lr"],
                      "consecutive_skips": skips})
                if skips >= config.max_skips:
                    save_all(s, last_record, False)
                    raise MolreconError(
                        f"training stopped: {skips} consecutive steps failed (last: {reason}); "
                        f"the state of the last good step is saved in {paths['state']}. Lower "
                        "--lr, raise --fwd-max-iter, or check the data")
                continue
            skips = 0
            torch.nn.utils.clip_grad_norm_(all_params, config.grad_clip)
            updating = True
            optim.step()
            s += 1
            updating = False
            if hasattr(cnn, "clear_spectral_cache"):
                cnn.clear_spectral_cache()
            rec: dict[str, Any] = {
                "step": s, "epoch": epoch, "loss": loss_mean,
                "fwd_iterations": stats["fwd_iterations"],
                "bwd_iterations": stats["bwd_iterations"],
                "lambda": float(step.lam.detach()), "lr": optim.param_groups[0]["lr"],
                "step_s": round(time.perf_counter() - t_step, 3), "elapsed_s": elapsed()}
            recent_steps.append(time.perf_counter() - t_step)
            if outcome.lipschitz:
                rec["lipschitz_local"] = float(np.max(outcome.lipschitz))
            is_best = False
            if val_problems and (s % config.val_every == 0 or s == config.max_steps):
                val_fixed_points.clear()
                t0 = time.perf_counter()
                vm = evaluate(step, val_problems, config, val_fixed_points)
                timing["val"] = time.perf_counter() - t0
                rec.update(vm)
                best_sense = vm.get("val_sense_psnr")
                if vm["val_psnr"] is not None and vm["val_psnr"] > best:
                    best = float(vm["val_psnr"])
                    is_best = True
            last_record = rec
            emit(rec)
            if s % config.checkpoint_every == 0 or is_best or s == config.max_steps:
                t0 = time.perf_counter()
                save_all(s, rec, is_best)
                timing["save"] = time.perf_counter() - t0
                saved_at = s
        if s != saved_at and (s > start_step or not paths["best"].exists()):
            save_all(s, last_record, False)
            saved_at = s
    except KeyboardInterrupt:
        if dist_info.main and not updating and s != saved_at:
            save_all(s, last_record, False)
            warn(f"interrupted: state saved after step {s}; continue with --resume")
        raise
    finally:
        if log is not None:
            log.close()
    return TrainResult(out=paths["best"], steps=s,
                       best_val_psnr=None if best == -math.inf else best,
                       val_sense_psnr=best_sense, log=paths["log"], skipped_files=data.skipped,
                       stopped=stopped, skipped_steps=skipped_here,
                       train_files=list(train_set.files), val_files=list(val_set.files),
                       main_process=dist_info.main)


def _local_step(step: Any, cnn: Any, config: TrainConfig, train_set: FolderDataset,
                order: np.ndarray, s: int, within: int, global_batch: int, dist_info: Dist,
                device: Any, fwd: Any, bwd: Any) -> _StepOutcome:
    """Forward and backward passes of this process's samples of step ``s``.

    Gradients accumulate in the parameters (each sample's loss divided by the batch size).
    """
    import torch

    from ..deq.implicit import deq_solve, unrolled
    from ..deq.mol import regularised_sense

    out = _StepOutcome()
    n_train = len(train_set)
    kind = train_set.kind
    for j in range(config.batch_size):
        g_index = dist_info.rank * config.batch_size + j         # position in the global batch
        gi = (within * global_batch + g_index) % n_train
        sample = train_set.samples[int(order[gi])]
        rng = np.random.default_rng([config.seed, 2, s, 0, g_index])
        prob = make_problem(sample, kind, config.mask, rng, config.extra_noise, device,
                            config.readout_block)
        with torch.no_grad():
            x0 = regularised_sense(prob.op.normal, prob.aty, lam=step.lam.detach(),
                                   iters=config.init_iters)         # (1, D, Y, X)

        support = prob.op.support()                                  # (1, D|1, Y, X)

        def fn(x: Any, _p: Problem = prob, _s: Any = support) -> Any:
            return step(x, normal=_p.op.normal, aty=_p.aty, support=_s)

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
        penalty = _lipschitz_penalty(
            cnn, config, s, rng, out,
            lambda _x=x, _r=rng: _random_crop(_x.detach(), config.penalty_crop, _r))
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
    import torch

    from .patches import draw_patch

    out = _StepOutcome()
    n_train = len(train_set)
    noisy, clean = [], []
    rng = np.random.default_rng([config.seed, 3, s, dist_info.rank])
    for j in range(config.batch_size):
        g_index = dist_info.rank * config.batch_size + j
        gi = int(order[(within * global_batch + g_index) % n_train])
        pair_rng = np.random.default_rng([config.seed, 2, s, 0, g_index])
        a, b = draw_patch(train_set.samples[gi], scales[gi], config.patch, pair_rng,
                          bank[gi] if bank else None)
        noisy.append(a)
        clean.append(b)
    p = min(min(x.shape[-2:]) for x in noisy)         # images smaller than the patch size
    x_in = torch.stack([x[..., :p, :p] for x in noisy]).to(device)        # (B, 1, P, P)
    target = torch.stack([x[..., :p, :p] for x in clean]).to(device)      # (B, 1, P, P)
    loss = _loss(cnn(x_in), target, config.loss)
    penalty = _lipschitz_penalty(cnn, config, s, rng, out,
                                 lambda: x_in[int(rng.integers(x_in.shape[0]))][None])  # (1, 1, P, P)
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
    """MOL-LR's penalty term on step ``s`` (None when the step has none): the adversarial
    local Lipschitz estimate at ``point()`` through the log barrier; the estimate is recorded
    in ``out``."""
    import torch

    from ..models.lipschitz import local_lipschitz_ratio

    if not (config.constraint == "lr" and config.penalty_weight > 0
            and s % config.penalty_every == 0):
        return None
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31 - 1)))
    lip, _ = local_lipschitz_ratio(cnn, point(), steps=config.penalty_steps, generator=gen)
    out.lipschitz.append(float(lip.detach()))
    return config.penalty_weight * _penalty(lip, config.penalty_threshold)


def _random_crop(x: Any, size: int | None, rng: np.random.Generator) -> Any:
    """A random (Y, X) window of ``size`` pixels of a (B, D, Y, X) image (all of it if smaller)."""
    if size is None:
        return x
    ny, nx = x.shape[-2:]
    cy, cx = min(size, ny), min(size, nx)
    y0 = int(rng.integers(ny - cy + 1))
    x0 = int(rng.integers(nx - cx + 1))
    return x[..., y0:y0 + cy, x0:x0 + cx].contiguous()


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _metadata(config: TrainConfig, kind: str, train_set: FolderDataset, val_set: FolderDataset,
              steps: int, metrics: dict[str, Any], dist_info: Dist) -> dict[str, Any]:
    return {
        "trained_with": "molrecon train",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": kind,
        "steps": steps,
        "train_files": [Path(f).name for f in train_set.files],
        "val_files": [Path(f).name for f in val_set.files],
        "train_samples": len(train_set),
        "val_samples": len(val_set),
        "world_size": dist_info.world,
        "mask": _plain(asdict(config.mask)),
        "config": _plain(asdict(config)),
        "last_metrics": _plain(metrics),
    }


def _certificate(cnn: Any, fixed_points: list[Any], seed: int,
                 data: list[str] | None = None) -> dict[str, Any]:
    """The checkpoint's certificate: the global bound and local estimates at validation fixed
    points, computed by the same code as ``molrecon check-lipschitz``."""
    from ..guarantees import certificate_for

    if not fixed_points:
        return {}
    points = [x.detach() for x in fixed_points[:4]]
    power_iters = 10
    if cnn.config.dims == 3:
        # 3D and 2D+time volumes: the local estimate at every best-model save would cost
        # minutes on a CPU; measure at two points, on their central 64 × 64 in-plane crop
        # (a point of its own), with fewer power iterations. `check-lipschitz` and the
        # bundling script measure whole volumes.
        points = [_centre_crop(x, 64) for x in points[:2]]
        power_iters = 6
    return certificate_for(cnn, points, data=data or [], power_iters=power_iters,
                           ratio_steps=0, seed=seed)


def _centre_crop(x: Any, size: int) -> Any:
    """The central ``size`` × ``size`` of the last two axes (whole axes when smaller)."""
    y0 = max(0, (x.shape[-2] - size) // 2)
    x0 = max(0, (x.shape[-1] - size) // 2)
    return x[..., y0:y0 + size, x0:x0 + size].contiguous()


def _save_state(path: Path, state: dict[str, Any]) -> None:
    import torch

    from ..io.atomic import atomic_path

    with atomic_path(path, force=True) as tmp:
        torch.save(state, tmp)


def _load_state(path: Path) -> dict[str, Any]:
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"unreadable resume state: {exc}", path=path) from exc
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError("not a molrecon resume state (or a different version)", path=path)
    for key in ("kind", "config", "steps", "best", "step", "optim"):
        if key not in state:
            raise CheckpointError(f"resume state lacks '{key}'", path=path)
    return state


def _check_state(state: dict[str, Any], config: TrainConfig, kind: str, path: Path
                 ) -> TrainConfig:
    """Refuse a state written for another data kind; return ``config`` with the saved
    spectral grid when this run leaves it unset (the SN rescaling, and so the network,
    depends on it). The options were compared before (:func:`_check_resume_options`)."""
    saved = state["config"] if isinstance(state["config"], dict) else {}
    if state["kind"] != kind:
        raise CheckpointError(f"resume state is for {state['kind']} data, this folder holds "
                              f"{kind} data", path=path)
    grid = saved.get("spectral_grid")
    if config.spectral_grid is None and isinstance(grid, int) and not isinstance(grid, bool):
        return replace(config, spectral_grid=grid)
    return config


# ------------------------------------------------------------------------------- resume checks
#: The command-line option of each TrainConfig field (dotted for MaskSpec and PatchSpec);
#: fields without one are named as they are.
OPTION_NAMES: dict[str, str] = {
    "data": "--data", "val_data": "--val-data", "kind": "--dims", "constraint": "--constraint",
    "lipschitz_target": "--lipschitz-target", "spectral_grid": "--spectral-grid",
    "layers": "--layers", "channels": "--channels", "mask.family": "--mask",
    "mask.accelerations": "-R", "mask.acs": "--acs", "extra_noise": "--noise",
    "loss": "--loss", "lr": "--lr", "lam_lr": "--lam-lr", "lam_init": "--lam",
    "alpha": "--alpha", "cg_iters": "--cg-iters", "fwd_max_iter": "--fwd-max-iter",
    "penalty_threshold": "--penalty-threshold", "penalty_weight": "--penalty-weight",
    "penalty_every": "--penalty-every", "batch_size": "--batch-size",
    "max_steps": "--max-steps", "time_budget_s": "--time-budget",
    "val_fraction": "--val-fraction", "readout_block": "--readout-block",
    "val_every": "--val-every", "val_samples": "--val-samples",
    "checkpoint_every": "--checkpoint-every", "max_skips": "--max-skips", "seed": "--seed",
    "device": "--device", "resume": "--resume", "override": "--override",
    "init_weights": "--init", "force": "--force", "stage": "--stage", "gradient": "--gradient",
    "patch.size": "--patch", "patch.sigma": "--sigma", "patch.sense_fraction": "--sense-fraction",
}
#: Fields a resumed run may change: how long and how often it runs, where, and what only
#: matters at a run's start (the state holds the weights, λ and the learning rates; the
#: data's kind is checked against the state on its own).
RESUME_FREE = frozenset({"out", "max_steps", "time_budget_s", "val_every", "checkpoint_every",
                         "max_skips", "device", "resume", "force", "override", "init_weights",
                         "lam_init", "kind"})
#: Fields that make the network what it is: a resume never changes them.
NETWORK_FIELDS = frozenset({"constraint", "layers", "channels", "lipschitz_target",
                            "spectral_grid", "stage"})


@dataclass(frozen=True)
class Change:
    """An option whose value differs from the one a resume state was saved with."""

    name: str          # the TrainConfig field (dotted for the mask's and the patches')
    old: Any
    new: Any

    @property
    def option(self) -> str:
        return OPTION_NAMES.get(self.name, self.name)

    @property
    def network(self) -> bool:
        return self.name in NETWORK_FIELDS

    def __str__(self) -> str:
        return f"{self.option} {_shown(self.old)} → {_shown(self.new)}"


def _shown(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    return str(value)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """A saved (or this run's, through :func:`_plain`) config as comparable fields: the mask's
    accelerations as one list (-R), the patch noise range as one pair (--sigma)."""
    out = {k: v for k, v in config.items() if k not in ("mask", "patch")}
    mask = config.get("mask")
    if isinstance(mask, dict):
        out["mask.family"] = mask.get("family")
        out["mask.accelerations"] = list(mask.get("accelerations") or [mask.get("acceleration")])
        out["mask.acs"] = mask.get("acs")
    patch = config.get("patch")
    if isinstance(patch, dict):
        for key, value in patch.items():
            if key not in ("sigma_min", "sigma_max"):
                out[f"patch.{key}"] = value
        out["patch.sigma"] = [patch.get("sigma_min"), patch.get("sigma_max")]
    return out


def _same_folder(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if a is None or b is None:
        return False
    try:
        return Path(str(a)).resolve() == Path(str(b)).resolve()
    except OSError:
        return False


def resume_changes(saved: dict[str, Any], config: TrainConfig) -> list[Change]:
    """The options of ``config`` that differ from ``saved`` (a resume state's config), in
    the order of TrainConfig's fields, leaving out :data:`RESUME_FREE` and options that do
    not matter to this run (the patch settings outside stage 0, --val-fraction with
    --val-data, an unset --spectral-grid, which takes the state's). Fields the state does not
    record (an older version's) are not compared."""
    old, new = _flat(saved), _flat(_plain(asdict(config)))
    changes = []
    for name, value in new.items():
        if name in RESUME_FREE or name not in old:
            continue
        if name.startswith("patch.") and config.stage != "denoise":
            continue
        if name == "val_fraction" and config.val_data is not None:
            continue
        if name == "spectral_grid" and value is None:
            continue
        if name in ("data", "val_data"):
            if not _same_folder(old[name], value):
                changes.append(Change(name, old[name], value))
        elif old[name] != value:
            changes.append(Change(name, old[name], value))
    return changes


def _check_resume_options(state: dict[str, Any], config: TrainConfig, path: Path
                          ) -> list[Change]:
    """Refuse a resume whose options differ from the state's (one line naming each change,
    old → new), unless ``config.override`` and none of them is the network's. Returns the
    changes that ``override`` lets through."""
    saved = state["config"] if isinstance(state["config"], dict) else {}
    changes = resume_changes(saved, config)
    network = [c for c in changes if c.network]
    if network:
        raise CheckpointError(
            "resume state was saved by a run with another network: "
            + "; ".join(map(str, network)) + " (a resume cannot change it; start a new run, "
            "with --init to start from this run's weights)", path=path)
    if changes and not config.override:
        raise ConfigError(
            "resume state was saved with other options: " + "; ".join(map(str, changes))
            + " (resume with the same options, or pass --override (override=True) to continue "
            "with the new ones)", path=path)
    return changes


def next_step_fits(used_s: float, budget_s: float, recent_steps_s: list[float],
                   extra_s: float = 0.0) -> bool:
    """Whether one more step can end within the time budget: ``used_s`` seconds spent, plus
    the slowest of the recent steps (none yet: nothing), plus ``extra_s`` (the validation
    the step would run and the save that follows) must not exceed ``budget_s``."""
    step_s = max(recent_steps_s) if recent_steps_s else 0.0
    return used_s + step_s + extra_s <= budget_s
