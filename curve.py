"""
Probe macro AUROC against training step: the README's learning-curve figure. Each ckpt_<step>.pt goes through
probe.main, own-modality probes; step 0 is the first run's random init.

    torchrun --standalone --nproc_per_node 2 train.py --ckpt_keep=True --ckpt_interval=150
    torchrun --standalone --nproc_per_node 2 train.py --objective=supervised --out_dir=out/sup --ckpt_keep=True --ckpt_interval=150
    python curve.py out out/sup        # -> assets/learning_curve.png and out/curve.json
"""

import glob
import json
import os
import re
import sys

import probe


def curve(run_dir: str, random_init: bool) -> dict:
    """{encoder: {test_set: [(step, macro, ci_low, ci_high)]}} for one run folder."""
    out, ckpts = {}, sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")), key=lambda p: int(re.findall(r"\d+", p)[-1]))
    if not ckpts:
        raise FileNotFoundError(f"{run_dir}: no ckpt_<step>.pt; train with --ckpt_keep=True")
    for i, path in enumerate(ckpts):
        cfg = {k: getattr(probe, k) for k in probe.config_keys}
        cfg.update(ckpt=path, lp_data="2d,3d", figures=False, pixel_floor=False, random_init=random_init and i == 0,
                   knn="", shots="",  # the linear probe's rows only
                   out_dir=os.path.join(run_dir, "curve", os.path.basename(path)[:-3]))
        probe.main(cfg)
        for r in json.load(open(os.path.join(cfg["out_dir"], "probe.json"))):
            if r["lp_data"] == r["test_set"][-2:]:  # own-modality probe
                name, step = r["encoder"].rsplit("-", 1) if r["encoder"] != "random-init" else ("random-init", 0)
                out.setdefault(name, {}).setdefault(r["test_set"], []).append((int(step), r["macro"], r["ci_low"], r["ci_high"]))
    return out


if __name__ == "__main__":
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {}
    for k, d in enumerate(sys.argv[1:]):
        runs.update(curve(d, random_init=k == 0))
    with open(os.path.join(sys.argv[1], "curve.json"), "w") as f:
        json.dump(runs, f, indent=1)
    sets = sorted({t for r in runs.values() for t in r})
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.6), squeeze=False)
    for ax, t in zip(axes[0], sets):
        for name, r in runs.items():
            pts = sorted(r.get(t, []))
            if name == "random-init":
                ax.axhspan(pts[0][2], pts[0][3], color="grey", alpha=0.25)
                ax.axhline(pts[0][1], color="grey", label="random init (95% CI)")
                continue
            s, m, lo, hi = zip(*pts)
            ax.errorbar(s, m, yerr=[[a - b for a, b in zip(m, lo)], [b - a for a, b in zip(m, hi)]], marker="o",
                        capsize=3, label=name)
        ax.set(title=f"{t}, own-modality probe", xlabel="training step", ylabel="test macro AUROC")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs("assets", exist_ok=True)
    fig.savefig("assets/learning_curve.png", dpi=110)
    print("wrote assets/learning_curve.png and", os.path.join(sys.argv[1], "curve.json"))
