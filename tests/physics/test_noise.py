"""The noise level of normalised k-space and the λ rule built on it (``physics.noise``)."""

from __future__ import annotations

import math

import pytest
import torch

from molrecon.errors import CheckpointError
from molrecon.physics.noise import MIN_SAMPLES, NoiseLambdaRule, periphery_sigma


def _noise(shape: tuple[int, ...], sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) * sigma


def _with_signal(shape: tuple[int, ...], sigma: float) -> torch.Tensor:
    """Noise plus a strong, smooth k-space peak at the centre (an image's low frequencies)."""
    k = _noise(shape, sigma)
    ny, nx = shape[-2], shape[-1]
    y = torch.arange(ny).float() - ny / 2
    x = torch.arange(nx).float() - nx / 2
    peak = 50.0 * torch.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / 18.0)
    return k + peak.to(k.dtype)


def test_the_estimate_is_the_noise_level_under_a_strong_centre() -> None:
    shape = (2, 4, 1, 96, 80)
    k = _with_signal(shape, 0.02)
    k[1] *= 3.0                                  # the second item is three times as noisy
    mask = torch.ones(1, 1, 1, 96, 1)
    s = periphery_sigma(k, mask, "2d")
    assert s[0] == pytest.approx(0.02, rel=0.05)
    assert s[1] == pytest.approx(0.06, rel=0.05)


def test_the_estimate_is_homogeneous_and_ignores_unacquired_and_padded_samples() -> None:
    shape = (1, 3, 1, 64, 64)
    k = _noise(shape, 0.01, seed=1)
    mask = torch.zeros(1, 1, 1, 64, 1)
    mask[..., ::3, :] = 1                                    # every third line acquired
    k = k * mask
    k[..., :4] = 0                                           # a zero-padded readout edge
    s = periphery_sigma(k, mask, "2d")[0]
    assert s == pytest.approx(0.01, rel=0.08)
    assert periphery_sigma(7.0 * k, mask, "2d")[0] == pytest.approx(7.0 * s, rel=1e-6)


def test_too_few_periphery_samples_give_no_estimate() -> None:
    k = torch.zeros(1, 2, 1, 32, 32, dtype=torch.complex64)
    k[..., 12:20, 12:20] = 1.0                               # signal only at the centre
    assert periphery_sigma(k, torch.ones(1, 1, 1, 32, 1), "2d") == [None]
    small = _noise((1, 1, 1, 8, 8), 1.0)                     # 28 periphery samples < MIN_SAMPLES
    assert 28 < MIN_SAMPLES and periphery_sigma(small, torch.ones(1, 1, 1, 8, 1), "2d") == [None]


def test_time_is_not_a_spatial_axis_of_a_series() -> None:
    """In 2D+time the periphery is that of (Y, X) in every frame: ten times the noise inside
    the (Y, X) edges of the first and last frames counts for a volume (D is spatial there)
    but not for a series."""
    shape = (1, 2, 64, 24, 24)
    k = _noise(shape, 0.01, seed=2)
    k[:, :, :4, 1:-1, 1:-1] *= 10.0
    k[:, :, -4:, 1:-1, 1:-1] *= 10.0
    mask = torch.ones(1, 1, 64, 24, 1)
    assert periphery_sigma(k, mask, "2dt")[0] == pytest.approx(0.01, rel=0.08)
    assert periphery_sigma(k, mask, "3d")[0] > 0.02


def test_rule_factor() -> None:
    rule = NoiseLambdaRule(sigma_ref=0.005, exponent=0.6, min_factor=0.1, max_factor=4.0)
    assert rule.factor(0.005) == 1.0
    assert rule.factor(0.05) == pytest.approx(10 ** -0.6)
    assert rule.factor(0.0025) == pytest.approx(2 ** 0.6)
    assert rule.factor(10.0) == 0.1 and rule.factor(1e-9) == 4.0      # clipped
    assert rule.factor(None) == 1.0
    values = [rule.factor(s) for s in (0.001, 0.003, 0.01, 0.03, 0.1)]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("bad", [
    {"sigma_ref": 0.0, "exponent": 0.6, "min_factor": 0.1, "max_factor": 4.0},
    {"sigma_ref": 0.005, "exponent": -1.0, "min_factor": 0.1, "max_factor": 4.0},
    {"sigma_ref": 0.005, "exponent": 0.6, "min_factor": 2.0, "max_factor": 4.0},
    {"sigma_ref": 0.005, "exponent": 0.6, "min_factor": 0.1, "max_factor": 0.5},
    {"sigma_ref": math.nan, "exponent": 0.6, "min_factor": 0.1, "max_factor": 4.0},
])
def test_invalid_rules_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid λ noise rule"):
        NoiseLambdaRule(**bad)
    with pytest.raises(CheckpointError, match="lam_noise"):
        NoiseLambdaRule.from_record(bad, path="m.pt")


def test_rule_record_round_trip() -> None:
    rule = NoiseLambdaRule(0.005, 0.6, 0.1, 4.0, measured={"fit": {"exponent": 0.6}})
    assert NoiseLambdaRule.from_record(rule.record()) == rule
    with pytest.raises(CheckpointError, match="lam_noise"):
        NoiseLambdaRule.from_record({"sigma_ref": 0.005}, path="m.pt")
    with pytest.raises(CheckpointError, match="lam_noise"):
        NoiseLambdaRule.from_record([0.005], path="m.pt")


def test_effective_acceleration_per_item() -> None:
    from molrecon.physics.noise import effective_acceleration

    mask = torch.zeros(2, 1, 1, 60, 1)
    mask[0, ..., ::3, :] = 1                                   # 20 of 60 lines
    mask[1, ..., ::4, :] = 1
    mask[1, ..., 28:32, :] = 1                                 # 15 + 3 calibration lines
    assert effective_acceleration(mask, 2) == [3.0, pytest.approx(60 / 18)]
    series = torch.zeros(1, 1, 4, 60, 1)
    series[..., ::6, :] = 1                                    # 10 lines in each of 4 frames
    assert effective_acceleration(series, 3) == [6.0, 6.0, 6.0]


def test_rule_with_an_acceleration_term() -> None:
    rule = NoiseLambdaRule(sigma_ref=0.01, exponent=1.5, min_factor=0.05, max_factor=8.0,
                           accel_ref=4.0, accel_exponent=2.0)
    assert rule.factor(0.01, 4.0) == 1.0
    assert rule.factor(0.01, 8.0) == pytest.approx(4.0)
    assert rule.factor(0.02, 8.0) == pytest.approx(4.0 * 2 ** -1.5)
    assert rule.factor(0.01) == 1.0 and rule.factor(None, 8.0) == 1.0
    assert rule.factor(0.01, 100.0) == 8.0
    assert NoiseLambdaRule.from_record(rule.record()) == rule
    old = {"sigma_ref": 0.01, "exponent": 1.5, "min_factor": 0.05, "max_factor": 8.0}
    assert NoiseLambdaRule.from_record(old).factor(0.01, 8.0) == 1.0    # no R term recorded


def test_the_acceleration_is_held_within_the_measured_range() -> None:
    rule = NoiseLambdaRule(sigma_ref=0.01, exponent=1.5, min_factor=0.01, max_factor=8.0,
                           accel_ref=4.0, accel_exponent=1.0, accel_min=4.0, accel_max=8.0)
    assert rule.factor(0.01, 2.0) == rule.factor(0.01, 4.0) == 1.0
    assert rule.factor(0.01, 16.0) == rule.factor(0.01, 8.0) == pytest.approx(2.0)
    assert NoiseLambdaRule.from_record(rule.record()) == rule
    with pytest.raises(ValueError, match="invalid"):
        NoiseLambdaRule(0.01, 1.5, 0.01, 8.0, accel_min=8.0, accel_max=4.0)
