"""Tests of bpfl.flow: planar steps, their log-dets and inverses, the prompt flow and its KL (paper Eq. 6-7).

Every check compares against an independent computation: autograd Jacobians and slogdet, a numerical
integral of the density, a histogram of samples, the closed-form Gaussian KL.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bpfl.flow import (
    RELEASED_LOGDET_EPS,
    FlowSample,
    GaussianEncoder,
    PlanarFlow,
    PlanarFlowStack,
    PromptFlow,
    constrain_u,
    flow_kl,
    planar_inverse_step,
    planar_step,
)

F64 = torch.float64

pytest_plugins = ["pytester"]  # the gpu-marker test runs a small pytest session


def _stack(dim: int, k: int, amortized: bool, constrained: bool, scale: float, seed: int = 0) -> PlanarFlowStack:
    """A stack with O(scale) parameters (free or amortised), in float64."""
    torch.manual_seed(seed)
    st = PlanarFlowStack(dim, k, amortized=amortized, constrained=constrained, init="normal",
                         init_std=scale / math.sqrt(dim)).to(F64)
    if amortized:
        # per-item u, w with entries of std ≈ scale/sqrt(C) (like the free init) for a context ~ N(0, I)
        with torch.no_grad():
            for lin in (st.amor_u, st.amor_w):
                lin.weight.normal_(0.0, scale / math.sqrt(2.0 * dim * st.cond_dim))
                lin.bias.normal_(0.0, scale / math.sqrt(2.0 * dim))
            st.amor_b.weight.normal_(0.0, 0.3 / math.sqrt(st.cond_dim))
            st.amor_b.bias.normal_(0.0, 0.3)
    else:
        with torch.no_grad():
            st.b.normal_(0.0, 0.5)
    return st


def _min_one_plus_wu(st: PlanarFlowStack, ctx: torch.Tensor | None) -> float:
    u, w, _ = st.step_parameters(ctx)
    return float((1.0 + (u * w).sum(-1)).abs().min().detach())


# ---------------------------------------------------------------------------------------- log|det| (Eq. 6)
@pytest.mark.parametrize("dim", [2, 64])
@pytest.mark.parametrize("k", [1, 10])
@pytest.mark.parametrize("amortized", [False, True])
@pytest.mark.parametrize("constrained", [True, False])
def test_logdet_matches_autograd_jacobian(dim, k, amortized, constrained):
    # constrained: large raw parameters (the û reparameterisation must handle them);
    # unconstrained (released): moderate ones, so that the raw map is invertible and |1 + uᵀψ| is not tiny.
    st = _stack(dim, k, amortized, constrained, scale=2.0 if constrained else 0.3, seed=dim + k)
    ctx = torch.randn(1, dim, dtype=F64) if amortized else None
    for _trial in range(3):
        z = torch.randn(dim, dtype=F64) * 1.5
        jac = torch.autograd.functional.jacobian(lambda x: st(x[None], ctx)[0][0], z)
        sign, logabsdet = torch.linalg.slogdet(jac)
        _, log_det = st(z[None], ctx)
        if constrained:
            assert sign > 0  # orientation preserving: every factor 1 + ûᵀψ > 0
            torch.testing.assert_close(log_det[0], logabsdet, atol=1e-9, rtol=1e-9)
        else:
            # the released log(|1 + uᵀψ| + 1e-5) overestimates each term by at most 1e-5/|1 + uᵀψ|
            # (log(|a| + ε) − log|a| ≤ ε/|a|, and |1 + (1 − h²)·uᵀw| ≥ min(1, |1 + uᵀw|) ≥ 0.5 here)
            assert _min_one_plus_wu(st, ctx) > 0.5
            assert -1e-10 <= float((log_det[0] - logabsdet).detach()) <= k * RELEASED_LOGDET_EPS / 0.5


def test_unconstrained_logdet_is_the_released_formula():
    # 2-D by hand: z = (1, 0), u = (0.5, 0), w = (1, 1), b = 0 → a = 1, h = tanh 1, uᵀψ = 0.5(1 − h²)
    z = torch.tensor([1.0, 0.0], dtype=F64)
    u = torch.tensor([0.5, 0.0], dtype=F64)
    w = torch.tensor([1.0, 1.0], dtype=F64)
    z_new, ld = planar_step(z, u, w, 0.0, constrained=False)
    h = math.tanh(1.0)
    torch.testing.assert_close(z_new, torch.tensor([1.0 + 0.5 * h, 0.0], dtype=F64))
    assert ld.item() == pytest.approx(math.log(abs(1.0 + 0.5 * (1.0 - h * h)) + 1e-5), abs=1e-14)


def test_batched_amortised_matches_per_item():
    # z0 [R, N, C] with a context [N, cond] must equal running each (r, n) on its own
    st = _stack(8, 5, amortized=True, constrained=True, scale=1.0)
    ctx = torch.randn(4, 8, dtype=F64)
    z0 = torch.randn(3, 4, 8, dtype=F64)
    zk, ld = st(z0, ctx)
    assert zk.shape == (3, 4, 8) and ld.shape == (3, 4)
    for r in range(3):
        for n in range(4):
            zi, li = st(z0[r, n][None], ctx[n][None])
            torch.testing.assert_close(zi[0], zk[r, n])
            torch.testing.assert_close(li[0], ld[r, n])


# ------------------------------------------------------------------------------- û and invertibility
@pytest.mark.parametrize("dtype,ts", [(torch.float32, [0.0, 1.0, 5.0, 10.0]),
                                      (torch.float64, [0.0, 1.0, 10.0, 30.0])])
def test_constrained_u_satisfies_wu_gt_minus_one(dtype, ts):
    torch.manual_seed(0)
    eps = torch.finfo(dtype).eps
    # −1 + softplus(x) is representably > −1 while softplus(x) ≈ eˣ > eps/2
    x_safe = math.log(eps)
    for wscale in (1e-3, 1.0, 1e3):
        w = torch.randn(16, 32, dtype=dtype) * wscale
        wn = w / (w * w).sum(-1, keepdim=True)
        # adversarial: u = −t·w/‖w‖² (wᵀu = −t), then random large u of two magnitudes
        us = [-t * wn for t in ts] + [torch.randn(16, 32, dtype=dtype) * 100.0,
                                      torch.randn(16, 32, dtype=dtype) * 100.0 / wscale]
        for u in us:
            wu = (w * u).sum(-1)
            u_hat = constrain_u(u, w)
            wu_hat = (w * u_hat).sum(-1)
            assert torch.isfinite(u_hat).all()
            safe = wu > x_safe
            assert (wu_hat[safe] > -1.0).all()
            # everywhere, wᵀû = m(wᵀu) = −1 + softplus(wᵀu) up to the rounding of a dot product
            # of size ‖w‖‖û‖
            m = -1.0 + F.softplus(wu)
            tol = 64 * eps * (w.norm(dim=-1) * u_hat.norm(dim=-1) + 1.0)
            assert ((wu_hat - m).abs() <= tol).all()
            # and the step's log-det (evaluated from softplus(wᵀu), not from the rounded wᵀû) is finite
            _, ld = planar_step(torch.randn(16, 32, dtype=dtype), u, w, torch.zeros(16, dtype=dtype))
            assert torch.isfinite(ld).all()


def test_constrained_logdet_finite_where_float_rounds_wu_hat_to_minus_one():
    # wᵀu = −100: −1 + softplus(−100) is exactly −1 in float64, yet the log-det is finite (−100 at h = 0)
    w = torch.tensor([1.0, 0.0], dtype=F64)
    u = torch.tensor([-100.0, 0.0], dtype=F64)
    _, ld = planar_step(torch.zeros(2, dtype=F64), u, w, 0.0)
    assert ld.item() == pytest.approx(-100.0, rel=1e-12)


def test_zero_w_is_a_translation():
    u = torch.tensor([0.3, -0.7], dtype=F64)
    w = torch.zeros(2, dtype=F64)
    z = torch.randn(5, 2, dtype=F64)
    z_new, ld = planar_step(z, u, w, 0.4)
    torch.testing.assert_close(z_new, z + u * math.tanh(0.4))
    torch.testing.assert_close(ld, torch.zeros(5, dtype=F64))


@pytest.mark.parametrize("dim", [2, 64])
def test_single_step_inverse_adversarial(dim):
    torch.manual_seed(dim)
    w = torch.randn(dim, dtype=F64)
    for u in (-10.0 * w / (w * w).sum(), torch.randn(dim, dtype=F64) * 10.0):
        flow = PlanarFlow(dim).to(F64)
        with torch.no_grad():
            flow.u.copy_(u)
            flow.w.copy_(w)
            flow.b.fill_(0.3)
        z = torch.randn(200, dim, dtype=F64) * 2.0
        z_new, _ = flow(z)
        torch.testing.assert_close(flow.inverse(z_new), z, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dim", [2, 64])
@pytest.mark.parametrize("amortized", [False, True])
def test_stack_inverse_recovers_z(dim, amortized):
    st = _stack(dim, 10, amortized, constrained=True, scale=3.0, seed=7)
    if not amortized:
        with torch.no_grad():
            st.u.mul_(10.0)  # large raw u: only the û constraint keeps the map invertible
    ctx = torch.randn(6, dim, dtype=F64) if amortized else None
    z0 = torch.randn(4, 6, dim, dtype=F64) * 2.0
    zk, _ = st(z0, ctx)
    torch.testing.assert_close(st.inverse(zk, ctx), z0, atol=1e-6, rtol=0)


def test_inverse_jacobian_is_inverse_of_forward_jacobian():
    st = _stack(3, 4, amortized=False, constrained=True, scale=2.0)
    z = torch.randn(3, dtype=F64)
    zk = st(z[None])[0][0].detach()
    j_fwd = torch.autograd.functional.jacobian(lambda x: st(x[None])[0][0], z)
    j_inv = torch.autograd.functional.jacobian(lambda y: st.inverse(y[None])[0], zk)
    torch.testing.assert_close(j_inv @ j_fwd, torch.eye(3, dtype=F64), atol=1e-8, rtol=0)
    # parameter gradients of the inverse: d z0 / d b through the implicit function, vs finite differences
    b0 = st.b.detach().clone()
    grad = torch.autograd.grad(st.inverse(zk[None])[0].sum(), st.b)[0]
    fd = torch.zeros_like(b0)
    for i in range(b0.numel()):
        with torch.no_grad():
            st.b.copy_(b0)
            st.b[i] += 1e-6
            plus = st.inverse(zk[None])[0].sum()
            st.b[i] -= 2e-6
            minus = st.inverse(zk[None])[0].sum()
        fd[i] = (plus - minus) / 2e-6
    with torch.no_grad():
        st.b.copy_(b0)
    torch.testing.assert_close(grad, fd, atol=1e-6, rtol=1e-5)


def test_unconstrained_inverse_refuses_non_invertible_step():
    w = torch.tensor([1.0, 0.0], dtype=F64)
    u = torch.tensor([-2.0, 0.0], dtype=F64)  # wᵀu = −2: the raw map folds
    with pytest.raises(ValueError, match="not invertible"):
        planar_inverse_step(torch.zeros(1, 2, dtype=F64), u, w, 0.0, constrained=False)


# ------------------------------------------------------------------------------------- 2-D density
def _flow_2d() -> tuple[PromptFlow, torch.Tensor]:
    # a smooth but clearly non-Gaussian density (total variation ≈ 0.18 from its moment-matched Gaussian)
    torch.manual_seed(3)
    pf = PromptFlow(2, hidden_dim=8, n_flows=10, init="normal", init_std=0.5).to(F64)
    with torch.no_grad():
        pf.flow.b.normal_(0.0, 1.0)
        pf.encoder.mean_net[4].bias.copy_(torch.tensor([0.5, -0.3]))
        pf.encoder.log_var_net[4].bias.copy_(torch.tensor([0.0, -0.5]))
    return pf, torch.zeros(1, 2, dtype=F64)


def test_2d_density_integrates_to_one_and_matches_histogram():
    pf, xi = _flow_2d()
    g = torch.Generator().manual_seed(0)
    n_samples = 100_000
    with torch.no_grad():
        pts = pf(xi, n_samples, generator=g).zk[:, 0]
        lo, hi = pts.min(0).values - 0.5, pts.max(0).values + 0.5
        n_cells, n_bins = 300, 12  # fine grid for the integral; 12×12 coarse bins (25×25 cells each)
        xs = torch.linspace(float(lo[0]), float(hi[0]), n_cells + 1, dtype=F64)
        ys = torch.linspace(float(lo[1]), float(hi[1]), n_cells + 1, dtype=F64)
        xc, yc = 0.5 * (xs[1:] + xs[:-1]), 0.5 * (ys[1:] + ys[:-1])
        grid = torch.stack(torch.meshgrid(xc, yc, indexing="ij"), -1).reshape(-1, 2)
        dens = pf.log_prob(grid, xi).exp().reshape(n_cells, n_cells)
        cell = (xs[1] - xs[0]) * (ys[1] - ys[0])
        mass = dens * cell
    assert abs(float(mass.sum()) - 1.0) < 0.02

    # histogram of the samples against the density's mass per bin: Pearson χ² within 5 sd of its mean
    expected = mass.reshape(n_bins, n_cells // n_bins, n_bins, n_cells // n_bins).sum((1, 3)).flatten()
    edges_x, edges_y = xs[:: n_cells // n_bins], ys[:: n_cells // n_bins]
    ix = torch.bucketize(pts[:, 0].contiguous(), edges_x[1:-1].contiguous())
    iy = torch.bucketize(pts[:, 1].contiguous(), edges_y[1:-1].contiguous())
    observed = torch.bincount(ix * n_bins + iy, minlength=n_bins * n_bins).to(F64)
    keep = expected * n_samples > 20
    e = expected[keep] * n_samples
    chi2 = float(((observed[keep] - e) ** 2 / e).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 5.0 * math.sqrt(2.0 * dof), (chi2, dof)

    # the flow is not Gaussian (else the checks above would be weak): total variation from the
    # moment-matched Gaussian
    mean, cov = pts.mean(0), torch.cov(pts.T)
    gauss = torch.distributions.MultivariateNormal(mean, cov).log_prob(grid).exp() * cell
    assert 0.5 * float((gauss - mass.flatten()).abs().sum()) > 0.1


def test_log_prob_at_samples_equals_log_qK():
    pf, xi = _flow_2d()
    with torch.no_grad():
        s = pf(xi, 500, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(pf.log_prob(s.zk[:, 0], xi), PromptFlow.log_qK(s)[:, 0], atol=1e-9, rtol=0)


# -------------------------------------------------------------------------------------- KL (Eq. 7)
def _closed_form_kl(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    return 0.5 * (log_var.exp() + mu ** 2 - 1.0 - log_var).sum(-1)


def _check_mc_kl(pf: PromptFlow, xi: torch.Tensor, shift: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        s = pf(xi, 20_000, generator=torch.Generator().manual_seed(11))
        per_draw = (PromptFlow.log_q0(s.z0, s.mu, s.log_var) - s.log_det
                    - (-0.5 * (math.log(2 * math.pi) + s.zk ** 2).sum(-1)))
        mc = flow_kl(s, reduction="none")
        se = per_draw.std(0) / math.sqrt(per_draw.shape[0])
        exact = _closed_form_kl(s.mu + (0.0 if shift is None else shift), s.log_var)
    assert mc.shape == exact.shape == (xi.shape[0],)
    assert (exact > 0.5).all()  # a non-trivial q0
    assert ((mc - exact).abs() < 4.0 * se).all(), (mc, exact, se)


def _spread_encoder(pf: PromptFlow) -> None:
    with torch.no_grad():
        for net in (pf.encoder.mean_net, pf.encoder.log_var_net):
            net[0].weight.normal_(0.0, 0.5)
            net[4].weight.normal_(0.0, 0.5)


def test_mc_kl_matches_closed_form_when_u_is_zero():
    torch.manual_seed(0)
    xi = torch.randn(3, 4, dtype=F64)
    # released (unconstrained) flow with u = 0: identity map; the 1e-5 log-det bias is ≪ the MC error
    pf = PromptFlow(4, hidden_dim=8, n_flows=10, constrained=False, init="randn").to(F64)
    _spread_encoder(pf)
    with torch.no_grad():
        pf.flow.u.zero_()
    _check_mc_kl(pf, xi)
    # amortised flow whose u-head outputs 0
    pf = PromptFlow(4, hidden_dim=8, n_flows=10, amortized=True, constrained=False).to(F64)
    _spread_encoder(pf)
    with torch.no_grad():
        pf.flow.amor_u.weight.zero_()
        pf.flow.amor_u.bias.zero_()
    _check_mc_kl(pf, xi)


def test_mc_kl_matches_closed_form_for_a_constrained_translation():
    # constrained flow with w = 0: z_K = z0 + Σ u_k tanh(b_k), log|det| = 0 → KL(N(μ + shift, σ²) ‖ N(0, I))
    torch.manual_seed(0)
    xi = torch.randn(3, 4, dtype=F64)
    pf = PromptFlow(4, hidden_dim=8, n_flows=3, init="randn").to(F64)
    _spread_encoder(pf)
    with torch.no_grad():
        pf.flow.w.zero_()
    shift = (pf.flow.u * torch.tanh(pf.flow.b)[:, None]).sum(0).detach()
    _check_mc_kl(pf, xi, shift)


def _mc_kl_and_standard_error(pf: PromptFlow, xi: torch.Tensor, n: int) -> tuple[float, float, FlowSample]:
    """flow_kl (Eq. 7) from n draws, and the standard error of that mean from the spread of the draws."""
    with torch.no_grad():
        s = pf(xi, n, generator=torch.Generator().manual_seed(5))
        mc = float(flow_kl(s, reduction="none")[0])
        # the per-draw terms, written out here from their definitions (not through flow.py's log densities)
        per_draw = (torch.distributions.Normal(s.mu, torch.exp(0.5 * s.log_var)).log_prob(s.z0).sum(-1)
                    - s.log_det - torch.distributions.Normal(0.0, 1.0).log_prob(s.zk).sum(-1))[:, 0]
    return mc, float(per_draw.std() / math.sqrt(n)), s


def test_mc_kl_matches_grid_integral_over_z0_with_autograd_jacobian():
    """Eq. 7 for a 2-D flow with log-dets far from 0, against KL(q_K ‖ N(0, I)) by quadrature.

    Change of variables on a fine grid of z0 (q0 is Gaussian, so ±9σ holds all its mass):
    KL = ∫ q0(z0) [log q0(z0) − log|det J_T(z0)| − log p(T(z0))] dz0, with J_T the autograd Jacobian of the
    whole K-step map T (independent of the flow's own log-det code) and T(z0) = z_K.
    """
    pf, xi = _flow_2d()
    n_draws = 200_000
    mc, se, s = _mc_kl_and_standard_error(pf, xi, n_draws)
    mu, sd = s.mu[0].detach(), torch.exp(0.5 * s.log_var[0]).detach()
    n_cells = 600
    edges = [torch.linspace(float(mu[i] - 9 * sd[i]), float(mu[i] + 9 * sd[i]), n_cells + 1, dtype=F64)
             for i in range(2)]
    centres = [0.5 * (e[1:] + e[:-1]) for e in edges]
    cell = float((edges[0][1] - edges[0][0]) * (edges[1][1] - edges[1][0]))
    z0 = torch.stack(torch.meshgrid(*centres, indexing="ij"), -1).reshape(-1, 2).requires_grad_(True)
    zk = pf.flow(z0)[0]
    # each grid point moves independently: row i of every point's Jacobian is the gradient of Σ_points z_K[:, i]
    jac = torch.stack([torch.autograd.grad(zk[:, i].sum(), z0, retain_graph=True)[0] for i in range(2)], -2)
    sign, log_abs_det = torch.linalg.slogdet(jac.detach())
    assert (sign > 0).all()
    with torch.no_grad():
        zk = zk.detach()
        log_q0 = torch.distributions.Normal(mu, sd).log_prob(z0.detach()).sum(-1)
        q0 = log_q0.exp()
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(zk).sum(-1)
        assert abs(float(q0.sum()) * cell - 1.0) < 1e-9
        kl_grid = float((q0 * (log_q0 - log_abs_det - log_p)).sum()) * cell
        # the same integral with the log-det's sign flipped: the test must tell the two apart by far
        kl_flipped = float((q0 * (log_q0 + log_abs_det - log_p)).sum()) * cell
        mean_log_det = float((q0 * log_abs_det).sum()) * cell
    assert abs(mean_log_det) > 1.0  # the flow really changes volume (the old tests had log-dets of 0)
    assert abs(kl_grid - kl_flipped) > 100 * se
    assert abs(mc - kl_grid) < 4 * se, (mc, kl_grid, se)


def test_mc_kl_matches_grid_integral_over_zk_of_log_prob():
    """Eq. 7 against ∫ q_K log(q_K / p) dz_K on a fine grid of z_K, q_K from the numerical inverse (log_prob)."""
    pf, xi = _flow_2d()
    n_draws = 200_000
    mc, se, s = _mc_kl_and_standard_error(pf, xi, n_draws)
    with torch.no_grad():
        pts = s.zk[:, 0]
        lo, hi = pts.min(0).values - 1.0, pts.max(0).values + 1.0
        n_cells = 300
        xs = torch.linspace(float(lo[0]), float(hi[0]), n_cells + 1, dtype=F64)
        ys = torch.linspace(float(lo[1]), float(hi[1]), n_cells + 1, dtype=F64)
        grid = torch.stack(torch.meshgrid(0.5 * (xs[1:] + xs[:-1]), 0.5 * (ys[1:] + ys[:-1]), indexing="ij"),
                           -1).reshape(-1, 2)
        cell = float((xs[1] - xs[0]) * (ys[1] - ys[0]))
        log_q = pf.log_prob(grid, xi)
        q = log_q.exp()
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(grid).sum(-1)
        mass = float(q.sum()) * cell
        kl_grid = float((q * (log_q - log_p)).sum()) * cell
    assert abs(mass - 1.0) < 1e-4  # a density (a wrong log-det sign would not integrate to 1)
    assert abs(mc - kl_grid) < 4 * se + 1e-4, (mc, kl_grid, se)


def test_flow_kl_reductions():
    pf = PromptFlow(4, n_flows=2)
    s = pf(torch.randn(5, 4), 3)
    per = flow_kl(s, "none")
    assert per.shape == (5,)
    torch.testing.assert_close(flow_kl(s), per.mean())
    torch.testing.assert_close(flow_kl(s, "sum"), per.sum())
    with pytest.raises(ValueError):
        flow_kl(s, "max")


# ----------------------------------------------------------------------------- sampling and modules
def test_reparameterised_sampling_is_seeded_and_differentiable():
    torch.manual_seed(0)
    for amortized in (False, True):
        pf = PromptFlow(6, in_dim=5, hidden_dim=7, n_flows=3, amortized=amortized)
        xi = torch.nn.Parameter(torch.randn(2, 5))
        s1 = pf(xi, 4, generator=torch.Generator().manual_seed(42))
        s2 = pf(xi, 4, generator=torch.Generator().manual_seed(42))
        s3 = pf(xi, 4, generator=torch.Generator().manual_seed(43))
        assert isinstance(s1, FlowSample)
        assert s1.z0.shape == s1.zk.shape == (4, 2, 6)
        assert s1.mu.shape == s1.log_var.shape == (2, 6) and s1.log_det.shape == (4, 2)
        assert torch.equal(s1.z0, s2.z0) and torch.equal(s1.zk, s2.zk)
        assert not torch.equal(s1.z0, s3.z0)
        # z0 = μ + σ·ε with ε the generator's standard normals
        eps = torch.randn((4, 2, 6), generator=torch.Generator().manual_seed(42))
        torch.testing.assert_close(s1.z0, s1.mu + torch.exp(0.5 * s1.log_var) * eps)

        (flow_kl(s1) + s1.zk.pow(2).sum()).backward()
        named = dict(pf.named_parameters())
        for name in ("encoder.mean_net.0.weight", "encoder.mean_net.4.bias",
                     "encoder.log_var_net.0.weight", "encoder.log_var_net.4.bias"):
            assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
        flow_params = (["flow.amor_u.weight", "flow.amor_w.weight", "flow.amor_b.weight"] if amortized
                       else ["flow.u", "flow.w", "flow.b"])
        for name in flow_params:
            assert named[name].grad is not None and named[name].grad.abs().sum() > 0, name
        assert xi.grad is not None and xi.grad.abs().sum() > 0


def test_gaussian_encoder_structure_and_init():
    enc = GaussianEncoder(768, 512, 768)
    for net in (enc.mean_net, enc.log_var_net):
        assert [type(m).__name__ for m in net] == ["Linear", "Softplus", "Linear", "Softplus", "Linear"]
        assert [tuple(net[i].weight.shape) for i in (0, 2, 4)] == [(512, 768), (512, 512), (768, 512)]
        for i in (0, 2, 4):
            assert float(net[i].bias.detach().abs().max()) == 0.0
            assert abs(float(net[i].weight.detach().std()) - 0.02) < 0.002
    mu, log_var = enc(torch.randn(8, 768))
    assert mu.shape == log_var.shape == (8, 768)
    # near μ = 0, σ = 1 at init (the Softplus means shift the outputs by O(0.3), they do not vanish)
    assert mu.abs().mean() < 0.5 and log_var.abs().mean() < 0.5
    assert mu.abs().max() < 2.0 and log_var.abs().max() < 2.0
    # released head: log σ² = 0.5·h
    enc_rel = GaussianEncoder(4, 3, 2, log_var_scale=0.5)
    xi = torch.randn(3, 4)
    torch.testing.assert_close(enc_rel(xi)[1], 0.5 * enc_rel.log_var_net(xi))


def test_shared_encoder_and_flow_between_normal_and_abnormal():
    normal = PromptFlow(6, n_flows=3)
    paper_abn = PromptFlow(6, n_flows=3, encoder=normal.encoder, flow=normal.flow)
    released_abn = PromptFlow(6, n_flows=3, encoder=normal.encoder)
    assert paper_abn.encoder is normal.encoder and paper_abn.flow is normal.flow
    assert released_abn.encoder is normal.encoder and released_abn.flow is not normal.flow
    xi_n = torch.nn.Parameter(torch.randn(1, 6))
    xi_a = torch.nn.Parameter(torch.randn(1, 6))
    sn, sa = normal(xi_n, 5), paper_abn(xi_a, 5)
    assert sn.zk.shape == (5, 1, 6)  # one IAD sample set shared by the batch
    (flow_kl(sn) + flow_kl(sa)).backward()
    assert xi_n.grad.abs().sum() > 0 and xi_a.grad.abs().sum() > 0
    # the same free vector through the shared modules gives the same distribution
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        a = normal(xi_n, 2, generator=g).zk
        g = torch.Generator().manual_seed(0)
        b = paper_abn(xi_n, 2, generator=g).zk
    assert torch.equal(a, b)


def test_init_options():
    st = PlanarFlowStack(64, 10)
    assert st.u.shape == st.w.shape == (10, 64) and st.b.shape == (10,)
    assert float(st.b.detach().abs().max()) == 0.0
    assert abs(float(st.w.detach().norm(dim=-1).mean()) - 1.0) < 0.2  # ‖w‖ ≈ 1 by default
    rel = PlanarFlowStack(64, 10, constrained=False, init="randn")
    assert abs(float(rel.u.detach().std()) - 1.0) < 0.1 and float(rel.b.detach().abs().max()) > 0
    am = PlanarFlowStack(8, 10, amortized=True, cond_dim=5)
    assert am.amor_u.weight.shape == (80, 5) and am.amor_b.weight.shape == (10, 5)
    assert float(am.amor_u.bias.detach().abs().max()) == 0.0
    with pytest.raises(ValueError):
        PlanarFlowStack(4, 2, init="uniform")
    with pytest.raises(ValueError):
        am(torch.randn(2, 8))  # amortised needs a context


@pytest.mark.gpu  # skipped without CUDA by tests/conftest.py
def test_cuda_matches_cpu_with_a_cpu_generator():
    torch.manual_seed(0)
    for amortized in (False, True):
        pf = PromptFlow(8, in_dim=6, hidden_dim=12, n_flows=10, amortized=amortized).to(F64)
        xi = torch.randn(3, 6, dtype=F64)
        s_cpu = pf(xi, 5, generator=torch.Generator().manual_seed(1))
        pf_gpu = pf.to("cuda")
        s_gpu = pf_gpu(xi.cuda(), 5, generator=torch.Generator().manual_seed(1))  # CPU generator, CUDA model
        assert s_gpu.zk.device.type == "cuda"
        torch.testing.assert_close(s_gpu.zk.cpu(), s_cpu.zk)
        torch.testing.assert_close(s_gpu.log_det.cpu(), s_cpu.log_det)
        torch.testing.assert_close(flow_kl(s_gpu).cpu(), flow_kl(s_cpu))
        ctx = xi.cuda() if amortized else None
        torch.testing.assert_close(pf_gpu.flow.inverse(s_gpu.zk, ctx), s_gpu.z0, atol=1e-8, rtol=0)
        torch.testing.assert_close(pf_gpu.log_prob(s_gpu.zk[:, :1], xi[:1].cuda()), PromptFlow.log_qK(s_gpu)[:, :1])
        pf.to("cpu")


# ------------------------------------------------------------------------ the gpu marker (tests/conftest.py)
@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_marked_tests_run_with_cuda_and_are_skipped_without(pytester, monkeypatch, cuda):
    """A small session with the project's own conftest and pytest options: with CUDA (faked here) a
    ``@pytest.mark.gpu`` test runs by default; without it the test is skipped with the reason; ``slow`` stays
    deselected either way."""
    tests_dir = Path(__file__).resolve().parent
    pytester.makeconftest((tests_dir / "conftest.py").read_text())
    pytester.makepyprojecttoml((tests_dir.parent / "pyproject.toml").read_text())
    pytester.makepyfile(test_markers="""
        import pytest

        @pytest.mark.gpu
        def test_on_the_gpu():
            pass

        def test_anywhere():
            pass

        @pytest.mark.slow
        def test_slow():
            pass
    """)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    result = pytester.runpytest_inprocess("-rs", "-p", "no:cacheprovider")
    if cuda:
        result.assert_outcomes(passed=2, deselected=1)
    else:
        result.assert_outcomes(passed=1, skipped=1, deselected=1)
        result.stdout.fnmatch_lines(["*SKIPPED*test_markers.py*needs a CUDA device*is_available() is False*"])
