"""2-D planar flows for notebook 02: a flow whose density is easy to see, its density on a grid (Eq. 6) and its
samples."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..flow import PlanarFlowStack, standard_normal_log_prob


def demo_flow_2d(k_max: int = 12, seed: int = 2, constrained: bool = True):
    """A 2-D :class:`bpfl.flow.PlanarFlowStack` (float64) whose densities are easy to see.

    Step k: w = |w|·d with a random direction d and |w| in [2.5, 4] (a sharp tanh), u = a·d + small
    perpendicular noise with a in [0.3, 0.6] (each step splits the mass along d), b ~ N(0, 0.5²). With the
    default seed the mass stays inside [-4.5, 4.5]² up to K = 12.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    angle = torch.rand(k_max, **f64) * math.pi
    d = torch.stack([angle.cos(), angle.sin()], dim=-1)
    perp = torch.stack([-d[:, 1], d[:, 0]], dim=-1)
    w_norm = 2.5 + 1.5 * torch.rand(k_max, 1, **f64)
    a = 0.3 + 0.3 * torch.rand(k_max, 1, **f64)
    st = PlanarFlowStack(2, k_max, constrained=constrained).double()
    with torch.no_grad():
        st.w.copy_(d * w_norm)
        st.u.copy_(d * a + perp * 0.3 * torch.randn(k_max, 1, **f64))
        st.b.copy_(0.5 * torch.randn(k_max, **f64))
    return st


def truncate_flow(stack, k: int):
    """The first ``k`` steps of a free-parameter stack, as a new stack (same dtype)."""
    out = PlanarFlowStack(stack.dim, k, constrained=stack.constrained).to(stack.u.dtype)
    with torch.no_grad():
        out.u.copy_(stack.u[:k])
        out.w.copy_(stack.w[:k])
        out.b.copy_(stack.b[:k])
    return out


def grid_2d(n: int = 100, extent: float = 4.5) -> tuple[torch.Tensor, float]:
    """Cell centres of an n x n grid on [-extent, extent]^2 ([n*n, 2], float64) and the cell area."""
    step = 2 * extent / n
    c = -extent + step * (torch.arange(n, dtype=torch.float64) + 0.5)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1), step * step


@torch.no_grad()
def flow_density_2d(stack, points: torch.Tensor) -> torch.Tensor:
    """q_K at ``points`` by Eq. 6: z0 = flow^-1(points), log q_K = log N(z0; 0, I) - Σ_k log|det_k|(z_{k-1})."""
    if stack.n_flows == 0:
        return standard_normal_log_prob(points).exp()
    z0 = stack.inverse(points)
    _, log_det = stack(z0)
    return (standard_normal_log_prob(z0) - log_det).exp()


@torch.no_grad()
def flow_samples_2d(stack, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """n samples of q_K: z0 ~ N(0, I) pushed through the stack ([n, 2], float64)."""
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return stack(z0)[0] if stack.n_flows else z0


def histogram_density(samples: torch.Tensor, n: int = 100, extent: float = 4.5) -> np.ndarray:
    """A 2-D histogram of samples normalised to a density on the same grid as :func:`grid_2d` ([n, n], rows = y)."""
    s = samples.cpu().numpy()
    edges = np.linspace(-extent, extent, n + 1)
    h, _, _ = np.histogram2d(s[:, 1], s[:, 0], bins=[edges, edges])
    area = (2 * extent / n) ** 2
    return h / (len(s) * area)


