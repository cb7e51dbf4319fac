"""
Normalised 3D rotary position embedding (paper section 2.1.1). Every patch token gets a position (z, h, w)
on one scale, coord(i) = alpha * i / max(g - 1, 1) for i < g in (G_Z, G_H, G_W), so a 3D grid of any shape
and a 2D image (G_Z = 1, depth 0) share one space. A head vector is laid out as
    [ z-block (2n) | h-block (2n) | w-block (2n) | pass-through (Dh - 6n) ],  n = Dh // 6,
pairs (x[j], x[j+n]) rotated by coord * base^(-j/n) ("half split", as nanochat); angles in fp32.
"""

import torch


def grid_coords(gz: int, gh: int, gw: int, alpha: float = 128.0, device=None) -> torch.Tensor:
    """(gz*gh*gw, 3) float32 coordinates (z, h, w), flattened z-major like the patches."""
    axes = [alpha * torch.arange(g, dtype=torch.float32, device=device) / max(g - 1, 1) for g in (gz, gh, gw)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # (gz, gh, gw, 3) -> (S, 3)


def rope_cos_sin(coords: torch.Tensor, head_dim: int, base: float = 10000.0):
    """Precompute (cos, sin), each (S, 3n) fp32, once per forward; shared by every layer and head."""
    n = head_dim // 6
    inv_freq = base ** (-torch.arange(n, dtype=torch.float32, device=coords.device) / max(n, 1))  # (n,)
    angles = coords.float()[:, :, None] * inv_freq  # (S, 3, n): axis-major, so blocks are z, h, w
    angles = angles.reshape(coords.shape[0], 3 * n)  # (S, 3n)
    return angles.cos(), angles.sin()


def apply_rope_cs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (S, H, Dh) with precomputed cos/sin (S, 3n). Math in fp32, result in x.dtype."""
    S, H, Dh = x.shape
    n = cos.shape[1] // 3
    if n == 0:
        return x
    xf = x.float()
    rot, rest = xf[..., : 6 * n], xf[..., 6 * n :]
    rot = rot.view(S, H, 3, 2, n)  # (S, H, axis, half, n)
    x1, x2 = rot[:, :, :, 0], rot[:, :, :, 1]  # (S, H, 3, n) each
    c, s = cos.view(S, 1, 3, n), sin.view(S, 1, 3, n)
    y = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=3)  # (S, H, 3, 2, n)
    return torch.cat([y.reshape(S, H, 6 * n), rest], dim=-1).to(x.dtype)  # (S, H, Dh)
