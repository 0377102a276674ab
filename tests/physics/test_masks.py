"""Sampling masks: acceleration, calibration block, density, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from molrecon.errors import ConfigError
from molrecon.physics import masks as M


def _acs_ok(line_mask: np.ndarray, acs: int) -> bool:
    return bool(line_mask[..., M.acs_slice(line_mask.shape[-1], acs)].all())


# --------------------------------------------------------------------------- 1D masks

@pytest.mark.parametrize("ny,r,acs", [(256, 4, 20), (64, 4, 8), (65, 3, 7), (128, 8, 8),
                                      (256, 2.5, 24), (37, 2, 0)])
def test_equispaced_exact_net_acceleration_and_acs(ny: int, r: float, acs: int) -> None:
    m = M.equispaced(ny, r, acs)
    assert m.shape == (ny,) and m.dtype == bool
    assert m.sum() == round(ny / r)
    assert abs(M.realised_acceleration(m) - r) / r < 0.03
    assert _acs_ok(m, acs)


def test_equispaced_is_a_regular_lattice_outside_the_acs() -> None:
    m = M.equispaced(256, 4, 0)
    gaps = np.diff(np.flatnonzero(m))
    assert set(gaps.tolist()) == {4}
    m = M.equispaced(256, 4, 20)            # spacing (256 - 20) / 44 = 5.36
    outside = np.flatnonzero(m)
    outside = outside[(outside < 118) | (outside >= 138)]
    gaps = np.diff(outside[outside < 118])
    assert set(gaps.tolist()) <= {5, 6}


def test_equispaced_offset_shifts_the_lattice() -> None:
    a = np.flatnonzero(M.equispaced(128, 4, 0, offset=0))
    b = np.flatnonzero(M.equispaced(128, 4, 0, offset=1))
    assert np.array_equal((a + 1) % 128, np.sort(b))


def test_full_sampling_at_r1_for_every_family() -> None:
    for fam, kind in [("equispaced", "2d"), ("random", "2d"), ("poisson", "3d"),
                      ("interleaved", "2dt")]:
        m = M.make_mask(kind, fam, (1, 1 if kind == "2d" else 8, 48), 1.0, 8, 0)
        assert m.all(), fam


@pytest.mark.parametrize("ny,r,acs", [(256, 4, 24), (96, 6, 8), (64, 2, 16)])
def test_random_vd_exact_count_acs_and_seed(ny: int, r: float, acs: int) -> None:
    a = M.random_vd(ny, r, acs, 7)
    assert a.sum() == round(ny / r)
    assert _acs_ok(a, acs)
    assert np.array_equal(a, M.random_vd(ny, r, acs, np.random.default_rng(7)))
    assert not np.array_equal(a, M.random_vd(ny, r, acs, 8))


def test_random_vd_is_denser_near_the_centre() -> None:
    ny, acs = 256, 16
    hits = np.zeros(ny)
    for seed in range(200):
        hits += M.random_vd(ny, 4, acs, seed)
    k = np.abs(np.arange(ny) - ny // 2)
    inner = hits[(k > acs) & (k < 64)].mean()
    outer = hits[k >= 96].mean()
    assert inner > 2.0 * outer


# --------------------------------------------------------------------------- Poisson disc

@pytest.mark.parametrize("ny,nz,r,acs", [(128, 32, 4, 16), (64, 16, 6, 8), (96, 64, 8, 12)])
def test_poisson_disc_hits_the_target_and_samples_the_acs_box(ny: int, nz: int, r: float,
                                                              acs: int) -> None:
    m = M.poisson_disc_2d(ny, nz, r, acs, 3)
    assert m.shape == (nz, ny)
    assert abs(M.realised_acceleration(m) - r) / r < 0.02
    assert m[M.acs_slice(nz, min(acs, nz)), M.acs_slice(ny, acs)].all()
    assert np.array_equal(m, M.poisson_disc_2d(ny, nz, r, acs, 3))
    assert not np.array_equal(m, M.poisson_disc_2d(ny, nz, r, acs, 4))


def test_poisson_disc_spreads_points_and_varies_density() -> None:
    ny, nz, acs = 96, 64, 12
    m = M.poisson_disc_2d(ny, nz, 8, acs, 0)
    box = np.zeros_like(m)
    box[M.acs_slice(nz, acs), M.acs_slice(ny, acs)] = True
    out = m & ~box
    # Poisson-disc: almost no two samples outside the ACS box touch each other.
    neighbour = np.zeros_like(m)
    neighbour[1:] |= out[:-1]
    neighbour[:-1] |= out[1:]
    neighbour[:, 1:] |= out[:, :-1]
    neighbour[:, :-1] |= out[:, 1:]
    assert (out & neighbour).sum() / out.sum() < 0.03
    ky = (np.arange(ny) - ny // 2) / (ny / 2)
    kz = (np.arange(nz) - nz // 2) / (nz / 2)
    rho = np.sqrt(ky[None, :] ** 2 + kz[:, None] ** 2)
    assert m[(rho < 0.5) & ~box].mean() > 1.8 * m[rho > 0.8].mean()


# --------------------------------------------------------------------------- interleaved

def test_interleaved_frames_fill_kspace_and_keep_the_rate() -> None:
    ny, r, acs = 128, 4, 8
    t = M.time_interleaved(ny, 12, r, acs)
    assert t.shape == (12, ny)
    assert all(frame.sum() == round(ny / r) for frame in t)
    assert _acs_ok(t, acs)
    assert t.any(axis=0).all()
    assert not np.array_equal(t[0], t[1])
    period = next(p for p in range(1, 13) if t[:p].any(axis=0).all())
    assert period <= 6          # spacing (128 - 8) / 24 = 5
    assert t[3:3 + period].any(axis=0).all()   # any `period` consecutive frames fill it


@settings(max_examples=60, deadline=None)
@given(ny=st.integers(16, 300), r=st.sampled_from([1.5, 2.0, 3.0, 4.0, 5.0, 8.0]),
       acs=st.integers(0, 24), seed=st.integers(0, 2**16))
@example(ny=80, r=5.0, acs=15, seed=0)         # a lattice period of 65 frames
def test_interleaved_union_covers_for_any_size(ny: int, r: float, acs: int, seed: int) -> None:
    if acs > round(ny / r):
        with pytest.raises(ConfigError):
            M.time_interleaved(ny, 4, r, acs)
        return
    if acs == round(ny / r):          # the ACS block alone is the whole budget
        t = M.time_interleaved(ny, 64, r, acs, rng=seed)
        assert t.sum(axis=1).tolist() == [acs] * 64
        return
    # The documented promise: any P consecutive frames (P the lattice period) fill k-space.
    # P can exceed 64 (ny = 80, R = 5, 15 ACS lines: one lattice line per frame, P = 65).
    outside = M._outside(ny, acs)
    period = M._lattice_period(outside.size, round(ny / r) - acs)
    nt = max(64, period)
    t = M.time_interleaved(ny, nt, r, acs, rng=seed)
    assert t[:period].any(axis=0).all()
    assert t.any(axis=0).all()
    assert all(frame.sum() == round(ny / r) for frame in t)
    assert M.equispaced(ny, r, acs).sum() == round(ny / r)


def test_interleaved_rejects_a_shift_that_cannot_fill() -> None:
    with pytest.raises(ConfigError, match="coprime"):
        M.time_interleaved(128, 8, 4, 8, shift=5)       # period 5


# --------------------------------------------------------------------------- make_mask

@pytest.mark.parametrize("kind,family,shape", [
    ("2d", "equispaced", (3, 1, 96)), ("2d", "random", (2, 1, 96)),
    ("3d", "poisson", (1, 24, 64)), ("3d", "equispaced", (1, 24, 64)),
    ("3d", "random", (1, 24, 64)), ("2dt", "interleaved", (1, 10, 80)),
    ("2dt", "equispaced", (1, 10, 80)), ("2dt", "random", (1, 10, 80)),
])
def test_make_mask_layout_rate_and_calibration(kind: str, family: str,
                                               shape: tuple[int, int, int]) -> None:
    b, d, y = shape
    m = M.make_mask(kind, family, shape, 4.0, 8, 11)
    assert m.shape == (b, 1, d, y, 1) and m.dtype == bool
    assert abs(M.realised_acceleration(m) - 4.0) / 4.0 < 0.05
    calib = M.calibration_region(kind, shape, 8)
    assert calib.shape == m.shape
    assert (m | ~calib).all()                       # the calibration region is sampled
    assert np.array_equal(m, M.make_mask(kind, family, shape, 4.0, 8, 11))
    # the same pattern for every slice of a multi-slice scan
    assert all(np.array_equal(m[0], m[i]) for i in range(b))


def test_make_mask_accepts_five_axis_shapes() -> None:
    a = M.make_mask("2dt", "interleaved", (1, 1, 6, 64, 1), 3.0, 8, 0)
    b = M.make_mask("2dt", "interleaved", (1, 6, 64), 3.0, 8, 0)
    c = M.make_mask("2dt", "interleaved", (1, 8, 6, 64, 128), 3.0, 8, 0)
    assert a.shape == (1, 1, 6, 64, 1)
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_random_2dt_draws_a_fresh_pattern_per_frame() -> None:
    m = M.make_mask("2dt", "random", (1, 6, 128), 4.0, 8, 0)[0, 0, :, :, 0]
    assert len({tuple(row) for row in m}) == 6


@pytest.mark.parametrize("args,match", [
    (("2d", "equispaced", (1, 1, 64), 0.5, 8), "acceleration"),
    (("2d", "equispaced", (1, 1, 64), 4.0, 80), "exceeds"),
    (("2d", "equispaced", (1, 1, 64), 8.0, 16), "ACS block alone"),
    (("2d", "equispaced", (1, 1, 64), 4.0, -1), "non-negative"),
    (("2d", "spiral", (1, 1, 64), 4.0, 8), "unknown mask family"),
    (("2d", "poisson", (1, 1, 64), 4.0, 8), "does not apply"),
    (("3d", "interleaved", (1, 8, 64), 4.0, 8), "does not apply"),
    (("2d", "equispaced", (1, 4, 64), 4.0, 8), "D = 1"),
    (("4d", "equispaced", (1, 1, 64), 4.0, 8), "unknown data kind"),
    (("2d", "equispaced", (1, 64), 4.0, 8), "shape"),
    (("2d", "equispaced", (1, 1, 64), float("nan"), 8), "acceleration"),
])
def test_make_mask_rejects_impossible_requests(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        M.make_mask(*args, 0)


def test_expand_mask_broadcasts_and_checks() -> None:
    line = M.equispaced(32, 2, 4)
    full = M.expand_mask(line, batch=3)
    assert full.shape == (3, 1, 1, 32, 1)
    assert np.array_equal(full[2, 0, 0, :, 0], line)
    assert M.expand_mask(np.ones((5, 32), bool)).shape == (1, 1, 5, 32, 1)
    with pytest.raises(ConfigError):
        M.expand_mask(np.ones((2, 2, 2), bool))
    with pytest.raises(ConfigError):
        M.make_mask("2d", "random", (1, 1, 64), 4.0, 8, rng="seed")  # type: ignore[arg-type]
