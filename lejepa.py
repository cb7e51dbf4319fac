"""
The LeJEPA objective (paper section 2.2; Balestriero & LeCun 2025, arXiv 2511.08544):

    L = (1 - lam) * L_pred + lam * SIGReg

epps_pulley (each column against N(0, 1), by quadrature), sigreg (its mean over random directions), lejepa_loss
and the Projector. Under DDP each rank gets the GLOBAL batch's statistic, with exact gradients; all runs in fp32.
"""

import contextlib
import functools

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn

# Trapezoid quadrature of the (even) Epps-Pulley integrand on [0, T_MAX]: 65 knots are exact to 1e-4 up to
# 10*N(0,1), where LeJEPA's 17 are off by 11% on 3*N(0,1) (DESIGN.md, "The loss")
T_MAX, N_KNOTS = 5.0, 65
NUM_SLICES = 1024  # random directions per SIGReg evaluation (LeJEPA's recommendation)

# lam, the SIGReg weight, has its default in one place: train.py's `lam` (the paper: 0.025 at batch 256).
# L_pred is the MEAN over feature dims, as the official LeJEPA code (its lambdas go with it); SIGReg grows
# with the N samples of one evaluation, so lam/(1-lam) * N sets the balance (DESIGN.md, "The loss")


def fp32(device: torch.device):
    """Autocast off: the statistic in fp32 (the meta device of the tests has no autocast to turn off)."""
    return (torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type)
            else contextlib.nullcontext())


class _CosSinSums(torch.autograd.Function):
    """sum_j cos(t x_j) and sum_j sin(t x_j) per column of x (M, N) at knots t (T,) -> (2, M, T); the backward
    reuses the forward's cos and sin in two batched matmuls (plain autograd recomputes them: 2x slower)."""

    @staticmethod
    def forward(ctx, x, t):
        xt = x.unsqueeze(-1) * t  # (M, N, T)
        c, s = xt.cos(), xt.sin()
        ctx.save_for_backward(c, s, t)
        return torch.stack([c.sum(1), s.sum(1)])  # (2, M, T)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # g: (2, M, T)
        c, s, t = ctx.saved_tensors
        gx = torch.bmm(c, (g[1] * t).unsqueeze(-1)) - torch.bmm(s, (g[0] * t).unsqueeze(-1))  # (M, N, 1)
        return gx.squeeze(-1), None


def epps_pulley(x: torch.Tensor) -> torch.Tensor:
    """EP = N * integral_R |phi_N(t) - exp(-t^2/2)|^2 * exp(-t^2/2) dt, phi_N(t) = mean_j exp(i t x_j), of each
    column of x (N, M) against N(0, 1), fp32 -> (M,); under a process group, of the batch over all ranks."""
    with fp32(x.device):
        x = x.float()
        t = torch.linspace(0.0, T_MAX, N_KNOTS, device=x.device)  # (T,)
        gauss = torch.exp(-0.5 * t * t)  # (T,) the N(0,1) characteristic function, also the window
        # trapezoid on [-T_MAX, T_MAX] folded onto t >= 0: weight h at t = 0 and at the end knot, 2h in between
        h = T_MAX / (N_KNOTS - 1)
        w = torch.full_like(t, 2 * h)
        w[0] = w[-1] = h
        sums = _CosSinSums.apply(x.t(), t)  # (2, M, T)
        n = x.new_full((), x.shape[0])  # made on the device: torch.tensor(N, device=cuda) would wait for the GPU
        if dist.is_available() and dist.is_initialized():
            # collective. The autograd-aware all_reduce RETURNS the sum (its input is untouched: using it would
            # silently give the local statistic); its backward sums the gradient over ranks, world_size times the
            # single-process one, which DDP's gradient averaging divides out again: exact parameter gradients.
            sums = dist_nn.all_reduce(sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(n)  # collective: counted across ranks, so unequal per-rank batches are exact too
        cos_mean, sin_mean = sums / n  # (M, T) each: the sum over all ranks / global N = the global mean
        err = (cos_mean - gauss) ** 2 + sin_mean ** 2  # (M, T) |phi_N(t) - phi(t)|^2
        return n * (err @ (w * gauss))  # (M,)


@functools.lru_cache(maxsize=2)  # drawn once per step and device, however many micro-batches the step has
def random_directions(dim: int, num_slices: int, step: int, device=None) -> torch.Tensor:
    """(dim, num_slices) unit columns from `step` alone (drawn on the CPU, fp32): the same on every rank, device and
    resume. To a GPU from pinned memory, without waiting: the host goes on queueing work."""
    a = torch.randn(dim, num_slices, generator=torch.Generator(device="cpu").manual_seed(int(step)))  # (K, M)
    # guard a zero-norm column: 0/0 would be NaN (a failure seen with bf16 directions elsewhere)
    a = a / a.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return (a.pin_memory() if torch.device(device or "cpu").type == "cuda" else a).to(device, non_blocking=True)


def sigreg(z: torch.Tensor, num_slices: int = NUM_SLICES, step: int = 0) -> torch.Tensor:
    """Mean Epps-Pulley statistic of z (N, K), or per view of z (V, N, K), over random unit directions, in fp32."""
    views = z if z.dim() == 3 else z.unsqueeze(0)  # (V, N, K)
    V, N, K = views.shape
    with fp32(z.device):  # the projection too: bf16 would round x to 3 digits
        a = random_directions(K, num_slices, step, z.device)  # (K, M)
        x = views.float() @ a  # (V, N, M)
        x = x.transpose(0, 1).reshape(N, V * num_slices)  # (N, V*M): each column one view's slice
        return epps_pulley(x).mean()  # equal slices per view, so mean over all = mean of view means


def lejepa_loss(z: torch.Tensor, n_global: int, lam: float, num_slices: int = NUM_SLICES,
                step: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z: (V, N, K) projector outputs, view-major, global views first -> fp32 (total, inv_loss, sigreg_loss), as the
    LeJEPA code names them: inv_loss (L_pred, this rank's) = mean over views of mean((mu - z_v)^2), mu the global
    views' centroid (no stop-gradient); sigreg_loss all ranks'. The log calls them pred and sigreg."""
    if z.dim() != 3 or not 1 <= n_global <= z.shape[0]:
        raise ValueError(f"lejepa.lejepa_loss: expected z of shape (V, N, K) with 1 <= n_global <= V, got "
                         f"{tuple(z.shape)} and n_global={n_global}; reshape the projector output view-major")
    with fp32(z.device):
        z = z.float()
        mu = z[:n_global].mean(0)  # (N, K)
        inv_loss = (mu - z).pow(2).mean()  # mean over views, samples and feature dims (see lam above)
        sigreg_loss = sigreg(z, num_slices=num_slices, step=step)
        return (1 - lam) * inv_loss + lam * sigreg_loss, inv_loss, sigreg_loss


class Projector(nn.Module):
    """(Linear -> LayerNorm -> ReLU) x 2 -> Linear: LeJEPA's minimal example with LayerNorm for BatchNorm."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (..., out_dim)
