"""
Embed your own images with a trained encoder: a file or a folder of PNG/JPG, DICOM files and DICOM series folders,
NIfTI and npz, through exactly the training preprocessing (data.preprocess_file: the same readers, orientation,
windows and long sides), whole images packed under token_budget -> one HDF5 file (the nanoGPT family's sample.py).

    python embed.py --ckpt=out/ckpt.pt --input=PATH --out=embeddings.h5
    python embed.py --ckpt=out/ckpt.pt --input=scans/ --modality=3d --tokens=True    # force CT; per-token features

The output (float32 embeddings, one row per embedded input, in sorted path order):
    embedding (N, dim) | path, modality (N,) str | shape (N, 3) int32 (Z, H, W) preprocessed, Z = 1 for 2D |
    spacing (N, 3) float32 mm (z, y, x), NaN unknown | failed/path, failed/reason (M,) str: every input not read
    attrs: ckpt, ckpt_sha1, step, model_cfg (JSON), git, preprocess_version, long_side (JSON), modality, summary
    with --tokens=True also: tokens (S, dim) float16, token_offset (N+1,) int64, grid (N, 3) int32 (gz, gh, gw):
    row i's tokens are tokens[token_offset[i]:token_offset[i+1]] in z, h, w order (probe.pca_maps' input)
Resuming: every packed batch is written to OUT.parts/ as it finishes (a temp file, then a rename), so the same
command after an interruption carries on from the last finished batch; OUT is assembled at the end.
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict

import h5py
import numpy as np
import torch

import data
import probe
from model import SparseMedicalViT
from readers import BadInput
from train import CHOICES, check_choices, configure, resolve_device

# -----------------------------------------------------------------------------
ckpt = "out/ckpt.pt"          # train.py checkpoint
input = ""                    # a file, a DICOM series folder, or a folder searched recursively
out = "embeddings.h5"         # the output file; OUT.parts/ holds finished batches until it is written
modality = "auto"             # 'auto' (a volume is CT, an image an X-ray; data.find_inputs) | '2d' or 'xray' | '3d' or 'ct'
long_side_2d = 0              # preprocessing long side in pixels; 0 = as the encoder was trained (its data_dir's shards)
long_side_3d = 0              # the same for CT voxels
tokens = False                # also write per-token features (float16) and their grids
device = "auto"               # 'auto' | 'cpu' | 'cuda' (bf16 on CUDA, exact fp32 on CPU)
token_budget = 12000          # max tokens per packed batch: the memory bound (one larger input goes alone)
num_workers = 2               # DataLoader processes reading and preprocessing files
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]

MODALITIES = {"auto": None, "2d": "2d", "xray": "2d", "3d": "3d", "ct": "3d"}  # --modality: as data.py folder's too


class _Files(torch.utils.data.Dataset):
    """Item i: (i, int8 image or None, spacing, reason) of inputs[i], read and preprocessed in a loader worker."""

    def __init__(self, inputs, long_side):
        self.inputs, self.long_side = inputs, long_side

    def __len__(self):
        return len(self.inputs)

    def __getitem__(self, i):
        path, mod = self.inputs[i]
        try:
            q, spacing = data.load_file(path, mod, self.long_side)
            return i, q, np.asarray(spacing, np.float32), None
        except BadInput as e:
            return i, None, None, str(e)
        except Exception as e:  # a decoder's own error on a corrupt file: a row with its reason, as report.json
            return i, None, None, f"unexpected {type(e).__name__}: {e}"


def _as_is(item):
    return item  # DataLoader collate: keep numpy arrays and None as they are


def _tokens_of(q, patch):
    return int(np.prod([-(-s // patch) for s in q.shape[1:]]))  # once padded to whole patches


def _write_part(parts, a, b, rows, x, tok, grids, fails):
    """Inputs [a, b) done: embedded rows (input index, shape, spacing), their features, failures; atomic."""
    rec = dict(idx=np.array([r[0] for r in rows], np.int64), shape=np.array([r[1] for r in rows], np.int32).reshape(-1, 3),
               spacing=np.array([r[2] for r in rows], np.float32).reshape(-1, 3), x=x,
               fail_idx=np.array([i for i, _ in fails], np.int64), fail_reason=np.array([r for _, r in fails], str))
    if tok is not None:
        rec.update(tokens=tok.astype(np.float16), grid=np.array(grids, np.int32).reshape(-1, 3))

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **rec)
    data.atomic_write(os.path.join(parts, f"part_{a:09d}_{b:09d}.npz"), write)


def _done_parts(parts) -> list:
    """[(a, b, file)] of finished parts, contiguous from 0 (a part after a gap cannot exist: batches run in order)."""
    found = sorted((int(f[5:14]), int(f[15:24]), os.path.join(parts, f)) for f in os.listdir(parts)
                   if f.startswith("part_") and f.endswith(".npz"))
    return [p for k, p in enumerate(found) if p[0] == (found[k - 1][1] if k else 0)]


def _sha1(path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(cfg: dict) -> dict:
    """Embed cfg['input'] into cfg['out']; returns the summary (counts, seconds)."""
    if not cfg["input"]:
        raise ValueError("--input=PATH is required: a file, a DICOM series folder or a folder of them")
    check_choices(cfg, {"modality": tuple(MODALITIES), "device": CHOICES["device"]})
    dev = resolve_device(cfg["device"])
    model = SparseMedicalViT.from_checkpoint(cfg["ckpt"]).to(dev)
    train_cfg = model.checkpoint["config"] or {}
    long_side = {m: cfg[f"long_side_{m}"] for m in ("2d", "3d")}
    if not all(long_side.values()):  # as the encoder was trained: the long sides its shards were built at
        trained = data.trained_long_side(train_cfg.get("data_dir", ""))
        long_side = {m: v or trained[m] for m, v in long_side.items()}
    inputs = data.find_inputs(cfg["input"], MODALITIES[cfg["modality"]])
    own = [os.path.abspath(cfg["out"] + ext) for ext in ("", ".tmp", ".parts")]  # an --out inside --input
    mine = lambda p: any(os.path.abspath(p) == o or os.path.abspath(p).startswith(o + os.sep) for o in own)
    if any(mine(p) for p, _ in inputs):
        print(f"not inputs: {sum(mine(p) for p, _ in inputs)} files of this run's own output ({cfg['out']}*)")
        inputs = [(p, m) for p, m in inputs if not mine(p)]
    if not inputs:
        raise FileNotFoundError(f"--input {cfg['input']}: no files in it")
    meta = dict(ckpt=os.path.abspath(cfg["ckpt"]), ckpt_sha1=_sha1(cfg["ckpt"]), step=int(model.checkpoint["step"] or 0),
                model_cfg=json.dumps(asdict(model.cfg)), git=str((model.checkpoint["run"] or {}).get("git", "unknown")),
                preprocess_version=data.PREPROCESS_VERSION, long_side=json.dumps(long_side),
                modality=cfg["modality"], tokens=bool(cfg["tokens"]))
    manifest = dict(meta, inputs=inputs)
    print(model.describe(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32))
    print(f"{len(inputs)} inputs under {cfg['input']} | long sides {long_side} | -> {cfg['out']}")

    # --- resume: OUT.parts/ holds the finished batches of a run with the same manifest
    parts = cfg["out"] + ".parts"
    if os.path.exists(cfg["out"]):
        raise FileExistsError(f"{cfg['out']} exists; delete it or choose another --out")
    os.makedirs(parts, exist_ok=True)
    mpath = os.path.join(parts, "manifest.json")
    old = data._read_json(mpath)
    if old and old != json.loads(json.dumps(manifest)):
        diff = [k for k in manifest if json.loads(json.dumps(manifest[k])) != old.get(k)]
        raise ValueError(f"{parts} holds part of another run (it differs in {', '.join(diff)}); rerun that command to "
                         f"finish it, or delete {parts} to start over")
    data._write_json(mpath, manifest)
    done = _done_parts(parts)
    start = done[-1][1] if done else 0
    if start:
        print(f"resuming: {start} of {len(inputs)} inputs already done in {parts}")

    # --- embed: workers read and preprocess in order; whole images packed into batches under token_budget
    t0, P = time.time(), model.cfg.patch
    loader = torch.utils.data.DataLoader(_Files(inputs, long_side), batch_size=None, collate_fn=_as_is,
                                         sampler=range(start, len(inputs)), num_workers=cfg["num_workers"])
    batch, fails, a, toks = [], [], start, 0

    def flush(b):  # inputs [a, b) are done: embed the batch, write its part
        x, grids = np.zeros((0, model.cfg.dim), np.float32), []  # a part of failures only has no rows
        tok = x if cfg["tokens"] else None
        if batch:
            packed = data.pack_whole([q for _, q, _ in batch], P, model.cfg.alpha)
            x, tok = probe.features(model, packed, dev, tokens=cfg["tokens"])
            grids = packed["packed"].grids
        _write_part(parts, a, b, [(i, (1,) * (q.ndim == 3) + q.shape[1:], sp) for i, q, sp in batch], x,
                    tok if cfg["tokens"] else None, grids, fails)

    with data.progress(total=len(inputs), initial=start, desc="embed") as bar:
        for i, q, sp, why in loader:
            n = 0 if q is None else _tokens_of(q, P)
            if batch and toks + n > cfg["token_budget"]:
                flush(i)
                batch, fails, a, toks = [], [], i, 0
            if q is None:
                fails.append((i, why))
            else:
                batch.append((i, q, sp))
                toks += n
            bar.update()
        if batch or fails or a < len(inputs):
            flush(len(inputs))
    summary = assemble(parts, cfg["out"], meta, inputs)
    summary["seconds"] = round(time.time() - t0, 1)
    print(f"embedded {summary['embedded']} | failed {summary['failed']} of {len(inputs)} inputs -> {cfg['out']}"
          f" ({summary['seconds']:.0f} s this run)",
          *(f"  failed {p}: {r}" for p, r in summary["failures"][:20]), sep="\n")
    if summary["failed"] > 20:
        print(f"  ... {summary['failed'] - 20} more in {cfg['out']} (failed/path, failed/reason)")
    if not summary["embedded"]:  # a wrong --input or --modality, not a few bad files (as data.py's runner)
        raise RuntimeError(f"all {len(inputs)} inputs failed, nothing embedded (first: {summary['failures'][0][0]}: "
                           f"{summary['failures'][0][1]}); every reason is in {cfg['out']}")
    return summary


def assemble(parts, out, meta, inputs) -> dict:
    """The finished parts, in input order, appended one at a time (memory: one part) to out.tmp, renamed to out;
    then OUT.parts/ is removed."""
    files, dim = _done_parts(parts), json.loads(meta["model_cfg"])["dim"]
    assert (files and files[-1][1] == len(inputs)) or not inputs, f"{parts}: parts missing"
    text = h5py.string_dtype()
    cols = dict(embedding=((dim,), np.float32), path=((), text), modality=((), text), shape=((3,), np.int32),
                spacing=((3,), np.float32), **{"failed/path": ((), text), "failed/reason": ((), text)})
    if meta["tokens"]:
        cols.update(tokens=((dim,), np.float16), grid=((3,), np.int32))
    fails, tmp = [], out + ".tmp"
    with h5py.File(tmp, "w") as h:
        for k, (shape, dt) in cols.items():
            h.create_dataset(k, (0, *shape), dt, maxshape=(None, *shape), chunks=True)  # h5py sizes the chunks
        for _, _, f in files:
            with np.load(f) as p:
                idx, fidx = p["idx"], p["fail_idx"]
                new = dict(embedding=p["x"], path=[inputs[i][0] for i in idx], modality=[inputs[i][1] for i in idx],
                           shape=p["shape"], spacing=p["spacing"], **{"failed/path": [inputs[i][0] for i in fidx],
                                                                      "failed/reason": list(p["fail_reason"])})
                if meta["tokens"]:
                    new.update(tokens=p["tokens"], grid=p["grid"])
            fails += zip(new["failed/path"], new["failed/reason"])
            for k, v in new.items():
                v = np.array(v, dtype=object) if cols[k][1] is text else np.asarray(v)
                h[k].resize(h[k].shape[0] + len(v), 0)
                h[k][h[k].shape[0] - len(v):] = v
        if meta["tokens"]:
            h["token_offset"] = np.concatenate([[0], np.cumsum(h["grid"][:].prod(1))]).astype(np.int64)
        n = h["embedding"].shape[0]
        h.attrs.update(meta, summary=f"{n} embedded, {len(fails)} failed of {len(inputs)} inputs")
    os.replace(tmp, out)
    for f in os.listdir(parts):  # the parts, the manifest, and temp files of a killed run
        os.remove(os.path.join(parts, f))
    os.rmdir(parts)
    return dict(embedded=n, failed=len(fails), failures=fails)


if __name__ == "__main__":
    run(configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
