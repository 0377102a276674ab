"""Bundled MOL checkpoints: which file serves which data kind.

The weights live in ``molrecon/data/weights/`` with a ``manifest.json`` that
maps each data kind to its default checkpoint and lists the alternatives
(e.g. the certified SN model beside the sharper LR one). Each checkpoint has
a model card (``<name>.md``) with its training data, masks, metrics and
Lipschitz certificate.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError


def weights_dir() -> Path:
    return Path(str(resources.files("molrecon") / "data" / "weights"))


def manifest() -> dict[str, Any]:
    path = weights_dir() / "manifest.json"
    if not path.is_file():
        return {"defaults": {}, "models": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"bundled weights manifest is unreadable: {exc}", path=path) from exc
    return data


def bundled_checkpoint(kind: str, constraint: str | None = None) -> Path:
    """The bundled checkpoint for ``kind`` ("2d", "3d", "2dt"); ``constraint`` picks sn or lr."""
    man = manifest()
    models: dict[str, dict[str, Any]] = man.get("models", {})
    if constraint is None:
        name = man.get("defaults", {}).get(kind)
    else:
        # a model trained on this kind first, else one that declares it (a 2D model serving
        # 2D+time frame by frame)
        fits = [n for n, m in models.items() if m.get("constraint") == constraint
                and kind in m.get("kinds", [m.get("kind")])]
        fits.sort(key=lambda n: models[n].get("kind") != kind)
        name = fits[0] if fits else None
    if not name:
        what = f"{constraint} " if constraint else ""
        raise ConfigError(f"no bundled {what}MOL weights for {kind} data; pass --weights MODEL.pt "
                          "(train one with `molrecon train`) or use --method sense")
    path = weights_dir() / models[name]["file"] if name in models else weights_dir() / name
    if not path.is_file():
        raise CheckpointError("bundled checkpoint is missing from the installation", path=path)
    return path


def resolve_weights(value: str | Path) -> Path:
    """A model argument (``--weights``, ``--init``, ``check-lipschitz MODEL``, ``robustness
    MODEL``): a checkpoint file, or the name of a bundled model (``mol_2d_sn``) when no such
    file exists."""
    path = Path(value)
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    models: dict[str, dict[str, Any]] = manifest().get("models", {})
    if str(value) not in models:
        names = ", ".join(sorted(models)) or "none"
        raise ConfigError(f"{value}: no such file and no bundled model of that name "
                          f"(bundled: {names}; see `molrecon models`)")
    target = weights_dir() / models[str(value)]["file"]
    if not target.is_file():
        raise CheckpointError("bundled checkpoint is missing from the installation", path=target)
    return target


def bundled_models() -> list[dict[str, Any]]:
    """Every bundled model: name, file, kinds, constraint, the kinds it is default for."""
    man = manifest()
    defaults: dict[str, str] = man.get("defaults", {})
    out = []
    for name, entry in sorted(man.get("models", {}).items()):
        out.append({"name": name, **entry,
                    "default_for": sorted(k for k, n in defaults.items() if n == name),
                    "path": str(weights_dir() / entry["file"])})
    return out


def checkpoint_for(kind: str, weights: str | Path | None = None, *,
                   one_readout: bool = False) -> Path:
    """The checkpoint that reconstructs a ``kind`` scan: ``weights`` (a file or a bundled
    model's name) when given, else the bundled default for ``kind``.

    The default rule: a 3D scan with one readout position (``one_readout``, e.g. a
    partition × phase plane already transformed along the readout) gets the bundled 2D
    default when that model declares 3D data, since its prior sees the plane as an image.
    """
    from .checkpoint import load_checkpoint

    if weights is not None:
        return resolve_weights(weights)
    if kind == "3d" and one_readout:
        planar = bundled_checkpoint("2d")
        if "3d" in load_checkpoint(planar).kinds:
            return planar
    return bundled_checkpoint(kind)
