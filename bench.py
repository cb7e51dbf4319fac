"""
Measure the efficiency claim of paper section 2.1.2 (packing removes padding overhead) and where time goes,
on this device (medians after a warm-up): 1. a LeJEPA step packed vs padded to the longest view (FLOPs and
time ratios), 2. scaling with the batch and each part's share, 3. loader views/s per worker, 4. model FLOP/s
against the same run's matmul FLOP/s (CPU: the main job's model and dtype; CUDA: small and base in bf16 on each
attention path, with peak memory at two token budgets), 5. the host at the paper's per-rank share. The last line
printed is one JSON of it all.

    python bench.py                      # CPU: tiny preset, ~3 minutes
    bash bench_gpu.sh                    # one GPU: this, plus a profiled torchrun of the main job (< 8 minutes)
"""

import contextlib
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import data
import pack
import views
from lejepa import Projector, lejepa_loss
from model import ModelConfig, SparseMedicalViT, PRESETS
from rope3d import apply_rope_cs, rope_cos_sin
from train import CHOICES, check_choices, configure, resolve_device, resolve_dtype

# -----------------------------------------------------------------------------
preset = "tiny"            # model preset for parts 1-2 ('tiny' | 'small' | 'base')
data_dir = "data/phantom"  # phantom shards (generated on first use)
samples_2d = 12            # reference batch: 2D samples (3 : 1 with 3D, as the paper's 192 : 64)
samples_3d = 4             # reference batch: 3D samples
reps = 5                   # timed repetitions (median) after one warm-up
loader_views = 400         # views drawn per loader measurement
device = "auto"            # 'auto' | 'cpu' | 'cuda'
threads = 2                # torch CPU threads
seed = 0
host_2d, host_3d = 96, 32  # part 5: one rank's share of the paper's step on 2 GPUs (192 2D + 64 3D samples)
host_token_budget = 32768  # part 5: tokens per micro-batch
gpu_step_ms = 40.0         # part 5: the GPU step the workers must keep up with (ViT-S, 83k tokens, H100 at 40% MFU)
dtype = "auto"             # part 4 on CPU: the main job's choice ('auto': bf16 where the CPU has it natively)
token_budgets = (16384, 65536)  # part 4 on CUDA: peak memory of a step cut into micro-batches of these many tokens
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))]


def padded_encoder_forward(enc: SparseMedicalViT, packed):
    """The same encoder the conventional way: views padded to the longest, key-padding mask, masked mean."""
    cfg, N, L = enc.cfg, packed.num_views, packed.max_seqlen
    H, Dh = cfg.heads, cfg.dim // cfg.heads
    x = enc.patch_embed(packed)  # (S, D), identical in both variants
    pos = torch.arange(packed.num_tokens, device=x.device) - packed.cu_seqlens[:-1].long()[packed.view_ids]

    def pad(t):  # (S, ...) -> (N, L, ...), zeros after each view's tokens
        return t.new_zeros(N, L, *t.shape[1:]).index_put_((packed.view_ids, pos), t)

    valid, xp, coords = pad(torch.ones_like(pos, dtype=torch.bool)), pad(x), pad(packed.coords)  # (N, L), (N, L, D)
    cos, sin = rope_cos_sin(coords.view(N * L, 3), Dh, cfg.rope_base)
    mask = valid[:, None, None, :]                                                  # (N, 1, 1, L) keys
    for b in enc.blocks:
        h = b.ln1(xp)
        q, k, v = b.attn.qkv(h).view(N * L, 3, H, Dh).unbind(1)                     # (N*L, H, Dh)
        q, k = apply_rope_cs(q, cos, sin), apply_rope_cs(k, cos, sin)
        q, k, v = (t.view(N, L, H, Dh).transpose(1, 2) for t in (q, k, v))          # (N, H, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                 # (N, H, L, Dh)
        xp = xp + b.attn.proj(y.transpose(1, 2).reshape(N, L, cfg.dim))
        xp = xp + b.mlp(b.ln2(xp))
    xp = enc.norm(xp) * valid[..., None]
    return xp.sum(1) / valid.sum(1, keepdim=True)                                   # (N, D)


def step_flops(cfg: ModelConfig, seqlens, proj_params=0) -> float:
    """Training FLOPs (forward + backward = 3 x forward) of the blocks' linears and attention."""
    D, f = cfg.dim, cfg.mlp_ratio
    lin = sum(seqlens) * cfg.depth * 2 * (4 * D * D + 2 * f * D * D)  # qkv + proj + mlp, 2 FLOPs per MAC
    att = sum(L * L for L in seqlens) * cfg.depth * 4 * D              # q k^T and att v
    return 3 * (lin + att + 2 * len(seqlens) * proj_params)


def median_time(fn, reps: int, sync) -> float:
    ts = []
    for _ in range(reps + 1):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:])  # the first run was the warm-up


def lejepa_step(enc, proj, opt, packed, B, V, amp, forward=None):
    """One training step on B samples x V views: encoder (or forward), projector, LeJEPA loss, backward, AdamW."""
    with amp:
        z = proj(forward(enc, packed) if forward else enc(packed)).float().view(B, V, -1).transpose(0, 1)  # (V, B, K)
        loss, _, _ = lejepa_loss(z, n_global=2, lam=0.025, num_slices=1024, step=0)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def reference_batch(ds2d, ds3d, n2d, n3d, crop, seed, dev):
    """(packed, V): a mixed batch from the real loader as one micro-batch, augmented on dev, sample-major."""
    b = next(iter(data.make_loader(ds2d, ds3d, n2d, n3d, seed=seed, crop=crop, stop_step=1)))
    return views.augment(b["packed"].to(dev), b["aug"]), b["views_per_sample"]


def host(cfg, dev, sync) -> dict:
    """5. The host at the paper's per-rank share (synthetic int8 images, paper sizes): worker and main-process times."""
    import tempfile
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for mod, n, shape in (("2d", cfg["host_2d"], (1, 224, 182)), ("3d", cfg["host_3d"], (1, 84, 112, 98))):
            data.write_shard(f"{tmp}/synthetic_train_{mod}_00000.h5", [dict(
                image=rng.integers(-127, 128, shape, dtype=np.int8), labels=np.zeros(5, np.float32), id=f"{mod}{i}",
                patient_id=f"{mod}{i}", study_id=f"{mod}{i}", modality=mod, split="train") for i in range(n)])
        ds2d, ds3d = (data.ShardDataset(tmp, modality=m) for m in ("2d", "3d"))
        loader = data.make_loader(ds2d, ds3d, cfg["host_2d"], cfg["host_3d"], crop=views.MultiCrop(), workers=1,
                                  token_budget=cfg["host_token_budget"], pin_memory=dev.type == "cuda")
        it = iter(loader)
        next(it)  # warm-up: the worker starts
        arrivals = []
        for _ in range(cfg["reps"] + 2):  # the training process takes batches as fast as the worker builds them
            next(it)
            arrivals.append(time.perf_counter())
        worker = statistics.median(np.diff(arrivals[1:]))
        cpu_w = []  # the same work in this process, its CPU time: robust to other load on the machine
        for s in range(cfg["reps"]):
            c = time.thread_time()
            loader.dataset[100 + s]
            cpu_w.append(time.thread_time() - c)
        rows = []  # per batch: times (s) received, received CPU, on the device, its CPU, augmented; bytes moved
        for _ in range(cfg["reps"]):
            time.sleep(2.5 * worker)  # the next batch is ready, as in a loop that keeps up
            t0, c0 = time.perf_counter(), time.thread_time()
            b = next(it)  # as train.py: the previous batch goes here
            t1, c1 = time.perf_counter(), time.thread_time()
            nbytes = sum(t.nbytes for t in [*b["packed"].tensors(), b["aug"]])  # what goes to the device
            b = dict(b, packed=b["packed"].to(dev, non_blocking=True))  # as data.ToDevice: one copy of the step
            micro = data.micro_batches(b, len(b["micro"]))  # cut on the device; augment() moves aug
            t2, c2 = time.perf_counter(), time.thread_time()
            for pk, aug, _ in micro:
                views.augment(pk, aug)
            sync()
            rows.append((t1 - t0, c1 - c0, t2 - t1, c2 - c1, time.perf_counter() - t2, nbytes))
        tokens = sum(pk.num_tokens for pk, _, _ in micro)
    recv, recv_cpu, main, main_cpu, prep, nbytes = (statistics.median(col) for col in zip(*rows))
    out = dict(host_main_ms=1e3 * main, host_main_cpu_ms=1e3 * main_cpu, host_receive_ms=1e3 * recv,
               host_receive_cpu_ms=1e3 * recv_cpu, host_worker_ms=1e3 * worker, host_bytes=nbytes,
               host_worker_cpu_ms=1e3 * statistics.median(cpu_w), host_device_prep_ms=1e3 * prep,
               host_gpu_step_ms=cfg["gpu_step_ms"], host_micro_batches=len(micro), host_tokens=tokens,
               host_workers_per_gpu=math.ceil(1e3 * worker / cfg["gpu_step_ms"]), load_avg=os.getloadavg()[0])
    print(f"\n5. host at the paper's per-rank share: {cfg['host_2d']} 2D (224x182) + {cfg['host_3d']} 3D (84x112x98) "
          f"samples x 10 views, {tokens} tokens, {len(micro)} micro-batches (median of {cfg['reps']})\n"
          f"   training process, batch received -> on the device: {out['host_main_ms']:.1f} ms ({out['host_main_cpu_ms']:.1f}"
          f" ms of its own CPU time; target <= 10); {out['host_bytes'] / 2 ** 20:.0f} MiB moved\n"
          f"   before that, receiving it from the worker: {out['host_receive_ms']:.1f} ms ({out['host_receive_cpu_ms']:.1f}"
          f" ms CPU; with pin_memory, on CUDA, the DataLoader's pinning thread does this)\n"
          f"   one worker, one step's batch: {out['host_worker_ms']:.0f} ms ({out['host_worker_cpu_ms']:.0f} ms of CPU time; "
          f"target <= 250): {out['host_workers_per_gpu']} workers per GPU keep up with a {cfg['gpu_step_ms']} ms GPU step\n"
          f"   augment() on {dev.type}: {out['host_device_prep_ms']:.0f} ms; load average {out['load_avg']:.1f} "
          f"(others' work on the machine inflates wall times)")
    return out


def main(cfg):
    check_choices(cfg, {k: CHOICES[k] for k in ("preset", "device", "dtype")})
    torch.set_num_threads(cfg["threads"])
    dev = resolve_device(cfg["device"])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    data.ensure_phantom(cfg["data_dir"])  # generated on first use, finished if interrupted
    ds2d, ds3d = (data.ShardDataset(cfg["data_dir"], split="train", modality=m) for m in ("2d", "3d"))
    crop = views.MultiCrop()
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else f"cpu x{cfg['threads']} threads",
           "torch": str(torch.__version__), "preset": cfg["preset"]}

    # 1. packed vs padded, one full training step
    torch.manual_seed(cfg["seed"])
    mcfg = ModelConfig(**PRESETS[cfg["preset"]])
    enc, proj = SparseMedicalViT(mcfg).to(dev), Projector(mcfg.dim, 1024, 128).to(dev)
    opt = torch.optim.AdamW([*enc.parameters(), *proj.parameters()], lr=1e-4, weight_decay=0.05)
    packed, V = reference_batch(ds2d, ds3d, cfg["samples_2d"], cfg["samples_3d"], crop, cfg["seed"], dev)
    B = cfg["samples_2d"] + cfg["samples_3d"]
    print(f"{enc.describe(dev, torch.bfloat16 if dev.type == 'cuda' else torch.float32)}\nreference batch: "
          f"{cfg['samples_2d']} 2D + {cfg['samples_3d']} 3D samples x {V} views = {packed.num_views} views, "
          f"{packed.num_tokens} tokens, views of {min(packed.seqlens)}-{packed.max_seqlen} tokens")

    t_packed = median_time(lambda: lejepa_step(enc, proj, opt, packed, B, V, amp), cfg["reps"], sync)
    t_padded = median_time(lambda: lejepa_step(enc, proj, opt, packed, B, V, amp, padded_encoder_forward), cfg["reps"], sync)
    proj_params = sum(p.numel() for p in proj.parameters())
    ideal = step_flops(mcfg, [packed.max_seqlen] * packed.num_views, proj_params) / step_flops(mcfg, packed.seqlens, proj_params)
    speedup = t_padded / t_packed
    out.update(tokens=packed.num_tokens, padded_tokens=packed.max_seqlen * packed.num_views, step_s_packed=t_packed,
               step_s_padded=t_padded, ideal_ratio=ideal, speedup=speedup, efficiency=speedup / ideal,
               tok_s_packed=packed.num_tokens / t_packed, tok_s_padded=packed.num_tokens / t_padded)
    print(f"\n1. packed vs padded (full LeJEPA step, median of {cfg['reps']})\n"
          f"   packed {t_packed * 1e3:8.1f} ms  {out['tok_s_packed'] / 1e3:7.1f}k tok/s\n"
          f"   padded {t_padded * 1e3:8.1f} ms  {out['tok_s_padded'] / 1e3:7.1f}k tok/s (real tokens)  "
          f"{out['padded_tokens']} tokens computed\n"
          f"   ideal_ratio {ideal:.2f}  speedup {speedup:.2f}  efficiency {speedup / ideal:.2f}")

    print("\n2. scaling")  # with the batch, and where the time goes
    out["scaling"] = []
    for mult in (1, 2, 4):
        pk, _ = reference_batch(ds2d, ds3d, cfg["samples_2d"] * mult, cfg["samples_3d"] * mult, crop, cfg["seed"] + mult, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = median_time(lambda: lejepa_step(enc, proj, opt, pk, B * mult, V, amp), max(2, cfg["reps"] // 2), sync)
        # CPU: the process's peak resident memory so far (monotone, so growth shows only past the last max)
        mem = (torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda"
               else __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 2 ** 20)
        out["scaling"].append(dict(batch=mult, tokens=pk.num_tokens, step_s=t, peak_gib=mem))
        print(f"   {mult}x: {pk.num_tokens:6d} tokens  {t * 1e3:8.1f} ms  {pk.num_tokens / t / 1e3:7.1f}k tok/s  "
              f"peak {mem:.2f} GiB" + ("" if dev.type == "cuda" else " (CPU: process max RSS)"))
    out["breakdown"] = breakdown(enc, proj, opt, packed, V, B, amp, sync, cfg["reps"])
    tot = sum(out["breakdown"].values())
    print("   share of the step: " + ", ".join(f"{k} {v / tot:.0%}" for k, v in out["breakdown"].items())
          + f"  (sum of parts {tot * 1e3:.0f} ms vs step {t_packed * 1e3:.0f} ms)")

    # 3. loader throughput per worker (the main process is one worker)
    print("\n3. loader (views/s per worker, HDF5 shards -> real sampler -> tensors)")
    for name, b2, b3 in (("2d", 16, 0), ("3d", 0, 8)):
        loader = data.make_loader(ds2d if b2 else None, ds3d if b3 else None, b2, b3, crop=crop, workers=0, seed=1)
        it, n, t = iter(loader), 0, time.perf_counter()
        while n < cfg["loader_views"]:
            n += next(it)["packed"].num_views
        out[f"loader_views_s_{name}"] = n / (time.perf_counter() - t)
        print(f"   {name}: {out[f'loader_views_s_{name}']:8.0f} views/s per worker")
    # a step needs samples x V views; a worker makes loader_views_s of them per second
    out["workers_needed"] = (cfg["samples_2d"] / out["loader_views_s_2d"] + cfg["samples_3d"] / out["loader_views_s_3d"]) * V / t_packed
    print(f"   workers needed to feed the measured packed step: {out['workers_needed']:.2f}")

    # 4. model FLOP/s against the device's own matmul FLOP/s
    out["utilisation"] = utilisation(ds2d, ds3d, crop, cfg, dev, sync)
    out.update(host(cfg, dev, sync))
    print(json.dumps(out))
    return out


def breakdown(enc, proj, opt, packed, V, B, amp, sync, reps):
    """Forward + backward time of each part, measured alone on the reference batch."""
    cfg = enc.cfg
    with torch.no_grad(), amp:
        x = enc.patch_embed(packed)
    rope = rope_cos_sin(packed.coords, cfg.dim // cfg.heads, cfg.rope_base)
    x = x.detach().float().requires_grad_()
    z = torch.randn(V, B, 128, device=x.device, requires_grad=True)
    b = enc.blocks[0]

    def fb(f):
        def run():
            with amp:
                y = f()
            y.float().sum().backward()
        return run
    parts = {
        "patch_embed": median_time(fb(lambda: enc.patch_embed(packed)), reps, sync),
        "attention": cfg.depth * median_time(fb(lambda: b.attn(b.ln1(x), rope, packed)), reps, sync),
        "mlp": cfg.depth * median_time(fb(lambda: b.mlp(b.ln2(x))), reps, sync),
        "sigreg": median_time(fb(lambda: lejepa_loss(z, 2, 0.025, 1024, 0)[0]), reps, sync),
    }
    for p in list(enc.parameters()) + list(proj.parameters()):
        p.grad = torch.zeros_like(p)
    parts["optimizer"] = median_time(opt.step, reps, sync)
    opt.zero_grad(set_to_none=True)
    return parts


def accumulated_step(enc, proj, opt, batch, V, amp):
    """One optimizer step over the batch's micro-batches (as train.py cuts them), on the batch's device."""
    micro = data.micro_batches(batch, len(batch["micro"]))
    for pk, aug, (a, b) in micro:
        with amp:
            z = proj(enc(views.augment(pk, aug))).float().view(b - a, V, -1).transpose(0, 1)  # (V, b, K)
            loss = lejepa_loss(z, n_global=2, lam=0.025, num_slices=1024, step=0)[0]
        (loss / len(micro)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def utilisation(ds2d, ds3d, crop, cfg, dev, sync) -> dict:
    """Model FLOP/s of a training step against this run's own n^3 matmul in the same dtype. CPU: the main job's
    preset and dtype on the reference batch; CUDA: small and base in bf16 on each attention path that is installed,
    and the peak memory of a 48 + 16 sample step cut at each of token_budgets."""
    cuda = dev.type == "cuda"
    dt = torch.bfloat16 if cuda or resolve_dtype(cfg["dtype"], dev) == "bfloat16" else torch.float32
    n = 8192 if cuda else 2048
    a, b = (torch.randn(n, n, device=dev, dtype=dt) for _ in range(2))
    peak = 2 * n ** 3 / median_time(lambda: a @ b, 10 if cuda else 3, sync)
    res = {"dtype": str(dt).split(".")[1], "matmul_flops": peak}
    print(f"\n4. model FLOP/s against a {n}^3 {res['dtype']} matmul's {peak / 1e12:.2f} TFLOP/s on this device")
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dt == torch.bfloat16 else contextlib.nullcontext()
    paths = ([p for p, ok in (("flash", pack.flash_attn_varlen_func), ("torch_varlen", pack.varlen_attn)) if ok is not None]
             if cuda else ["exact"])
    for name in ("small", "base") if cuda else (cfg["preset"],):
        torch.manual_seed(cfg["seed"])
        mcfg = ModelConfig(**PRESETS[name])
        enc, proj = SparseMedicalViT(mcfg).to(dev), Projector(mcfg.dim, 1024, 128).to(dev)
        opt = torch.optim.AdamW(list(enc.parameters()) + list(proj.parameters()), lr=1e-4, fused=cuda or None)
        n2, n3 = (48, 16) if cuda else (cfg["samples_2d"], cfg["samples_3d"])
        packed, V = reference_batch(ds2d, ds3d, n2, n3, crop, cfg["seed"], dev)
        flops = step_flops(mcfg, packed.seqlens, sum(p.numel() for p in proj.parameters()))
        for path in paths or ["exact"]:
            saved = pack.flash_attn_varlen_func
            if path == "torch_varlen":
                pack.flash_attn_varlen_func = None  # dispatch falls through to torch's varlen_attn
            t = median_time(lambda: lejepa_step(enc, proj, opt, packed, n2 + n3, V, amp), cfg["reps"], sync)
            row = {"flops": flops / t, "of_matmul": flops / t / peak}
            if cuda:  # memory is bounded by the token budget, not by the batch
                for budget in cfg["token_budgets"]:
                    b = next(iter(data.make_loader(ds2d, ds3d, n2, n3, seed=cfg["seed"], crop=crop, stop_step=1,
                                                   token_budget=budget, pin_memory=True)))
                    b = dict(b, packed=b["packed"].to(dev, non_blocking=True))
                    torch.cuda.reset_peak_memory_stats()
                    accumulated_step(enc, proj, opt, b, V, amp)
                    sync()
                    row[f"peak_gib_at_{budget}"] = torch.cuda.max_memory_allocated() / 2 ** 30
            pack.flash_attn_varlen_func = saved
            res[f"{name}_{path}"] = row
            print(f"   {name:5s} {path:12s} {t * 1e3:8.1f} ms/step  {row['flops'] / 1e12:7.3f} TFLOP/s = "
                  f"{row['of_matmul']:.1%} of the matmul's" + "".join(f"  peak {v:.2f} GiB at {k.split('_')[-1]} tokens"
                                                                      for k, v in row.items() if k.startswith("peak")))
    return res


if __name__ == "__main__":
    main(configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
