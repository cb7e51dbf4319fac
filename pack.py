"""
Sequence packing and variable-length attention (paper section 2.1.2): views of any sizes are never padded
to one shape; all their P^3 patches form ONE token sequence, cu_seqlens marks where each view starts, and
attention stays inside each view (flash-attn's varlen kernel on CUDA, an exact per-view SDPA loop elsewhere).
A 2D view's patches stay P^2 vectors (a depth-1 pseudo-volume: model.py projects them with one weight slice).

    pack_views(views) -> Packed        patches, (S, 3) RoPE coordinates, cu_seqlens, view ids, length groups
    pack_arrays(arrays, share=...)     the same for numpy views (int8 crops in a loader worker), one copy each
"""

import math
from collections import Counter
from itertools import accumulate
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from rope3d import grid_coords

PATCH = 14   # patch side P of the encoder (paper 2.1.1), also the smallest usable image side
Q = 127.0    # int8 patches hold q = rint(127 x) of x in [-1, 1]: symmetric, so -1, 0 and 1 are exact

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


class LengthGroups(NamedTuple):
    """Views grouped by length, for the exact attention path (one SDPA call per length)."""
    perm: torch.Tensor   # (S,) long: the tokens in the order of their views sorted by length
    inv: torch.Tensor    # (S,) long: its inverse, back to packed order
    shapes: list         # [(L, n_views)], one per length, in the order of perm


@dataclass
class Packed:
    """One packed batch of N views, S tokens; 2D and 3D patch vectors kept apart, with their positions."""
    patches2d: torch.Tensor   # (S2, C*P*P) float, tokens of 2D views
    patches3d: torch.Tensor   # (S3, C*P*P*P) float, tokens of 3D views
    idx2d: torch.Tensor       # (S2,) long, where those tokens sit in the packed sequence
    idx3d: torch.Tensor       # (S3,) long
    coords: torch.Tensor      # (S, 3) float32 RoPE positions (z, h, w)
    cu_seqlens: torch.Tensor  # (N+1,) int32 view boundaries
    view_ids: torch.Tensor    # (S,) long, view index of each token
    seqlens: list             # N python ints: tokens per view (host copy, no device sync)
    max_seqlen: int           # longest view, python int (flash-attn needs it on the host)
    grids: list               # N tuples (gz, gh, gw); gz == 1 for 2D views (and for 3D views one patch deep)
    is2d: list                # N python bools: a 2D view (host copy: slicing needs no device sync)
    groups: LengthGroups | None  # views grouped by length, for the exact attention path; None on a device slice
                                 # (the model builds them there only if the exact path runs)

    @property
    def num_views(self) -> int:
        return len(self.seqlens)

    @property
    def num_tokens(self) -> int:
        return self.coords.shape[0]

    def __reduce__(self):
        """Pickled (from a worker) as 4 tensors, not 9: each costs ~0.5 ms to hand over (a file descriptor)."""
        ints = [self.idx2d, self.idx3d, self.view_ids, self.cu_seqlens.long(), self.groups.perm, self.groups.inv]
        return _unflatten, (self.patches2d, self.patches3d, self.coords, torch.cat(ints), [t.numel() for t in ints],
                            self.seqlens, self.max_seqlen, self.grids, self.is2d, self.groups.shapes)

    def _map(self, fn):
        """A Packed with fn applied to every tensor; the host metadata is shared."""
        groups = None if self.groups is None else self.groups._replace(perm=fn(self.groups.perm), inv=fn(self.groups.inv))
        return Packed(fn(self.patches2d), fn(self.patches3d), fn(self.idx2d), fn(self.idx3d), fn(self.coords),
                      fn(self.cu_seqlens), fn(self.view_ids), self.seqlens, self.max_seqlen, self.grids, self.is2d, groups)

    def to(self, device, non_blocking=False):
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        """Page-locked copy, so .to(cuda, non_blocking=True) overlaps; DataLoader(pin_memory=True) calls it."""
        return self._map(lambda t: t.pin_memory())

    def tensors(self) -> list:
        """Every tensor it holds (to record them on a stream)."""
        return [t for t in (*vars(self).values(), *(self.groups or ())) if isinstance(t, torch.Tensor)]

    def slice(self, a: int, b: int) -> "Packed":
        """Views a..b-1 as a Packed of their own (micro-batches), wherever the tensors are: row views and offset
        subtractions at places computed on the host from seqlens and is2d, so on a GPU it never waits for it."""
        lo, hi = sum(self.seqlens[:a]), sum(self.seqlens[:b])
        r2 = [sum(n for n, f in zip(self.seqlens[:j], self.is2d) if f) for j in (a, b)]  # 2D token rows a..b
        r3 = [j - r for j, r in zip((lo, hi), r2)]                                    # 3D token rows a..b
        groups = None  # the exact path's length groups: on the host only (boolean indexing would sync a GPU)
        if self.groups is not None and self.groups.perm.device.type == "cpu":
            perm = self.groups.perm
            groups = _groups(perm[(perm >= lo) & (perm < hi)] - lo, self.seqlens[a:b])  # still ordered by length
        return Packed(self.patches2d[r2[0]:r2[1]], self.patches3d[r3[0]:r3[1]], self.idx2d[r2[0]:r2[1]] - lo,
                      self.idx3d[r3[0]:r3[1]] - lo, self.coords[lo:hi], self.cu_seqlens[a:b + 1] - lo,
                      self.view_ids[lo:hi] - a, self.seqlens[a:b], max(self.seqlens[a:b]), self.grids[a:b],
                      self.is2d[a:b], groups)


def _unflatten(p2, p3, coords, ints, sizes, seqlens, max_seqlen, grids, is2d, shapes) -> Packed:
    idx2d, idx3d, view_ids, cu, perm, inv = ints.split(sizes)  # views of the one int64 tensor
    return Packed(p2, p3, idx2d, idx3d, coords, cu.int(), view_ids, seqlens, max_seqlen, grids, is2d,
                  LengthGroups(perm, inv, shapes))


def check_view(i: int, v, patch: int, in_chans: int):
    """Raise a ValueError naming view i and its shape if it cannot be packed."""
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


def pack_views(views, patch: int = PATCH, in_chans: int = 1, alpha: float = 128.0) -> Packed:
    """Pack a list of float views (torch tensors, checked) into one token sequence on the CPU."""
    if len(views) == 0:
        raise ValueError("pack_views: empty list of views; pass at least one [C, H, W] or [C, Z, H, W] tensor")
    for i, v in enumerate(views):
        check_view(i, v, patch, in_chans)
        if not torch.isfinite(v).all():
            raise ValueError(f"view {i} has shape {tuple(v.shape)}: contains NaN or inf values")
    return pack_arrays([v.detach().float().cpu().numpy() for v in views], patch, alpha)


def pack_arrays(views, patch: int = PATCH, alpha: float = 128.0, share: bool = False) -> Packed:
    """pack_views for valid numpy views, float32 or int8, each copied once; in shared memory if share (workers)."""
    C, dtype = views[0].shape[0], torch.from_numpy(views[0][:0]).dtype
    assert all(torch.from_numpy(v[:0]).dtype == dtype for v in views), "pack_arrays: views of mixed dtypes"
    flat = [v.ndim == 3 or v.shape[1] == 1 for v in views]  # 2D views: (C, H, W), or a depth of 1
    grids = [(1 if f else v.shape[1] // patch, v.shape[-2] // patch, v.shape[-1] // patch) for v, f in zip(views, flat)]
    seqlens = [math.prod(g) for g in grids]
    n2 = sum(n for n, f in zip(seqlens, flat) if f)
    t = torch.empty(0, dtype=dtype)  # (n, k) buffers in shared memory if share, as DataLoader's default_collate
    empty = lambda n, k: t.new(t._typed_storage()._new_shared(n * k)).view(n, k) if share else torch.empty(n, k, dtype=dtype)
    p2, p3 = empty(n2, C * patch ** 2), empty(sum(seqlens) - n2, C * patch ** 3)
    b2, b3, o2, o3, P = p2.numpy(), p3.numpy(), 0, 0, patch
    for v, (gz, gh, gw), f, n in zip(views, grids, flat, seqlens):  # rows ordered z, h, w (like grid_coords)
        if f:
            b2[o2:o2 + n].reshape(gh, gw, C, P, P)[...] = v.reshape(C, gh, P, gw, P).transpose(1, 3, 0, 2, 4)
            o2 += n
        else:
            b3[o3:o3 + n].reshape(gz, gh, gw, C, P, P, P)[...] = \
                v.reshape(C, gz, P, gh, P, gw, P).transpose(1, 3, 5, 0, 2, 4, 6)
            o3 += n
    coord_cache = {g: grid_coords(*g, alpha=alpha) for g in set(grids)}
    is2d = torch.repeat_interleave(torch.tensor(flat), torch.tensor(seqlens))  # (S,) per token
    pos = torch.arange(sum(seqlens))
    n = torch.tensor(seqlens)
    return Packed(p2, p3, pos[is2d], pos[~is2d], torch.cat([coord_cache[g] for g in grids]),
                  F.pad(torch.cumsum(n, 0), (1, 0)).int(), torch.repeat_interleave(torch.arange(len(seqlens)), n),
                  list(seqlens), max(seqlens), grids, flat, length_groups(seqlens))


def length_groups(seqlens, device=None):
    """Views of equal length together: one SDPA call per length (patch-snapped crops have few lengths)."""
    starts = [0, *accumulate(seqlens)]
    order = sorted(range(len(seqlens)), key=lambda i: seqlens[i])
    perm, inv, shapes = _groups(torch.cat([torch.arange(starts[i], starts[i + 1]) for i in order]), seqlens)
    return LengthGroups(perm.to(device), inv.to(device), shapes)


def _groups(perm, seqlens) -> LengthGroups:
    """Packed.groups of tokens in the order perm, views sorted by length."""
    return LengthGroups(perm, torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel())),
                        sorted(Counter(seqlens).items()))


def pool_views(x: torch.Tensor, packed: Packed) -> torch.Tensor:
    """Mean of the token features of each view: (S, D) -> (N, D)."""
    counts = packed.cu_seqlens.diff().to(x.dtype)[:, None]  # (N, 1), from the device's own copy (no host copy)
    sums = x.new_zeros(packed.num_views, x.shape[1]).index_add_(0, packed.view_ids, x)  # (N, D)
    return sums / counts


# ----------------------------------------------------------------------------- attention within each view

def attention_path(device: torch.device, dtype: torch.dtype) -> str:
    """Which kernel varlen_attention uses for tensors on `device` of `dtype`."""
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half and flash_attn_varlen_func is not None:
        return "flash_attn.flash_attn_varlen_func"
    if device.type == "cuda" and half and varlen_attn is not None:
        return "torch.nn.attention.varlen.varlen_attn"
    return "exact per-view SDPA loop"


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, groups=None):
    """Non-causal attention of q/k/v (S, H, Dh) within each view of cu_seqlens (N+1,) int32; groups: Packed.groups."""
    path = attention_path(q.device, q.dtype)
    if path.startswith("flash_attn"):  # its backward is deterministic only when asked (torch's follows the flag)
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=False,
                                      deterministic=torch.are_deterministic_algorithms_enabled())
    if path.startswith("torch.nn"):
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    # Exact path: the views of each length L gathered into one (n, H, L, Dh) batch, one SDPA call each, by one
    # index_select each way (slices per view would make the backward O(views x tokens)). Without groups (a direct
    # caller) they come from cu_seqlens: on a GPU that reads it back to the host, a sync.
    perm, inv, shapes = groups if groups is not None else length_groups(cu_seqlens.diff().tolist(), q.device)
    S, H, Dh = q.shape
    sizes = [L * n for L, n in shapes]
    out = []
    for (L, n), qi, ki, vi in zip(shapes, *(t.index_select(0, perm).split(sizes) for t in (q, k, v))):
        bhld = lambda t: t.view(n, L, H, Dh).transpose(1, 2)  # (n, H, L, Dh)
        out.append(F.scaled_dot_product_attention(bhld(qi), bhld(ki), bhld(vi)).transpose(1, 2).reshape(n * L, H, Dh))
    return torch.cat(out).index_select(0, inv)  # (S, H, Dh) in packed order
