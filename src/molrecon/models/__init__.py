"""The MOL prior H and everything about it: the network, its Lipschitz certificate
(spectral bounds of zero-padded convolutions), local Lipschitz estimates, and the
checkpoint file format."""

from .checkpoint import LoadedModel, load_checkpoint, save_checkpoint, sha256
from .cnn import CONSTRAINTS, CNNConfig, Constraint, MolCNN
from .lipschitz import local_lipschitz_power, local_lipschitz_ratio
from .spectral import certified_bound, conv_norm_bound, layer_bounds

__all__ = [
    "CONSTRAINTS",
    "CNNConfig",
    "Constraint",
    "LoadedModel",
    "MolCNN",
    "certified_bound",
    "conv_norm_bound",
    "layer_bounds",
    "load_checkpoint",
    "local_lipschitz_power",
    "local_lipschitz_ratio",
    "save_checkpoint",
    "sha256",
]
