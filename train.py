"""
Pretrain SparseMedicalViT with LeJEPA (paper sections 2.2-2.4), or train the supervised baseline.

    python train.py                                     # built-in phantom world, tiny model, CPU
    torchrun --standalone --nproc_per_node 2 train.py   # same on 2 processes (gloo on CPU, nccl on CUDA)
    torchrun --nproc_per_node 2 train.py config/stage3.py --max_iters=100

Every knob is a constant below, overridden by config files and --key=value (type-checked). A step is one
GLOBAL batch, split over the ranks, then into micro-batches of at most token_budget tokens (DESIGN.md, Training).
Layout, as nanochat's base_train.py: the knobs, main (setup, then the loop in named blocks), the plumbing; last
the supervised baseline under its own heading.
"""

import errno
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from ast import literal_eval
from contextlib import nullcontext
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import adapters
import data
import views
from lejepa import Projector, lejepa_loss
from model import ModelConfig, SparseMedicalViT, PRESETS, load_weights

# -----------------------------------------------------------------------------
# data
data_dir = "data/phantom"     # shard folder (python data.py ...); the phantom world is made here if empty or half made
                              # (any other empty folder is an error, unless its phantom.json says it is a world)
batch_2d = 16                 # GLOBAL 2D samples per step, all ranks (paper: 256 in stage 1, 192 in stages 2-3)
batch_3d = 16                 # GLOBAL 3D samples per step, all ranks (paper: 0 in stage 1, 64 in stages 2-3); the
                              # CPU world's CT learns slowest, so it gets half of each step: its CT probe gained
                              # +0.104 / +0.091 over random init (two seeds), +0.077 / +0.045 at 24 + 8
n_global = 2                  # global views per sample (paper: 2)
n_local = 8                   # local views per sample (paper: 8)
global_scale = (0.3, 1.0)     # global view size, fraction of image area (2D) or volume (3D) (paper)
local_scale = (0.05, 0.3)     # local view size (paper)
view_zoom = (1.0, 1.0)        # per-view resampling factor range (1, 1 = native resolution, no resize); views.MultiCrop
view_intensity = (0.2, 0.4, 0.04)  # per-view (brightness, contrast, noise sd) jitter, images in [-1, 1]; strong,
                              # so two views match by structure, not by intensity statistics (a weak (0.02, 0.05,
                              # 0.02) lost the 3D lesions: consolidation AUROC 0.53 against 0.71)
num_workers = 1               # DataLoader worker processes per rank (one keeps up on CPU; GPUs: see README)
skip_bad_samples = False      # a sample that fails to read stops the run; True: the next replaces it (warned, counted)
# model
preset = "tiny"               # 'tiny' | 'small' (ViT-S) | 'base' (ViT-B), see model.PRESETS
scale_2d = 14 ** 0.5          # 2D patches x this in the patch embedding: sqrt(P) gives 2D tokens the 3D tokens' scale
                              # (paper: 1, literal zero-padding; at 1, 2D supervision learns or not by the seed here)
proj_hidden = 1024            # LeJEPA projector MLP hidden width
proj_dim = 128                # projector output: the space SIGReg and L_pred act on
# objective
objective = "lejepa"          # 'lejepa' (self-supervised) | 'supervised' (linear head + masked BCE, baseline)
sup_views = "whole"           # the supervised baseline's input: 'whole' (n_global views of the whole image, no jitter:
                              # what its labels describe and the probe sees) | 'global' (LeJEPA's global views, jitter)
lam = 0.17                    # SIGReg weight: loss = (1-lam)*inv + lam*sigreg (paper: 0.025 at batch 256,
                              # with lam/(1-lam)*N held at the paper's 6.56: N = 32 samples -> 0.17; see lejepa.py)
num_slices = 1024             # random 1D projections per SIGReg evaluation (LeJEPA default)
view_pairing = "sample"       # ablation: 'sample' (the method: each sample's views predict its own centroid) |
                              # 'shuffled' (each view of z paired with a random sample of its micro-batch);
                              # SIGReg alone is --lam=1.0, prediction alone --lam=0.0 (it collapses)
# optim
max_iters = 600               # optimizer steps
learning_rate = 5e-4          # peak lr (paper: 1e-4 at batch 256; the tiny CPU model tolerates more)
min_lr = 1e-5                 # end of the cosine decay
warmup_iters = 30             # linear warmup steps
weight_decay = 0.05           # AdamW, on matrices only (paper: 0.05)
beta1, beta2 = 0.9, 0.95      # AdamW betas
grad_clip = 1.0               # max global grad norm (0 = off)
# system
out_dir = "out"               # checkpoint, log.jsonl
init_from = "scratch"         # 'scratch' | 'resume' (out_dir/ckpt.pt, exact) | 'auto' (resume if it exists, else
                              # scratch: torchrun --max-restarts) | a checkpoint path (weights, fresh optimizer, step 0)
device = "auto"               # 'auto' | 'cpu' | 'cuda'
dtype = "auto"                # 'auto' (bf16 on CUDA and on CPUs with native bf16, else fp32) | 'float32' | 'bfloat16'
token_budget = 12000          # max tokens per micro-batch per rank (memory bound; more -> fewer accumulation steps)
log_interval = 10             # steps between log lines
ckpt_interval = 100           # steps between checkpoints (and one at the end)
ckpt_keep = False             # also keep each checkpoint as ckpt_<step>.pt (a run's trend, for probe.py)
stop_at = 0                   # end this job after this step (0 = max_iters); resume later, same schedule
seed = 1337
deterministic = False         # torch.use_deterministic_algorithms (tests: exact resume; on CUDA also cuBLAS, flash-attn)
profile = 0                   # CUDA: trace this many steps after 10 of warm-up: print the share of the step the GPU
                              # waits for the host, and warn at every host sync (bench_gpu.sh)
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))]
CHOICES = {"preset": tuple(PRESETS), "objective": ("lejepa", "supervised"), "sup_views": ("whole", "global"),
           "view_pairing": ("sample", "shuffled"), "device": ("auto", "cpu", "cuda"),
           "dtype": ("auto", "float32", "bfloat16")}  # the choice-valued knobs


def main(cfg: dict):
    # --- the config's choices and its data folder, checked before anything is built or started: fails in seconds
    check_choices(cfg, CHOICES)
    if cfg["init_from"] not in ("scratch", "resume", "auto") and not os.path.isfile(cfg["init_from"]):
        raise ValueError(f"init_from={cfg['init_from']!r}: expected 'scratch', 'resume', 'auto' or a checkpoint file")
    data.check_data_dir(cfg["data_dir"])

    # --- distributed, device, dtype: torchrun sets RANK; then init must succeed (never two silent independent runs)
    ddp, rank, local_rank, world, device = init_distributed(cfg["device"])
    master = rank == 0
    print0 = lambda *a, **k: print(*a, **k) if master else None
    cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), print0)
    dt = resolve_dtype(cfg["dtype"], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dt == "bfloat16" else nullcontext()
    torch.manual_seed(cfg["seed"])
    set_deterministic(cfg["deterministic"])
    if cfg["profile"] and device.type != "cuda":
        raise ValueError(f"profile={cfg['profile']}: the GPU's wait for the host is a CUDA measurement; set --profile=0")
    for name in ("batch_2d", "batch_3d"):
        assert cfg[name] % world == 0, f"{name}={cfg[name]} must be divisible by the world size {world}"
    b2d, b3d = cfg["batch_2d"] // world, cfg["batch_3d"] // world  # this rank's share

    # --- model, optimizer and checkpoint, matched to the config BEFORE any data is made: a bad one fails in seconds
    mcfg = ModelConfig(**PRESETS[cfg["preset"]], scale_2d=cfg["scale_2d"])
    net = make_net(cfg, mcfg).to(device)  # one module for DDP: head(encoder(views))
    opt = torch.optim.AdamW([{"params": [p for p in net.parameters() if (p.dim() >= 2) == mat],  # decay matrices only
                              "weight_decay": cfg["weight_decay"] if mat else 0.0} for mat in (True, False)],
                            lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    cfg, start_step = init_from_checkpoint(cfg, ckpt_path, net, opt, world, print0)

    # --- data: rank 0 generates the phantom world on first use (or finishes an interrupted one) while the others wait
    if master:
        data.ensure_phantom(cfg["data_dir"])
    if ddp:
        dist.barrier()  # collective: every rank waits for the data
    ds2d, ds3d = (data.ShardDataset(cfg["data_dir"], split="train", modality=m) if b else None
                  for m, b in (("2d", b2d), ("3d", b3d)))
    multicrop = view_maker(cfg)
    model = DDP(net, device_ids=[local_rank] if device.type == "cuda" else None) if ddp else net
    info = run_info(device)
    print0(f"config: {json.dumps(cfg)}\nrun: {json.dumps(info)} | world size {world} | dtype {dt}\n"
           f"{net.encoder.describe(device, torch.bfloat16 if dt == 'bfloat16' else torch.float32)}\n"
           f"head: {sum(p.numel() for p in net.head.parameters()) / 1e6:.2f}M params ({cfg['objective']})")
    V = multicrop.n_global + multicrop.n_local  # LeJEPA: V_g + V_l; supervised: V_g
    # the workers crop, cut micro-batches under token_budget and pack; this process only moves them
    loader = data.make_loader(ds2d, ds3d, b2d, b3d, rank=rank, world_size=world, seed=cfg["seed"], start_step=start_step,
                              crop=multicrop, workers=cfg["num_workers"], skip_bad=cfg["skip_bad_samples"], n_views=V,
                              token_budget=cfg["token_budget"], alpha=mcfg.alpha, pin_memory=device.type == "cuda")
    os.makedirs(cfg["out_dir"], exist_ok=True)
    log_path = os.path.join(cfg["out_dir"], "log.jsonl")
    if master:  # a resume repeats the steps after its checkpoint, a fresh run all of them: their old lines go
        trim_log(log_path, start_step)
    log = open(log_path, "a") if master else None
    pbar = data.progress(total=cfg["max_iters"], initial=start_step, desc="train") if master else None

    # --- the training loop
    sigreg_or_bce = "sigreg" if cfg["objective"] == "lejepa" else "bce"  # the name of the second logged term
    batches, step = data.ToDevice(loader, device), start_step  # on CUDA, the next batch copies while a step computes
    t_last, tok_acc, views_acc, steps_acc, skipped = time.time(), 0, 0, 0, 0
    end = min(cfg["max_iters"], cfg["stop_at"] or cfg["max_iters"])
    prof = None
    while step < end:
        if cfg["profile"] and step == start_step + 10:  # after warm-up (allocator, kernels' autotuning, workers)
            prof = start_profile()

        # the batch: this rank's share of the global batch; collective: all ranks agree on the micro-batch count
        batch = next(batches)
        for err in batch["skipped"]:  # only with skip_bad_samples; else the loader raised
            print(f"warning: rank {rank} step {step}: skipped a bad sample: {err}", file=sys.stderr)
        skipped += len(batch["skipped"])
        n_micro = torch.tensor(len(batch["micro"]))  # on the host: the loop needs it there (gloo carries it)
        if ddp:  # collective: every rank must run the same number of micro-batches (SIGReg all-reduces)
            dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
        micro = data.micro_batches(batch, int(n_micro))  # views of the batch; cut finer if another rank needs more
        lr = get_lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr

        # the micro-batches: forward, loss, backward; collectives: SIGReg's sums in each, DDP's gradients in the last
        losses = torch.zeros(3, device=device)  # (loss, inv_loss, sigreg_loss or bce), averaged over micro-batches
        for m, (packed, aug, (a, b)) in enumerate(micro):
            packed = views.augment(packed, aug)  # int8 -> augmented floats, on the device
            sync = m == len(micro) - 1  # average gradients across ranks only on the last micro-batch
            with model.no_sync() if ddp and not sync else nullcontext():
                with autocast:
                    z = model(packed).float().view(b - a, V, -1).transpose(0, 1)  # sample-major -> (V, b, K), global first
                    if cfg["objective"] == "lejepa":
                        if cfg["view_pairing"] == "shuffled":
                            z = shuffle_pairs(z, cfg["seed"], step, m)
                        loss, inv_loss, sigreg_loss = lejepa_loss(z, n_global=cfg["n_global"], lam=cfg["lam"],
                                                                  num_slices=cfg["num_slices"], step=step)
                    else:
                        labels = batch["labels"][a:b].to(device, non_blocking=True)
                        loss, inv_loss, sigreg_loss = supervised_loss(z, labels)  # (bce, 0, bce)
                (loss / len(micro)).backward()  # outside autocast, as the AMP docs advise
            losses += torch.stack([loss.detach(), inv_loss.detach(), sigreg_loss.detach()]) / len(micro)
            tok_acc += packed.num_tokens
            views_acc += packed.num_views
        if step + 1 < end:
            batches.prefetch()  # the next batch's copy (CUDA) overlaps this step's queued backward

        # reduce and check: collective: the logged and checked loss is the mean over ranks; then the step's one host
        # sync, as the loss must be checked before the optimizer step may change the weights
        if ddp:
            dist.all_reduce(losses, op=dist.ReduceOp.AVG)
        loss_v, inv_v, sigreg_v = losses.tolist()
        for name, val in (("pred", inv_v), (sigreg_or_bce, sigreg_v)):
            if not math.isfinite(val):
                raise FloatingPointError(f"step {step}: non-finite loss term {name} = {val}. Stopping before the "
                                         f"optimizer step; the last good checkpoint {ckpt_path} is left untouched")

        # the optimizer step
        gnorm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"] if cfg["grad_clip"] > 0 else float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        steps_acc += 1
        if master:
            pbar.update(1)
        if prof is not None and step == start_step + 10 + cfg["profile"]:
            print0(stop_profile(prof, cfg["profile"]))
            prof = None

        # log: collective: the throughput counters of all ranks; rank 0 prints and writes
        if step % cfg["log_interval"] == 0 or step == cfg["max_iters"]:
            counts = torch.tensor([tok_acc, views_acc, skipped], dtype=torch.float64)  # host: carried by gloo
            if ddp:
                dist.all_reduce(counts)
            dt_s = time.time() - t_last
            mem = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
            rec = dict(step=step, loss=loss_v, pred=inv_v, sigreg=sigreg_v, lr=lr, grad_norm=float(gnorm),
                       tok_s=counts[0].item() / dt_s, views_s=counts[1].item() / dt_s,
                       step_ms=1000 * dt_s / steps_acc, mem_gib=mem, n_micro=len(micro), skipped=int(counts[2]))
            line = (f"step {step}/{cfg['max_iters']} | loss {loss_v:.4f} | pred {inv_v:.4f} | "
                    f"{sigreg_or_bce} {sigreg_v:.4f} | lr {lr:.2e} | gnorm {float(gnorm):.3f} | "
                    f"{rec['tok_s'] / 1e3:.1f}k tok/s | {rec['views_s']:.0f} views/s | {rec['step_ms']:.0f} ms | mem {mem:.2f} GiB"
                    + (f" | skipped {rec['skipped']} bad samples so far" if rec["skipped"] else ""))
            if master:
                pbar.write(line)
                print(json.dumps(rec), file=log, flush=True)
            t_last, tok_acc, views_acc, steps_acc = time.time(), 0, 0, 0

        # checkpoint: rank 0 only, no collective
        if master and (step % cfg["ckpt_interval"] == 0 or step == end):
            save_checkpoint({"model": net.encoder.state_dict(), "head": net.head.state_dict(), "optimizer": opt.state_dict(),
                             "model_cfg": asdict(mcfg), "config": cfg, "step": step, "data_pos": step,
                             "world_size": world, "rng": {"torch": torch.get_rng_state()}, "run": info}, ckpt_path)
            if cfg["ckpt_keep"]:
                shutil.copyfile(ckpt_path, os.path.join(cfg["out_dir"], f"ckpt_{step}.pt"))
    if master:
        pbar.close()
    print0(f"done: checkpoint {ckpt_path} (step {step})\nnext: python probe.py --ckpt={ckpt_path}")
    if ddp:
        del model  # the DDP wrapper must go before its process group (else exit can hang or abort)
        dist.destroy_process_group()
    return net


# ----------------------------------------------------------------------------- configuration

def configure(defaults: dict, argv: list) -> dict:
    """nanoGPT-style overrides: config files, then --key=value; unknown keys, types and lengths are errors."""
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            scope = {}
            exec(open(arg).read(), {}, scope)
            updates, origin = {k: v for k, v in scope.items() if not k.startswith("_")}, arg
        else:
            key, sep, val = arg[2:].partition("=")
            if not sep:
                raise ValueError(f"override {arg!r}: expected --key=value")
            try:  # a str knob takes the text as given: probe.py's --knn=10,20 is not the tuple (10, 20)
                val = literal_eval(val) if not isinstance(defaults.get(key), str) else val
            except (ValueError, SyntaxError):
                val = val  # a bare string such as --out_dir=out2
            updates, origin = {key: val}, "command line"
        for k, v in updates.items():
            if k not in cfg:
                raise ValueError(f"{origin}: unknown config key {k!r}; known keys: {', '.join(sorted(cfg))}")
            if isinstance(cfg[k], float) and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if type(v) is not type(cfg[k]):
                raise ValueError(f"{origin}: {k}={v!r} is a {type(v).__name__}, expected {type(cfg[k]).__name__} "
                                 f"like the default {cfg[k]!r}")
            if isinstance(v, tuple) and len(v) != len(cfg[k]):
                raise ValueError(f"{origin}: {k}={v!r} has {len(v)} values, expected {len(cfg[k])} like the default {cfg[k]!r}")
            if os.environ.get("RANK", "0") == "0":
                print(f"override from {origin}: {k} = {v!r}")
            cfg[k] = v
    return cfg


def check_choices(cfg: dict, choices: dict):
    """ValueError naming the allowed values of a choice-valued knob set to anything else (a bare KeyError, or a
    'gpu' device silently run on the CPU, otherwise)."""
    for name, allowed in choices.items():
        if name in cfg and cfg[name] not in allowed:
            raise ValueError(f"{name}={cfg[name]!r}: expected one of {', '.join(map(repr, allowed))}")


def get_lr(it: int, cfg: dict) -> float:
    """Linear warmup, then cosine decay to min_lr: a pure function of the step, so resume needs only it."""
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / cfg["warmup_iters"]
    t = min(1.0, (it - cfg["warmup_iters"]) / max(1, cfg["max_iters"] - cfg["warmup_iters"]))
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * t)) * (cfg["learning_rate"] - cfg["min_lr"])


# ----------------------------------------------------------------------------- processes, device, dtype, threads

def init_distributed(device_name: str) -> tuple:
    """(ddp, rank, local_rank, world size, device): one process group if torchrun set RANK, else one process."""
    ddp = "RANK" in os.environ
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # one rendezvous store for all attempts: restarted ranks can read dead addresses (DESIGN.md, Restarts)
        raise RuntimeError("torchrun --max-restarts > 0 shares one rendezvous store across restarts, and restarted "
                           "ranks may then fail to connect. Run it as TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ... "
                           "(a fresh store per attempt; see DESIGN.md, Restarts)")
    rank, local_rank, world = 0, int(os.environ.get("LOCAL_RANK", "0")), 1
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the group: NCCL binds this GPU, never guesses
    if ddp:
        # nccl carries the CUDA tensors (gradients, SIGReg's sums); gloo the host ones (the micro-batch count, the
        # log's counters), which the host needs anyway, so agreeing on them never waits for the GPU's queue
        dist.init_process_group(backend=process_group_backend(device), device_id=device if device.type == "cuda" else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    return ddp, rank, local_rank, world, device


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU if there is one, else the CPU (name checked against CHOICES). The scripts' one
    device resolver: probe.py, embed.py and bench.py import it."""
    dev = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(f"cuda:{local_rank}" if dev == "cuda" else "cpu")


def resolve_dtype(name: str, device: torch.device) -> str:
    """'auto' -> bf16 autocast on CUDA and on CPUs with native bf16, else fp32 (name checked against CHOICES)."""
    return name if name != "auto" else ("bfloat16" if device.type == "cuda" or cpu_has_bf16() else "float32")


def process_group_backend(device: torch.device) -> str:
    """nccl carries CUDA tensors only: with a GPU, host tensors go over gloo in the same group."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def set_deterministic(on: bool):
    """torch.use_deterministic_algorithms, and what CUDA needs for it: cuBLAS raises without a fixed workspace
    (set before its first use); flash-attn is asked per call (pack.varlen_attention)."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)


def cpu_has_bf16() -> bool:
    """Native bf16 (avx512_bf16 / amx): bf16 autocast is 1.5x faster there and ~15x slower where it is emulated."""
    try:
        return any(f in open("/proc/cpuinfo").read() for f in ("avx512_bf16", "amx_bf16"))
    except OSError:
        return False


def cpu_threads(local_ranks: int, print0):
    """Ranks x threads beyond the cores slow every rank many-fold (DESIGN.md): take cores // ranks, or warn if set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads, fair = torch.get_num_threads(), max(1, cores // local_ranks)
    if local_ranks * threads <= cores:
        return
    if "OMP_NUM_THREADS" in os.environ:
        print0(f"warning: {local_ranks} ranks x {threads} threads (OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}) "
               f"on {cores} cores: every rank runs several times slower; set OMP_NUM_THREADS={fair}")
    else:
        torch.set_num_threads(fair)
        print0(f"{local_ranks} ranks on {cores} cores: {fair} torch thread(s) per rank (set OMP_NUM_THREADS to choose)")


# ----------------------------------------------------------------------------- model, views, checkpoints

class EncoderWithHead(nn.Module):
    """head(encoder(views)): one module for DDP. LeJEPA's head is the projector (lejepa.Projector)."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, packed):
        return self.head(self.encoder(packed))


def make_net(cfg: dict, mcfg: ModelConfig) -> EncoderWithHead:
    """The encoder with LeJEPA's projector, or with the supervised baseline's head."""
    encoder = SparseMedicalViT(mcfg)
    if cfg["objective"] == "supervised":
        return SupervisedNet(encoder, SupervisedHead(mcfg.dim, len(adapters.LABELS)))
    return EncoderWithHead(encoder, Projector(mcfg.dim, cfg["proj_hidden"], cfg["proj_dim"]))


def view_maker(cfg: dict) -> views.MultiCrop:
    """LeJEPA's global + local views with per-view jitter; the supervised baseline's views (sup_views)."""
    if cfg["objective"] == "supervised":
        return supervised_views(cfg)
    brightness, contrast, noise = cfg["view_intensity"]
    return views.MultiCrop(n_global=cfg["n_global"], n_local=cfg["n_local"], global_scale=cfg["global_scale"],
                           local_scale=cfg["local_scale"], zoom=cfg["view_zoom"], brightness=brightness,
                           contrast=contrast, noise=noise)


def shuffle_pairs(z: torch.Tensor, seed: int, step: int, micro: int) -> torch.Tensor:
    """Ablation of the view pairing: z (V, b, K) with row v's samples permuted by its own random permutation, a
    fixed function of (seed, step, micro-batch), so the invariance term compares views of different samples
    (SIGReg, which sees each row as a set, is unchanged)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003) + step) * 1009 + micro)
    perm = torch.stack([torch.randperm(z.shape[1], generator=g) for _ in range(z.shape[0])])  # (V, b)
    perm = (perm.pin_memory() if z.is_cuda else perm).to(z.device, non_blocking=True)
    return z.gather(1, perm[..., None].expand_as(z))


def init_from_checkpoint(cfg: dict, ckpt_path: str, net: EncoderWithHead, opt, world: int, print0) -> tuple:
    """(cfg, start step) after init_from: scratch, resume (weights, optimizer, step, RNG: exact), auto, or a
    checkpoint's weights. weights_only: a checkpoint that would run code is refused before anything is read."""
    if cfg["init_from"] == "auto":  # a restarted torchrun worker picks up the last checkpoint (DESIGN.md, Restarts)
        cfg = dict(cfg, init_from="resume" if os.path.exists(ckpt_path) else "scratch")
        print0(f"init_from='auto': {cfg['init_from']} ({ckpt_path} {'found' if os.path.exists(ckpt_path) else 'absent'})")
    if cfg["init_from"] == "scratch":
        return cfg, 0
    path, start_step = ckpt_path if cfg["init_from"] == "resume" else cfg["init_from"], 0
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    load_weights(net.encoder, ckpt["model"], path, "model")
    if "model_cfg" not in ckpt:
        raise ValueError(f"checkpoint {path}: no 'model_cfg' entry; it is not a train.py checkpoint")
    saved, mcfg = ckpt["model_cfg"], asdict(net.encoder.cfg)  # what shapes cannot show (scale_2d)
    diff = [k for k, v in mcfg.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"checkpoint {path}: its model has " + ", ".join(f"{k}={saved.get(k)!r}" for k in diff) +
                         ", this run " + ", ".join(f"{mcfg[k]!r}" for k in diff) + "; pass " +
                         " ".join(f"--{k}={saved.get(k)!r}" if k in cfg else "--preset=<its preset>" for k in diff))
    if cfg["init_from"] == "resume":
        changed = [f"{k}={v!r} (was {ckpt['config'][k]!r})" for k, v in cfg.items()
                   if k not in ("init_from", "stop_at") and ckpt["config"].get(k, v) != v]
        if changed:  # legitimate (a longer run, say), but it is no longer the same run
            print0(f"resume: this run's config differs from the checkpoint's: {', '.join(changed)}")
        if ckpt["world_size"] != world:  # batches depend on the global batch only (DATA.md)
            print0(f"resume on {world} rank(s), checkpoint from {ckpt['world_size']}: the same samples and views "
                   f"each step, gradients summed in another order (close, not bit-identical)")
        load_weights(net.head, ckpt["head"], path, "head")
        opt.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
    elif ckpt["config"]["objective"] == cfg["objective"]:
        load_weights(net.head, ckpt["head"], path, "head")
    print0(f"init from {path} (step {ckpt['step']}): {'resuming' if cfg['init_from'] == 'resume' else 'weights only, fresh optimizer'}")
    return cfg, start_step


def save_checkpoint(obj: dict, path: str):
    """Atomic (data.atomic_write): a crash or full disk keeps the previous checkpoint."""
    try:
        data.atomic_write(path, lambda tmp: torch.save(obj, tmp))
    # torch.save's zip writer reports a failed write (disk full, file size limit) as a RuntimeError
    # such as "[enforce fail at inline_container.cc:672] unexpected pos 704 vs 598", not an OSError
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 30
        raise OSError(getattr(e, "errno", None) or errno.EIO,
                      f"could not write checkpoint {path} ({getattr(e, 'strerror', None) or e}; {free:.1f} GiB "
                      f"free there); the previous checkpoint, if any, is intact. Free disk space or set --out_dir") from e


# ----------------------------------------------------------------------------- logs and the profile

def run_info(device) -> dict:
    """What produced this run: recorded in the log and the checkpoint."""
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        git = ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return {"git": git or "unknown", "torch": str(torch.__version__), "device": str(name)}


def trim_log(path: str, step: int):
    """Keep the records of steps <= step (what the checkpoint has seen), atomically: a run killed after its last
    checkpoint wrote records the restart writes again, and a half-written last line is dropped with them."""
    if not os.path.exists(path):
        return
    keep = []
    for line in open(path):
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):  # cut off mid-line by a kill: always after the checkpoint's step
            pass

    def write(tmp):
        with open(tmp, "w") as f:
            f.writelines(keep)
    data.atomic_write(path, write)


def start_profile():
    """Trace the GPU's kernels and copies, and warn at every host sync (a stack per call site), from here."""
    import warnings
    torch.cuda.synchronize()
    warnings.simplefilter("default")  # each synchronizing call site once
    torch.cuda.set_sync_debug_mode("warn")
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])  # CPU tracing would slow the host
    prof.start()
    return prof


def stop_profile(prof, steps: int) -> str:
    """Stop the trace; the share of its span in which the GPU ran nothing, i.e. waited for the host."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("default")
    prof.stop()
    path = f"/tmp/trace_{os.getpid()}.json"
    prof.export_chrome_trace(path)
    busy, span = gpu_busy(json.load(open(path))["traceEvents"])
    os.remove(path)
    return (f"profile of {steps} steps: the GPU ran kernels or copies {busy / 1e3:.1f} of {span / 1e3:.1f} ms: it waited "
            f"for the host {1 - busy / max(span, 1e-9):.1%} of the time ({span / 1e3 / steps:.1f} ms a step)")


def gpu_busy(events: list) -> tuple:
    """(time some GPU kernel or copy ran, span from the first start to the last end), in us, of a chrome trace."""
    iv = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X")
    if not iv:
        return 0.0, 0.0
    busy, (lo, hi) = 0.0, iv[0]
    for a, b in iv[1:]:  # union of the intervals: overlapping streams count once
        if a > hi:
            busy, lo = busy + hi - lo, a
        hi = max(hi, b)
    return busy + hi - lo, max(b for _, b in iv) - iv[0][0]


# ----------------------------------------------------------------------------- the supervised baseline
# objective='supervised': the encoder with a linear head, trained with masked BCE on the labels (a NaN label is
# unknown and left out), on the whole image. Everything that differs from LeJEPA is here.

def supervised_views(cfg: dict) -> views.MultiCrop:
    """sup_views='whole': V_g views of the whole image (scale 1; only the aspect jitter trims an edge), unjittered:
    a label describes the whole image, and crops and jitter each cost 2D supervision ~0.1 AUROC.
    'global': LeJEPA's global views alone, jittered."""
    whole = cfg["sup_views"] == "whole"
    brightness, contrast, noise = (0.0, 0.0, 0.0) if whole else cfg["view_intensity"]
    return views.MultiCrop(n_global=cfg["n_global"], n_local=0, global_scale=(1.0, 1.0) if whole else cfg["global_scale"],
                           local_scale=cfg["local_scale"], zoom=(1.0, 1.0) if whole else cfg["view_zoom"],
                           brightness=brightness, contrast=contrast, noise=noise)


class SupervisedHead(nn.Module):
    """Pooled features standardised over the batch within each modality (BatchNorm without affine, as MAE's linear
    probe), then a linear map. A bare linear head barely trains the backbone: mean-pooled features hardly differ
    between images at init (3D val AUROC 0.56 with nn.Linear, 0.85 with BatchNorm + linear; DESIGN.md, Training)."""

    def __init__(self, dim, n_out):
        super().__init__()
        self.norm = nn.ModuleList([nn.BatchNorm1d(dim, affine=False) for _ in ("2d", "3d")])
        self.linear = nn.Linear(dim, n_out)

    def forward(self, x, is2d: list):
        """x (N, dim), is2d N host bools with the 2D views first (as the stream orders them): row slices, no mask
        indexing, so a GPU is never waited for."""
        n2 = sum(is2d)
        if is2d != [True] * n2 + [False] * (len(is2d) - n2):
            raise ValueError("SupervisedHead: expected the 2D views before the 3D ones, as data.make_loader orders them")
        out = []
        for norm, rows in zip(self.norm, (x[:n2], x[n2:])):
            if len(rows):  # batch statistics need two views; a lone one is standardised with the running ones
                out.append(F.batch_norm(rows, norm.running_mean, norm.running_var, training=self.training
                                        and len(rows) > 1, momentum=norm.momentum, eps=norm.eps))
        return self.linear(torch.cat(out))


class SupervisedNet(EncoderWithHead):
    """The encoder with a SupervisedHead, which is also told each view's modality."""

    def forward(self, packed):
        return self.head(self.encoder(packed), packed.is2d)


def supervised_loss(logits, labels):
    """(bce, 0, bce) of logits (Vg, b, 5) against labels (b, 5) on each global view, NaN masked: in the place of
    LeJEPA's (loss, inv_loss, sigreg_loss)."""
    y, mask = torch.nan_to_num(labels).expand_as(logits), (~torch.isnan(labels)).expand_as(logits).float()
    bce = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * mask).sum() / mask.sum().clamp(min=1)
    return bce, torch.zeros_like(bce), bce


if __name__ == "__main__":
    main(configure({k: globals()[k] for k in config_keys}, sys.argv[1:]))
