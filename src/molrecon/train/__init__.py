"""Deep-equilibrium training of MOL on a folder of raw scans (``molrecon train``): see
:mod:`.loop` (the run), :mod:`.data` (training samples) and :mod:`.patches` (stage-0 patches).
"""

from .data import MaskSpec, list_raw_files, load_folder, split_dataset
from .loop import (
    OPTION_NAMES,
    TrainConfig,
    TrainResult,
    evaluate,
    inflate_state_2d_to_3d,
    make_problem,
    next_step_fits,
    output_paths,
    resume_changes,
    train,
)
from .patches import PatchSpec, degraded_bank, draw_patch, sample_scales

__all__ = [
    "OPTION_NAMES", "MaskSpec", "PatchSpec", "TrainConfig", "TrainResult", "degraded_bank",
    "draw_patch", "evaluate", "inflate_state_2d_to_3d", "list_raw_files", "load_folder",
    "make_problem", "next_step_fits", "output_paths", "resume_changes", "sample_scales",
    "split_dataset", "train",
]
