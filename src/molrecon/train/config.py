"""What a training run is asked to do and what it did: :class:`TrainConfig` (every option of
``molrecon train``, checked when it is made), :class:`TrainResult`, and the comparison of a
run's options with those a resume state was saved with (:func:`resume_changes`: a resumed
run must repeat the options that define the problem, the network's always).

Torch-free, so that the command line can check its options before torch is imported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ..config import MAPS_FROM
from ..errors import CheckpointError, ConfigError
from .data import MaskSpec
from .patches import PatchSpec

Loss = Literal["mse", "mse_mag", "l1"]
Stage = Literal["deq", "denoise"]
PenaltyEstimator = Literal["ratio", "power", "sample", "lanczos", "monotone"]
PENALTY_ESTIMATORS: tuple[str, ...] = get_args(PenaltyEstimator)
STAGES: tuple[str, ...] = ("deq", "denoise")
#: What --project-bound and --best-max-lipschitz hold (``TrainConfig.bound_measure``).
BOUND_MEASURES: tuple[str, ...] = ("lipschitz", "monotone")
#: Initial λ of a run that neither gives one nor starts from a checkpoint.
DEFAULT_LAM = 100.0
RecordFn = Callable[[dict[str, Any]], None]
WarnFn = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on (recorded in the checkpoint's metadata).

    data, out         folder of fully sampled raw scans; the model file (.pt)
    kind              "2d" | "3d" | "2dt", or None to take it from the data
    constraint        "sn" (certified spectral normalisation) | "lr" (Lipschitz penalty)
    skip              LR: the identity path around the network, H(x) = x + N(x)
    spectral_grid     SN: frequency grid per axis of the certified layer bounds (None: default)
    mask              retrospective masks (family, R, ACS)
    extra_noise       std of extra complex noise added to the normalised k-space;
                      extra_noise_max, when set, makes it a range: each training problem
                      draws its std log-uniformly in [extra_noise, extra_noise_max]
                      (a training set of nearly noise-free references then sees a spread
                      of noise levels, and its targets hold none of it)
    val_noise         std of the extra noise of the validation problems, cycled over them
                      (empty: none), fixed per problem like their masks
    maps, val_maps    where the coil maps of the training / validation problems come
                      from: "reference" (the fully sampled scan's: an exact data term) or
                      "calibration" (ESPIRiT from each problem's own calibration lines, as
                      reconstruction has them: :func:`molrecon.problem.undersampled`)
    lam_from_noise    train and validate with λ set per problem by the ``--init``
                      checkpoint's noise rule (as ``reconstruct --lam auto``), and keep the
                      rule in the saved checkpoints
    loss              "mse" (complex) | "mse_mag" | "l1", each relative to the target
    lr, lam_lr        Adam learning rates of H and of log λ; lam_init the initial λ
                      (None: the --init checkpoint's λ, else DEFAULT_LAM)
    alpha, cg_iters   MOL step size and CG iterations per step
    init_iters        CG iterations of the regularised-SENSE start
    fwd_*, bwd_*      tolerance (relative residual) and cap of the forward / backward solves
    diverge_tol       a forward residual above this after the cap skips the step
    penalty_*         MOL-LR penalty (see :mod:`molrecon.train`); penalty_estimator "ratio"
                      (a ratio search of penalty_steps steps on a penalty_crop crop of each
                      training fixed point) or "power" (the Jacobian norm at the fixed
                      points of penalty_probes fixed training problems, penalty_steps power
                      iterations per visit carried from step to step: :mod:`.probes`) or
                      "sample" (the Jacobian norm at each training sample's own whole fixed
                      point, penalty_steps power iterations from white noise every time) or
                      "lanczos" (there, the penalty_top largest singular values of the
                      Jacobian by penalty_steps Lanczos steps, each through the barrier)
                      or "monotone" (there, the penalty_top largest eigenvalues μ of the
                      Jacobian's symmetric part ½(J + Jᵀ), by Lanczos likewise: what F =
                      I − H's monotonicity needs below 1, where the norm may exceed it;
                      penalty_norm_cap C adds the largest singular value at the same
                      point through a barrier at C: a norm far above 1 slows the
                      fixed-point iteration, monotone or not; that barrier is weighted by
                      penalty_norm_weight, penalty_weight when None);
                      penalty_at (stage 0): where on a patch: "noisy" (the network's input),
                      "clean" (the clean patch: MOL's fixed points are nearly clean images,
                      and a denoiser held at its noisy inputs can be expansive there) or
                      "both" (a barrier at each), or a comma list of those and "image"
                      (a whole clean image of the same scan: the norm's largest
                      value over a whole image, where a patch samples one window)
    unroll            0: deep equilibrium; K ≥ 1: the unrolled baseline through K steps
    gradient          deep equilibrium: "implicit" (exact implicit gradient, a backward
                      solve) or "jfb" (Jacobian-free: the gradient through one step at x*)
    stage             "deq": deep-equilibrium steps; "denoise": stage-0 pretraining of H
                      alone on noisy patches of the targets (2D patches, or blocks of
                      ``patch.depth`` planes for 2dt and 3d data; ``patch`` says how,
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
                      of ``data`` trains and val_fraction is not used); val_points: how
                      many of the validation fixed points (spread over the problems) the
                      certificate measures (``val_lipschitz``, ``val_monotone``)
    checkpoint_every  steps between saves; max_skips consecutive skips stop the run
    grad_clip         global gradient-norm clip
    best_max_lipschitz  if set, a validation makes the best model only where the largest
                      local estimate at its fixed points (``val_lipschitz``) is at most
                      this: for an LR model, the best among those at the bound, not a more
                      expansive one whose PSNR it owes to leaving it
    project_bound     None (off) or a bound T: every project_every steps (LR; the
                      deep-equilibrium stage or stage 0), the largest singular value of H's
                      Jacobian at the MOL fixed points of penalty_probes fixed whole
                      training scans (20 Lanczos steps each) is measured, and where it
                      exceeds T, H's output is scaled by T over it (:mod:`.probes`): the
                      run trains the model at the bound instead of scaling it there after
    bound_measure     what project_bound and best_max_lipschitz hold: "lipschitz" (the
                      largest singular value of H's Jacobian) or "monotone" (the top μ of
                      its symmetric part ½(J + Jᵀ), what F = I − H's monotonicity and so
                      MOL's uniqueness and robustness need: μ ≤ ‖J‖, and a network with an
                      identity path is expansive mostly through negative directions);
                      validation logs both (``val_lipschitz``, ``val_monotone``)
    ema               0 (off) or the decay d of an exponential moving average of the
                      weights and λ, updated after every step (with the usual warm-up,
                      min(d, (1 + n)/(10 + n)) at its n-th update): validation, the
                      certificate and the saved models are the average's, the optimiser
                      and the penalty act on the raw weights
    resume            continue the run whose state is beside ``out``; the options that
                      define the problem must be those the state was saved with
                      (:func:`resume_changes`), else the run is refused, unless
                      ``override`` (then the new values apply; a changed lr or lam_lr
                      replaces the saved learning rates). The network's options
                      (constraint, layers, channels, skip, lipschitz_target, spectral_grid,
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
    skip: bool = False
    mask: MaskSpec = field(default_factory=MaskSpec)
    extra_noise: float = 0.0
    extra_noise_max: float | None = None
    val_noise: tuple[float, ...] = ()
    maps: str = "reference"
    val_maps: str = "reference"
    lam_from_noise: bool = False
    loss: Loss = "mse"
    lr: float = 1e-4
    lam_lr: float = 1e-2
    lam_init: float | None = None
    alpha: float = 1.0
    cg_iters: int = 10                  # as the bundled models and `train --cg-iters`
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
    penalty_estimator: PenaltyEstimator = "ratio"
    penalty_probes: int = 4
    penalty_top: int = 1
    penalty_norm_cap: float | None = None
    penalty_norm_weight: float | None = None
    penalty_at: str = "noisy"
    batch_size: int = 1
    max_steps: int = 1000
    time_budget_s: float | None = None
    val_fraction: float = 0.15
    val_data: str | None = None
    readout_block: int | None = None
    val_every: int = 50
    val_samples: int = 8
    val_points: int = 4
    best_max_lipschitz: float | None = None
    project_bound: float | None = None
    project_every: int = 5
    bound_measure: str = "lipschitz"
    ema: float = 0.0
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
        if not isinstance(self.skip, bool):
            raise ConfigError(f"skip must be a bool, got {self.skip!r}")
        if self.skip and self.constraint == "sn":
            raise ConfigError("--skip needs --constraint lr: an identity path cannot be "
                              "spectrally normalised below 1")
        if self.loss not in ("mse", "mse_mag", "l1"):
            raise ConfigError(f"--loss must be mse, mse_mag or l1, got {self.loss!r}")
        if self.extra_noise_max is not None and not (
                isinstance(self.extra_noise_max, (int, float))
                and 0 < self.extra_noise <= self.extra_noise_max < math.inf):
            raise ConfigError("a --noise range LOW,HIGH needs 0 < LOW <= HIGH (finite), got "
                              f"{self.extra_noise!r},{self.extra_noise_max!r}")
        if not all(isinstance(v, (int, float)) and 0 <= v < math.inf for v in self.val_noise):
            raise ConfigError(f"--val-noise levels must be >= 0 and finite, got {self.val_noise!r}")
        for name in ("maps", "val_maps"):
            if getattr(self, name) not in MAPS_FROM:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of "
                                  f"{', '.join(MAPS_FROM)}, got {getattr(self, name)!r}")
        if self.lam_from_noise and not self.init_weights:
            raise ConfigError("--lam-from-noise takes the noise rule of the --init checkpoint: "
                              "give --init")
        if self.readout_block is not None and (isinstance(self.readout_block, bool) or not
                                               isinstance(self.readout_block, int)
                                               or self.readout_block < 1):
            raise ConfigError("readout_block must be a positive integer, got "
                              f"{self.readout_block!r}")
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
                     "checkpoint_every", "penalty_every", "val_samples", "val_points", "fwd_max_iter",
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
        if self.penalty_estimator not in PENALTY_ESTIMATORS:
            raise ConfigError("penalty_estimator must be one of "
                              f"{', '.join(map(repr, PENALTY_ESTIMATORS))}, got "
                              f"{self.penalty_estimator!r}")
        if isinstance(self.penalty_probes, bool) or not isinstance(self.penalty_probes, int) \
                or self.penalty_probes < 1:
            raise ConfigError("penalty_probes must be an integer >= 1, got "
                              f"{self.penalty_probes!r}")
        if isinstance(self.penalty_top, bool) or not isinstance(self.penalty_top, int) \
                or self.penalty_top < 1:
            raise ConfigError(f"penalty_top must be an integer >= 1, got {self.penalty_top!r}")
        if self.penalty_estimator in ("lanczos", "monotone") \
                and self.penalty_top > self.penalty_steps:
            raise ConfigError("penalty_top cannot exceed penalty_steps (the Lanczos steps give "
                              "at most that many Ritz values)")
        if self.penalty_norm_cap is not None:
            if isinstance(self.penalty_norm_cap, bool) or not isinstance(
                    self.penalty_norm_cap, (int, float)) \
                    or not 0 < self.penalty_norm_cap < math.inf:
                raise ConfigError("penalty_norm_cap must be a positive finite number, got "
                                  f"{self.penalty_norm_cap!r}")
            if self.penalty_estimator != "monotone":
                raise ConfigError("penalty_norm_cap caps the Jacobian norm beside the monotone "
                                  "estimator's μ: it needs penalty_estimator 'monotone'")
        if self.penalty_norm_weight is not None:
            if isinstance(self.penalty_norm_weight, bool) or not isinstance(
                    self.penalty_norm_weight, (int, float)) \
                    or not 0 <= self.penalty_norm_weight < math.inf:
                raise ConfigError("penalty_norm_weight must be a finite number >= 0, got "
                                  f"{self.penalty_norm_weight!r}")
            if self.penalty_norm_cap is None:
                raise ConfigError("penalty_norm_weight weighs the barrier of penalty_norm_cap: "
                                  "it needs penalty_norm_cap")
        if isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) \
                or not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be 0 (off) or a decay in (0, 1), got {self.ema!r}")
        if self.project_bound is not None:
            if isinstance(self.project_bound, bool) or not isinstance(
                    self.project_bound, (int, float)) or not 0 < self.project_bound <= 1:
                raise ConfigError("project_bound must be a bound in (0, 1], got "
                                  f"{self.project_bound!r}")
            if self.constraint != "lr" or self.unroll:
                raise ConfigError("project_bound scales an LR model to the bound during "
                                  "training (--constraint lr, no --unroll)")
            if self.ema:
                raise ConfigError("project_bound and ema cannot be combined: an average of "
                                  "models at the bound need not be at the bound")
        if isinstance(self.project_every, bool) or not isinstance(self.project_every, int) \
                or self.project_every < 1:
            raise ConfigError(f"project_every must be an integer >= 1, got {self.project_every!r}")
        if self.bound_measure not in BOUND_MEASURES:
            raise ConfigError(f"bound_measure must be one of {', '.join(BOUND_MEASURES)}, got "
                              f"{self.bound_measure!r}")
        if self.best_max_lipschitz is not None and not 0 < self.best_max_lipschitz < math.inf:
            raise ConfigError("best_max_lipschitz must be positive, got "
                              f"{self.best_max_lipschitz!r}")
        if not self.penalty_points():
            raise ConfigError("penalty_at must be 'noisy', 'clean', 'both' or a comma list of "
                              f"noisy, clean and image, got {self.penalty_at!r}")
        if self.penalty_at != "noisy" and self.stage != "denoise":
            raise ConfigError("penalty_at places the penalty on stage 0's patches: the "
                              "deep-equilibrium stage takes it at the fixed points")
        if self.penalty_estimator == "power" and self.stage == "denoise":
            raise ConfigError("penalty_estimator 'power' measures H at MOL fixed points: it "
                              "needs the deep-equilibrium stage (stage 0 uses 'ratio')")
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

    def draw_noise(self, rng: Any) -> float:
        """The extra noise std of one training problem: ``extra_noise``, or a log-uniform
        draw from ``rng`` in [extra_noise, extra_noise_max] when that is set (drawn only
        then, so a run without a range draws what it always drew)."""
        if self.extra_noise_max is None:
            return float(self.extra_noise)
        lo, hi = math.log(self.extra_noise), math.log(self.extra_noise_max)
        return float(math.exp(lo + (hi - lo) * float(rng.random())))

    def penalty_points(self) -> tuple[str, ...]:
        """Where stage 0's penalty measures, in order ("both" is clean then noisy); empty
        if ``penalty_at`` names anything else."""
        if self.penalty_at == "both":
            return ("clean", "noisy")
        names = tuple(n.strip() for n in str(self.penalty_at).split(","))
        ok = names and all(n in ("noisy", "clean", "image") for n in names) \
            and len(set(names)) == len(names)
        return names if ok else ()


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


def _plain(obj: Any) -> Any:
    """``obj`` as JSON values (a saved config, checkpoint metadata): mappings with string keys,
    tuples as lists, non-finite floats as None, anything else as its string."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# ------------------------------------------------------------------------------- resume checks
#: The command-line option of each TrainConfig field (dotted for MaskSpec and PatchSpec);
#: fields without one are named as they are.
OPTION_NAMES: dict[str, str] = {
    "data": "--data", "val_data": "--val-data", "kind": "--dims", "constraint": "--constraint",
    "lipschitz_target": "--lipschitz-target", "spectral_grid": "--spectral-grid",
    "layers": "--layers", "channels": "--channels", "skip": "--skip", "mask.family": "--mask",
    "mask.accelerations": "-R", "mask.acs": "--acs", "extra_noise": "--noise",
    "extra_noise_max": "--noise", "val_noise": "--val-noise", "maps": "--maps",
    "val_maps": "--val-maps", "lam_from_noise": "--lam-from-noise",
    "loss": "--loss", "lr": "--lr", "lam_lr": "--lam-lr", "lam_init": "--lam",
    "alpha": "--alpha", "cg_iters": "--cg-iters", "fwd_max_iter": "--fwd-max-iter",
    "penalty_threshold": "--penalty-threshold", "penalty_weight": "--penalty-weight",
    "penalty_every": "--penalty-every", "penalty_at": "--penalty-at",
    "penalty_norm_cap": "--penalty-norm-cap", "penalty_norm_weight": "--penalty-norm-weight",
    "best_max_lipschitz": "--best-max-lipschitz", "ema": "--ema",
    "project_bound": "--project-bound", "project_every": "--project-every",
    "bound_measure": "--bound-measure", "batch_size": "--batch-size",
    "max_steps": "--max-steps", "time_budget_s": "--time-budget",
    "val_fraction": "--val-fraction", "readout_block": "--readout-block",
    "val_every": "--val-every", "val_samples": "--val-samples", "val_points": "--val-points",
    "checkpoint_every": "--checkpoint-every", "max_skips": "--max-skips", "seed": "--seed",
    "device": "--device", "resume": "--resume", "override": "--override",
    "init_weights": "--init", "force": "--force", "stage": "--stage", "gradient": "--gradient",
    "patch.size": "--patch", "patch.sigma": "--sigma", "patch.sense_fraction": "--sense-fraction",
    "patch.depth": "--patch-depth",
}
#: Fields a resumed run may change: how long and how often it runs, where, and what only
#: matters at a run's start (the state holds the weights, λ and the learning rates; the
#: data's kind is checked against the state on its own).
RESUME_FREE = frozenset({"out", "max_steps", "time_budget_s", "val_every", "checkpoint_every",
                         "max_skips", "device", "resume", "force", "override", "init_weights",
                         "lam_init", "kind", "best_max_lipschitz", "ema", "project_bound",
                         "project_every", "bound_measure", "val_points"})
#: Fields that make the network what it is: a resume never changes them.
NETWORK_FIELDS = frozenset({"constraint", "layers", "channels", "skip", "lipschitz_target",
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

