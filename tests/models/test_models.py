"""The prior network H and the local Lipschitz estimators."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as nnf

from molrecon.errors import ConfigError
from molrecon.models import (
    CNNConfig,
    MolCNN,
    certified_bound,
    local_lipschitz_power,
    local_lipschitz_ratio,
)
from molrecon.models.lipschitz import (jacobian_norm, lanczos_jacobian_norm, monotonicity_estimate,
                                      tracked_jacobian_norm)


def test_reference_architecture_parameter_count() -> None:
    model = MolCNN(CNNConfig(dims=2, layers=5, channels=64, kernel=3), "sn")
    assert sum(p.numel() for p in model.parameters()) == 113_154
    assert CNNConfig().parameter_count() == 113_154
    model3 = MolCNN(CNNConfig(dims=3), "lr")
    # 2·64·27+64 + 3·(64·64·27+64) + 64·2·27+2
    assert sum(p.numel() for p in model3.parameters()) == 338_946
    assert [tuple(c.weight.shape) for c in model.convs] == [
        (64, 2, 3, 3), (64, 64, 3, 3), (64, 64, 3, 3), (64, 64, 3, 3), (2, 64, 3, 3)]


@pytest.mark.parametrize("kwargs", [
    {"dims": 1}, {"dims": 4}, {"dims": 2.0}, {"layers": 0}, {"channels": 0},
    {"kernel": 2}, {"kernel": 0}, {"bias": 1}, {"skip": True}, {"skip": -1.0},
    {"skip": float("inf")},
])
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CNNConfig(**kwargs)  # type: ignore[arg-type]


def test_model_option_validation() -> None:
    with pytest.raises(ConfigError):
        MolCNN(CNNConfig(), "spectral")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        MolCNN(CNNConfig(), "sn", 0.0)
    with pytest.raises(ConfigError):
        MolCNN(CNNConfig(), "sn", spectral_grid=2)
    with pytest.raises(ValueError):
        MolCNN(CNNConfig(layers=2, channels=4))(torch.randn(1, 8, 8))


def _manual_forward(model: MolCNN, x: torch.Tensor) -> torch.Tensor:
    """The network written out: two real channels, conv + ReLU, no skip, zero padding."""
    b, d, y, xx = x.shape
    h = torch.stack([x.real, x.imag], dim=2).reshape(b * d, 2, y, xx)
    weights = model.effective_weights()
    for i, (conv, w) in enumerate(zip(model.convs, weights)):
        h = nnf.conv2d(h, w, conv.bias, padding=1)
        if i < len(weights) - 1:
            h = nnf.relu(h)
    h = h.reshape(b, d, 2, y, xx)
    return torch.complex(h[:, :, 0], h[:, :, 1])


@pytest.mark.parametrize("constraint", ["sn", "lr"])
def test_2d_forward_matches_explicit_network(constraint: str) -> None:
    torch.manual_seed(0)
    model = MolCNN(CNNConfig(layers=3, channels=5), constraint).double()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 11, 9, dtype=torch.complex128)
    out = model(x)
    assert out.shape == x.shape and out.dtype == torch.complex128
    torch.testing.assert_close(out, _manual_forward(model, x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [2, 3])
def test_identity_skip_adds_the_input_and_one_to_the_bound(dims: int) -> None:
    torch.manual_seed(3)
    plain = MolCNN(CNNConfig(dims=dims, layers=3, channels=5), "lr").double()
    skip = MolCNN(CNNConfig(dims=dims, layers=3, channels=5, skip=1.0), "lr").double()
    skip.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 9, 7, dtype=torch.complex128)
    torch.testing.assert_close(skip(x), x + plain(x), rtol=1e-12, atol=1e-12)
    assert certified_bound(skip) == pytest.approx(1.0 + certified_bound(plain), rel=1e-12)
    # scaling the output scales the whole of H, the identity path included
    before = skip(x)
    skip.scale_output(0.9)
    assert skip.config.skip == pytest.approx(0.9)
    torch.testing.assert_close(skip(x), 0.9 * before, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError):
        skip.scale_output(0.0)
    # a zero last layer is the identity: Lip = 1 exactly, on the monotone boundary
    with torch.no_grad():
        skip.convs[-1].weight.zero_()
        skip.convs[-1].bias.zero_()
    torch.testing.assert_close(skip(x), 0.9 * x)
    assert jacobian_norm(skip, x[:1], max_iters=3, rtol=None).value == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="identity skip"):
        MolCNN(CNNConfig(skip=1.0), "sn")
    # checkpoints from before the option (no "skip" key) read as plain networks
    keys = CNNConfig().to_dict()
    del keys["skip"]
    assert CNNConfig.from_dict(keys) == CNNConfig()
    assert CNNConfig.from_dict({**keys, "skip": True}).skip == 1.0    # the first ones: a flag
    assert CNNConfig.from_dict({**keys, "skip": 0.5}).skip == 0.5


@pytest.mark.parametrize("dims,constraint,skip", [(2, "sn", 0.0), (3, "lr", 0.9)])
def test_flip_ensemble_averages_the_network_over_flips(dims: int, constraint: str,
                                                       skip: float) -> None:
    torch.manual_seed(4)
    one = MolCNN(CNNConfig(dims=dims, layers=3, channels=5, skip=skip), constraint, 0.95)
    one = one.double()  # type: ignore[arg-type]
    x = torch.randn(2, 3, 9, 7, dtype=torch.complex128)
    for g, flips in ((2, [(), (-1,)]), (4, [(), (-1,), (-2,), (-2, -1)])):
        ens = MolCNN(CNNConfig(dims=dims, layers=3, channels=5, skip=skip, ensemble=g),
                     constraint, 0.95).double()  # type: ignore[arg-type]
        ens.load_state_dict(one.state_dict())
        want = sum(one(x.flip(a)).flip(a) if a else one(x) for a in flips) / g
        torch.testing.assert_close(ens(x), want, rtol=1e-12, atol=1e-12)
        for a in flips[1:]:                       # equivariant to its flips, unlike the network
            torch.testing.assert_close(ens(x.flip(a)), ens(x).flip(a), rtol=1e-12, atol=1e-12)
        # the same global bound, and never more expansive than the network at its flips
        assert certified_bound(ens) == pytest.approx(certified_bound(one), rel=1e-12)
        def top(model: MolCNN, p: torch.Tensor) -> float:
            return float(lanczos_jacobian_norm(model, p, iters=60)[0].max().detach())
        at = [top(one, x[:1].flip(a) if a else x[:1]) for a in flips]
        assert top(ens, x[:1]) <= max(at) * (1 + 1e-4)
    assert not torch.allclose(one(x.flip(-1)), one(x).flip(-1))  # the check above could fail
    for bad in (3, 8, 0, True):
        with pytest.raises(ConfigError, match="ensemble"):
            CNNConfig(ensemble=bad)
    keys = CNNConfig(ensemble=4).to_dict()
    assert CNNConfig.from_dict(keys).ensemble == 4
    del keys["ensemble"]                       # checkpoints from before the option: off
    assert CNNConfig.from_dict(keys).ensemble == 1


def test_2d_model_treats_depth_as_batch_and_3d_model_mixes_it() -> None:
    torch.manual_seed(1)
    x = torch.randn(1, 4, 10, 8, dtype=torch.complex64)
    x2 = x.clone()
    x2[:, 0] += 1.0
    m2 = MolCNN(CNNConfig(dims=2, layers=3, channels=4), "lr")
    m3 = MolCNN(CNNConfig(dims=3, layers=2, channels=4), "lr")
    with torch.no_grad():
        d2 = (m2(x) - m2(x2)).abs().amax(dim=(2, 3))[0]     # (D,)
        d3 = (m3(x) - m3(x2)).abs().amax(dim=(2, 3))[0]
        sliced = torch.cat([m2(x[:, i:i + 1]) for i in range(4)], dim=1)
    assert d2[0] > 0 and torch.all(d2[1:] == 0)
    # Two 3×3×3 layers see two slices away: slice 2 feels slice 0, slice 3 does not.
    assert d3[1] > 0 and d3[2] > 0 and d3[3] == 0
    torch.testing.assert_close(m2(x).detach(), sliced, rtol=1e-5, atol=1e-6)


def test_dtype_follows_input_and_weights() -> None:
    model = MolCNN(CNNConfig(layers=2, channels=3), "sn")
    x = torch.randn(1, 1, 6, 6, dtype=torch.complex128)
    assert model(x).dtype == torch.complex128     # computed in float32, returned as input dtype
    assert model(x.to(torch.complex64)).dtype == torch.complex64


def test_sn_gradients_reach_every_weight_and_bias() -> None:
    torch.manual_seed(2)
    model = MolCNN(CNNConfig(layers=3, channels=4), "sn", 0.9)
    with torch.no_grad():
        for c in model.convs:
            c.weight.mul_(10)
    x = torch.randn(2, 1, 8, 7, dtype=torch.complex64)
    model(x).abs().sum().backward()
    for p in model.parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0


def _linear_model() -> MolCNN:
    """One conv layer without bias: H is linear, its Lipschitz constant is a matrix norm."""
    torch.manual_seed(3)
    return MolCNN(CNNConfig(layers=1, bias=False), "lr").double()


def _dense_matrix(model: MolCNN, shape: tuple[int, int, int]) -> torch.Tensor:
    """The real 2n × 2n matrix of the linear map H on complex images of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    cols = []
    with torch.no_grad():
        for part in (1.0, 1j):
            for i in range(n):
                e = torch.zeros(n, dtype=torch.complex128)
                e[i] = part
                out = model(e.reshape(1, *shape))
                cols.append(torch.view_as_real(out).reshape(-1))
    return torch.stack(cols, dim=1)


def test_power_iteration_finds_the_jacobian_norm_of_a_linear_prior() -> None:
    model = _linear_model()
    shape = (1, 7, 6)
    exact = float(torch.linalg.matrix_norm(_dense_matrix(model, shape), ord=2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *shape, dtype=torch.complex128, generator=g)
    est = local_lipschitz_power(model, x, iters=200, generator=g)
    assert est <= exact * (1 + 1e-9)
    assert est >= exact * (1 - 1e-3)
    assert est <= certified_bound(model)


def test_ratio_search_on_a_linear_prior() -> None:
    model = _linear_model()
    shape = (1, 7, 6)
    exact = float(torch.linalg.matrix_norm(_dense_matrix(model, shape), ord=2))
    g = torch.Generator().manual_seed(1)
    u = torch.randn(2, *shape, dtype=torch.complex128, generator=g)
    start, _ = local_lipschitz_ratio(model, u, steps=0, generator=torch.Generator().manual_seed(1))
    value, v = local_lipschitz_ratio(model, u, steps=30, generator=torch.Generator().manual_seed(1))
    assert v.shape == u.shape and not v.requires_grad
    assert float(value.detach()) <= exact * (1 + 1e-9)
    # Ascent improves on the random start and approaches the norm.
    assert float(value.detach()) > float(start.detach())
    assert float(value.detach()) >= 0.9 * exact


def test_ratio_search_is_differentiable_and_reproducible() -> None:
    torch.manual_seed(4)
    model = MolCNN(CNNConfig(layers=3, channels=6), "lr")
    u = torch.randn(2, 1, 9, 8, dtype=torch.complex64)
    v1, p1 = local_lipschitz_ratio(model, u, generator=torch.Generator().manual_seed(7))
    v2, p2 = local_lipschitz_ratio(model, u, generator=torch.Generator().manual_seed(7))
    assert torch.equal(p1, p2) and float(v1.detach()) == float(v2.detach())
    v1.backward()
    # Every kernel gets a gradient (the last bias cancels in H(u) − H(v)).
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in model.convs)
    # Local estimate at u never exceeds the certified global bound of the raw network.
    assert float(v1.detach()) <= certified_bound(model)
    assert local_lipschitz_power(model, u, generator=torch.Generator().manual_seed(7)) <= \
        certified_bound(model)


def test_converged_power_iteration_stops_itself_and_reads_the_linear_norm() -> None:
    model = _linear_model()
    shape = (1, 7, 6)
    exact = float(torch.linalg.matrix_norm(_dense_matrix(model, shape), ord=2))
    x = torch.randn(2, *shape, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    est = jacobian_norm(model, x, max_iters=2000, rtol=1e-9,
                        generator=torch.Generator().manual_seed(0))
    assert est.converged and 10 < est.iterations < 2000
    assert exact * (1 - 1e-4) <= est.value <= exact * (1 + 1e-9)
    # A cap it cannot meet: not converged, and a lower reading than the converged one.
    capped = jacobian_norm(model, x, max_iters=2, rtol=1e-9,
                           generator=torch.Generator().manual_seed(0))
    assert not capped.converged and capped.iterations == 2 and capped.value < est.value
    # The fixed-count form runs exactly its iterations.
    assert local_lipschitz_power(model, x, iters=2, generator=torch.Generator().manual_seed(0)) \
        == capped.value


def test_tracked_jacobian_norm_converges_over_calls_and_its_gradient_lowers_it() -> None:
    torch.manual_seed(5)
    model = MolCNN(CNNConfig(layers=3, channels=6), "lr").double()
    x = torch.randn(1, 1, 12, 11, dtype=torch.complex128)
    target = jacobian_norm(model, x, max_iters=3000, rtol=1e-10,
                           generator=torch.Generator().manual_seed(1)).value
    v = None
    first = None
    for _ in range(150):                 # 150 visits of 3 iterations, as a training run does
        value, v = tracked_jacobian_norm(model, x, v, iters=3,
                                         generator=torch.Generator().manual_seed(2))
        first = float(value.detach()) if first is None else first
    assert first < float(value.detach())
    assert float(value.detach()) == pytest.approx(target, rel=1e-3)
    # The estimate carries gradients to H's kernels, and a small step against them lowers it.
    model.zero_grad()
    value.backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in model.convs)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad)
    after = jacobian_norm(model, x, max_iters=3000, rtol=1e-10,
                          generator=torch.Generator().manual_seed(1)).value
    assert after < target


def test_lanczos_reads_the_top_singular_values_in_far_fewer_products_than_power() -> None:
    torch.manual_seed(6)
    model = MolCNN(CNNConfig(layers=3, channels=6), "lr").double()
    shape = (1, 9, 8)
    x = torch.randn(1, *shape, dtype=torch.complex128)
    xr = torch.view_as_real(x).clone()
    jac = torch.autograd.functional.jacobian(
        lambda z: torch.view_as_real(model(torch.view_as_complex(z))).reshape(-1), xr)
    exact = torch.linalg.svdvals(jac.reshape(xr.numel(), xr.numel()))
    values, vectors = lanczos_jacobian_norm(model, x, iters=40, top=3,
                                            generator=torch.Generator().manual_seed(0))
    assert values.shape == (3,) and vectors.shape == (3, *shape, 2)
    assert torch.allclose(values.detach(), exact[:3], rtol=1e-6)
    assert torch.allclose(torch.linalg.vector_norm(vectors.reshape(3, -1), dim=1),
                          torch.ones(3, dtype=vectors.dtype))
    # The same number of products of a power iteration reads lower.
    power = jacobian_norm(model, x, max_iters=40, rtol=None,
                          generator=torch.Generator().manual_seed(0)).value
    assert power <= float(values[0].detach()) * (1 + 1e-9)
    # Differentiable: a small step against the gradient of the top value lowers it.
    values[0].backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in model.convs)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad)
    after, _ = lanczos_jacobian_norm(model, x, iters=40, generator=torch.Generator().manual_seed(0))
    assert float(after[0].detach()) < float(exact[0])
    with pytest.raises(ValueError):
        lanczos_jacobian_norm(model, torch.cat([x, x]), iters=5)


def test_monotonicity_estimate_reads_the_numerical_range_not_the_norm() -> None:
    """H(x) = c·x with c = 1.5·e^{iπ/3}: on the real view J is 1.5 times a rotation by 60°,
    so ‖J‖ = 1.5 (not a contraction) while ½(J + Jᵀ) = 1.5·cos 60° · I = 0.75 I: F = I − H is
    0.25-monotone. H(x) = −1.3·x: ‖J‖ = 1.3 but μ = −1.3."""
    x = torch.randn(1, 1, 6, 5, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)
    c = 1.5 * complex(0.5, 3 ** 0.5 / 2)
    found = monotonicity_estimate(lambda z: c * z, x, iters=5, generator=gen)
    assert float(found.top[0].detach()) == pytest.approx(0.75, rel=1e-9)
    assert found.smallest == pytest.approx(0.75, rel=1e-9)
    norm, _ = lanczos_jacobian_norm(lambda z: c * z, x, iters=5, generator=gen)
    assert float(norm[0].detach()) == pytest.approx(1.5, rel=1e-9)
    neg = monotonicity_estimate(lambda z: -1.3 * z, x, iters=5, generator=gen)
    assert float(neg.top[0].detach()) == pytest.approx(-1.3, rel=1e-9)
    with pytest.raises(ValueError):
        monotonicity_estimate(lambda z: z, torch.cat([x, x]), iters=5)


def test_monotonicity_estimate_matches_the_dense_symmetric_part() -> None:
    """At a point of a small ReLU network: the top and bottom of the spectrum of ½(J + Jᵀ)
    from the dense Jacobian, read by Lanczos to 1e-6; the top is at most ‖J‖; it carries
    gradients to H's parameters, and a step against them lowers it."""
    torch.manual_seed(7)
    model = MolCNN(CNNConfig(layers=3, channels=6, skip=1.0), "lr").double()
    shape = (1, 8, 7)
    x = torch.randn(1, *shape, dtype=torch.complex128)
    xr = torch.view_as_real(x).clone()
    jac = torch.autograd.functional.jacobian(
        lambda z: torch.view_as_real(model(torch.view_as_complex(z))).reshape(-1), xr)
    jac = jac.reshape(xr.numel(), xr.numel())
    sym = torch.linalg.eigvalsh(0.5 * (jac + jac.T))
    found = monotonicity_estimate(model, x, iters=xr.numel(), top=2,
                                  generator=torch.Generator().manual_seed(0))
    assert found.top.shape == (2,) and found.vectors.shape == (2, *shape, 2)
    assert torch.allclose(found.top.detach(), sym.flip(0)[:2], rtol=1e-6)
    assert found.smallest == pytest.approx(float(sym[0]), rel=1e-6)
    assert float(found.top[0].detach()) <= float(torch.linalg.matrix_norm(jac, 2)) + 1e-12
    found.top[0].backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in model.convs)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-3 * p.grad)
    after = monotonicity_estimate(model, x, iters=xr.numel(),
                                  generator=torch.Generator().manual_seed(0))
    assert float(after.top[0].detach()) < float(sym[-1])
