"""
Frozen-feature evaluation (paper section 3, Tables 1-3, Figure 2): linear probes, AUROC with patient-
bootstrap confidence intervals, the tables and the PCA figures; the protocol: DESIGN.md, "Evaluation".
Beside each linear probe, on the same cached features: kNN (DINOv2's eval/knn.py: cosine similarity,
temperature-weighted votes) and few-shot linear probes (k labelled samples per class and finding, several draws).
Test sets: each (shard prefix, modality) with a test split in data_dir (internal) and external_dir.

    python probe.py --ckpt=out/ckpt.pt                      # phantom world (train.py's default data)
    python probe.py --ckpt=out/stage3/ckpt.pt --supervised=out/supervised/ckpt.pt --external_dir=data/external
"""

import glob
import hashlib
import json
import os
import sys
import warnings
from dataclasses import asdict
from functools import partial
from typing import NamedTuple

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # comes with scikit-learn

import adapters
import data
import views
from model import ModelConfig, SparseMedicalViT
from pack import pool_views
from train import CHOICES, check_choices, configure, resolve_device

# -----------------------------------------------------------------------------
# encoders and data
ckpt = "out/ckpt.pt"          # trained encoder (train.py checkpoint)
supervised = ""               # supervised-baseline checkpoint (config/supervised.py); "" = none
random_init = True            # also probe the same architecture at random initialisation
data_dir = ""                 # pretraining shards (LP train/val, internal test sets); "" = the checkpoint's data_dir
external_dir = ""             # shards never trained on (CheXpert, RAD-ChestCT): test sets, and domain adaptation
                              # where a set has its own train split; "" = none
# probe
lp_data = "2d,3d,all"         # LP training data, comma-separated: 2d | 3d | all (both concatenated, Table 3)
Cs = (0.001, 0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried per finding; best validation AUROC wins
max_iter = 1000               # lbfgs iterations per logistic regression
n_boot = 1000                 # bootstrap resamples of test patients for the 95% CI
seed = 0                      # bootstrap and few-shot seed (the same resamples and draws for every encoder: paired)
knn = "10,20"                 # kNN neighbour counts k, comma-separated ("" = no kNN rows); DINOv2 uses 10, 20
knn_T = 0.07                  # kNN temperature: a neighbour votes with weight softmax(cosine / T) (DINOv2)
shots = "1,10,100"            # few-shot probes: k positives + k negatives per finding, comma-separated ("" = none)
shot_draws = 5                # independent draws of the k-shot training samples per k (mean and sd reported)
shot_C = 1.0                  # few-shot inverse L2 strength, fixed: k-shot learning has no labelled val set to choose it
# system
out_dir = ""                  # probe.json and figures; "" = <checkpoint folder>/probe
device = "auto"               # 'auto' | 'cpu' | 'cuda'
token_budget = 12000          # max tokens per packed batch (memory bound, like train.py)
num_workers = 2               # DataLoader processes reading shards
figures = True                # write the PCA figures (needs matplotlib)
pixel_floor = True            # on the phantom world, add the raw-pixel floor rows (floor_rows)
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))]

LP_DATA = ("2d", "3d", "all")
# the raw-pixel floor: of the grids tried (2D 8^2, 16^2, 32^2; 3D 6^3, 8^3, 12^3) these, 256 2D / 512 3D
# features, gave the highest macro (the strongest floor); its test AUROC is flat beyond C = 1
FLOOR_GRID = {"2d": (16, 16), "3d": (8, 8, 8)}
FLOOR_C, FLOOR_ITER = (1e-4, 1e-3, 1e-2, 0.1, 1.0), 5000


# ----------------------------------------------------------------------------- metrics

def _auroc_groups(g, y, w):
    """AUROC from precomputed tie groups g (sample -> rank of its distinct score)."""
    pos, neg = np.bincount(g, w * (y == 1)), np.bincount(g, w * (y == 0))
    if pos.sum() == 0 or neg.sum() == 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # negative weight with a strictly lower score
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def auroc(y, s, w=None) -> float:
    """P(positive scores above negative), ties 1/2, weights w optional (a resample); NaN labels masked."""
    y, s = np.asarray(y, np.float64), np.asarray(s, np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, np.float64)
    keep = ~np.isnan(y) & ~np.isnan(s)
    return _auroc_groups(np.unique(s[keep], return_inverse=True)[1].reshape(-1), y[keep], w[keep])  # tie groups


def bootstrap_ci(y, s, patients, n_boot=1000, seed=0, level=0.95):
    """(low, high) of the macro AUROC of y, s (N, K) over resamples of test PATIENTS (with all their samples)."""
    _, pid = np.unique(np.asarray(patients), return_inverse=True)
    P = pid.max() + 1
    cols = []  # per finding: samples with a label, their tie groups (sorted once, reused n_boot times)
    for k in range(y.shape[1]):
        m = ~np.isnan(y[:, k]) & ~np.isnan(s[:, k])
        if m.any():
            cols.append((m, np.unique(s[m, k], return_inverse=True)[1].reshape(-1), y[m, k]))
    draws = np.random.default_rng(seed).integers(0, P, size=(n_boot, P))  # (B, P) drawn patients
    macros = np.full(n_boot, np.nan)
    for b in range(n_boot):
        w = np.bincount(draws[b], minlength=P)[pid].astype(np.float64)  # (N,) times each sample is drawn
        aucs = [_auroc_groups(g, yk, w[m]) for m, g, yk in cols]
        if not np.all(np.isnan(aucs)):
            macros[b] = np.nanmean(aucs)
    tail = 100 * (1 - level) / 2
    return tuple(float(v) for v in np.nanpercentile(macros, [tail, 100 - tail]))


# ----------------------------------------------------------------------------- linear probe

def fit_probe(xtr, ytr, xva, yva, Cs=Cs, max_iter=max_iter):
    """(scaler, [classifier or None per finding]): standardised features, NaN labels left out, C by val AUROC."""
    scaler = StandardScaler().fit(xtr)
    ztr, zva = scaler.transform(xtr), scaler.transform(xva)
    clfs = []
    # one BLAS thread: multi-threaded on these small matrices was 5-25x slower (one fit of 5 findings x 5 C: 7.5 s
    # on 2 threads, 0.28 s on 1); warnings: lbfgs hitting max_iter at large C, which the val score judges
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(ytr.shape[1]):
            tr, va = ~np.isnan(ytr[:, k]), ~np.isnan(yva[:, k])
            if len(np.unique(ytr[tr, k])) < 2:  # no probe can be fit; its AUROC is reported as NaN
                clfs.append(None)
                continue
            fits = [LogisticRegression(C=C, max_iter=max_iter).fit(ztr[tr], ytr[tr, k]) for C in Cs]
            scores = np.array([auroc(yva[va, k], clf.decision_function(zva[va])) for clf in fits])
            clfs.append(fits[int(np.nanargmax(scores)) if np.isfinite(scores).any() else len(Cs) // 2])
    return scaler, clfs


def predict(probe, x):
    """(N, K) decision scores; NaN for findings without a probe."""
    scaler, clfs = probe
    z = scaler.transform(x)
    return np.stack([c.decision_function(z) if c is not None else np.full(len(x), np.nan) for c in clfs], 1)


def _clean(v):
    return None if v is None or not np.isfinite(v) else round(float(v), 4)  # JSON: NaN -> null


def _macro(aucs):
    return np.nanmean(aucs) if np.isfinite(aucs).any() else np.nan


# ----------------------------------------------------------------------------- kNN and few-shot

def knn_scores(xtr, ytr, xte, k, T=knn_T, chunk=512) -> np.ndarray:
    """(N_test, K) scores as DINOv2's eval/knn.py: per finding, the k train samples labelled for it that are most
    cosine-similar vote with weights softmax(similarity / T); the score is the weighted share of positives."""
    a = F.normalize(torch.from_numpy(np.asarray(xtr, np.float32)), dim=1)  # (N_train, dim)
    b = F.normalize(torch.from_numpy(np.asarray(xte, np.float32)), dim=1)
    out = np.full((len(b), ytr.shape[1]), np.nan)
    for j in range(ytr.shape[1]):
        lab = torch.from_numpy(~np.isnan(ytr[:, j]))
        if not lab.any():
            continue
        yj = torch.from_numpy(ytr[:, j])[lab].double()
        for i in range(0, len(b), chunk):  # (chunk, N_train) similarities at a time: memory bounded
            top, idx = (b[i:i + chunk] @ a[lab].T).topk(min(k, int(lab.sum())), dim=1)
            w = torch.exp((top.double() - top[:, :1].double()) / T)  # softmax(top / T) unnormalised, max weight 1
            # a ratio of two sums: k agreeing neighbours give exactly 0 or 1, so those samples tie (as they should)
            out[i:i + chunk, j] = ((w * yj[idx]).sum(1) / w.sum(1)).numpy()
    return out


def few_shot_picks(y, k, rng) -> list:
    """Per finding, k positives then k negatives drawn without replacement among the samples labelled for it, or
    None where it has fewer than k of a class. The same rng state gives the same draws (paired across encoders)."""
    picks = []
    for j in range(y.shape[1]):
        pos, neg = np.flatnonzero(y[:, j] == 1), np.flatnonzero(y[:, j] == 0)
        picks.append(None if min(len(pos), len(neg)) < k else
                     np.concatenate([rng.choice(pos, k, replace=False), rng.choice(neg, k, replace=False)]))
    return picks


def fit_few_shot(xtr, ytr, picks, scaler, C=shot_C, max_iter=max_iter):
    """(scaler, [classifier or None per finding]) as fit_probe, for predict(): one logistic regression per finding on
    its picked samples. The scaler is fit on ALL train features (labels unused): 2 samples cannot estimate a scale."""
    ztr = scaler.transform(xtr)
    with threadpool_limits(1):  # as fit_probe: one BLAS thread is faster on these small problems
        return scaler, [None if idx is None else LogisticRegression(C=C, max_iter=max_iter).fit(ztr[idx], ytr[idx, j])
                        for j, idx in enumerate(picks)]


def score_row(test_set, lp, encoder, y, s, patients, n_train, labels, n_boot, seed, protocol="linear"):
    """One result row: per-finding AUROC, macro (mean over findings with both classes) and its CI."""
    aucs = [auroc(y[:, k], s[:, k]) for k in range(y.shape[1])]
    lo, hi = bootstrap_ci(y, s, patients, n_boot, seed)
    return dict(test_set=test_set, lp_data=lp, protocol=protocol, encoder=encoder,
                auroc={l: _clean(a) for l, a in zip(labels, aucs)}, macro=_clean(_macro(aucs)), ci_low=_clean(lo),
                ci_high=_clean(hi), n_train=int(n_train), n_test=int(len(y)))


def few_shot_row(test_set, lp, encoder, k, y, draws, labels):
    """A k-shot row: per-finding AUROC and macro, each the mean over the draws' scores (D of (N, K)); the spread is
    the sd of the draws' macros (ci_low / ci_high null: the draw, not the test sample, dominates at small k)."""
    per = np.array([[auroc(y[:, j], s[:, j]) for j in range(y.shape[1])] for s in draws])  # (D, K)
    macros = np.array([_macro(a) for a in per])
    with warnings.catch_warnings():  # a finding never drawn (too few of a class) stays NaN, reported as null
        warnings.simplefilter("ignore", RuntimeWarning)
        aucs = np.nanmean(per, 0)
    sd = np.nanstd(macros) if np.isfinite(macros).any() else None
    return dict(test_set=test_set, lp_data=lp, protocol=f"{k}-shot", encoder=encoder,
                auroc={l: _clean(a) for l, a in zip(labels, aucs)}, macro=_clean(_macro(macros)), ci_low=None,
                ci_high=None, n_train=2 * k, n_test=int(len(y)), sd=_clean(sd), draws=[_clean(m) for m in macros])


def format_table(rows, labels) -> str:
    """The layout of Tables 1 and 3: one block per test set, rows LP data x encoder."""
    f = lambda v: "  -  " if v is None else f"{v:.3f}"
    head = (f"  {'encoder':<18}{'LP data':<10}{'protocol':<10}{'n_train':>8}  " + "".join(f"{l:>7}" for l in labels)
            + "   Macro (95% CI; few-shot: sd over draws)")
    out = []
    for t in dict.fromkeys(r["test_set"] for r in rows):
        block = [r for r in rows if r["test_set"] == t]
        out += [f"{t} (n={block[0]['n_test']})", head]
        for r in block:
            spread = (f" +- {f(r['sd'])} ({len(r['draws'])} draws)" if "sd" in r else
                      f" ({f(r['ci_low'])}-{f(r['ci_high'])})")
            out.append(f"  {r['encoder']:<18}{r['lp_data'].upper():<10}{r['protocol']:<10}{r['n_train']:>8}  "
                       + "".join(f"{f(r['auroc'][l]):>7}" for l in labels) + f"   {f(r['macro'])}{spread}")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- features

@torch.no_grad()
def features(model, batch, device, tokens=False):
    """Embeddings (b, dim) float32 of a data.pack_whole batch, and its per-token features (S, dim) if tokens: the
    frozen encoder on whole images, q / 127 exactly (identity augmentation), bf16 on CUDA, exact fp32 elsewhere."""
    packed = views.augment(batch["packed"].to(device, non_blocking=True), batch["aug"])
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        t, packed = model.forward_tokens(packed)  # as model(packed), with the tokens kept
        x = pool_views(t, packed)
    return x.float().cpu().numpy(), t.float().cpu().numpy() if tokens else None


@torch.no_grad()
def embed(model, ds, device, token_budget=token_budget, workers=num_workers, desc="embed") -> dict:
    """{'x' (N, dim), 'y', 'patient', 'id'}: frozen backbone embeddings of ds, batches of <= token_budget tokens."""
    model.eval()
    out = {"x": [], "y": [], "patient": [], "id": []}
    loader = data.iterate_whole(ds, token_budget, workers=workers, patch=model.cfg.patch, alpha=model.cfg.alpha,
                                pin_memory=device.type == "cuda")
    with data.progress(total=len(ds), desc=desc, leave=False) as bar:
        for b in loader:
            out["x"].append(features(model, b, device)[0])  # (b, dim)
            out["y"].append(b["labels"].numpy())
            out["patient"] += b["patient_id"]
            out["id"] += b["id"]
            bar.update(len(b["id"]))
    return {k: np.concatenate(v) if k in ("x", "y") else np.array(v) for k, v in out.items()}


def cached(cache_path: str, encoder: str, ckpt_tag: str, key: str, compute) -> dict:
    """cache_path[encoder/hash(ckpt_tag, key)], else compute() stored there; other ckpt_tags of encoder are deleted."""
    name = hashlib.sha1(f"{ckpt_tag}|{key}".encode()).hexdigest()[:16]
    if os.path.exists(cache_path):
        with h5py.File(cache_path, "r") as f:
            if f"{encoder}/{name}" in f:
                g = f[f"{encoder}/{name}"]
                return {k: g[k].asstr()[:].astype(str) if k in ("patient", "id") else g[k][:] for k in g}
    feats = compute()
    with h5py.File(cache_path, "a") as f:
        grp = f.require_group(encoder)
        for old in [n for n in grp if grp[n].attrs.get("ckpt_tag") != ckpt_tag]:
            del grp[old]
        g = grp.create_group(name)
        g.attrs["ckpt_tag"], g.attrs["key"] = ckpt_tag, key
        for k, v in feats.items():
            g.create_dataset(k, data=v.astype(object) if v.dtype.kind == "U" else v,
                             dtype=h5py.string_dtype() if v.dtype.kind == "U" else None)
    return feats


# ----------------------------------------------------------------------------- figures (matplotlib optional)

def fig_pca_lr(x2, y2, x3, y3, labels, path, title, n_pc=16):
    """Figure 2a: LR coefficients on the joint features' first whitened PCs, fit on 2D, 3D and both."""
    import matplotlib.pyplot as plt
    parts = [(n, x, y) for n, x, y in (("2D", x2, y2), ("3D", x3, y3)) if len(x)]
    xall = np.concatenate([x for _, x, _ in parts])
    scaler = StandardScaler().fit(xall)
    pca = PCA(min(n_pc, *xall.shape), whiten=True, random_state=0).fit(scaler.transform(xall))
    parts = [(n, pca.transform(scaler.transform(x)), y) for n, x, y in parts]
    parts.append(("joint", np.concatenate([z for _, z, _ in parts]), np.concatenate([y for _, _, y in parts])))
    fig, axes = plt.subplots(1, len(labels), figsize=(2.6 * len(labels), 2.2), sharey=True, squeeze=False)
    for k, (label, ax) in enumerate(zip(labels, axes[0])):
        rows = []
        for _, z, y in parts:
            m = ~np.isnan(y[:, k])
            coef = np.full(z.shape[1], np.nan)
            if len(np.unique(y[m, k])) == 2:
                coef = LogisticRegression(C=1.0, max_iter=1000).fit(z[m], y[m, k]).coef_[0]
                coef = coef / np.abs(coef).max()
            rows.append(coef)
        im = ax.imshow(np.array(rows), cmap="coolwarm", vmin=-1, vmax=1, aspect="auto")
        ax.set(title=label, xlabel="principal component", yticks=range(len(parts)), yticklabels=[n for n, _, _ in parts])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="LR coefficient (row max = 1)")
    fig.suptitle(title, fontsize=9, y=1.08)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def pca_maps(model, vs) -> list:
    """DINO-style maps: the first 3 PCs of all views' tokens (one basis) as RGB, (gz, gh, gw, 3) per view; each
    view centred (else PC 1 is the 2D-3D offset) and scaled (else the busiest view picks the basis)."""
    tokens, packed = model.forward_tokens(model.pack(vs))
    cuts = np.cumsum(packed.seqlens)[:-1]
    xs = [v - v.mean(0) for v in np.split(tokens.float().cpu().numpy(), cuts)]  # per view (L, dim)
    x = np.concatenate([v / max(v.std(), 1e-8) for v in xs])  # (S, dim)
    pcs = np.split(x @ np.linalg.svd(x, full_matrices=False)[2][:3].T, cuts)  # per view (L, 3), each PC to [0, 1]:
    return [((p - p.min(0)) / np.maximum(p.max(0) - p.min(0), 1e-8)).reshape(*g, 3) for p, g in zip(pcs, packed.grids)]


def fig_pca_maps(models, images, path, patch):
    """Figure 2b: a radiograph and a CT (the mid token slab's middle slice) by their PCA maps, a row per encoder."""
    import matplotlib.pyplot as plt
    vs = [torch.from_numpy(data.pad_to_patches(np.asarray(im, np.float32), patch)) for im in images]  # as in embed()
    fig, axes = plt.subplots(len(models), 2 * len(vs), figsize=(5.2 * len(vs), 2.6 * len(models)), squeeze=False)
    for r, (name, model) in enumerate(models):
        for c, (v, m) in enumerate(zip(vs, pca_maps(model, vs))):
            z = m.shape[0] // 2
            img = v[0, z * patch + patch // 2] if v.dim() == 4 else v[0]  # slice at the centre of slab z
            axes[r, 2 * c].imshow(img.numpy(), cmap="gray", vmin=-1, vmax=1)
            axes[r, 2 * c + 1].imshow(m[z], interpolation="nearest")
            axes[r, 2 * c].set_title(f"{'CT mid slice' if v.dim() == 4 else 'radiograph'}", fontsize=8)
            axes[r, 2 * c + 1].set_title(f"{name}: PCA of tokens", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- test sets on disk, and the run

def find_sets(folder: str, external: bool) -> dict:
    """{prefix-modality: set} of folder's shards, per split a glob and a fingerprint (names, sizes, mtimes)."""
    data.check_complete(folder)  # a folder whose preprocessing was interrupted would give numbers on part of a set
    sets = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.h5"))):
        parts = os.path.basename(path)[:-3].rsplit("_", 3)
        if len(parts) != 4:
            continue
        prefix, split, modality, _ = parts
        s = sets.setdefault(f"{prefix}-{modality}", dict(prefix=prefix, modality=modality, external=external, splits={}))
        pat = os.path.join(folder, f"{prefix}_{split}_{modality}_*.h5")
        st = os.stat(path)
        fp = s["splits"].setdefault(split, {"glob": pat, "fingerprint": os.path.abspath(folder)})
        fp["fingerprint"] += f"|{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}"
    return sets


def concat(feats: list) -> dict:
    return {k: np.concatenate([f[k] for f in feats]) for k in feats[0]}


class Encoder(NamedTuple):
    """One encoder to probe, and where its features are cached."""
    name: str                # its rows' encoder column: '<objective>-<step>' or 'random-init'
    model: SparseMedicalViT
    cache: str               # features.hdf5 beside its checkpoint (.hdf5: a checkpoint kept in a shard folder must
                             # not make the cache look like a shard)
    group: str               # its group in that file
    tag: str                 # what its features depend on: checkpoint path, step, mtime (or config and seed)


def load_encoders(cfg) -> tuple:
    """([Encoder] of the checkpoint, its random init and the supervised baseline, as asked), the checkpoint."""
    def from_checkpoint(path) -> tuple:  # a train.py checkpoint's encoder weights
        model = SparseMedicalViT.from_checkpoint(path)
        ck = dict(model.checkpoint, model_cfg=asdict(model.cfg))
        tag = f"{os.path.abspath(path)}|step {ck['step']}|mtime {os.stat(path).st_mtime_ns}"
        cache = os.path.join(os.path.dirname(os.path.abspath(path)), "features.hdf5")
        return Encoder(f"{ck['config'].get('objective', 'ckpt')}-{ck['step']}", model, cache, os.path.basename(path), tag), ck
    first, ck = from_checkpoint(cfg["ckpt"])
    encoders = [first]
    if cfg["random_init"]:
        s, mcfg = ck["config"].get("seed", 0), ck["model_cfg"]
        torch.manual_seed(s)  # as train.py seeds before it builds its encoder
        encoders.append(Encoder("random-init", SparseMedicalViT(ModelConfig(**mcfg)), first.cache,
                                f"random-init:{first.group}", f"random|{json.dumps(mcfg, sort_keys=True)}|seed {s}"))
    if cfg["supervised"]:
        encoders.append(from_checkpoint(cfg["supervised"])[0])
    return encoders, ck


def split_features(enc: Encoder, sname: str, split: str, sets: dict, cfg: dict, device, memo: dict) -> dict:
    """enc's features of one split of a set: from memo (this run), its cache file, or embedded and stored there."""
    if (enc.name, sname, split) not in memo:
        sp = sets[sname]["splits"][split]
        memo[enc.name, sname, split] = cached(
            enc.cache, enc.group, enc.tag, f"{sp['fingerprint']}|{split}|{device.type}",
            lambda: embed(enc.model, data.ShardDataset(sp["glob"]), device, cfg["token_budget"], cfg["num_workers"],
                          f"{enc.name} {sname} {split}"))
    return memo[enc.name, sname, split]


def patient_holdout(feats: dict, seed: int) -> tuple:
    """(train, val) of feats, 10% of its patients held out as val: where a set has no val split (CT-RATE), the probe's
    C is chosen on them. The same patients for every encoder (seeded)."""
    pats = np.unique(feats["patient"])
    val = np.isin(feats["patient"], np.random.default_rng(seed).choice(pats, max(1, len(pats) // 10), replace=False))
    return {k: v[~val] for k, v in feats.items()}, {k: v[val] for k, v in feats.items()}


def main(cfg: dict):
    check_choices(cfg, {"device": CHOICES["device"]})
    lps = [lp.strip() for lp in cfg["lp_data"].split(",") if lp.strip()]
    if not lps or set(lps) - set(LP_DATA):
        raise ValueError(f"--lp_data={cfg['lp_data']!r}: expected a comma-separated subset of {', '.join(LP_DATA)}")
    knn_ks, shot_ks = (counts(cfg, key) for key in ("knn", "shots"))
    dev = resolve_device(cfg["device"])
    encoders, ck = load_encoders(cfg)
    data_dir = cfg["data_dir"] or ck["config"]["data_dir"]
    data.ensure_phantom(data_dir)  # as train.py: the phantom world is made on first use, finished if interrupted
    sets = find_sets(data_dir, external=False)
    if cfg["external_dir"]:
        sets.update(find_sets(cfg["external_dir"], external=True))
    out_dir = cfg["out_dir"] or os.path.join(os.path.dirname(os.path.abspath(cfg["ckpt"])), "probe")
    os.makedirs(out_dir, exist_ok=True)
    print(encoders[0].model.describe(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32))
    print("test sets: " + ", ".join(f"{n} ({'external' if s['external'] else 'internal'}, splits "
                                    f"{'/'.join(sorted(s['splits']))})" for n, s in sets.items()))

    # what to fit and where to test it: (LP data, train sets, test sets)
    tests, runs = [n for n, s in sets.items() if "test" in s["splits"]], []
    for lp in lps:
        names = [n for n, s in sets.items() if not s["external"] and "train" in s["splits"] and lp in ("all", s["modality"])]
        if names:
            runs.append((lp, names, tests))
        else:
            print(f"LP data {lp}: no {lp} train split in {data_dir}, skipped")
    runs += [("adapt", [n], [n]) for n in tests if sets[n]["external"] and "train" in sets[n]["splits"]]  # Table 2

    memo, rows, labels = {}, [], list(adapters.LABELS)  # memo: (encoder, set, split) -> features, this run
    get = partial(split_features, sets=sets, cfg=cfg, device=dev, memo=memo)  # get(encoder, set name, split)
    for e in encoders:
        e.model.to(dev)
        for lp, names, tsets in runs:
            tr = concat([get(e, n, "train") for n in names])
            if all("val" in sets[n]["splits"] for n in names):
                va = concat([get(e, n, "val") for n in names])
            else:
                print(f"{names}: no val split, C chosen on 10% of the train patients held out")  # CT-RATE
                tr, va = patient_holdout(tr, cfg["seed"])
            p = fit_probe(tr["x"], tr["y"], va["x"], va["y"], cfg["Cs"], cfg["max_iter"])
            scaler = StandardScaler().fit(tr["x"])  # few-shot: standardised on all train features, labels unused
            picks = {k: [few_shot_picks(tr["y"], k, np.random.default_rng((cfg["seed"], k, d)))
                         for d in range(cfg["shot_draws"])] for k in shot_ks}  # the same draws for every encoder
            shot_probes = {k: [fit_few_shot(tr["x"], tr["y"], pk, scaler, cfg["shot_C"], cfg["max_iter"]) for pk in
                               picks[k]] for k in shot_ks}
            for k in shot_ks:
                short = [l for l, pk in zip(labels, picks[k][0]) if pk is None]
                if short and e is encoders[0]:
                    print(f"{k}-shot, LP data {lp}: fewer than {k} positives or negatives of {', '.join(short)} in "
                          f"{len(tr['y'])} train samples: left blank (null)")
            for t in tsets:
                te = get(e, t, "test")
                args = (te["patient"], len(tr["x"]), labels, cfg["n_boot"], cfg["seed"])
                rows.append(score_row(t, lp, e.name, te["y"], predict(p, te["x"]), *args))
                rows += [score_row(t, lp, e.name, te["y"], knn_scores(tr["x"], tr["y"], te["x"], k, cfg["knn_T"]), *args,
                                   protocol=f"knn-{k}") for k in knn_ks]
                rows += [few_shot_row(t, lp, e.name, k, te["y"], [predict(sp, te["x"]) for sp in shot_probes[k]], labels)
                         for k in shot_ks]
    if cfg["pixel_floor"] and any(s["prefix"] == "phantom" and not s["external"] for s in sets.values()):
        rows += floor_rows(data_dir, labels, cfg["n_boot"], cfg["seed"])

    order = (list(sets) + lps + ["adapt", "raw-pixels", "linear"] + [f"knn-{k}" for k in knn_ks]
             + [f"{k}-shot" for k in shot_ks] + [e.name for e in encoders])
    rank = {k: i for i, k in enumerate(order)}
    rows.sort(key=lambda r: (rank[r["test_set"]], rank.get(r["lp_data"], -1), rank[r["protocol"]],
                             rank.get(r["encoder"], -1)))
    table = format_table(rows, labels)
    with open(os.path.join(out_dir, "probe.json"), "w") as f, open(os.path.join(out_dir, "table.txt"), "w") as t:
        json.dump(rows, f, indent=1)
        t.write(table)
    print(f"{table}\nwrote {out_dir}/probe.json and table.txt")
    if cfg["figures"]:
        write_figures(encoders, partial(get, encoders[0]), sets, labels, out_dir)


def counts(cfg, key) -> list:
    """--knn / --shots: a comma-separated list of positive ints, "" for none."""
    try:
        ks = [int(v) for v in str(cfg[key]).split(",") if v.strip()]
    except ValueError:
        ks = [0]
    if any(k < 1 for k in ks):
        raise ValueError(f"--{key}={cfg[key]!r}: expected comma-separated positive integers such as \"10,20\", or \"\"")
    return ks


def write_figures(encoders, get, sets, labels, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print("matplotlib is not installed: figures skipped (pip install matplotlib)")
        return
    internal = lambda m: [n for n, s in sets.items() if not s["external"] and s["modality"] == m and "train" in s["splits"]]
    fx = {m: concat([get(n, "train") for n in internal(m)]) if internal(m) else
          dict(x=np.zeros((0, encoders[0].model.cfg.dim)), y=np.zeros((0, len(labels)))) for m in ("2d", "3d")}
    fig_pca_lr(fx["2d"]["x"], fx["2d"]["y"], fx["3d"]["x"], fx["3d"]["y"], labels, os.path.join(out_dir, "pca_lr.png"),
               f"{encoders[0].name}: which principal components of the LP train features predict each finding")
    images = []  # one radiograph and one CT from the internal test sets, cardiomegaly-positive if any (Fig. 2b)
    for m in ("2d", "3d"):
        cands = sorted((s for s in sets.values() if s["modality"] == m and "test" in s["splits"]), key=lambda s: s["external"])
        if cands:
            ds = data.ShardDataset(cands[0]["splits"]["test"]["glob"])
            images.append(ds[int(np.argmax(ds.labels[:, labels.index("CARD")] == 1))]["image"])
    if images:
        fig_pca_maps([(e.name, e.model) for e in encoders], images, os.path.join(out_dir, "pca_maps.png"),
                     encoders[0].model.cfg.patch)
    print(f"wrote {os.path.join(out_dir, 'pca_lr.png')} and pca_maps.png")


def floor_rows(data_dir, labels, n_boot=n_boot, seed=seed) -> list:
    """Table rows of the floor every encoder must beat: the same probe on pooled raw pixels, per modality."""
    print("raw-pixel floor ...")
    rows = []
    for mod, grid in FLOOR_GRID.items():
        pool, f = F.adaptive_avg_pool2d if len(grid) == 2 else F.adaptive_avg_pool3d, {}
        for s in ("train", "val", "test"):  # features as embed() gives them: raw pixels pooled, one image at a time
            ds = data.ShardDataset(data_dir, split=s, modality=mod)
            f[s] = {"x": np.stack([pool(torch.from_numpy(ds[i]["image"])[None], grid).flatten().numpy() for i in range(len(ds))]),
                    "y": ds.labels, "patient": ds.patient_id.astype(str)}
        p = fit_probe(f["train"]["x"], f["train"]["y"], f["val"]["x"], f["val"]["y"], FLOOR_C, FLOOR_ITER)
        te = f["test"]
        rows.append(score_row(f"phantom-{mod}", mod, "raw-pixels", te["y"], predict(p, te["x"]), te["patient"],
                              len(f["train"]["x"]), labels, n_boot, seed))
    return rows


if __name__ == "__main__":
    main(configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
