"""FP8 (emulated DeepSeek recipe) vs BF16: the same `small` run twice, then the loss gap.

    python experiments/fp8_vs_bf16/run.py [--workdir runs/fp8_vs_bf16] [--seed S --out DIR] [--analyse-only]

Trains `config.json`'s run once per precision (same data, seed and steps: only
`train.precision` differs), copies each metrics.jsonl to --out (default: here), and writes
`loss.png` there and the numbers `results.md` quotes: relative LM-loss difference
|fp8 - bf16| / bf16 per step, its mean over the run and over the last `tail_steps` steps (the
paper's criterion: below 0.25%). `--seed` replaces config.json's seed (data order and initial
weights) for another pair of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def train(cfg: dict, precision: str, workdir: str) -> float:
    """One run through the training CLI; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "dsv3_jax.train", "--preset", cfg["preset"], "--steps", str(cfg["steps"]),
           "--seed", str(cfg["seed"]), "--workdir", workdir, "--no-progress",
           "--set", f"train.precision={precision}", *[a for s in cfg["set"] for a in ("--set", s)]]
    print(" ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - t0


def load(path: str) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in open(path)]
    return {k: np.array([r[k] for r in rows]) for k in ("step", "loss", "lm_loss", "step_seconds")}


def analyse(cfg: dict, out_dir: str) -> dict:
    runs = {p: load(os.path.join(out_dir, f"metrics_{p}.jsonl")) for p in cfg["precisions"]}
    base, fp8 = runs["bf16"], runs["fp8_emulated"]
    rel = np.abs(fp8["lm_loss"] - base["lm_loss"]) / base["lm_loss"]
    signed = (fp8["lm_loss"] - base["lm_loss"]) / base["lm_loss"]
    tail = slice(-cfg["tail_steps"], None)
    out = {
        "seed": cfg["seed"],
        "steps": int(base["step"][-1]),
        "final_lm_loss": {p: float(r["lm_loss"][-1]) for p, r in runs.items()},
        "tail_mean_lm_loss": {p: float(r["lm_loss"][tail].mean()) for p, r in runs.items()},
        "rel_diff_mean_all": float(rel.mean()),
        "rel_diff_mean_tail": float(rel[tail].mean()),
        "rel_diff_of_tail_means": float(abs(fp8["lm_loss"][tail].mean() / base["lm_loss"][tail].mean() - 1)),
        "signed_rel_diff_mean_tail": float(signed[tail].mean()),
        "rel_diff_max": float(rel.max()),
        "median_step_seconds": {p: float(np.median(r["step_seconds"][5:])) for p, r in runs.items()},
    }
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for p, r in runs.items():
        a.plot(r["step"], r["lm_loss"], label=p, lw=1)
    a.set(xlabel="step", ylabel="LM loss", title=f"{cfg['preset']}: BF16 vs FP8 (emulated)", yscale="log")
    a.legend()
    b.plot(base["step"], 100 * signed, lw=1)
    b.axhline(0.25, color="r", ls="--", lw=0.8, label="paper: 0.25%")
    b.axhline(-0.25, color="r", ls="--", lw=0.8)
    b.set(xlabel="step", ylabel="(fp8 - bf16) / bf16  [%]", title="relative LM-loss difference")
    b.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "loss.png"), dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "fp8_vs_bf16"))
    p.add_argument("--seed", type=int, help="override config.json's seed (data order and initial weights)")
    p.add_argument("--out", default=HERE, help="where metrics_*.jsonl and loss.png go")
    p.add_argument("--analyse-only", action="store_true", help="reuse the metrics_*.jsonl in --out")
    args = p.parse_args()
    cfg = json.load(open(os.path.join(HERE, "config.json")))
    if args.seed is not None:
        cfg["seed"] = args.seed
    os.makedirs(args.out, exist_ok=True)
    if not args.analyse_only:
        for precision in cfg["precisions"]:
            workdir = os.path.join(args.workdir, precision)
            shutil.rmtree(workdir, ignore_errors=True)
            seconds = train(cfg, precision, workdir)
            print(f"{precision}: {seconds:.0f} s", flush=True)
            shutil.copy(os.path.join(workdir, "metrics.jsonl"), os.path.join(args.out, f"metrics_{precision}.jsonl"))
    print(json.dumps(analyse(cfg, args.out)))


if __name__ == "__main__":
    main()
