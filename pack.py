"""
Sequence packing and variable-length attention (paper section 2.1.2).

Views of different sizes (2D [C, H, W] radiograph crops, 3D [C, Z, H, W] CT crops) are never padded
or resized to a common shape. Each is cut into P^3 patches (P = 14) and all patches of all views are
concatenated into ONE token sequence. `cu_seqlens` marks where each view starts, and attention stays
inside each view: flash-attn's varlen kernel on CUDA, an exact per-view PyTorch loop elsewhere.

    pack_views(views) -> Packed        patches, (S, 3) RoPE coordinates, cu_seqlens, max_seqlen, view ids
    varlen_attention(q, k, v, ...)     non-causal attention within each view, q/k/v of shape (S, H, Dh)
    pool_views(x, packed)              per-view mean of the token features, (N, D)
    split_views(x, packed)             a packed (S, ...) tensor back into one tensor per view

A 2D view is a pseudo-volume of depth 1 (paper: zero-padded along depth to P). Its patches are kept as
P^2 vectors; model.py projects them with the one depth slice of the P^3 weight that meets the image,
which equals zero-padding and projecting (tested) at 1/P of the cost.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rope3d import grid_coords

try:  # optional CUDA fast path (pip install flash-attn)
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
varlen_attn = None
if torch.cuda.is_available():  # torch >= 2.10, CUDA only; importing it costs ~3 s (torch._dynamo) on CPU
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pass


@dataclass
class Packed:
    """One packed batch of N views, S tokens. 2D and 3D patch vectors are kept apart (they have
    different lengths, C*P^2 and C*P^3) together with their positions in the packed sequence."""
    patches2d: torch.Tensor   # (S2, C*P*P) float, tokens of 2D views
    patches3d: torch.Tensor   # (S3, C*P*P*P) float, tokens of 3D views
    idx2d: torch.Tensor       # (S2,) long, where those tokens sit in the packed sequence
    idx3d: torch.Tensor       # (S3,) long
    coords: torch.Tensor      # (S, 3) float32 RoPE positions (z, h, w)
    cu_seqlens: torch.Tensor  # (N+1,) int32 view boundaries
    view_ids: torch.Tensor    # (S,) long, view index of each token
    seqlens: list             # N python ints: tokens per view (host copy, no device sync)
    max_seqlen: int           # longest view, python int (flash-attn needs it on the host)
    grids: list               # N tuples (gz, gh, gw); gz == 1 for 2D views
    groups: tuple             # (perm, inv, [(L, n), ...]): views grouped by length, for the CPU path

    @property
    def num_views(self) -> int:
        return len(self.seqlens)

    @property
    def num_tokens(self) -> int:
        return self.coords.shape[0]

    def to(self, device, dtype=None, non_blocking=False):
        """Move tensors; patches also cast to `dtype` if given. Host metadata stays on the host."""
        mv = lambda t, dt=None: t.to(device=device, dtype=dt, non_blocking=non_blocking)
        perm, inv, shapes = self.groups
        return Packed(mv(self.patches2d, dtype), mv(self.patches3d, dtype), mv(self.idx2d), mv(self.idx3d),
                      mv(self.coords), mv(self.cu_seqlens), mv(self.view_ids),
                      self.seqlens, self.max_seqlen, self.grids, (mv(perm), mv(inv), shapes))


def check_view(i: int, v, patch: int, in_chans: int):
    """Raise a ValueError naming view i and its shape if it cannot be packed. Returns (gz, gh, gw)."""
    if not isinstance(v, torch.Tensor):
        raise ValueError(f"view {i}: expected a torch.Tensor, got {type(v).__name__}")
    shape = tuple(v.shape)
    if v.dim() not in (3, 4):
        raise ValueError(f"view {i} has shape {shape}: expected [C, H, W] (2D) or [C, Z, H, W] (3D)")
    if v.shape[0] != in_chans:
        raise ValueError(f"view {i} has shape {shape}: expected {in_chans} channel(s) in dim 0")
    if not v.is_floating_point():
        raise ValueError(f"view {i} has dtype {v.dtype}: expected a floating-point image in [-1, 1]")
    spatial = shape[1:] if v.dim() == 4 else (1,) + shape[1:]
    z, h, w = spatial
    if min(spatial) < 1 or h % patch or w % patch or (z != 1 and z % patch):
        raise ValueError(f"view {i} has shape {shape}: spatial sizes must be positive multiples of the "
                         f"patch size {patch} (a depth of 1 means 2D); crop or resize it first")
    return (1 if z == 1 else z // patch, h // patch, w // patch)


def patchify(v: torch.Tensor, grid, patch: int) -> torch.Tensor:
    """One view -> its patch vectors, rows ordered z, h, w (like grid_coords)."""
    gz, gh, gw = grid
    P, C = patch, v.shape[0]
    if v.dim() == 4 and v.shape[1] != 1:  # 3D: (C, Z, H, W) -> (gz*gh*gw, C*P^3)
        x = v.reshape(C, gz, P, gh, P, gw, P)
        return x.permute(1, 3, 5, 0, 2, 4, 6).reshape(gz * gh * gw, C * P ** 3)
    x = v.reshape(C, gh, P, gw, P)  # 2D (depth 1): (C, H, W) -> (gh*gw, C*P^2)
    return x.permute(1, 3, 0, 2, 4).reshape(gh * gw, C * P * P)


def pack_views(views, patch: int = 14, in_chans: int = 1, alpha: float = 128.0,
               check_finite: bool = True) -> Packed:
    """Pack a list of views into one token sequence. Meant to run on the CPU (e.g. in the loader);
    move the result with Packed.to(device)."""
    if len(views) == 0:
        raise ValueError("pack_views: empty list of views; pass at least one [C, H, W] or [C, Z, H, W] tensor")
    p2, p3, i2, i3, coords, seqlens, grids = [], [], [], [], [], [], []
    coord_cache, start = {}, 0
    for i, v in enumerate(views):
        grid = check_view(i, v, patch, in_chans)
        if check_finite and not torch.isfinite(v).all():
            raise ValueError(f"view {i} has shape {tuple(v.shape)}: contains NaN or inf values")
        tok = patchify(v.float(), grid, patch)
        n, is2d = tok.shape[0], v.dim() == 3 or v.shape[1] == 1
        (p2 if is2d else p3).append(tok)
        (i2 if is2d else i3).append(torch.arange(start, start + n))
        if grid not in coord_cache:
            coord_cache[grid] = grid_coords(*grid, alpha=alpha)
        coords.append(coord_cache[grid])
        seqlens.append(n)
        grids.append(grid)
        start += n
    cat = lambda xs, width: torch.cat(xs) if xs else torch.zeros(0, width)
    cu = torch.zeros(len(views) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens), 0)
    return Packed(
        patches2d=cat(p2, in_chans * patch ** 2), patches3d=cat(p3, in_chans * patch ** 3),
        idx2d=cat(i2, 0).long().reshape(-1), idx3d=cat(i3, 0).long().reshape(-1),
        coords=torch.cat(coords), cu_seqlens=cu,
        view_ids=torch.repeat_interleave(torch.arange(len(views)), torch.tensor(seqlens)),
        seqlens=seqlens, max_seqlen=max(seqlens), grids=grids, groups=length_groups(seqlens))


def length_groups(seqlens):
    """Order the tokens so that views of equal length sit together: (perm, inv, [(L, n_views), ...]).
    The exact attention path then makes one batched SDPA call per distinct length instead of one per
    view; crops snap to whole patches, so a batch of hundreds of views has only tens of lengths."""
    order = sorted(range(len(seqlens)), key=lambda i: seqlens[i])
    starts = [0] * len(seqlens)
    for i in range(1, len(seqlens)):
        starts[i] = starts[i - 1] + seqlens[i - 1]
    perm = torch.cat([torch.arange(starts[i], starts[i] + seqlens[i]) for i in order])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    shapes = []
    for i in order:
        if shapes and shapes[-1][0] == seqlens[i]:
            shapes[-1][1] += 1
        else:
            shapes.append([seqlens[i], 1])
    return perm, inv, [tuple(x) for x in shapes]


def pool_views(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Mean of the token features of each view: (S, D) -> (N, D)."""
    counts = torch.tensor(packed.seqlens, dtype=x.dtype, device=x.device)[:, None]  # (N, 1)
    sums = x.new_zeros(packed.num_views, x.shape[1]).index_add_(0, packed.view_ids, x)  # (N, D)
    return sums / counts


def split_views(x: torch.Tensor, packed: Packed):
    """A packed (S, ...) tensor -> list of N per-view tensors (views, not copies)."""
    return list(torch.split(x, packed.seqlens))


# -----------------------------------------------------------------------------
# attention within each view

def attention_path(device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel varlen_attention uses for tensors on `device` of `dtype`."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and flash_attn_varlen_func is not None:
        return "flash_attn.flash_attn_varlen_func"
    if device.type == "cuda" and half and varlen_attn is not None:
        return "torch.nn.attention.varlen.varlen_attn"
    return "exact per-view SDPA loop"


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, groups=None):
    """Non-causal attention of q/k/v (S, H, Dh) within each view given by cu_seqlens (N+1,) int32.
    `groups` (Packed.groups) is used by the exact path; without it it is built from cu_seqlens."""
    path = attention_path(q.device, q.dtype)
    if path.startswith("flash_attn"):
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False)
    if path.startswith("torch.nn"):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    # Exact path: gather the views of each distinct length L into one (n, H, L, Dh) batch, one SDPA
    # call per length, scatter back. Only the needed FLOPs, few calls (README efficiency notes).
    # One index_select each way (its backward is a single index_add, O(S)); slicing q[a:b] per view
    # would make the backward O(views x tokens). 4-D inputs: 3-D ones fall back to SDPA's slow math kernel.
    perm, inv, shapes = groups if groups is not None else length_groups(cu_seqlens.diff().tolist())
    S, H, Dh = q.shape
    sizes = [L * n for L, n in shapes]
    out = []
    for (L, n), qi, ki, vi in zip(shapes, *(t.index_select(0, perm).split(sizes) for t in (q, k, v))):
        bhld = lambda t: t.view(n, L, H, Dh).transpose(1, 2)  # (n, H, L, Dh)
        out.append(F.scaled_dot_product_attention(bhld(qi), bhld(ki), bhld(vi)).transpose(1, 2).reshape(n * L, H, Dh))
    return torch.cat(out).index_select(0, inv)  # (S, H, Dh) in packed order
