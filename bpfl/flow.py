"""Prompt flow module: planar normalising flows for the prompt distributions (paper §3.3, Eq. 6-7).

The paper turns the learnable prompt vectors into random vectors Φ and approximates their posterior
with a normalising flow (Rezende & Mohamed, 2015): a simple Gaussian q0 = N(μ(ξ), diag σ²(ξ)) is pushed
through K planar maps

    h(z) = z + u · tanh(wᵀz + b),          u, w ∈ R^C, b ∈ R,

and the density of the result follows from the change of variables (Eq. 6)

    log q_K(z_K) = log q0(z0) − Σ_k log |1 + u_kᵀ ψ_k(z_{k−1})|,   ψ(z) = (1 − tanh²(wᵀz + b)) · w.

(The paper writes ψ(Φ_k); the k-th log-det is evaluated at the step's input z_{k−1}, as in Rezende &
Mohamed and in the released code.)

Two distributions are built this way (§3.3):

* the **image-specific distribution** (ISD) for the context vectors, with ξ = the global image feature;
* the **image-agnostic distribution** (IAD) for the normal and abnormal state vectors, with ξ = a free
  learnable vector per state (ξ_n, ξ_a) and the *same network weights* for both states.

What the kit does by default (the paper, plus Rezende & Mohamed's invertibility condition), and where the
authors' released code differs (each a constructor switch here, and a field of
:class:`bpfl.config.BayesPFLConfig`):

* **invertibility** — default: û = u + [m(wᵀu) − wᵀu]·w/‖w‖² with m(x) = −1 + softplus(x) (Rezende &
  Mohamed's condition, as in pyro/normflows); released: raw u (``constrained=False``).
* **log|det| of a step** — default: the exact log|1 + ûᵀψ|, evaluated as log(h² + (1 − h²)·softplus(wᵀu));
  released: log(|1 + uᵀψ| + 1e-5).
* **flow parameters u, w, b** — default: free parameters ``[K, C], [K, C], [K]`` (the paper's wording);
  released ISD: per-image Linear(x_cls) (``amortized=True``).
* **IAD normal vs abnormal** — default: share encoder *and* flow, differ only in ξ (pass ``encoder=`` and
  ``flow=``); released: share the encoder only (pass ``encoder=``).
* **log σ² head** — default: the MLP output is log σ²; released: the output is h with log σ² = 0.5·h
  (``log_var_scale=0.5``).

Everything is batched and device/dtype agnostic: ``z`` may have any leading shape ``[..., C]``; the
prompt-flow convention is ``[R, N, C]`` (R Monte-Carlo samples of N items).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RELEASED_LOGDET_EPS",
    "constrain_u",
    "planar_step",
    "planar_inverse_step",
    "gaussian_log_prob",
    "standard_normal_log_prob",
    "PlanarFlow",
    "PlanarFlowStack",
    "GaussianEncoder",
    "FlowSample",
    "PromptFlow",
    "flow_log_density",
    "flow_kl",
]

#: The released code adds this inside the log of |det| (flows.py): log(|1 + uᵀψ| + 1e-5).
RELEASED_LOGDET_EPS = 1e-5

_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------------------------
# one planar step
# ------------------------------------------------------------------------------------------------------
def _constrain(u: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """û and 1 + wᵀû (= softplus(wᵀu), computed without the cancellation of −1 + softplus + 1)."""
    wtu = (w * u).sum(-1, keepdim=True)
    sp = F.softplus(wtu)
    sq = (w * w).sum(-1, keepdim=True)
    # w = 0: the correction is 0·w/tiny = 0 (û = u, no NaN), and 1 + wᵀû = 1 (the step is a translation).
    u_hat = u + ((sp - 1.0) - wtu) * w / sq.clamp_min(torch.finfo(w.dtype).tiny)
    one_plus = torch.where(sq > 0, sp, torch.ones_like(sp))
    return u_hat, one_plus.squeeze(-1)


def constrain_u(u: Tensor, w: Tensor) -> Tensor:
    """Invertibility reparameterisation of a planar step (Rezende & Mohamed 2015, appendix A.1).

    û = u + [m(wᵀu) − wᵀu] · w / ‖w‖²,   m(x) = −1 + softplus(x),

    so that wᵀû = m(wᵀu) > −1, which makes z ↦ z + û·tanh(wᵀz + b) invertible (its derivative along w,
    1 + (1 − tanh²)·wᵀû, is then strictly positive). ``u`` and ``w`` are ``[..., C]`` and broadcast
    against each other. ``w = 0`` returns ``u`` unchanged (the step is then a translation).

    Floating point: wᵀû = −1 + softplus(wᵀu) rounds to exactly −1 once wᵀu < ≈ −17 (float32) or
    ≈ −37 (float64). :func:`planar_step` therefore evaluates the log-det from softplus(wᵀu) directly,
    which stays exact (and finite) far beyond that.
    """
    return _constrain(u, w)[0]


def planar_step(z: Tensor, u: Tensor, w: Tensor, b: Tensor | float, constrained: bool = True
                ) -> tuple[Tensor, Tensor]:
    """One planar map z' = z + u·tanh(wᵀz + b) and its log|det ∂z'/∂z| (paper Eq. 6, one term of the sum).

    Args:
        z: ``[..., C]``.
        u, w: broadcastable to ``[..., C]`` (e.g. ``[C]`` free parameters, ``[N, C]`` per item).
        b: broadcastable to ``z.shape[:-1]`` (e.g. a scalar, or ``[N]``).
        constrained: ``True`` (default, Rezende & Mohamed): use û = :func:`constrain_u`\\ (u, w) and the
            exact log|det| = log|1 + ûᵀψ(z)| with ψ(z) = (1 − tanh²(wᵀz + b))·w. Because
            1 + ûᵀψ = h² + (1 − h²)·softplus(wᵀu) with h = tanh(wᵀz + b), it is evaluated in that form,
            which is strictly positive and free of cancellation.
            ``False`` (released code, ``models/flows.py``): u is used as it is, invertibility is not
            guaranteed, and the log-det is log(|1 + uᵀψ(z)| + 1e-5) exactly as the released code
            computes it (the 1e-5 only guards log 0 and biases each term by ≈ 1e-5/|1 + uᵀψ|).

    Returns:
        ``(z_new [..., C], log_abs_det [...])``; the log-det is evaluated at the step's input ``z``.
    """
    if constrained:
        u_eff, one_plus_wu = _constrain(u, w)
    else:
        u_eff = u
    h = torch.tanh((z * w).sum(-1) + b)
    z_new = z + u_eff * h.unsqueeze(-1)
    one_minus_h2 = 1.0 - h * h
    if constrained:
        log_det = torch.log(h * h + one_minus_h2 * one_plus_wu)
    else:
        log_det = torch.log(torch.abs(1.0 + one_minus_h2 * (w * u).sum(-1)) + RELEASED_LOGDET_EPS)
    return z_new, log_det


def _solve_monotone(y: Tensor, c: Tensor, b: Tensor, max_iter: int) -> Tensor:
    """Root α of f(α) = α + c·tanh(α + b) − y for c ≥ −1 (f non-decreasing), elementwise, no grad.

    Safeguarded Newton: keep a bracket [lo, hi] with f(lo) ≤ 0 ≤ f(hi); take the Newton step when it lands
    inside the bracket and at most halves the previous step, else bisect. Stops when every step is a few
    ulps.
    """
    lo, hi = y - c.abs(), y + c.abs()
    alpha = (y - c * torch.tanh(y + b)).clamp(lo, hi)  # one fixed-point step: a good start
    step_old = hi - lo
    tol = 4.0 * torch.finfo(y.dtype).eps
    done = torch.zeros_like(y, dtype=torch.bool)
    for _ in range(max_iter):
        t = torch.tanh(alpha + b)
        f = alpha + c * t - y
        fprime = 1.0 + c * (1.0 - t * t)
        neg = f < 0
        lo = torch.where(neg, alpha, lo)
        hi = torch.where(neg, hi, alpha)
        newton = alpha - f / fprime  # fprime = 0 only at c = −1, t = 0: inf/nan, caught below
        use_newton = (newton >= lo) & (newton <= hi) & (2.0 * (newton - alpha).abs() <= step_old)
        new = torch.where(use_newton, newton, 0.5 * (lo + hi))
        new = torch.where(done, alpha, new)  # converged entries stay put while others iterate
        step_old = (new - alpha).abs()
        alpha = new
        done = done | (step_old <= tol * (alpha.abs() + 1.0))
        if bool(done.all()):
            break
    return alpha


def planar_inverse_step(z_new: Tensor, u: Tensor, w: Tensor, b: Tensor | float, constrained: bool = True,
                        max_iter: int = 200) -> Tensor:
    """Invert one planar step numerically, batched over ``z_new [..., C]``.

    With c = wᵀû and α = wᵀz, the forward map gives wᵀz' = α + c·tanh(α + b). For c > −1 the right-hand
    side is strictly increasing in α, and |c·tanh| ≤ |c| brackets the root in [wᵀz' − |c|, wᵀz' + |c|],
    so a bracketed Newton iteration (vectorised; a bisection step wherever Newton would leave the bracket
    or fails to halve the step; at most ``max_iter`` steps) finds α to machine precision; then
    z = z' − û·tanh(α + b). Gradients with respect to ``z_new`` and the parameters are those of the true
    inverse (implicit-function theorem: one Newton step whose value is detached).

    With ``constrained=False`` the raw u must satisfy wᵀu > −1 everywhere, else ``ValueError``.
    """
    if constrained:
        u_eff, one_plus_c = _constrain(u, w)
        c = one_plus_c - 1.0
    else:
        u_eff = u
        c = (w * u).sum(-1)
        if bool((c <= -1.0).any()):
            raise ValueError("planar step is not invertible: wᵀu <= -1 for some step (constrained=False); "
                             "use constrained=True for guaranteed invertibility")
    y = (z_new * w).sum(-1)
    b_t = torch.as_tensor(b, dtype=y.dtype, device=y.device)
    shape = torch.broadcast_shapes(y.shape, c.shape, b_t.shape)
    with torch.no_grad():
        yd, cd, bd = (t.detach().expand(shape) for t in (y, c, b_t))
        alpha0 = _solve_monotone(yd, cd, bd, max_iter)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (y, c, b_t)):
        # value stays alpha0; d(alpha)/d(theta) = -(∂f/∂theta) / f'(alpha)  (implicit function theorem)
        t0 = torch.tanh(alpha0 + b_t)
        f = alpha0 + c * t0 - y
        fprime = (1.0 + c * (1.0 - t0 * t0)).detach()
        alpha = alpha0 - (f - f.detach()) / fprime
    else:
        alpha = alpha0
    return z_new - u_eff * torch.tanh(alpha + b_t).unsqueeze(-1)


# ------------------------------------------------------------------------------------------------------
# Gaussian log densities
# ------------------------------------------------------------------------------------------------------
def gaussian_log_prob(z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """log N(z; μ, diag exp(log_var)), summed over the last dim, including the −½·log 2π constants."""
    return -0.5 * (_LOG_2PI + log_var + (z - mu) ** 2 * torch.exp(-log_var)).sum(-1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I), summed over the last dim, including the constants (the prior p of Eq. 7)."""
    return -0.5 * (_LOG_2PI + z * z).sum(-1)


def flow_log_density(z0: Tensor, mu: Tensor, log_var: Tensor, log_det: Tensor) -> Tensor:
    """log q_K(z_K) by the change of variables (paper Eq. 6), the one place the kit writes it:

        log q_K(z_K) = log q0(z0) − Σ_k log|det ∂h_k/∂z_{k−1}|,   q0 = N(μ, diag σ²),

    for z_K = h_K ∘ … ∘ h_1(z0) and ``log_det`` = Σ_k log|det_k| along that path. ``z0 [..., C]`` broadcasts
    against ``mu, log_var``; ``log_det`` is ``z0.shape[:-1]``. :meth:`PromptFlow.log_qK` (at drawn samples),
    :meth:`PromptFlow.log_prob` (at any point, via the inverse) and :func:`flow_kl` (Eq. 7) all use it.
    """
    return gaussian_log_prob(z0, mu, log_var) - log_det


# ------------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------------
def _default_std(dim: int) -> float:
    return 1.0 / math.sqrt(dim)


class PlanarFlow(nn.Module):
    """One planar step with free parameters u, w ∈ R^C, b ∈ R (see :func:`planar_step`).

    Args:
        dim: C.
        constrained: û reparameterisation (default, paper + Rezende & Mohamed) or raw u (released).
        init: ``"normal"`` (default): u, w ~ N(0, init_std²) with ``init_std = 1/sqrt(C)`` unless given,
            b = 0. This keeps ‖w‖ ≈ 1 in any dimension, so the constrained û (whose correction scales
            like 1/‖w‖) stays O(1) and wᵀz ~ N(0, 1) sits in tanh's non-linear range.
            ``"randn"``: u, w, b ~ N(0, 1), what the released code does for the IAD flows.
    """

    def __init__(self, dim: int, constrained: bool = True, init: str = "normal", init_std: float | None = None):
        super().__init__()
        self.dim = dim
        self.constrained = constrained
        self.u = nn.Parameter(torch.empty(dim))
        self.w = nn.Parameter(torch.empty(dim))
        self.b = nn.Parameter(torch.empty(()))
        self.init, self.init_std = init, init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_free(self.u, self.w, self.b, self.init, self.init_std, self.dim)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z [..., C]`` → ``(z' [..., C], log|det| [...])``."""
        return planar_step(z, self.u, self.w, self.b, self.constrained)

    def inverse(self, z_new: Tensor) -> Tensor:
        """Numerical inverse (:func:`planar_inverse_step`)."""
        return planar_inverse_step(z_new, self.u, self.w, self.b, self.constrained)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, constrained={self.constrained}"


def _init_free(u: Tensor, w: Tensor, b: Tensor, init: str, init_std: float | None, dim: int) -> None:
    with torch.no_grad():
        if init == "normal":
            std = _default_std(dim) if init_std is None else init_std
            u.normal_(0.0, std)
            w.normal_(0.0, std)
            b.zero_()
        elif init == "randn":  # released code: torch.randn for u, w, b
            u.normal_()
            w.normal_()
            b.normal_()
        else:
            raise ValueError(f"init={init!r}; choose 'normal' (kit default) or 'randn' (released code)")


class PlanarFlowStack(nn.Module):
    """K planar steps h_K ∘ … ∘ h_1 (paper §3.3; K = flow length, default 10).

    Two parameterisations:

    * ``amortized=False`` (paper): free parameters ``u, w: [K, C]``, ``b: [K]`` (init as in
      :class:`PlanarFlow`). The same flow acts on every item.
    * ``amortized=True`` (released ISD, ``PlanarPFL``): per-item parameters computed from a context
      vector, ``u = amor_u(ctx).view(N, K, C)``, ``w = amor_w(ctx).view(N, K, C)``,
      ``b = amor_b(ctx).view(N, K)`` with ``amor_u, amor_w: Linear(cond_dim → K·C)`` and
      ``amor_b: Linear(cond_dim → K)``, initialised N(0, 0.02) with zero bias like every Linear of the
      released model. (The released ``[N, K, C, 1]`` / ``[N, K, 1, C]`` layouts flatten in the same order.)

    Args:
        dim: C. n_flows: K (0 gives the identity). cond_dim: context width (amortised only; default C).
        constrained: û reparameterisation (paper default) or raw u with the released log-det.
        init, init_std: see :class:`PlanarFlow` (free parameterisation only).
    """

    def __init__(self, dim: int, n_flows: int = 10, amortized: bool = False, cond_dim: int | None = None,
                 constrained: bool = True, init: str = "normal", init_std: float | None = None):
        super().__init__()
        self.dim, self.n_flows, self.amortized, self.constrained = dim, n_flows, amortized, constrained
        self.init, self.init_std = init, init_std
        if amortized:
            self.cond_dim = dim if cond_dim is None else cond_dim
            self.amor_u = nn.Linear(self.cond_dim, n_flows * dim)
            self.amor_w = nn.Linear(self.cond_dim, n_flows * dim)
            self.amor_b = nn.Linear(self.cond_dim, n_flows)
        else:
            self.cond_dim = None
            self.u = nn.Parameter(torch.empty(n_flows, dim))
            self.w = nn.Parameter(torch.empty(n_flows, dim))
            self.b = nn.Parameter(torch.empty(n_flows))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.amortized:
            for lin in (self.amor_u, self.amor_w, self.amor_b):
                nn.init.normal_(lin.weight, 0.0, 0.02)
                nn.init.zeros_(lin.bias)
        else:
            _init_free(self.u, self.w, self.b, self.init, self.init_std, self.dim)

    def step_parameters(self, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The raw (unconstrained) ``(u [..., K, C], w [..., K, C], b [..., K])``.

        Free: ``[K, C], [K, C], [K]``. Amortised: ``context [..., cond_dim]`` → ``[..., K, C]`` etc.
        """
        if not self.amortized:
            return self.u, self.w, self.b
        if context is None:
            raise ValueError("an amortised PlanarFlowStack needs context=[N, cond_dim]")
        lead = context.shape[:-1]
        u = self.amor_u(context).view(*lead, self.n_flows, self.dim)
        w = self.amor_w(context).view(*lead, self.n_flows, self.dim)
        b = self.amor_b(context).view(*lead, self.n_flows)
        return u, w, b

    def forward(self, z0: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``z0 [..., C]`` (e.g. ``[R, N, C]``) → ``(zK [..., C], Σ_k log|det_k| [...])`` (Eq. 6).

        Amortised parameters from ``context [N, cond_dim]`` broadcast over the leading R dimension.
        """
        u, w, b = self.step_parameters(context)
        z = z0
        total = z0.new_zeros(z0.shape[:-1])
        for k in range(self.n_flows):
            z, ld = planar_step(z, u[..., k, :], w[..., k, :], b[..., k], self.constrained)
            total = total + ld
        return z, total

    def inverse(self, zk: Tensor, context: Tensor | None = None) -> Tensor:
        """Numerical inverse ``zK → z0`` (step inverses in reverse order, :func:`planar_inverse_step`).

        Meant for the free parameterisation (the paper's); it also works for an amortised stack given the
        same ``context``. Unconstrained stacks are accepted only where every wᵀu > −1.
        """
        u, w, b = self.step_parameters(context)
        z = zk
        for k in reversed(range(self.n_flows)):
            z = planar_inverse_step(z, u[..., k, :], w[..., k, :], b[..., k], self.constrained)
        return z

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_flows={self.n_flows}, amortized={self.amortized}, "
                f"constrained={self.constrained}")


class _MLP3(nn.Sequential):
    # Linear → Softplus → Linear → Softplus → Linear; indices 0, 2, 4 hold the Linears, matching the
    # released `weight_mean.module.{0,2,4}` / `weight_log_variance.module.{0,2,4}` keys.
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, hidden_dim),
                         nn.Softplus(), nn.Linear(hidden_dim, out_dim))


class GaussianEncoder(nn.Module):
    """q0 = N(μ(ξ), diag σ²(ξ)): two three-layer MLPs, one for μ and one for log σ² (paper §3.3).

    Paper: "parameterized by three linear layers, with a Softplus activation applied between consecutive
    layers". Released code (``VPB.py``): two separate MLPs ``Linear(in→hidden) → Softplus →
    Linear(hidden→hidden) → Softplus → Linear(hidden→out)`` with ``hidden = vision_width // 2`` (512 for
    ViT-L/14). This class has exactly that structure: ``mean_net`` and ``log_var_net`` are
    ``nn.Sequential`` with the Linears at indices 0, 2, 4, so a released
    ``weight_mean.module.i.*`` maps to ``mean_net.i.*`` and ``weight_log_variance.module.i.*`` to
    ``log_var_net.i.*``.

    Args:
        in_dim: width of ξ. hidden_dim: MLP width (default ``in_dim``; the released code uses
            vision_width // 2). out_dim: C (default ``in_dim``).
        log_var_scale: log σ² = ``log_var_scale`` · (output of ``log_var_net``). 1.0 (default) reads the
            head as log σ². The released head outputs h with var = exp(0.5·h), i.e. log σ² = 0.5·h: use
            0.5 with released weights.

    Init: Linear weights N(0, 0.02), zero bias (released ``_initialize_weights``), so q0 starts near
    N(0, I): for a unit-scale 768-d ξ and hidden 512, μ and log σ² come out with entries of size ≈ 0.3
    (not exactly 0: the Softplus outputs have a positive mean that the next layer sums).
    """

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int | None = None,
                 log_var_scale: float = 1.0):
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        out_dim = in_dim if out_dim is None else out_dim
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.log_var_scale = log_var_scale
        self.mean_net = _MLP3(in_dim, hidden_dim, out_dim)
        self.log_var_net = _MLP3(in_dim, hidden_dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, xi: Tensor) -> tuple[Tensor, Tensor]:
        """``xi [..., in_dim]`` → ``(mu [..., out_dim], log_var [..., out_dim])``."""
        return self.mean_net(xi), self.log_var_scale * self.log_var_net(xi)


@dataclass
class FlowSample:
    """R Monte-Carlo draws of a prompt flow for N items.

    Attributes:
        z0: ``[R, N, C]`` draws from q0 (reparameterised: μ + σ·ε).
        zk: ``[R, N, C]`` the same draws after the K planar steps (the sampled prompt vectors φ_r).
        mu, log_var: ``[N, C]`` parameters of q0.
        log_det: ``[R, N]`` Σ_k log|det_k| along each draw's path.
    """

    z0: Tensor
    zk: Tensor
    mu: Tensor
    log_var: Tensor
    log_det: Tensor


class PromptFlow(nn.Module):
    """A prompt distribution: a :class:`GaussianEncoder` for q0 followed by a :class:`PlanarFlowStack`.

    ISD (context): ``PromptFlow(C, in_dim=C_img)`` called with ξ = the global image feature ``[N, C_img]``.
    IAD (states): two instances that share modules, each called with its own free vector ξ ``[1, C]`` (a
    ``nn.Parameter`` owned by the caller)::

        normal = PromptFlow(C)                                                 # paper: same network
        abnormal = PromptFlow(C, encoder=normal.encoder, flow=normal.flow)     # weights, only ξ differs
        abnormal_released = PromptFlow(C, encoder=normal.encoder)              # released: own u, w, b

    Args:
        dim: C, the width of the sampled vectors. in_dim: width of ξ (default C). hidden_dim: encoder MLP
            width (default ``in_dim``; released: vision_width // 2).
        n_flows: K. amortized / cond_dim / constrained / init / init_std: see :class:`PlanarFlowStack`
            (``cond_dim`` defaults to ``in_dim``: the context defaults to ξ).
        log_var_scale: see :class:`GaussianEncoder`.
        encoder, flow: existing modules to share (then the corresponding arguments above are ignored).
    """

    def __init__(self, dim: int, in_dim: int | None = None, hidden_dim: int | None = None, n_flows: int = 10,
                 amortized: bool = False, cond_dim: int | None = None, constrained: bool = True,
                 init: str = "normal", init_std: float | None = None, log_var_scale: float = 1.0,
                 encoder: GaussianEncoder | None = None, flow: PlanarFlowStack | None = None):
        super().__init__()
        in_dim = dim if in_dim is None else in_dim
        cond_dim = in_dim if cond_dim is None else cond_dim  # the context defaults to ξ itself
        self.encoder = encoder if encoder is not None else GaussianEncoder(in_dim, hidden_dim, dim, log_var_scale)
        self.flow = flow if flow is not None else PlanarFlowStack(dim, n_flows, amortized, cond_dim, constrained,
                                                                  init, init_std)
        self.dim = dim

    def forward(self, xi: Tensor, n_samples: int = 1, context: Tensor | None = None,
                generator: torch.Generator | None = None) -> FlowSample:
        """Draw ``n_samples`` = R reparameterised samples per item and push them through the flow.

        Args:
            xi: ``[N, in_dim]`` (ISD: image features; IAD: the free vector, usually ``[1, C]``).
            n_samples: R.
            context: amortised flows only; defaults to ``xi`` (the released ISD conditions both q0 and the
                flow parameters on x_cls).
            generator: optional ``torch.Generator`` for ε ~ N(0, I). ε is drawn on the generator's device
                and moved to ``xi``'s, so a seeded generator gives the same samples on any device.
        """
        mu, log_var = self.encoder(xi)
        eps_device = generator.device if generator is not None else mu.device
        eps = torch.randn((n_samples, *mu.shape), generator=generator, device=eps_device, dtype=mu.dtype)
        eps = eps.to(mu.device)
        z0 = mu + torch.exp(0.5 * log_var) * eps
        if self.flow.amortized and context is None:
            context = xi
        zk, log_det = self.flow(z0, context)
        return FlowSample(z0=z0, zk=zk, mu=mu, log_var=log_var, log_det=log_det)

    @staticmethod
    def log_q0(z0: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
        """log q0(z0) = log N(z0; μ, diag σ²), summed over C (``[R, N]`` for ``z0 [R, N, C]``)."""
        return gaussian_log_prob(z0, mu, log_var)

    @staticmethod
    def log_qK(sample: FlowSample) -> Tensor:
        """log q_K(z_K) = log q0(z0) − Σ_k log|det_k| along each draw (paper Eq. 6); ``[R, N]``."""
        return flow_log_density(sample.z0, sample.mu, sample.log_var, sample.log_det)

    def log_prob(self, points: Tensor, xi: Tensor, context: Tensor | None = None) -> Tensor:
        """log q_K at arbitrary points in z_K space (Eq. 6 via the numerical inverse).

        z0 = flow⁻¹(points), then log q0(z0; μ(ξ), σ²(ξ)) − Σ_k log|det_k|(z0). ``points [..., C]``
        broadcasts against μ ``[N, C]`` from the right (use ``xi [1, in_dim]`` and ``points [M, C]`` for a
        2-D density grid). Intended for the free (paper) parameterisation; an amortised flow needs the same
        ``context`` (default ``xi``) as in :meth:`forward`.
        """
        mu, log_var = self.encoder(xi)
        if self.flow.amortized and context is None:
            context = xi
        z0 = self.flow.inverse(points, context)
        _, log_det = self.flow(z0, context)
        return flow_log_density(z0, mu, log_var, log_det)


def flow_kl(sample: FlowSample, reduction: str = "mean") -> Tensor:
    """Monte-Carlo flow loss, the first two terms of paper Eq. 7.

    E_{q0}[log q0(z0) − Σ_k log|det_k| − log p(z_K)] = E_{q_K}[log q_K(z_K) − log p(z_K)] = KL(q_K ‖ p),
    p = N(0, I),

    built on the flow's own density: log q_K at each draw is :meth:`PromptFlow.log_qK` (Eq. 6, the same
    :func:`flow_log_density` that :meth:`PromptFlow.log_prob` evaluates anywhere), so the loss cannot disagree
    with the density the kit plots and tests. Estimated per item by averaging over the R draws of ``sample``
    (dim 0), then reduced over the items: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[N]``). Both log
    densities keep their −½·log 2π constants (they cancel), so the value is an unbiased estimate of
    KL(q_K ‖ N(0, I)) for any flow, and of KL(q0 ‖ N(0, I)) for an identity flow.
    """
    per_draw = PromptFlow.log_qK(sample) - standard_normal_log_prob(sample.zk)
    per_item = per_draw.mean(0)
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(f"reduction={reduction!r}; choose 'mean', 'sum' or 'none'")
