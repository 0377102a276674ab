"""The MOL prior H and everything about it: the network, its Lipschitz certificate
(spectral bounds of zero-padded convolutions), local Lipschitz estimates, the
checkpoint file format, and the bundled checkpoints (:mod:`.bundled`).

The names below load their module (and torch) on first use, so that looking up a
bundled model (:mod:`.bundled`, json only) does not pay torch's import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .checkpoint import LoadedModel, load_checkpoint, save_checkpoint, sha256
    from .cnn import CONSTRAINTS, CNNConfig, Constraint, MolCNN
    from .lipschitz import local_lipschitz_power, local_lipschitz_ratio
    from .spectral import certified_bound, conv_norm_bound, layer_bounds

_HOME = {
    "LoadedModel": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint", "sha256": "checkpoint",
    "CONSTRAINTS": "cnn", "CNNConfig": "cnn", "Constraint": "cnn", "MolCNN": "cnn",
    "local_lipschitz_power": "lipschitz", "local_lipschitz_ratio": "lipschitz",
    "certified_bound": "spectral", "conv_norm_bound": "spectral", "layer_bounds": "spectral",
}

__all__ = [
    "CONSTRAINTS", "CNNConfig", "Constraint", "LoadedModel", "MolCNN", "certified_bound",
    "conv_norm_bound", "layer_bounds", "load_checkpoint", "local_lipschitz_power",
    "local_lipschitz_ratio", "save_checkpoint", "sha256",
]


__getattr__ = lazy_attributes(__name__, _HOME, globals())
