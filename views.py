"""
LeJEPA's views (paper 2.2, 2.4): V_g global + V_l local crops of a sample and their per-view intensity
augmentation, drawn in a loader worker by MultiCrop(...)(image, rng) and applied on the device by
augment(packed, aug) to the packed int8 crops. The choices and their tests: DATA.md, "Views".
Everything a view is lives here; its knobs are train.py's `# data` block (n_global ... view_intensity), which
train.view_maker hands to MultiCrop; data.make_loader calls the MultiCrop in its workers, train.py calls augment.
"""

import dataclasses
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from pack import PATCH, Q, Packed

NOISE_SIZE = 1 << 22  # standard normals in the fixed noise table (16 MB), see augment
# the columns of a view's row of `aug` (V, 4) float64: MultiCrop draws them in a worker, augment applies them
CONTRAST, BRIGHTNESS, NOISE_SD, NOISE_ROW = range(4)  # x -> c x + (1 - c) mean + b + sd * table[row + pos]
IDENTITY_AUG = (1.0, 0.0, 0.0, 0.0)  # the view as stored: what the probe and embed.py see


@lru_cache(maxsize=None)  # made once per device, on first use there
def noise_table(device) -> torch.Tensor:
    """The fixed table of NOISE_SIZE standard normals on `device` (the same numbers everywhere)."""
    return torch.from_numpy(np.random.default_rng(12345).standard_normal(NOISE_SIZE, dtype=np.float32)).to(device)


class MultiCrop:
    """V_g global + V_l local crops of an image (1, H, W) or volume (1, Z, H, W), global first, snapped to whole
    patches, no resize; intensity and zoom drawn PER VIEW; no flips (chest anatomy is lateralised). DATA.md, "Views"."""

    def __init__(self, n_global=2, n_local=8, global_scale=(0.3, 1.0), local_scale=(0.05, 0.3), aspect=(3 / 4, 4 / 3),
                 patch=PATCH, brightness=0.1, contrast=0.2, noise=0.02, zoom=(1.0, 1.0), tries=10):
        assert 0 < global_scale[0] <= global_scale[1] and 0 < local_scale[0] <= local_scale[1]
        assert 0 < aspect[0] <= 1 <= aspect[1] and 0 < zoom[0] <= zoom[1]
        self.n_global, self.n_local, self.patch, self.tries = n_global, n_local, patch, tries
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.log_aspect = math.log(aspect[1] / aspect[0]) / 2  # half-width of each axis's log-stretch
        self.brightness, self.contrast, self.noise, self.log_zoom = brightness, contrast, noise, np.log(zoom)

    def size(self, spatial, scale, rng) -> tuple:
        """Patch-snapped view size for an image of spatial shape (H, W) or (Z, H, W)."""
        d, p = len(spatial), self.patch
        fit = [s // p for s in spatial]  # whole patches that fit per axis
        assert min(fit) >= 1, f"image {spatial} smaller than one {p}-pixel patch (preprocessing should refuse it)"
        best = None
        for _ in range(self.tries):
            s = rng.uniform(*scale)
            u = rng.uniform(-self.log_aspect / 2, self.log_aspect / 2, d).tolist()  # python floats: 2x faster here
            stretch = [math.exp(x - sum(u) / d) for x in u]
            n = [min(max(1, round(S * s ** (1 / d) * r / p)), f) for S, r, f in zip(spatial, stretch, fit)]
            real = math.prod(n) * p ** d / math.prod(spatial)
            err = max(scale[0] - real, real - scale[1], 0.0)
            if best is None or err < best[0]:
                best = (err, n)
            if err == 0:
                break
        return tuple(k * p for k in best[1])

    def __call__(self, image: np.ndarray, rng: np.random.Generator):
        """(crops: sub-blocks of image, in its dtype unless zoomed; aug (V, 4): columns CONTRAST ... NOISE_ROW)."""
        spatial = image.shape[1:]  # (H, W) or (Z, H, W)
        zoom = self.log_zoom[1] > self.log_zoom[0]
        if zoom and image.dtype == np.int8:
            image = image / np.float32(Q)  # resampling needs floats; then every view is float
        crops, aug = [], []
        for v in range(self.n_global + self.n_local):
            size = self.size(spatial, self.global_scale if v < self.n_global else self.local_scale, rng)
            z = math.exp(rng.uniform(*self.log_zoom)) if zoom else 1.0
            src = [min(S, max(1, round(s / z))) for S, s in zip(spatial, size)]  # region shown at size
            corner = [rng.integers(0, S - s + 1) for S, s in zip(spatial, src)]
            crop = image[(slice(None),) + tuple(slice(a, a + s) for a, s in zip(corner, src))]
            if list(src) != list(size):  # zoom: the region resampled to the patch-snapped size
                crop = F.interpolate(torch.from_numpy(np.ascontiguousarray(crop))[None], size=size,
                                     mode="bilinear" if len(size) == 2 else "trilinear", align_corners=False)[0].numpy()
            crops.append(crop)  # a view of the image (no copy) unless resampled
            c = 1.0 + rng.uniform(-self.contrast, self.contrast)
            b = rng.uniform(-self.brightness, self.brightness)
            sd = rng.uniform(0, self.noise)
            rows = NOISE_SIZE // (self.patch ** len(spatial))  # the noise table as rows of one patch
            aug.append((c, b, sd, rng.integers(0, rows) if sd > 0 else 0))  # CONTRAST, BRIGHTNESS, NOISE_SD, NOISE_ROW
        return crops, np.array(aug, np.float64)


@torch.no_grad()
def augment(packed: Packed, aug: torch.Tensor) -> Packed:
    """Patches (int8 q = 127 x, or float x) -> float32 clip(c x + (1 - c) mean_v(x) + b + sd * noise, -1, 1),
    (c, b, sd, row) = aug[v] (columns CONTRAST, BRIGHTNESS, NOISE_SD, NOISE_ROW), wherever the packed views are, in a
    few batched ops. A view's noise: the fixed table's rows from `row` on (wrapping), one gather per batch (DATA.md,
    "Views"). Pass aug on the host."""
    dev, N, noisy = packed.coords.device, packed.num_views, bool((aug[:, NOISE_SD] > 0).any())
    a = aug.to(dev, torch.float64, non_blocking=True)
    c, b, sd, row = a[:, CONTRAST], a[:, BRIGHTNESS], a[:, NOISE_SD], a[:, NOISE_ROW]  # (N,) each
    pos = torch.arange(packed.num_tokens, device=dev) - packed.cu_seqlens[:-1].long()[packed.view_ids]  # (S,) in its view
    sums, count = torch.zeros(N, dtype=torch.float64, device=dev), torch.zeros(N, dtype=torch.float64, device=dev)
    for p, idx in ((packed.patches2d, packed.idx2d), (packed.patches3d, packed.idx3d)):
        q = p.dtype == torch.int8  # int8 sums are exact (so equal on every device), float ones nearly so
        sums.index_add_(0, packed.view_ids[idx], p.sum(1, dtype=torch.int32 if q else torch.float32).double() / (Q if q else 1))
        count.index_add_(0, packed.view_ids[idx], torch.full_like(idx, p.shape[1], dtype=torch.float64))
    shift = ((sums / count.clamp(min=1)) * (1 - c) + b).float()  # contrast about the view's mean, then brightness
    c, sd, out = c.float(), sd.float(), []
    for p, idx in ((packed.patches2d, packed.idx2d), (packed.patches3d, packed.idx3d)):
        vid, K = packed.view_ids[idx], p.shape[1]
        x = p.float().div_(Q) if p.dtype == torch.int8 else p.float().clone()  # (S_d, K), in place from here
        x.mul_(c[vid, None]).add_(shift[vid, None])
        if noisy:
            table = noise_table(dev)[:NOISE_SIZE // K * K].view(-1, K)  # (rows, K)
            x.add_(table[(row.long()[vid] + pos[idx]) % table.shape[0]].mul_(sd[vid, None]))
        out.append(x.clamp_(-1.0, 1.0))
    return dataclasses.replace(packed, patches2d=out[0], patches3d=out[1])
