"""
SparseMedicalViT: one vision transformer for 2D radiographs and 3D CT (paper section 2.1).

    views (list of [C, H, W] / [C, Z, H, W] tensors, any mix of sizes)
      -> pack.pack_views: cubic P^3 patches, one packed token sequence, cu_seqlens   (pack.py)
      -> patch embedding: one linear map of the P^3 patch; a 2D image is a depth-1 pseudo-volume
      -> depth x pre-norm Block(attention with 3D RoPE on q and k, MLP)              (rope3d.py)
      -> final LayerNorm -> mean over each view's tokens -> (N, dim), one embedding per view
"Sparse": a radiograph fills the plane z = 0 of the shared 3D coordinate space, a CT a volume.

Usage: SparseMedicalViT(ModelConfig(**PRESETS['small']))([xray_224x196, ct_56x112x98])  -> (2, 384)
       SparseMedicalViT.from_checkpoint("out/ckpt.pt")  -> a trained encoder, eval mode (README: "Embed your own images")
"""

import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pack import Packed, attention_path, length_groups, pack_views, pool_views, varlen_attention
from rope3d import rope_cos_sin, apply_rope_cs


@dataclass
class ModelConfig:
    patch: int = 14             # cubic patch side P (paper: 14)
    in_chans: int = 1           # grayscale radiographs and CT
    dim: int = 192              # token width
    depth: int = 4              # number of blocks
    heads: int = 4              # attention heads; head dim = dim // heads (best a multiple of 6, see rope3d.py)
    mlp_ratio: float = 4.0      # MLP hidden = mlp_ratio * dim
    alpha: float = 128.0        # RoPE coordinate scale: positions live in [0, alpha]^3 (paper: 128)
    rope_base: float = 10000.0  # RoPE frequency base (paper: 10,000)
    scale_2d: float = 1.0       # 2D patches enter the projection times this (1: the paper's literal zero-padding;
                                # sqrt(P) puts 2D tokens on the 3D tokens' scale, see PatchEmbed)


RANGE_TOL = 1e-3  # inputs may exceed [-1, 1] by this before check_range warns (float rounding of q / 127)

PRESETS = {  # head dims and RoPE pairs per axis: DESIGN.md, "The model"
    "tiny": dict(dim=192, depth=4, heads=4),    # tests and CPU runs
    "small": dict(dim=384, depth=12, heads=6),  # ViT-S/14
    "base": dict(dim=768, depth=12, heads=12),  # ViT-B/14
}


class PatchEmbed(nn.Module):
    """Linear projection of cubic P^3 patches; 2D patches with the one weight slice their image meets (DESIGN.md).
    A 2D token sums P^2 products, a 3D token P^3, so with scale_2d = 1 a 2D token is ~sqrt(P) smaller; scale_2d =
    sqrt(P) is zero-padding an image whose one slice is sqrt(P) brighter (DESIGN.md, "2D tokens at the 3D scale")."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        P, C = cfg.patch, cfg.in_chans
        self.scale_2d = cfg.scale_2d
        self.weight = nn.Parameter(torch.empty(cfg.dim, C, P, P, P))  # like a Conv3d(C, dim, P, stride=P)
        self.bias = nn.Parameter(torch.zeros(cfg.dim))

    def forward(self, packed: Packed) -> torch.Tensor:
        D = self.weight.shape[0]
        e3 = F.linear(packed.patches3d, self.weight.reshape(D, -1), self.bias)          # (S3, D)
        e2 = F.linear(packed.patches2d, self.weight[:, :, 0].reshape(D, -1) * self.scale_2d, self.bias)  # (S2, D)
        # the residual stream starts in the weights' dtype (fp32), not autocast's bf16 output: every block adds to
        # it in fp32 and only the matmuls run in bf16 (nanoGPT's embedding does the same)
        x = self.weight.new_zeros(packed.num_tokens, D)
        return x.index_copy(0, packed.idx3d, e3.to(x.dtype)).index_copy(0, packed.idx2d, e2.to(x.dtype))  # (S, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.dim % cfg.heads == 0, f"dim {cfg.dim} must be divisible by heads {cfg.heads}"
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, rope, packed: Packed):
        S = x.shape[0]
        q, k, v = self.qkv(x).view(S, 3, self.heads, self.head_dim).unbind(1)  # (S, H, Dh) each
        q, k = apply_rope_cs(q, *rope), apply_rope_cs(k, *rope)  # 3D RoPE in every layer (paper 2.1.1)
        y = varlen_attention(q, k, v, packed.cu_seqlens, packed.max_seqlen, packed.groups)  # (S, H, Dh)
        return self.proj(y.reshape(S, -1))  # (S, D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.dim)
        self.fc1, self.fc2 = nn.Linear(cfg.dim, hidden), nn.Linear(hidden, cfg.dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(cfg.dim), Attention(cfg)
        self.ln2, self.mlp = nn.LayerNorm(cfg.dim), MLP(cfg)

    def forward(self, x, rope, packed):
        x = x + self.attn(self.ln1(x), rope, packed)
        return x + self.mlp(self.ln2(x))


class SparseMedicalViT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """All initialisation, in one place:
        - patch_embed.weight: trunc normal, std 0.02 (ViT); its bias 0. A 2D token sums P^2 terms, a 3D token
          P^3, so at init 2D tokens are ~sqrt(P) smaller unless cfg.scale_2d = sqrt(P) (PatchEmbed).
        - every nn.Linear weight (qkv, proj, fc1, fc2): trunc normal, std 0.02; biases 0.
        - attn.proj and mlp.fc2 weights: std 0.02 / sqrt(2 * depth): residual variance stays flat with depth (GPT-2).
        - every LayerNorm: weight 1, bias 0."""
        nn.init.trunc_normal_(self.patch_embed.weight, std=0.02)
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for b in self.blocks:
            nn.init.trunc_normal_(b.attn.proj.weight, std=0.02 / (2 * self.cfg.depth) ** 0.5)
            nn.init.trunc_normal_(b.mlp.fc2.weight, std=0.02 / (2 * self.cfg.depth) ** 0.5)

    def pack(self, views) -> Packed:
        """Pack a list of views on the CPU and move the result to the model's device."""
        views = [v.cpu() if isinstance(v, torch.Tensor) else v for v in views]  # pack_views refuses non-tensors
        return pack_views(views, self.cfg.patch, self.cfg.in_chans, self.cfg.alpha).to(self.patch_embed.weight.device)

    def forward_tokens(self, views_or_packed):
        """Per-token features (S, dim) after the final norm, and the Packed (its grids map them back to views)."""
        packed = views_or_packed if isinstance(views_or_packed, Packed) else self.pack(views_or_packed)
        if not self.training:  # inference on someone's images: the range guard (check_range)
            self.check_range(packed)
        x = self.patch_embed(packed)  # (S, D)
        rope = rope_cos_sin(packed.coords, self.cfg.dim // self.cfg.heads, self.cfg.rope_base)  # once per forward
        amp = torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if amp else x.dtype  # what q, k, v will be
        if packed.groups is None and attention_path(x.device, dtype).startswith("exact"):
            # a micro-batch sliced on a GPU has no length groups; the fused kernels need none, the exact path does
            packed = dataclasses.replace(packed, groups=length_groups(packed.seqlens, x.device))
        for block in self.blocks:
            x = block(x, rope, packed)
        return self.norm(x), packed

    def forward(self, views_or_packed) -> torch.Tensor:
        """One embedding per view, in input order: (N, dim)."""
        # the mean of the view's tokens: a CLS token has no place in the 3D RoPE grid (DESIGN.md, pooling)
        return pool_views(*self.forward_tokens(views_or_packed))

    @classmethod
    def from_checkpoint(cls, path: str) -> "SparseMedicalViT":
        """The encoder of a train.py checkpoint, in eval mode, with the checkpoint's own ModelConfig; its step,
        run config and run info (git hash) in .checkpoint. weights_only=True: a checkpoint that would run code
        when unpickled is refused (pickle.UnpicklingError) before anything is built."""
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path} not found: train one (python train.py) or pass its path")
        ck = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ck, dict) or "model" not in ck or "model_cfg" not in ck:
            raise ValueError(f"checkpoint {path}: no 'model' and 'model_cfg' entries; it is not a train.py checkpoint")
        model = cls(ModelConfig(**ck["model_cfg"]))  # an unknown field: TypeError naming it
        load_weights(model, ck["model"], path, "model")
        model.checkpoint = {k: ck.get(k) for k in ("step", "config", "run")}
        return model.eval()

    def check_range(self, packed: Packed):
        """Warn once if an input lies outside [-1, 1], the range every training image was mapped to (data.py):
        0-255 pixels or raw HU give features from outside the training distribution, silently. Not called in
        training (views are clipped to [-1, 1] there, and the check syncs the host with the device)."""
        if getattr(self, "_range_warned", False):
            return
        lo_hi = [torch.aminmax(p) for p in (packed.patches2d, packed.patches3d) if p.numel()]
        lo, hi = min(float(a) for a, _ in lo_hi), max(float(b) for _, b in lo_hi)
        if lo < -1.0 - RANGE_TOL or hi > 1.0 + RANGE_TOL:
            self._range_warned = True
            warnings.warn(f"SparseMedicalViT: input values span [{lo:g}, {hi:g}], outside the [-1, 1] it was trained "
                          f"on; preprocess images with data.preprocess_file (or data.preprocess_xray / preprocess_ct)",
                          stacklevel=3)

    def describe(self, device, dtype) -> str:
        path = attention_path(torch.device(device), dtype)
        slow = torch.device(device).type == "cuda" and path.startswith("exact")
        return (f"SparseMedicalViT {self.cfg} | {sum(p.numel() for p in self.parameters()) / 1e6:.2f}M params | "
                f"attention path: {path}" + (" | warning: slow on a GPU; pip install flash-attn (bf16), or use "
                                             "torch>=2.10 for its varlen_attn" if slow else ""))


def load_weights(module: nn.Module, state: dict, path: str, what: str):
    """load_state_dict with a message that lists mismatched keys and shapes."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {path} ({what}) does not fit this model config:\n"
                         + "".join(f"  missing: {k}\n" for k in missing[:20])
                         + "".join(f"  unexpected: {k}\n" for k in unexpected[:20])
                         + "".join(f"  shape: {s}\n" for s in shapes[:20])
                         + "use the same --preset/--proj_dim/--proj_hidden as the run that wrote it")
    module.load_state_dict(state)
