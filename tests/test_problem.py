"""The one way a scan becomes a MOL problem (``problem.py``): scale, maps, operator, start."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from molrecon.io.detect import read_raw
from molrecon.physics.espirit import EspiritConfig
from molrecon.problem import from_scan, prepare, with_sense_start
from molrecon.recon import ReconConfig, reconstruct
from molrecon.sim import SimulationConfig, simulate_to_file


def _scan(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "s.h5"
    simulate_to_file(SimulationConfig(kind="2d", matrix=(48, 48), coils=4, acceleration=2.0,
                                      seed=3, slice_position=0.45), path)
    return read_raw(path)


def test_from_scan_is_prepare_of_the_same_items(tmp_path: Path) -> None:
    scan = _scan(tmp_path)
    prob = from_scan(scan, slice(0, 1), "cpu", source="s.h5")
    ref = prepare(torch.from_numpy(scan.kspace[:1]), torch.from_numpy(scan.mask[:1]),
                  torch.from_numpy(scan.calib[:1]), scan.kind)
    assert torch.equal(prob.kspace, ref.kspace) and torch.equal(prob.scale, ref.scale)
    assert torch.equal(prob.op.maps, ref.op.maps)
    assert prob.items == (0,) and prob.source == "s.h5" and prob.start is None
    # the data are normalised: bright tissue near 1 in the zero-filled image
    assert 0.5 < float(prob.aty.abs().quantile(0.99)) < 5.0
    started = with_sense_start(prob.op, prob.kspace)
    assert started.start is not None and started.start.shape == prob.aty.shape


def test_espirit_crop_zero_keeps_the_maps_everywhere(tmp_path: Path) -> None:
    """The default crop (BART's 0.8) zeroes the maps outside the head; --espirit-crop 0
    keeps them over the whole field of view (for an object that fills it)."""
    scan = _scan(tmp_path)
    cropped = from_scan(scan, slice(0, 1), "cpu")
    full = from_scan(scan, slice(0, 1), "cpu", espirit=EspiritConfig(crop=0.0))
    inside_cropped = float(cropped.op.support().mean())
    inside_full = float(full.op.support().mean())
    assert inside_full == 1.0 and inside_cropped < 0.9
    default = reconstruct(scan, ReconConfig(method="sense"))
    same = reconstruct(scan, ReconConfig(method="sense", espirit_crop=0.8))
    assert np.array_equal(default.image.data, same.image.data)
    uncropped = reconstruct(scan, ReconConfig(method="sense", espirit_crop=0.0))
    outside = cropped.op.support()[0, 0].numpy() == 0                     # (Y, X)
    assert np.all(default.image.data[0, 0][outside] == 0)
    assert np.abs(uncropped.image.data[0, 0][outside]).max() > 0
