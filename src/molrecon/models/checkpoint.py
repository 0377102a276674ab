"""The molrecon checkpoint: one file, loadable with ``torch.load(path, weights_only=True)``.

Layout (format_version 1), a dict of plain types and tensors only:

=================  ====================================================================
format             "molrecon-checkpoint"
format_version     1
architecture       CNNConfig as a dict: dims, layers, channels, kernel, bias
constraint         "sn" | "lr"
lipschitz_target   float, the L_target of the SN constraint (recorded for "lr" too)
spectral_grid      int, grid points per axis of the certified spectral bound
kinds              list of data kinds the model applies to ("2d", "3d", "2dt")
alpha, lam         MOL step size α and the trained data-consistency weight λ
cg_iters           CG iterations per MOL step
state_dict         {"convs.{i}.weight": tensor, "convs.{i}.bias": tensor}: the free weights
metadata           plain dict (str keys; str/int/float/bool/None, lists and dicts of those):
                   training data, masks, acceleration, steps, metrics, date, ...
certificate        plain dict; :func:`save_checkpoint` always writes ``certified_bound``
                   (∏ of certified layer bounds of the weights as applied), ``layer_bounds``,
                   ``spectral_grid`` and ``date``, next to the caller's entries (local
                   estimates, the data they were measured on)
lam_noise          optional: λ set from each scan's noise level and acceleration,
                   :class:`~molrecon.physics.noise.NoiseLambdaRule` as a plain dict
                   (``sigma_ref``, ``exponent``, ``min_factor``, ``max_factor``,
                   ``accel_ref``, ``accel_exponent``, ``accel_min``, ``accel_max``
                   (None: unbounded), ``measured``); without it λ is the same for every
                   scan. A molrecon older than this key refuses such a file
                   ("unknown key"), as it cannot apply the rule
=================  ====================================================================

Loading never unpickles arbitrary objects: ``torch.load(..., weights_only=True)``
is the only reader, and every key, type, value and tensor shape is checked
before a model is built. Anything else is refused with a
:class:`~molrecon.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..config import MolConfig
from ..errors import CheckpointError, ConfigError
from ..kinds import KINDS_BY_PRIOR_DIMS
from ..physics.noise import NoiseLambdaRule
from .cnn import CONSTRAINTS, CNNConfig, MolCNN
from .spectral import layer_bounds

FORMAT = "molrecon-checkpoint"
FORMAT_VERSION = 1
_KEYS = frozenset({
    "format", "format_version", "architecture", "constraint", "lipschitz_target",
    "spectral_grid", "kinds", "alpha", "lam", "cg_iters", "state_dict", "metadata",
    "certificate",
})
_OPTIONAL_KEYS = frozenset({"lam_noise"})
_MAX_DEPTH = 8


@dataclass(frozen=True)
class LoadedModel:
    """A validated checkpoint: the prior (in eval mode) and everything recorded with it."""

    model: MolCNN
    mol_config: MolConfig
    constraint: str
    lipschitz_target: float
    kinds: tuple[str, ...]
    metadata: dict[str, Any]
    certificate: dict[str, Any]
    format_version: int
    path: Path
    sha256: str
    #: λ from the scan's noise level (None: the same λ for every scan).
    lam_noise: NoiseLambdaRule | None = None


def with_kinds(loaded: LoadedModel, kinds: Sequence[str]) -> LoadedModel:
    """``loaded`` declared for ``kinds`` instead of the kinds its file records: any its
    network can serve (a 3×3×3 prior trained on 2D+time series, for volumes), else
    :class:`ConfigError`. For measuring or bundling a prior on data it was not trained on."""
    dims = loaded.model.config.dims
    allowed = KINDS_BY_PRIOR_DIMS[dims]
    wanted = tuple(str(k) for k in kinds)
    bad = [k for k in wanted if k not in allowed]
    if not wanted or bad:
        raise ConfigError(f"a {dims}D prior serves only {', '.join(allowed)} data, "
                          f"not {', '.join(bad) or 'no kind'}")
    return replace(loaded, kinds=wanted)


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (for reports: which weights produced an image)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_plain(value: object, depth: int = 0) -> bool:
    """str/int/float/bool/None, and lists/tuples/str-keyed dicts of those (bounded depth)."""
    if depth > _MAX_DEPTH:
        return False
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _plain_copy(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain_copy(v) for k, v in value.items()}
    return value


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MolCNN,
    mol_config: MolConfig,
    *,
    metadata: Mapping[str, Any] | None = None,
    certificate: Mapping[str, Any] | None = None,
    kinds: Sequence[str] | None = None,
    lam_noise: NoiseLambdaRule | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` and ``mol_config`` (with the trained λ: see ``MolStep.to_config``).

    The file is written atomically; an existing file is replaced only with
    ``force=True`` (else :class:`~molrecon.errors.OutputError`). ``kinds``
    defaults to ("2d",) for 2D and ("3d",) for 3D models. ``lam_noise``, when given,
    is stored so that reconstruction sets λ from each scan's noise level
    (:mod:`molrecon.physics.noise`). The certified bound is computed here, so the
    file's claim always matches its weights.
    """
    meta = {} if metadata is None else dict(metadata)
    cert = {} if certificate is None else dict(certificate)
    if not _is_plain(meta):
        raise ConfigError("checkpoint metadata must hold only str/int/float/bool/None, "
                          "lists and str-keyed dicts")
    if not _is_plain(cert):
        raise ConfigError("checkpoint certificate must hold only str/int/float/bool/None, "
                          "lists and str-keyed dicts")
    dims = model.config.dims
    kind_list = [("2d" if dims == 2 else "3d")] if kinds is None else [str(k) for k in kinds]
    allowed = KINDS_BY_PRIOR_DIMS[dims]
    if not kind_list or any(k not in allowed for k in kind_list):
        raise ConfigError(f"a {dims}D model applies to kinds {allowed}, got {kind_list}")
    bounds = layer_bounds(model)
    cert.update({
        "certified_bound": model.bound_from(bounds),
        "layer_bounds": bounds,
        "spectral_grid": model.spectral_grid,
    })
    cert.setdefault("date", _now())
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    obj: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.config.to_dict(),
        "constraint": model.constraint,
        "lipschitz_target": float(model.lipschitz_target),
        "spectral_grid": int(model.spectral_grid),
        "kinds": kind_list,
        "alpha": float(mol_config.alpha),
        "lam": float(mol_config.lam),
        "cg_iters": int(mol_config.cg_iters),
        "state_dict": state,
        "metadata": _plain_copy(meta),
        "certificate": _plain_copy(cert),
    }
    if lam_noise is not None:
        rule = lam_noise.record()
        if not _is_plain(rule):
            raise ConfigError("the λ noise rule's record must hold only plain values")
        obj["lam_noise"] = _plain_copy(rule)
    with atomic_path(path, force=force) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _number(obj: Mapping[str, Any], key: str, path: Path) -> float:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise CheckpointError(f"'{key}' must be a finite number, got {v!r}", path=path)
    return float(v)


def _integer(obj: Mapping[str, Any], key: str, path: Path) -> int:
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"'{key}' must be an integer, got {v!r}", path=path)
    return v


def _load_failure(exc: Exception) -> str:
    """Our own words for why torch.load(weights_only=True) refused a file.

    torch's messages suggest retrying with ``weights_only=False``, which would
    execute whatever the file contains; molrecon never does that and never
    repeats the suggestion.
    """
    text = str(exc)
    if "Unsupported global" in text:
        return ("refused: the file holds Python objects that a molrecon checkpoint never "
                "contains (unpickling them could run code)")
    if "zip archive" in text or "central directory" in text:
        return "not a molrecon checkpoint: damaged or truncated archive"
    if isinstance(exc, EOFError):
        return "not a molrecon checkpoint: the file is empty or truncated"
    return f"not a molrecon checkpoint: unreadable content ({type(exc).__name__})"


def load_checkpoint(path: str | os.PathLike[str], *,
                    map_location: str | torch.device = "cpu") -> LoadedModel:
    """Read and validate a checkpoint; build the prior on ``map_location`` in eval mode.

    Uses only ``torch.load(..., weights_only=True)``. Refuses (CheckpointError
    with ``path``): a missing or unreadable file, anything that is not such a
    dict (random bytes, pickles of arbitrary objects), missing or unknown keys,
    a newer format version, wrong types or values, and a state dict whose
    names, shapes or values (non-finite) do not fit the architecture.
    """
    p = Path(path)
    obj = _read_file(p)
    version = _check_format(obj, p)
    constraint, target, kinds, mol_config, model = _check_settings(obj, p)
    _check_state_dict(obj["state_dict"], model.state_dict(), p)
    model.load_state_dict(obj["state_dict"])
    model.to(map_location)
    model.eval()
    rule = None
    if "lam_noise" in obj:
        if not _is_plain(obj["lam_noise"]):
            raise CheckpointError("'lam_noise' must be a dict of plain values", path=p)
        rule = NoiseLambdaRule.from_record(obj["lam_noise"], path=p)
    return LoadedModel(
        model=model,
        mol_config=mol_config,
        constraint=constraint,
        lipschitz_target=target,
        kinds=tuple(kinds),
        metadata=obj["metadata"],
        certificate=obj["certificate"],
        format_version=version,
        path=p,
        sha256=sha256(p),
        lam_noise=rule,
    )


def _read_file(p: Path) -> Any:
    """The file's content through ``torch.load(..., weights_only=True)``, refusals in our words."""
    if not p.exists():
        raise CheckpointError("does not exist", path=p)
    if not p.is_file():
        raise CheckpointError("is not a file", path=p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # torch's notes on foreign pickle protocols
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or unsafe content
        raise CheckpointError(_load_failure(exc), path=p) from exc


def _check_format(obj: Any, p: Path) -> int:
    """The format version of a molrecon checkpoint dict with exactly the expected keys."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"not a molrecon checkpoint (top level is {type(obj).__name__})",
                              path=p)
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"not a molrecon checkpoint (format {obj.get('format')!r})", path=p)
    if "format_version" not in obj:
        raise CheckpointError("missing key 'format_version'", path=p)
    version = _integer(obj, "format_version", p)
    if version > FORMAT_VERSION:
        raise CheckpointError(f"written by a newer molrecon (format version {version}); "
                              f"this version reads format version {FORMAT_VERSION}", path=p)
    if version < 1:
        raise CheckpointError(f"invalid format version {version}", path=p)
    missing = sorted(_KEYS - set(obj))
    unknown = sorted(str(k) for k in set(obj) - _KEYS - _OPTIONAL_KEYS)
    if missing:
        raise CheckpointError(f"missing key(s) {missing}", path=p)
    if unknown:
        raise CheckpointError(f"unknown key(s) {unknown}", path=p)
    return version


def _check_settings(obj: dict[str, Any], p: Path,
                    ) -> tuple[str, float, list[str], MolConfig, MolCNN]:
    """Architecture, constraint, kinds and MOL settings, checked; the (untrained) prior built.

    Also checks that metadata and certificate are dicts of plain values.
    """
    arch = obj["architecture"]
    if not isinstance(arch, dict):
        raise CheckpointError("'architecture' must be a dict", path=p)
    try:
        config = CNNConfig.from_dict(arch)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"invalid architecture: {exc}", path=p) from exc
    constraint = obj["constraint"]
    if constraint not in CONSTRAINTS:
        raise CheckpointError(f"'constraint' must be one of {CONSTRAINTS}, got {constraint!r}",
                              path=p)
    target = _number(obj, "lipschitz_target", p)
    if target <= 0:
        raise CheckpointError(f"'lipschitz_target' must be positive, got {target}", path=p)
    grid = _integer(obj, "spectral_grid", p)
    kinds = obj["kinds"]
    allowed = KINDS_BY_PRIOR_DIMS[config.dims]
    if (not isinstance(kinds, list) or not kinds
            or any(not isinstance(k, str) or k not in allowed for k in kinds)):
        raise CheckpointError(f"'kinds' must be a non-empty list from {allowed} for a "
                              f"{config.dims}D model, got {kinds!r}", path=p)
    try:
        mol_config = MolConfig(alpha=_number(obj, "alpha", p), lam=_number(obj, "lam", p),
                               cg_iters=_integer(obj, "cg_iters", p))
        model = MolCNN(config, constraint, target, spectral_grid=grid)
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"invalid settings: {exc}", path=p) from exc
    for key in ("metadata", "certificate"):
        if not isinstance(obj[key], dict) or not _is_plain(obj[key]):
            raise CheckpointError(f"'{key}' must be a dict of plain values", path=p)
    return constraint, target, kinds, mol_config, model


def _check_state_dict(state: Any, expected: Mapping[str, torch.Tensor], p: Path) -> None:
    """Refuse a state dict whose names, tensor types, shapes or values do not fit the model."""
    if not isinstance(state, dict):
        raise CheckpointError("'state_dict' must be a dict", path=p)
    missing = sorted(set(expected) - set(state))
    unknown = sorted(str(k) for k in set(state) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"state_dict does not match the architecture "
                              f"(missing {missing}, unexpected {unknown})", path=p)
    for name, ref in expected.items():
        t = state[name]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CheckpointError(f"state_dict entry {name!r} is not a floating-point tensor",
                                  path=p)
        if tuple(t.shape) != tuple(ref.shape):
            raise CheckpointError(f"state_dict entry {name!r} has shape {tuple(t.shape)}, "
                                  f"the architecture needs {tuple(ref.shape)}", path=p)
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"state_dict entry {name!r} contains non-finite values", path=p)
