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
(the ascent steps cost more than the rest of a step on a CPU). That search reads
low: 0.92-0.94 where the converged Jacobian norm at validation fixed points is
1.009-1.017 (``benchmarks/bench_lipschitz_estimates.py``). ``penalty_estimator =
"power"`` penalises the Jacobian norm instead, at the fixed points of a few fixed
probe problems, continuing each probe's power iteration from step to step
(:mod:`molrecon.train.probes`). ``project_bound`` replaces the penalty by a
projection: every few steps the Jacobian norm at whole-scan probes' fixed points is
read by Lanczos and H's output scaled down to the bound where it exceeds it. MOL-SN needs no penalty: its
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
file is written to a temporary file and renamed (``molrecon.atomic``), so a kill
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

The package: :mod:`.config` (TrainConfig, TrainResult, the resume option checks),
:mod:`.data` (samples from a folder of raw scans, retrospective masks, problems),
:mod:`.patches` (stage-0 patches), :mod:`.step` (the model and one process's share of a
step), :mod:`.validate` (validation problems and :func:`evaluate`), :mod:`.state` (the
resume state and the run log), :mod:`.distributed` (the torch.distributed glue) and
:mod:`.loop` (:func:`train`: setup, steps, validation and saves). The names below load
their module on first use, so that TrainConfig (and the command line's option checks) does
not pay torch's import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .config import (
        DEFAULT_LAM,
        NETWORK_FIELDS,
        OPTION_NAMES,
        RESUME_FREE,
        STAGES,
        Change,
        Loss,
        RecordFn,
        Stage,
        TrainConfig,
        TrainResult,
        WarnFn,
        resume_changes,
    )
    from .data import (
        FULL_FRACTION,
        RAW_SUFFIXES,
        FolderDataset,
        MaskSpec,
        Sample,
        check_masks,
        draw_mask,
        list_raw_files,
        load_folder,
        make_problem,
        split_dataset,
        split_files,
    )
    from .distributed import Dist
    from .loop import next_step_fits, train
    from .patches import PatchSpec, degraded_bank, draw_patch, sample_scales
    from .state import STATE_VERSION, output_paths
    from .step import inflate_state_2d_to_3d
    from .validate import evaluate

_HOME = {
    **dict.fromkeys(("DEFAULT_LAM", "NETWORK_FIELDS", "OPTION_NAMES", "RESUME_FREE", "STAGES",
                     "Change", "Loss", "RecordFn", "Stage", "TrainConfig", "TrainResult",
                     "WarnFn", "resume_changes"), "config"),
    **dict.fromkeys(("FULL_FRACTION", "RAW_SUFFIXES", "FolderDataset", "MaskSpec", "Sample",
                     "check_masks", "draw_mask", "list_raw_files", "load_folder",
                     "make_problem", "split_dataset", "split_files"), "data"),
    "Dist": "distributed",
    "next_step_fits": "loop", "train": "loop",
    **dict.fromkeys(("PatchSpec", "degraded_bank", "draw_patch", "sample_scales"), "patches"),
    "STATE_VERSION": "state", "output_paths": "state",
    "inflate_state_2d_to_3d": "step",
    "evaluate": "validate",
}

__all__ = [
    "DEFAULT_LAM", "FULL_FRACTION", "NETWORK_FIELDS", "OPTION_NAMES", "RAW_SUFFIXES", "RESUME_FREE",
    "STAGES", "STATE_VERSION", "Change", "Dist", "FolderDataset", "Loss", "MaskSpec", "PatchSpec",
    "RecordFn", "Sample", "Stage", "TrainConfig", "TrainResult", "WarnFn", "check_masks",
    "degraded_bank", "draw_mask", "draw_patch", "evaluate", "inflate_state_2d_to_3d",
    "list_raw_files", "load_folder", "make_problem", "next_step_fits", "output_paths",
    "resume_changes", "sample_scales", "split_dataset", "split_files", "train",
]


__getattr__ = lazy_attributes(__name__, _HOME, globals())
