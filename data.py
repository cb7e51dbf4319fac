"""
Data (paper 2.3, 2.4): records and raw images (adapters.py, readers.py, phantom.py) -> preprocessed HDF5
shards -> the mixed 2D/3D stream of cropped, packed steps. Formats, measurements, pitfalls: DATA.md.

    preprocess_records(records, load_fn, out_dir, prefix)   parallel load + preprocess -> shards + report.json
    make_phantom(out_dir), ensure_phantom(data_dir)         the phantom world, through that same path
    ShardDataset(path_or_glob, split, modality)             lazy reader, item = dict(image, labels, ...)
    make_loader(ds2d, ds3d, b2d, b3d, ...)   the stream: workers read, crop, cut micro-batches, pack each step
    iterate_whole(ds, token_budget)          one pass over a split, whole images, packed, for the linear probe
    preprocess_file(path)                    one file -> the exact array the encoder trained on (embed.py)

Usage: python data.py <name> --root R --out O [--workers N] [--max_voxels N] [--file_timeout S]
       python data.py phantom --out data/phantom
"""

import argparse
import contextlib
import faulthandler
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import zlib
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import lru_cache, partial

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import adapters
import phantom
import readers
from adapters import LABELS
from pack import PATCH, Q, pack_arrays
from readers import BadInput
from views import IDENTITY_AUG, MultiCrop

FORMAT_VERSION = 1     # bump when the shard layout changes; readers refuse other versions
LONG_SIDE = {'2d': 224, '3d': 112}   # paper 2.4: long side after resizing
SHARD_SIZE = {'2d': 1024, '3d': 64}  # samples per shard: ~50 MB of 2D, ~60 MB of 3D at the paper's sizes
CT_WINDOW = (2500.0, 250.0)          # (width, level) in HU, paper 2.4: [-1000, 1500] -> [-1, 1]
SPLITS = ('train', 'val', 'test')
STR_KEYS = ('id', 'patient_id', 'study_id', 'modality', 'split')  # the str columns of a shard, per sample
PREPROCESS_VERSION = 1  # bump when readers.py or preprocess_* change what a file becomes (embed.py records it)
COMPRESSION = None     # or 'lzf' (built into h5py): 3D shards ~30% smaller, 3D reads ~1-5 ms slower (DATA.md)
FILE_TIMEOUT = 600     # seconds one record may take to load and preprocess (a 512^2 x 1200 CT: ~1 min); then refused


class ShardError(RuntimeError):
    """A shard that cannot be read (truncated, wrong format version); the message says how to rebuild it."""


# ----------------------------------------------------------------------------- preprocessing (paper 2.4)

def _checked(a, ndim) -> np.ndarray:
    """A raw image as float32 once it passes what every input must: ndim axes, numeric, finite, not constant."""
    what, unit = ('image', 'pixel') if ndim == 2 else ('volume', 'voxel')
    a = np.asarray(a)
    if a.ndim != ndim:
        raise BadInput(f"expected a {'2D grayscale image' if ndim == 2 else '3D volume (Z, H, W)'}, got shape {a.shape}")
    if a.dtype.kind not in 'uifb':
        raise BadInput(f"non-numeric {unit} type {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise BadInput(f"{what} has NaN or inf values ({np.count_nonzero(~np.isfinite(a))} {unit}s)")
    if a.min() == a.max():
        raise BadInput(f"constant {what} (min = max = {float(a.min()):g})")
    return a


def xray_to_unit(img: np.ndarray) -> np.ndarray:
    """Min-max normalise a (non-constant) 2D array to float32 [-1, 1] (paper 2.4: min-max for X-rays)."""
    x = np.asarray(img, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    return np.clip((x - lo) * (2.0 / (hi - lo)) - 1.0, -1.0, 1.0)


def hu_to_unit(hu: np.ndarray, width: float = CT_WINDOW[0], level: float = CT_WINDOW[1]) -> np.ndarray:
    """CT window: [level - width/2, level + width/2] HU -> [-1, 1], clipped outside (paper 2.4)."""
    return np.clip((np.asarray(hu, dtype=np.float32) - level) * (2.0 / width), -1.0, 1.0)


def _resize(x: np.ndarray, size) -> np.ndarray:
    """Resize a 2D or 3D float array: area filter on shrinking axes (no aliased rib edges), linear on growing ones."""
    size = tuple(int(s) for s in size)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if size == x.shape:
        return x
    t = torch.from_numpy(x)[None, None]  # (1, 1, *S)
    down = tuple(min(s, d) for s, d in zip(size, x.shape))
    if down != x.shape:
        t = F.interpolate(t, size=down, mode='area')
    if down != size:
        t = F.interpolate(t, size=size, mode='bilinear' if x.ndim == 2 else 'trilinear', align_corners=False)
    return t[0, 0].numpy()


def resize_long_side(img: np.ndarray, long_side: int) -> np.ndarray:
    """Resize a 2D (H, W) or 3D (Z, H, W) array so its longest axis is `long_side`, keeping the aspect ratio."""
    scale = long_side / max(img.shape)
    return _resize(img, [max(1, round(s * scale)) for s in img.shape])


def resample_ct(hu: np.ndarray, spacing_zyx, long_side: int = LONG_SIDE['3d']) -> np.ndarray:
    """Spacing-aware resize: the physically longest axis gets `long_side` voxels, all voxels come out isotropic."""
    sp = np.asarray(spacing_zyx, dtype=np.float64)
    if sp.shape != (3,) or not np.isfinite(sp).all() or (sp <= 0).any():
        raise BadInput(f"invalid voxel spacing {tuple(spacing_zyx)}: need 3 positive mm values (z, y, x)")
    extent = np.asarray(hu.shape) * sp  # mm
    return _resize(hu, [max(1, round(e / extent.max() * long_side)) for e in extent])


def _sample(x, what, long_side) -> np.ndarray:
    """x as (1, ...) once every side is at least one patch."""
    if min(x.shape) < PATCH:
        raise BadInput(f"{what} is {'x'.join(map(str, x.shape))} after resizing its long side to {long_side}: "
                       f"smaller than one {PATCH}-pixel patch (extreme aspect ratio or too few slices)")
    return x[None]


def preprocess_xray(img, long_side: int = LONG_SIDE['2d']) -> np.ndarray:
    """Raw radiograph (H, W), any numeric dtype -> float32 (1, H', W') in [-1, 1], long side `long_side`."""
    x = resize_long_side(xray_to_unit(_checked(img, 2)), long_side)  # paper order: normalise, then downsize
    return _sample(x, 'image', long_side)  # (1, H, W)


def preprocess_ct(hu, spacing_zyx, long_side: int = LONG_SIDE['3d']) -> np.ndarray:
    """HU volume (Z, H, W), spacing mm -> float32 (1, Z', H', W') in [-1, 1], windowed first (metal stays local)."""
    return _sample(resample_ct(hu_to_unit(_checked(hu, 3)), spacing_zyx, long_side), 'volume', long_side)  # (1, Z, H, W)


# ----------------------------------------------------------------------------- shards

def _quantise(x: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(x, -1.0, 1.0) * Q).astype(np.int8)


def write_shard(path, samples: list, meta: dict | None = None):
    """Samples (image float32 or int8, labels, STR_KEYS, spacing) to one shard, atomically (atomic_write)."""
    n = len(samples)
    imgs = [s['image'] if s['image'].dtype == np.int8 else _quantise(s['image']) for s in samples]
    shape = np.array([(1,) + im.shape[1:] if im.ndim == 3 else im.shape[1:] for im in imgs], np.int32).reshape(n, 3)
    offset = np.concatenate([[0], np.cumsum([im.size for im in imgs])]).astype(np.int64)
    flat = np.concatenate([im.ravel() for im in imgs]) if n else np.zeros(0, np.int8)

    def write(tmp):
        with h5py.File(tmp, 'w') as h:
            h.attrs.update(meta or {}, format_version=FORMAT_VERSION, labels=list(LABELS))
            comp = COMPRESSION if flat.size else None  # 64 KiB chunks: a 2D read decompresses little beyond itself
            h.create_dataset('image', data=flat, compression=comp, chunks=(min(flat.size, 1 << 16),) if comp else None)
            h['offset'], h['shape'] = offset, shape
            # per-sample CRC32 (0.3 ms per 112^3 volume): a shard truncated or overwritten after writing reads
            # back as zeros or garbage through an open handle, never as an error
            h['crc32'] = np.array([zlib.crc32(np.ascontiguousarray(im)) for im in imgs], np.uint32).reshape(n)
            h['labels'] = np.array([s['labels'] for s in samples], np.float32).reshape(n, len(LABELS))
            h['spacing'] = np.array([s.get('spacing', (np.nan,) * 3) for s in samples], np.float32).reshape(n, 3)
            for k in STR_KEYS:
                h.create_dataset(k, data=np.array([str(s[k]) for s in samples], dtype=object), dtype=h5py.string_dtype())
    atomic_write(str(path), write)


def _read_json(path) -> dict:
    """The dict in a JSON file, or {} if it is missing, unreadable or holds something else."""
    try:
        with open(path) as f:
            obj = json.load(f)
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def atomic_write(path, write):
    """write(tmp) to a temp file beside path, then rename it over path: a crash, a kill or a full disk never leaves a
    half-written file, and the old one, if any, is kept. The one atomic write of shards, reports, logs, checkpoints."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _write_json(path, obj):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def _rebuild_hint(path) -> str:
    """The command that built this shard, from its folder's report.json, to quote in errors."""
    folder, name = os.path.split(os.path.abspath(path))
    for prefix, rep in _read_json(os.path.join(folder, 'report.json')).items():
        if name.startswith(prefix + '_') and isinstance(rep, dict) and 'command' in rep:
            return rep['command']
    return f"the `python data.py <name> --root R --out {folder}` command that built it"


def _open_shard(path) -> h5py.File:
    """Open a shard read-only and check it; ShardError naming the file and the fix otherwise."""
    try:
        h = h5py.File(path, 'r')
    except OSError as e:
        raise ShardError(f"shard {path}: cannot be read, truncated or corrupt ({e}); delete it and re-run "
                         f"{_rebuild_hint(path)} (finished shards are skipped)") from None
    version = h.attrs.get('format_version')
    try:
        ok = (version == FORMAT_VERSION and list(h.attrs['labels']) == list(LABELS) and 'crc32' in h
              and h['offset'][-1] == h['image'].shape[0])
    except (KeyError, OSError):
        ok = False
    if not ok:
        h.close()
        raise ShardError(f"shard {path}: expected format_version {FORMAT_VERSION}, found {version}; delete the old "
                         f"shards and re-run {_rebuild_hint(path)}" if version != FORMAT_VERSION else
                         f"shard {path}: inconsistent contents (labels {list(LABELS)}, checksums and image size "
                         f"expected); delete it and re-run {_rebuild_hint(path)}")
    return h


def _find_shards(path_or_glob) -> list:
    p = str(path_or_glob)
    return sorted(glob.glob(os.path.join(p, '*.h5')) if os.path.isdir(p) else glob.glob(p))


def check_complete(path_or_glob):
    """ShardError if a data set read here has "complete": false in report.json (its run was interrupted)."""
    p = str(path_or_glob)
    picked = [(p, None)] if os.path.isdir(p) else [os.path.split(os.path.abspath(f)) for f in _find_shards(p)]
    for folder, name in picked:  # name None: the whole folder is read
        for prefix, rep in _read_json(os.path.join(folder, 'report.json')).items():
            if isinstance(rep, dict) and rep.get('complete') is False and (name is None or name.startswith(prefix + '_')):
                raise ShardError(f"{folder}: data set '{prefix}' is incomplete: its preprocessing run was interrupted "
                                 f"(report.json: \"complete\": false), so some of its shards are missing. Resume it with "
                                 f"`{rep.get('command', f'python data.py {prefix} --root R --out {folder}')}` "
                                 f"(finished shards are kept)")


def _preprocess_raw(raw, mod, long_side=None, spacing_2d=None):
    """A loader's raw image (2D (H, W), 3D (hu, spacing_zyx)) -> (int8 (1, ...) as stored, spacing mm (z, y, x)).
    long_side: None (the paper's), an int or {'2d': n, '3d': m}; spacing_2d: (row, col) mm if the source says."""
    ls = long_side[mod] if isinstance(long_side, dict) else (long_side or LONG_SIDE[mod])
    if mod == '2d':
        raw = np.asarray(raw)
        img = preprocess_xray(raw, ls)
        sp_in = np.asarray(spacing_2d if spacing_2d is not None else (np.nan,) * 2, np.float64)[-2:]
        spacing = (np.nan, *(sp_in * np.array(raw.shape) / img.shape[1:]))
    else:
        hu, sp_in = raw
        img = preprocess_ct(hu, sp_in, ls)
        spacing = tuple(np.asarray(sp_in, np.float64) * np.shape(hu) / img.shape[1:])
    return _quantise(img), spacing


class _FileTimeout(BaseException):
    """Raised by the per-file alarm; a BaseException, so a reader's `except Exception` cannot mistake it for corruption."""


def _on_alarm(signum, frame):
    raise _FileTimeout


def _prepare_one(load_fn, long_side, max_voxels, timeout, rec):
    """Worker: load + preprocess one record within `timeout` s. Returns (sample, None) or (None, reason)."""
    try:  # outside the timed part: an alarm that fires while it is being disarmed still lands here
        return _timed(timeout, partial(_prepare, load_fn, long_side, max_voxels, rec))
    except _FileTimeout:
        return None, f"took longer than {timeout:g} s to load (a hung decoder?); raise the limit with --file_timeout S"


def _timed(timeout, fn):
    """fn() with a per-file time limit (raises _FileTimeout), where the platform has interval timers."""
    alarm = bool(timeout) and hasattr(signal, 'setitimer') and threading.current_thread() is threading.main_thread()
    hard = bool(timeout) and mp.parent_process() is not None
    if alarm:  # Python-level work is interrupted at the limit; a decoder stuck in C code, only once it returns...
        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    if hard:  # ... so a pool worker also exits at twice the limit, and _results reports its record
        faulthandler.dump_traceback_later(2 * timeout + 5, exit=True)
    try:
        return fn()
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if hard:
            faulthandler.cancel_dump_traceback_later()


def _prepare(load_fn, long_side, max_voxels, rec):
    """Load + preprocess one record: (sample, None) or (None, reason)."""
    try:
        rec = dict(rec, max_voxels=max_voxels) if max_voxels else rec  # readers.MAX_VOXELS otherwise
        labels = rec.get('labels')
        if labels is None:
            raise BadInput('missing label row')
        labels = np.asarray(labels, np.float32)
        if labels.shape != (len(LABELS),):
            raise BadInput(f"labels have shape {labels.shape}, expected ({len(LABELS)},) in order {LABELS}")
        q, spacing = _preprocess_raw(load_fn(rec), rec['modality'], long_side, rec.get('spacing'))
        return dict({k: rec[k] for k in STR_KEYS}, image=q, labels=labels, spacing=spacing), None
    except BadInput as e:
        return None, str(e)
    except Exception as e:  # a decoder's own error on a corrupt file; counted, never silent
        return None, f"unexpected {type(e).__name__}: {e}"


class _LogLines:
    """tqdm's stream when stderr is a file or a pipe: each redraw one plain line, clears dropped."""
    flush = staticmethod(lambda: None)

    def write(self, s):
        if s.strip():
            print(s.strip(), file=sys.stderr, flush=True)


def progress(**kw) -> tqdm:
    """A tqdm bar at a terminal; in a file or pipe a plain line every 30 s at most, stdout line-buffered."""
    if sys.stderr.isatty():
        return tqdm(dynamic_ncols=True, **kw)
    getattr(sys.stdout, 'reconfigure', lambda **_: None)(line_buffering=True)
    return tqdm(file=_LogLines(), mininterval=30, **kw)


def _records_sha(recs, load_fn, long_side, limits=()) -> str:
    """Fingerprint of a shard's records, labels, loader and size: a re-run with others rebuilds the shard. limits:
    non-default --max_voxels / --file_timeout, which decide what fails: raising one retries the files it refused."""
    ls = sorted(long_side.items()) if isinstance(long_side, dict) else long_side
    h = hashlib.sha1(json.dumps([FORMAT_VERSION, ls, getattr(load_fn, '__qualname__', '')] + list(limits)).encode())
    for r in recs:
        lab = r.get('labels')
        h.update(f"{r['id']}\t{r.get('path', '')}\t{'-' if lab is None else np.asarray(lab, np.float32).tolist()}\n".encode())
    return h.hexdigest()


def _new_pool(workers):
    # spawn, not fork: the parent may hold torch/OpenMP threads, and a forked child of those can hang; each
    # worker starts with torch.set_num_threads(1), as there is one worker per core already
    return ProcessPoolExecutor(workers, mp.get_context('spawn'), initializer=torch.set_num_threads, initargs=(1,))


def _results(work, records, workers, command):
    """work(r) for each record, in order, over `workers` spawned processes (here if 1). A worker that dies (kill -9,
    the kernel's OOM killer) breaks the pool: the records it may have held are run again one at a time in a fresh
    process, and one whose process dies again is reported as failed, so no record is lost and the run goes on."""
    if workers <= 1:
        yield from map(work, records)
        return
    pool, inflight, todo = _new_pool(workers), deque(), iter(records)
    try:
        while True:
            while len(inflight) < 4 * workers and (r := next(todo, None)) is not None:  # a bounded window, in order
                inflight.append((r, pool.submit(work, r)))
            if not inflight:
                pool.shutdown()  # all done: leave no process behind
                return
            r, fut = inflight.popleft()
            try:
                yield fut.result()
                continue
            except BrokenProcessPool:
                lost = [(r, fut)] + list(inflight)
            pool.shutdown(wait=False, cancel_futures=True)
            print(f"warning: a preprocessing worker process died (killed by the OS: out of memory? kill -9?); its "
                  f"{len(lost)} record(s) in flight run again one at a time. Finished shards are kept: if this run "
                  f"stops, resume it with `{command}`", file=sys.stderr, flush=True)
            solo = None  # one process at a time: when it dies, the record it held is the one that killed it
            for r, fut in lost:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    yield fut.result()  # finished before the pool broke
                    continue
                for _ in range(2):  # twice: a record that merely shared the broken pool may meet a stray kill too
                    solo = solo or _new_pool(1)
                    try:
                        result = solo.submit(work, r).result()
                        break
                    except BrokenProcessPool:
                        solo.shutdown(wait=False)
                        solo, result = None, (None, "its process died each time it read it, twice on its own (killed "
                                              "by the OS: out of memory? or stuck in a decoder past twice --file_timeout)")
                yield result
            if solo:
                solo.shutdown()
            pool, inflight = _new_pool(workers), deque()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def preprocess_records(records: list, load_fn, out_dir, prefix: str, shard_size=None, workers=None,
                       long_side=None, command=None, max_voxels=None, file_timeout=FILE_TIMEOUT) -> dict:
    """Records (as adapters.py makes them) loaded by load_fn (picklable: raw 2D (H, W) or 3D (hu, spacing_zyx), or
    BadInput), preprocessed over all cores into shards {prefix}_{split}_{modality}_NNNNN.h5 -> the report (DATA.md).
    max_voxels (None: readers.MAX_VOXELS) caps the size a file's header may declare; file_timeout, seconds per file."""
    os.makedirs(out_dir, exist_ok=True)
    command = command or f"python data.py {prefix} --root R --out {out_dir}"
    groups, seen = {}, set()
    for i, r in enumerate(records):
        missing = [k for k in STR_KEYS if k not in r]
        if missing:
            raise ValueError(f"{prefix} record {i} ({r.get('id', '?')}): missing field '{missing[0]}'")
        if r['split'] not in SPLITS or r['modality'] not in LONG_SIDE:
            raise ValueError(f"{prefix} record {r['id']}: split {r['split']!r} / modality {r['modality']!r}, "
                             f"expected one of {SPLITS} / {tuple(LONG_SIDE)}")
        if r['id'] in seen:
            raise ValueError(f"{prefix} record {r['id']}: duplicate id")
        seen.add(r['id'])
        groups.setdefault((r['split'], r['modality']), []).append(r)
    plan = []  # (shard path, its records)
    for (split, mod), rs in sorted(groups.items()):
        n = shard_size or SHARD_SIZE[mod]
        plan += [(os.path.join(out_dir, f"{prefix}_{split}_{mod}_{k:05d}.h5"), rs[i:i + n])
                 for k, i in enumerate(range(0, len(rs), n))]
    rep = dict(command=command, written=0, skipped=0, failed=0, shards_written=0, shards_skipped=0, failures=[])
    todo = []
    limits = [f"max_voxels={max_voxels}"] * bool(max_voxels) + [f"timeout={file_timeout}"] * (file_timeout != FILE_TIMEOUT)
    for path, rs in plan:
        sha = _records_sha(rs, load_fn, long_side, limits)
        try:  # a finished shard of the same records is skipped; its failures stay in the report (still missing)
            with _open_shard(path) as h:
                if h.attrs.get('records_sha') == sha:
                    rep['failures'] += json.loads(h.attrs['failures'])
                    rep['skipped'] += len(h['offset']) - 1
                    rep['shards_skipped'] += 1
                    continue
        except ShardError:  # missing or unreadable: (re)build it
            pass
        todo.append((path, rs, sha))
    planned = {os.path.basename(p) for p, _ in plan}
    rep['stale'] = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, f"{prefix}_*.h5"))
                          if os.path.basename(p) not in planned)
    flat = [r for _, rs, _ in todo for r in rs]
    # "complete": false until the last shard is written: readers refuse what a killed run left (check_complete)
    report = os.path.join(out_dir, 'report.json')  # {data set prefix: report of its last preprocessing run}
    _write_json(report, dict(_read_json(report), **{prefix: dict(command=command, complete=False)}))
    work = partial(_prepare_one, load_fn, long_side, max_voxels, file_timeout)
    workers = min(workers or os.cpu_count() or 1, max(len(flat), 1))
    results = _results(work, flat, workers, command)
    try:
        with progress(total=len(flat), desc=f"{prefix} preprocess", disable=not flat) as bar:
            for path, rs, sha in todo:
                samples, fails = [], []
                for r in rs:
                    s, why = next(results)
                    bar.update()
                    if s is None:
                        fails.append(dict(file=str(r.get('path', r['id'])), id=r['id'], reason=why))
                    else:
                        samples.append(s)
                write_shard(path, samples, dict(command=command, records_sha=sha, failures=json.dumps(fails),
                                                long_side=json.dumps(long_side)))
                rep['written'] += len(samples)
                rep['shards_written'] += 1
                rep['failures'] += fails
    finally:
        results.close()  # stops the workers, also when interrupted
    rep['failed'], rep['complete'] = len(rep['failures']), True
    _write_json(report, dict(_read_json(report), **{prefix: rep}))
    print(f"{prefix}: written {rep['written']} | skipped {rep['skipped']} (finished shards) | failed {rep['failed']}"
          f" | shards {rep['shards_written']} written, {rep['shards_skipped']} skipped -> {out_dir}",
          *(f"  failed {f['file']}: {f['reason']}" for f in rep['failures'][:20]), sep="\n")
    if rep['failed'] > 20:
        print(f"  ... {rep['failed'] - 20} more in {report}")
    if rep['stale']:
        print(f"  warning: {len(rep['stale'])} shard(s) of '{prefix}' in {out_dir} are not from these records "
              f"(e.g. {rep['stale'][0]}); ShardDataset would read them too: delete them")
    if flat and rep['written'] == 0:  # a broken loader or wrong --root, not a few bad files
        raise RuntimeError(f"{prefix}: all {len(flat)} records failed, nothing written (first: "
                           f"{rep['failures'][-len(flat)]['file']}: {rep['failures'][-len(flat)]['reason']})")
    return rep


class ShardDataset(torch.utils.data.Dataset):
    """Samples of the shards in a folder or glob, optionally one split / modality: the index is read here, the
    images through h5py handles opened by the process that reads (no worker inherits one through fork)."""

    def __init__(self, path_or_glob, split=None, modality=None):
        check_complete(path_or_glob)
        self.files = _find_shards(path_or_glob)
        if not self.files:
            raise FileNotFoundError(f"no shards (*.h5) at {path_or_glob}; build them with "
                                    f"`python data.py <name> --root R --out DIR` (or `python data.py phantom --out DIR`)")
        cols, held = {}, Counter()  # held: (modality, split) -> samples in these shards, for the error below
        for fi, path in enumerate(self.files):
            with _open_shard(path) as h:
                off, n = h['offset'][:], len(h['offset']) - 1
                col = {k: h[k].asstr()[:] for k in STR_KEYS} | {k: h[k][:] for k in ('shape', 'labels', 'spacing')}
                col.update(file=np.full(n, fi), start=off[:-1], stop=off[1:], crc32=h['crc32'][:])
            held.update(zip(col['modality'], col['split']))
            keep = np.ones(n, bool) & (col['split'] == split if split else True) & (
                col['modality'] == modality if modality else True)
            for k, v in col.items():
                cols.setdefault(k, []).append(v[keep])
        for k, v in cols.items():
            setattr(self, k, np.concatenate(v))
        if not len(self.id):
            holds = ', '.join(f"{m} {sp}: {n}" for (m, sp), n in sorted(held.items())) or 'no samples at all'
            raise ValueError(f"{path_or_glob}: no samples of split {split or 'any'!r}, modality {modality or 'any'!r} in "
                             f"its {len(self.files)} shards; it holds {holds}. Preprocess those (python data.py <name> "
                             f"--root R --out DIR) or ask for what is there (train.py: --batch_2d=0 or --batch_3d=0)")
        self._handles, self._pid = {}, None

    def __len__(self):
        return len(self.id)

    def _handle(self, fi):
        if self._pid != os.getpid():  # first read in this process (or a forked child): fresh handles
            self._handles, self._pid = {}, os.getpid()
        if fi not in self._handles:
            self._handles[fi] = _open_shard(self.files[fi])
        return self._handles[fi]

    def __getstate__(self):  # pickled into spawned workers without open handles
        return dict(self.__dict__, _handles={}, _pid=None)

    def read(self, i) -> np.ndarray:
        """The stored int8 image of sample i (q = 127 x), (1, H, W) or (1, Z, H, W), checksum verified."""
        z, hgt, wid = self.shape[i]
        path = self.files[self.file[i]]
        try:
            q = self._handle(self.file[i])['image'][self.start[i]:self.stop[i]]
        except (OSError, ShardError) as e:  # e.g. truncated since the index was read; name the sample too
            fix = "" if isinstance(e, ShardError) else f"; delete it and re-run {_rebuild_hint(path)}"
            raise ShardError(f"sample {self.id[i]} (index {i}) of shard {path}: {e}{fix}") from None
        if zlib.crc32(q) != self.crc32[i]:
            raise ShardError(f"shard {path}: sample {self.id[i]} (index {i}) fails its CRC32 check: the file was "
                             f"truncated or overwritten after it was written; delete it and re-run {_rebuild_hint(path)}")
        return q.reshape((1, hgt, wid) if self.modality[i] == '2d' else (1, z, hgt, wid))

    def __getitem__(self, i):
        img = (self.read(i) / np.float32(Q)).astype(np.float32, copy=False)  # exact at -1, 0, 1
        return dict({k: str(getattr(self, k)[i]) for k in STR_KEYS}, image=img, labels=self.labels[i].copy(),
                    spacing=self.spacing[i].copy())


# ----------------------------------------------------------------------------- mixed 2D/3D stream (paper 2.3)

@lru_cache(maxsize=4)  # a few per process (each worker keeps its own)
def _epoch(n: int, seed: int, modality_id: int, e: int) -> np.ndarray:
    return np.random.default_rng((seed, 0, modality_id, e)).permutation(n)


def stream_index(n: int, seed: int, modality_id: int, k: int) -> int:
    """Sample at position k of an endless stream over n: each epoch k // n a permutation seeded by its number."""
    return int(_epoch(n, seed, modality_id, k // n)[k % n])


def split_micro(tokens_per_sample: list, n_micro: int) -> list:
    """n_micro + 1 boundaries cutting whole samples (L_pred needs all views) into balanced contiguous chunks."""
    total, bounds, acc, j = sum(tokens_per_sample), [0], 0, 1
    for i, t in enumerate(tokens_per_sample):
        acc += t
        left = len(tokens_per_sample) - (i + 1)
        if j < n_micro and (acc >= total * j / n_micro or left == n_micro - j):
            bounds.append(i + 1)
            j += 1
    bounds.append(len(tokens_per_sample))
    return bounds


def micro_batches(batch: dict, n: int = 0) -> list:
    """[(Packed, aug, (a, b))] micro-batches as views, the largest halved until there are n (as many as any rank)."""
    pk, V, cuts = batch['packed'], batch['views_per_sample'], [tuple(c) for c in batch['micro']]
    toks = [sum(pk.seqlens[i * V:(i + 1) * V]) for i in range(len(batch['id']))]
    while len(cuts) < n:
        j = max(range(len(cuts)), key=lambda j: (cuts[j][1] - cuts[j][0] > 1, sum(toks[cuts[j][0]:cuts[j][1]])))
        a, b = cuts[j]
        c = a + split_micro(toks[a:b], 2)[1]
        cuts[j:j + 1] = [(a, c), (c, b)]
    return [(pk.slice(a * V, b * V), batch['aug'][a * V:b * V], (a, b)) for a, b in cuts]


class _StepBatches(torch.utils.data.Dataset):
    """Item s = this rank's batch of step s: stream positions (s * world_size + rank) * b + i, crops seeded by them,
    so ranks never overlap and the global batch does not depend on their number (DATA.md, "Mixed stream")."""

    def __init__(self, ds2d, ds3d, b2d, b3d, rank, world_size, seed, crop, skip_bad=False, n_views=None,
                 token_budget=None, alpha=128.0):
        self.parts = [(ds, b, m) for m, (ds, b) in enumerate(((ds2d, b2d), (ds3d, b3d))) if b]
        for ds, b, m in self.parts:
            if ds is None or len(ds) == 0:
                raise ValueError(f"batch_{m + 2}d = {b} but there are no {m + 2}D samples; set it to 0 (stage 1 is 2D only)")
        assert self.parts, "b2d + b3d must be positive"
        self.rank, self.world_size, self.seed, self.crop, self.skip_bad = rank, world_size, seed, crop, skip_bad
        self.n_views, self.token_budget, self.alpha = n_views, token_budget, alpha

    def __len__(self):
        return 1 << 62  # endless; DataLoader only needs the sampler's indices

    def _read(self, ds, idx, skipped):
        """(index, int8 image) of ds[idx]; with skip_bad, an unreadable one is replaced by the next, its error kept."""
        for j in range(len(ds) if self.skip_bad else 1):
            try:
                return (idx + j) % len(ds), ds.read((idx + j) % len(ds))
            except ShardError as e:
                if not self.skip_bad:
                    raise
                skipped.append(str(e))
        raise ShardError(f"skip_bad: no readable sample left in {len(ds)} samples; last error: {skipped[-1]}")

    def __getitem__(self, step):
        crops, augs, labels, mods, ids, skipped = [], [], [], [], [], []
        for ds, b, m in self.parts:
            for i in range(b):
                k = (step * self.world_size + self.rank) * b + i  # position in this modality's stream
                j, q = self._read(ds, stream_index(len(ds), self.seed, m, k), skipped)
                cs, aug = self.crop(q, np.random.default_rng((self.seed, 1, m, k)))
                crops.append(cs[:self.n_views])
                augs.append(aug[:self.n_views])
                labels.append(ds.labels[j])
                mods.append(str(ds.modality[j]))
                ids.append(str(ds.id[j]))
        P = self.crop.patch
        toks = [sum(c[0].size // P ** (c.ndim - 1) for c in cs) for cs in crops]
        n_micro = min(len(crops), max(1, math.ceil(sum(toks) / self.token_budget))) if self.token_budget else 1
        bounds, share = split_micro(toks, n_micro), torch.utils.data.get_worker_info() is not None
        # one Packed for the whole step (a few tensors to hand over, ~0.3 ms each), cut by micro_batches()
        batch = {'packed': pack_arrays([c for cs in crops for c in cs], P, self.alpha, share),  # sample-major
                 'aug': torch.from_numpy(np.concatenate(augs)), 'views_per_sample': len(crops[0]),
                 'micro': list(zip(bounds, bounds[1:])), 'labels': torch.from_numpy(np.stack(labels)),  # (B, 5)
                 'modality': mods, 'id': ids, 'step': int(step), 'skipped': skipped}
        if share:  # whoever lets go of shared memory last returns its pages to the OS (~5 ms for 90 MB): this
            self._recent = (getattr(self, '_recent', []) + [batch])[-3:]  # worker, not the training process
        return batch


def make_loader(ds2d, ds3d, b2d: int, b3d: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                start_step: int = 0, crop: MultiCrop = None, workers: int = 0, stop_step=None, skip_bad=False,
                n_views=None, token_budget=None, alpha=128.0, pin_memory=False):
    """This rank's batches from step start_step on (endless unless stop_step), each built whole by one worker: b2d 2D
    then b3d 3D samples (ds3d None if b3d = 0), n_views views each, micro-batches under token_budget (DATA.md)."""
    ds = _StepBatches(ds2d, ds3d, b2d, b3d, rank, world_size, seed, crop or MultiCrop(), skip_bad, n_views,
                      token_budget, alpha)
    steps = range(start_step, stop_step if stop_step is not None else 1 << 62)  # the sampler yields step numbers
    return torch.utils.data.DataLoader(ds, batch_size=None, sampler=steps, num_workers=workers, pin_memory=pin_memory,
                                       persistent_workers=workers > 0, prefetch_factor=2 if workers else None)


class ToDevice:
    """The loader's batches with their Packed on `device`. On CUDA the copy runs on a side stream from pinned memory:
    prefetch() starts the next batch's copy while this step still computes, next() makes the compute stream wait for
    it (on the GPU, not the host). Elsewhere a plain .to(). Slices of it (micro_batches) stay on the device."""

    def __init__(self, loader, device: torch.device):
        self.it, self.device, self.ahead = iter(loader), device, None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def prefetch(self):
        """Take the next batch from the loader and start its copy (waits only for the loader's worker)."""
        if self.ahead is None:
            batch = next(self.it)
            with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
                self.ahead = dict(batch, packed=batch['packed'].to(self.device, non_blocking=True))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        self.prefetch()  # a no-op if the loop already started it
        batch, self.ahead = self.ahead, None
        if self.stream:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)  # the GPU waits for the copy; the host goes on
            for t in batch['packed'].tensors():  # made on the side stream, used on this one: not reused too early
                t.record_stream(compute)
        return batch


def pad_to_patches(x: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """An image padded evenly to whole patches with -1 (air, black; -127 if int8): a 40-slice CT gains 2."""
    return np.pad(x, [(0, 0)] + [(-s % patch // 2, -s % patch - -s % patch // 2) for s in x.shape[1:]],
                  constant_values=-Q if x.dtype == np.int8 else -1.0)


def pack_whole(images: list, patch: int = PATCH, alpha: float = 128.0) -> dict:
    """Stored int8 images, whole, padded to whole patches and packed, with the identity augmentation: the input of
    probe.features (the probe and embed.py). In shared memory inside a DataLoader worker."""
    share = torch.utils.data.get_worker_info() is not None
    return {'packed': pack_arrays([pad_to_patches(q, patch) for q in images], patch, alpha, share),
            'aug': torch.tensor([IDENTITY_AUG] * len(images), dtype=torch.float64)}


def _whole_batch(ds, patch, alpha, idx) -> dict:
    """Samples idx of ds, whole and packed (int8 patches), in the DataLoader worker: see iterate_whole."""
    return dict(pack_whole([ds.read(i) for i in idx], patch, alpha), labels=torch.from_numpy(ds.labels[idx]),
                modality=[str(ds.modality[i]) for i in idx], id=[str(ds.id[i]) for i in idx],
                patient_id=[str(ds.patient_id[i]) for i in idx])


def iterate_whole(ds: 'ShardDataset', token_budget: int, rank: int = 0, world_size: int = 1, workers: int = 0,
                  patch: int = PATCH, alpha: float = 128.0, pin_memory: bool = False):
    """One pass over ds in order (rank r takes samples r, r + world_size, ...), whole images padded to whole patches,
    in batches of consecutive samples of at most token_budget tokens (a larger one goes alone; DATA.md)."""
    groups, toks = [], 0
    for i in range(rank, len(ds), world_size):
        n = math.prod(-(-int(s) // patch) for s in ds.shape[i][int(ds.modality[i] == '2d'):])  # tokens once padded
        if not groups or toks + n > token_budget:
            groups.append([])
            toks = 0
        groups[-1].append(i)
        toks += n
    return torch.utils.data.DataLoader(groups, batch_size=None, collate_fn=partial(_whole_batch, ds, patch, alpha),
                                       num_workers=workers, pin_memory=pin_memory)


# ----------------------------------------------------------------------------- one file, as in training (embed.py)

def _is_slice(path) -> bool:
    """A DICOM file with a cross-sectional position (ImagePositionPatient): a CT slice, not a radiograph."""
    try:
        return 'ImagePositionPatient' in readers._need('pydicom').dcmread(path, stop_before_pixels=True)
    except ImportError:
        raise
    except Exception:  # unreadable header: left to the loader, which names the reason
        return False


def find_inputs(path, modality=None) -> list:
    """[(file or DICOM series folder, '2d' | '3d' | None (unknown type))] under path, sorted, as `python data.py folder`
    reads them. modality None decides from the data: pictures and lone DICOM images are radiographs; NIfTI, npz and
    a folder holding DICOM slices (ImagePositionPatient) are CT. '2d' / '3d' force it (a DICOM folder is a series)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    if not os.path.isdir(path):
        return [(path, modality or _kind_modality(path))]
    out = []
    for d, dirs, files in os.walk(path):
        dirs.sort()
        files = [os.path.join(d, f) for f in sorted(files)]
        dicom = [f for f in files if readers.file_kind(f) == 'dicom']
        series = modality == '3d' and dicom or modality is None and any(_is_slice(f) for f in dicom)
        if series:  # the folder is one volume (readers.load_ct reads its DICOM files)
            out.append((d, '3d'))
        out += [(f, modality or _kind_modality(f)) for f in files if not (series and f in dicom)]
    return sorted(out)


def _kind_modality(path):
    kind = 'npz' if path.lower().endswith('.npz') else readers.file_kind(path)
    return {'picture': '2d', 'dicom': '2d', 'nifti': '3d', 'npz': '3d', 'series': '3d'}.get(kind)


def load_file(path, modality, long_side=None):
    """(int8 (1, ...) as a shard stores it, spacing_zyx mm) of one input of find_inputs, or BadInput(reason)."""
    if modality not in ('2d', '3d'):
        raise BadInput(f"unknown file type ({os.path.basename(path)}): expected .png, .jpg, .jpeg, DICOM, .nii, "
                       ".nii.gz, .npz (RAD-ChestCT's layout) or a folder of DICOM slices")
    rec = {'path': path}
    raw = (readers.load_xray(rec) if modality == '2d' else
           readers.load_radchest(rec) if path.lower().endswith('.npz') else readers.load_ct(rec))
    return _preprocess_raw(raw, modality, long_side)


def preprocess_file(path, modality=None, long_side=None) -> dict:
    """One file (or DICOM series folder) -> dict(image, modality, spacing): image is float32 (1, H, W) or
    (1, Z, H, W) in [-1, 1], exactly what the encoder trained on (readers.py, preprocess_xray / preprocess_ct and
    the int8 step of the shards); long_side as the encoder was trained: trained_long_side(its data_dir)."""
    items = find_inputs(path, modality)
    if len(items) != 1:
        raise ValueError(f"{path}: holds {len(items)} inputs; preprocess_file takes one file or one DICOM series "
                         f"folder (embed.py takes whole folders)")
    q, spacing = load_file(*items[0], long_side)
    return dict(image=(q / np.float32(Q)).astype(np.float32, copy=False), modality=items[0][1], spacing=spacing)


def trained_long_side(data_dir) -> dict:
    """{'2d': n, '3d': m}: the long sides of the shards in data_dir (their `long_side` attribute), the paper's
    LONG_SIDE for a modality they do not hold; ValueError if a modality was built at several."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: the encoder's training data is not here, so its long sides are unknown; "
                                f"pass them (embed.py: --long_side_2d=N --long_side_3d=M, as it was trained)")
    seen = {'2d': set(), '3d': set()}
    for path in _find_shards(data_dir):
        mod = os.path.basename(path)[:-3].rsplit('_', 2)[-2]
        with _open_shard(path) as h:
            ls = json.loads(h.attrs.get('long_side', 'null'))
        if mod in seen:
            seen[mod].add(ls[mod] if isinstance(ls, dict) else ls or LONG_SIDE[mod])
    for mod, v in seen.items():
        if len(v) > 1:
            raise ValueError(f"{data_dir}: {mod} shards were built at several long sides {sorted(v)}; pass the one "
                             f"this encoder trained on (embed.py: --long_side_{mod}=N)")
    return {mod: v.pop() if v else LONG_SIDE[mod] for mod, v in seen.items()}


# ----------------------------------------------------------------------------- the phantom world (phantom.py)

def make_phantom(out_dir, workers=None, **config):
    """The phantom world into out_dir; config not given is as phantom.json recorded it, else phantom.py's."""
    marker = os.path.join(out_dir, 'phantom.json')
    done = _read_json(marker)
    cfg = dict(seed=0, n2d=list(phantom.N2D), n3d=list(phantom.N3D), long_side_2d=phantom.LONG_SIDE_2D,
               long_side_3d=phantom.LONG_SIDE_3D)
    cfg.update({k: v for k, v in done.get('config', {}).items() if k != 'version'})
    cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}, version=phantom.VERSION)
    if done and done['config'] != cfg:
        raise ValueError(f"{marker}: this folder holds a phantom world made with {done['config']}, not "
                         f"{cfg}; delete {out_dir} or use another folder (--out, --data_dir)")
    if done.get('complete'):
        print(f"phantom world in {out_dir} is complete ({marker}): skipping")
        return done
    os.makedirs(out_dir, exist_ok=True)
    _write_json(marker, dict(config=cfg, complete=False))
    t0 = time.time()
    rep = preprocess_records(phantom.records(cfg['seed'], cfg['n2d'], cfg['n3d']), phantom.load, out_dir, 'phantom',
                             workers=workers, long_side={'2d': cfg['long_side_2d'], '3d': cfg['long_side_3d']},
                             command=f"python data.py phantom --out {out_dir}")
    if rep['failed']:  # every phantom is valid by construction: a failure is a bug, never a skip
        raise RuntimeError(f"phantom: {rep['failed']} samples failed, e.g. {rep['failures'][0]}")
    nbytes = sum(os.path.getsize(f) for f in _find_shards(out_dir))
    done = dict(config=cfg, complete=True, seconds=round(time.time() - t0, 1), bytes=nbytes,
                written=rep['written'], skipped=rep['skipped'])
    _write_json(marker, done)
    print(f"phantom world: {rep['written'] + rep['skipped']} samples, {nbytes / 2 ** 20:.0f} MiB in {out_dir}, "
          f"{done['seconds']:.0f} s")
    return done


PHANTOM_DIR = "data/phantom"  # the scripts' default data_dir: the only folder the phantom world is made in unasked


def check_data_dir(data_dir):
    """The scripts' check before any model or data work: data_dir holds data, or is where the phantom world belongs
    (PHANTOM_DIR, or a folder whose phantom.json says so). Otherwise an error naming the commands that fill it: an
    empty data/paper must never be trained on as a freshly made phantom world (50,000 GPU steps on toy data)."""
    if (_find_shards(data_dir) or _read_json(os.path.join(data_dir, 'report.json'))
            or _read_json(os.path.join(data_dir, 'phantom.json'))
            or os.path.abspath(data_dir) == os.path.abspath(PHANTOM_DIR)):
        return
    raise FileNotFoundError(
        f"data_dir {data_dir}: {'missing' if not os.path.exists(data_dir) else 'no shards (*.h5) there'}, and it is not "
        f"the phantom world's folder ({PHANTOM_DIR}, or one with a phantom.json), so nothing is generated in it. Fill "
        f"it first (README, \"Paper-scale recipe\"; DATA.md), e.g.\n"
        f"  python data.py mimic    --root /data/mimic-cxr-jpg --out {data_dir}\n"
        f"  python data.py ctrate   --root /data/ct-rate/dataset --out {data_dir}\n"
        f"or point --data_dir at the folder that holds your shards; for the built-in phantom world there, on purpose: "
        f"python data.py phantom --out {data_dir}")


def ensure_phantom(data_dir, workers=None):
    """The scripts' first data step: the phantom world in PHANTOM_DIR if empty, or finished if it was interrupted;
    any other folder without data is refused (check_data_dir)."""
    check_data_dir(data_dir)
    done = _read_json(os.path.join(data_dir, 'phantom.json'))
    if not done and (_find_shards(data_dir) or _read_json(os.path.join(data_dir, 'report.json'))):
        return  # real data sets
    if not done.get('complete'):  # a complete one: make_phantom skips it, or refuses it if made otherwise (VERSION)
        print(f"{data_dir}: " + ("its phantom world was interrupted (phantom.json: \"complete\": false): finishing it"
                                 if done else "no shards: generating the phantom world there")
              + f" (python data.py phantom --out {data_dir})")
    return make_phantom(data_dir, workers=workers)


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    p = argparse.ArgumentParser(description="Preprocess a data set into shards (python data.py <name> --root R --out O)")
    p.add_argument('name', choices=['phantom', *adapters.DATASETS])
    p.add_argument('--root', help="the raw data set's folder (not for phantom)")
    p.add_argument('--out', required=True, help="shard folder (several data sets may share one)")
    p.add_argument('--workers', type=int, default=None, help="processes (default: all CPU cores)")
    p.add_argument('--shard_size', type=int, default=None, help=f"samples per shard (default {SHARD_SIZE})")
    p.add_argument('--long_side', type=int, default=None, help=f"override the long side (default {LONG_SIDE})")
    p.add_argument('--max_voxels', type=int, default=None, help="refuse a file whose header declares more voxels "
                   f"(default {readers.MAX_VOXELS:,} = 512 x 512 x 2048), before reading it: bounds memory per worker")
    p.add_argument('--file_timeout', type=float, default=FILE_TIMEOUT, help="seconds one file may take, then it is "
                   f"refused (default {FILE_TIMEOUT})")
    g = p.add_argument_group('real-data adapters (adapters.py)')
    for opt, kw in adapters.OPTIONS.items():
        users = ', '.join(name for name, (_, _, opts) in adapters.DATASETS.items() if opt in opts)
        g.add_argument(f'--{opt}', **dict(kw, help=f"{users}: {kw['help']}"))
    args = p.parse_args(argv)
    if args.name == 'phantom':
        return make_phantom(args.out, workers=args.workers)  # an interrupted world: as it was started
    if not args.root:
        p.error(f"{args.name} needs --root, the folder of the raw data set")
    records_fn, load_fn, options = adapters.DATASETS[args.name]
    kwargs = {opt: getattr(args, opt) for opt in options}
    return preprocess_records(records_fn(args.root, **kwargs), load_fn, args.out, args.name, shard_size=args.shard_size,
                              workers=args.workers, long_side=args.long_side, max_voxels=args.max_voxels,
                              file_timeout=args.file_timeout,
                              command=' '.join(['python', 'data.py', *(sys.argv[1:] if argv is None else argv)]))


if __name__ == '__main__':
    main()
