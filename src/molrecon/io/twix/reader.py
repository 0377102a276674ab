"""Reading a twix file's image scan: :func:`read_twix`.

The stages, in order: the file's measurements (:mod:`.layout`), the image
scan's protocol (:mod:`.protocol`), its MDHs as ISMRMRD acquisition headers
(:mod:`.heads`), then the ISMRMRD planner and assembler
(:mod:`molrecon.io.ismrmrd`) with the readouts' samples read through twixtools
in blocks of about 64 MiB.

Noise and prewhitening: as for ISMRMRD (:func:`~molrecon.io.kspace.noise_covariance`
over all noise samples, scaled by the noise measurement's dwell time over the
image scan's; ``L⁻¹`` of its Cholesky factor applied to every line). Noise
readouts with another channel count than the image scan are not used (warning).

Memory: the k-space and the noise samples are checked against the memory
available before they are allocated (``check_memory``, ``MAX_KSPACE_ELEMENTS``);
twixtools' index of the file (a small Python object per readout) is not.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import InputDataError
from ..ismrmrd import (
    ACQ_IS_NOISE_MEASUREMENT,
    SKIPPED_FLAGS,
    assemble_kspace,
    assemble_scan,
    flag_bit,
    plan_acquisitions,
)
from ..kspace import (
    BLOCK_BYTES,
    Notes,
    check_memory,
    first_line,
    noise_covariance,
    noise_whitener,
    raw_file_size,
)
from ..types import RawScan
from .heads import flag_mask, ismrmrd_heads, mdh_table, refuse_readouts
from .layout import Layout, call_twixtools, check_complete, file_layout, is_twix
from .protocol import (
    Protocol,
    empty_fields,
    header_fields,
    noise_dwell_us,
    parse_protocol,
    refuse_protocol,
)

__all__ = ["read_twix"]


# --------------------------------------------------------------------------- reading
def read_twix(path: str | os.PathLike[str], *, prewhiten: bool = True) -> RawScan:
    """Read the image scan of a Siemens twix file into a :class:`RawScan` (module docstring).

    The last measurement is the image scan; ``prewhiten`` multiplies its lines by
    the inverse Cholesky factor of the coil noise covariance when the file has
    noise-adjustment readouts (``RawScan.whitened``). Unsupported or damaged
    files raise :class:`InputDataError` naming the file, with one line saying why.
    """
    p = Path(path)
    size = raw_file_size(p)
    if not is_twix(p):
        raise InputDataError("is not a Siemens twix file (neither a VD/VE multi-raid header "
                             "nor a VB protocol header at its start)", path=p)
    layout = file_layout(p, size)
    count = len(layout.measurements)
    image = count - 1
    scans = [image - 1, image] if count > 1 else [image]
    notes = Notes(p)

    headers = call_twixtools(p, scans, data=False)
    prot = parse_protocol(headers[-1].get("hdr"), p)
    refuse_protocol(prot, p)

    image_mdbs = check_complete(call_twixtools(p, [image], data=True)[0]["mdb"],
                                *layout.measurements[image], image, count, p)
    mdh = mdh_table(image_mdbs, layout.version)
    refuse_readouts(mdh, p)
    heads = ismrmrd_heads(mdh, prot.dwell_us)
    not_imaging = flag_bit(ACQ_IS_NOISE_MEASUREMENT)
    for flag in SKIPPED_FLAGS:
        not_imaging |= flag_bit(flag)
    lines = np.flatnonzero((heads["flags"] & not_imaging) == 0)  # what the planner may place
    if lines.size == 0:  # the planner says what the measurement holds instead
        lines = np.arange(mdh.size)
    fields = header_fields(prot, mdh, lines) if mdh.size else empty_fields(prot)
    plan = plan_acquisitions(heads, fields, p, notes)

    noise_cov, n_noise = _noise_scan(p, layout, image_mdbs, flag_mask(mdh, "NOISEADJSCAN"),
                                     headers, prot, plan.shape[1], notes)
    whitener = noise_whitener(noise_cov, notes) if noise_cov is not None and prewhiten else None
    kspace = assemble_kspace(
        _blocks(image_mdbs, plan.rows, plan.shape[1], plan.n_samples, p), plan, whitener, p)

    return assemble_scan(plan, fields, kspace, notes, fmt="twix", path=p, noise_cov=noise_cov,
                         whitened=whitener is not None, n_noise=n_noise)


def _noise_scan(path: Path, layout: Layout, image_mdbs: list[Any], noise_flag: np.ndarray,
                headers: list[dict[str, Any]], prot: Protocol, n_coils: int, notes: Notes,
                ) -> tuple[np.ndarray | None, int]:
    """Noise covariance (at the image scan's dwell time) and the number of noise readouts used.

    From the image measurement's NOISEADJSCAN readouts; without any, from those of
    the measurement before it, at that measurement's own dwell time.
    """
    rows = np.flatnonzero(noise_flag)
    mdbs, dwell_noise = image_mdbs, prot.dwell_us
    where = "the image measurement"
    if rows.size == 0 and len(headers) > 1:
        k = len(layout.measurements) - 2
        before = check_complete(call_twixtools(path, [k], data=True)[0]["mdb"],
                                *layout.measurements[k], k, len(layout.measurements), path)
        mdh = mdh_table(before, layout.version)
        rows = np.flatnonzero(flag_mask(mdh, "NOISEADJSCAN"))
        mdbs = before
        dwell_noise = noise_dwell_us(headers[0].get("hdr"))
        where = f"measurement {k + 1} (the noise scan)"
    if rows.size == 0:
        return None, 0
    samples = _noise(mdbs, rows, path)
    if samples is None or samples.shape[0] != n_coils:
        channels = "differing" if samples is None else str(samples.shape[0])
        notes.add(f"the noise readouts of {where} have {channels} channels, the image scan "
                  f"{n_coils}; the noise was not used and the data were not prewhitened")
        return None, 0
    cov = noise_covariance(samples, dwell_noise, prot.dwell_us, path=path)
    if cov is None:
        notes.add("the noise readouts hold no samples; the data were not prewhitened")
        return None, 0
    return cov, int(rows.size)


# --------------------------------------------------------------------------- samples
def _blocks(mdbs: list[Any], rows: np.ndarray, n_coils: int, n_samples: int,
            path: Path) -> Iterator[tuple[slice, np.ndarray]]:
    """Samples of ``mdbs[rows]`` as ``(n, C, Ns)`` complex64 blocks of about 64 MiB."""
    per_block = max(1, BLOCK_BYTES // (8 * n_coils * n_samples))
    for start in range(0, rows.size, per_block):
        stop = min(start + per_block, rows.size)
        out = np.empty((stop - start, n_coils, n_samples), dtype=np.complex64)
        for i, row in enumerate(rows[start:stop]):
            out[i] = _samples(mdbs[int(row)], n_coils, n_samples, path)
        yield slice(start, stop), out


def _samples(mdb: Any, n_coils: int, n_samples: int, path: Path) -> np.ndarray:
    """One readout's samples ``(C, Ns)`` via twixtools, its failures as InputDataError."""
    try:
        data = mdb.data
    except Exception as exc:  # noqa: BLE001 - a short read or a vanished file
        raise InputDataError(f"the samples of a readout cannot be read ({type(exc).__name__}: "
                             f"{first_line(exc)}); the file is damaged or truncated",
                             path=path) from None
    if not isinstance(data, np.ndarray) or data.shape != (n_coils, n_samples):
        shape = getattr(data, "shape", None)
        raise InputDataError(f"a readout holds samples of shape {shape}, its header says "
                             f"{n_coils} channels × {n_samples} samples; the file is damaged",
                             path=path)
    return data


def _noise(mdbs: list[Any], rows: np.ndarray, path: Path) -> np.ndarray | None:
    """The samples ``(C, N)`` of the noise readouts ``rows``; None if the channel counts differ."""
    channels = {int(mdbs[int(r)].mdh.UsedChannels) for r in rows}
    if len(channels) != 1:
        return None
    n_coils = channels.pop()
    total = sum(int(mdbs[int(r)].mdh.SamplesInScan) for r in rows)
    check_memory(n_coils * total * 16 * 2, f"noise samples ({n_coils}×{total})", path)
    parts = [_samples(mdbs[int(r)], n_coils, int(mdbs[int(r)].mdh.SamplesInScan), path)
             for r in rows]
    return np.concatenate(parts, axis=1) if parts else None
