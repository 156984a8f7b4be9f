"""Expert load balancing: none vs a conventional auxiliary loss vs DeepSeek-V3's aux-loss-free bias.

    python experiments/load_balancing/run.py [--workdir runs/load_balancing] [--analyse-only]
        [--preset P] [--steps N] [--seed S] [--set SECTION.FIELD=VALUE ...] [--variants NAME ...] [--out DIR]

Trains `config.json`'s run once per variant through the training CLI (same data order, seed and
initial weights; only the balancing settings differ), copies each metrics.jsonl here, then
scores every final checkpoint on held-out text (see `heldout_text`): LM loss and bits per byte
with `dsv3_jax.eval`'s sliding window, and MaxVio_global, the imbalance of the expert load
summed over all held-out tokens. `runs.json` keeps the commands, wall times and held-out
numbers, so `--analyse-only` rebuilds `summary.json` and the plots from committed files alone.

MaxVio = max_i load_i / mean_i load_i - 1 per MoE layer (0 = perfectly balanced; with top-K of
E experts it cannot exceed E/K - 1). `--preset/--steps/--set` scale the run up (GPU/TPU) and
`--seed` repeats it; pass `--out DIR` then so the committed results beside this script stay.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.data.pipeline import DataConfig  # noqa: E402
from dsv3_jax.train.config import TrainConfig, parse_overrides  # noqa: E402


def command(setup: dict, variant: dict, workdir: str) -> list[str]:
    sets = setup["set"] + variant["set"]
    return [sys.executable, "-m", "dsv3_jax.train", "--preset", setup["preset"], "--steps", str(setup["steps"]),
            "--seed", str(setup["seed"]), "--workdir", workdir, "--no-progress",
            *[a for s in sets for a in ("--set", s)]]


def heldout_text(min_bytes: int) -> tuple[str, list[str]]:
    """Held-out text: there is no validation split, so take the standard library's top-level
    modules that the embedded training corpus leaves out (it stops at a 3 MB budget, in sorted
    order), in sorted order until `min_bytes`. Same kind of text as the corpus's code part, never
    trained on (nor seen by the tokenizer). Files are joined with a blank line."""
    from dsv3_jax.data.corpus import embedded_documents

    trained = set(embedded_documents())
    texts, names, size = [], [], 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")  # as the corpus reads it
        if text in trained:
            continue
        texts.append(text)
        names.append(path.name)
        size += len(text.encode("utf-8"))
        if size >= min_bytes:
            break
    return "\n\n".join(texts), names


def evaluate(workdir: str, text: str, seq_len: int, batch: int = 8) -> dict:
    """Held-out LM loss / bits per byte (`python -m dsv3_jax.eval bpb --window seq_len`, i.e.
    BOS + text, windows of seq_len tokens, stride seq_len/2) and the expert load over every
    held-out token once (non-overlapping windows), with the final router biases' spread."""
    import jax
    from flax import nnx

    from dsv3_jax.eval.scoring import bits_per_byte
    from dsv3_jax.inference import load_model
    from dsv3_jax.model import RouterBias

    model, tok = load_model(workdir)
    bos = model.config.bos_token_id
    ids = np.asarray(([bos] if bos is not None else []) + tok.encode(text).ids, np.int32)
    out = bits_per_byte(model, ids, len(text.encode("utf-8")), window=seq_len, batch=batch)
    rows = -(-ids.size // (seq_len * batch)) * batch
    tokens = np.zeros(rows * seq_len, np.int32)
    tokens[: ids.size] = ids
    segment = (np.arange(tokens.size) < ids.size).astype(np.int32)  # 0 = padding, left out of the load
    graphdef, state = nnx.split(model)
    load_fn = jax.jit(lambda s, t, g: nnx.merge(graphdef, s)(t, segment_ids=g).expert_load)  # [L,E]
    load = sum(np.asarray(load_fn(state, t, g), np.float64) for t, g in
               zip(tokens.reshape(-1, batch, seq_len), segment.reshape(-1, batch, seq_len)))  # [L,E]
    vio = load.max(-1) / load.mean(-1) - 1
    bias = np.concatenate([np.asarray(b).reshape(-1, model.config.n_routed_experts)
                           for b in jax.tree.leaves(nnx.state(model, RouterBias))])  # [L,E]
    return {"nats_per_token": out["nats_per_token"], "bits_per_byte": out["bits_per_byte"], "tokens": int(ids.size),
            "bytes": out["bytes"], "maxvio_global": float(vio.mean()), "maxvio_global_per_layer": vio.tolist(),
            "bias_spread_per_layer": (bias.max(-1) - bias.min(-1)).tolist()}


def random_routing_maxvio(n_tokens: int, n_experts: int, k: int, trials: int = 200, seed: int = 0) -> float:
    """Expected MaxVio of n_tokens each routed to k distinct experts uniformly at random: the
    sampling-noise floor that a perfectly balanced router still shows on a finite batch."""
    rng = np.random.default_rng(seed)
    vio = []
    for _ in range(trials):
        picks = np.argsort(rng.random((n_tokens, n_experts)), axis=1)[:, :k]
        load = np.bincount(picks.reshape(-1), minlength=n_experts)
        vio.append(load.max() / load.mean() - 1)
    return float(np.mean(vio))


def load_metrics(path: str) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in open(path)]
    keys = ("step", "lm_loss", "mtp_loss", "balance_loss", "max_violation", "max_violation_per_layer")
    return {k: np.array([r[k] for r in rows]) for k in keys}


def smooth(x: np.ndarray, n: int = 10) -> np.ndarray:
    """Trailing moving average (the first n-1 points average what exists so far)."""
    c = np.cumsum(np.insert(x, 0, 0.0, axis=0), axis=0)
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(i - n, 0)
    return (c[i] - c[lo]) / (i - lo).reshape(-1, *[1] * (x.ndim - 1))


def analyse(cfg: dict, out: str) -> dict:
    runs = json.load(open(os.path.join(out, "runs.json")))
    setup = runs["setup"]
    names = [n for n in cfg["variants"] if n in runs["variants"]]
    m = {n: load_metrics(os.path.join(out, f"metrics_{n}.jsonl")) for n in names}
    tail = slice(-cfg["tail_steps"], None)
    L = m[names[0]]["max_violation_per_layer"].shape[1]
    layer_names = [f"MoE layer {i}" for i in range(L - setup["mtp_layers"])] + \
                  [f"MTP depth {i + 1}" for i in range(setup["mtp_layers"])]
    floor_step = random_routing_maxvio(setup["tokens_per_step"], setup["n_routed_experts"], setup["top_k"])
    floor_heldout = random_routing_maxvio(runs["variants"][names[0]]["heldout"]["tokens"],
                                          setup["n_routed_experts"], setup["top_k"], trials=50)
    summary = {"setup": setup, "tail_steps": cfg["tail_steps"], "layers": layer_names,
               "random_routing_maxvio": {"per_step": floor_step, "heldout_global": floor_heldout}, "variants": {}}
    for n in names:
        r, h = m[n], runs["variants"][n]["heldout"]
        summary["variants"][n] = {
            "final_lm_loss": float(r["lm_loss"][-1]), "tail_lm_loss": float(r["lm_loss"][tail].mean()),
            "tail_mtp_loss": float(r["mtp_loss"][tail].mean()),
            "heldout_nats_per_token": h["nats_per_token"], "heldout_bits_per_byte": h["bits_per_byte"],
            "tail_maxvio": float(r["max_violation"][tail].mean()),
            "tail_maxvio_per_layer": r["max_violation_per_layer"][tail].mean(0).tolist(),
            "heldout_maxvio_global": h["maxvio_global"],
            "heldout_maxvio_global_per_layer": h["maxvio_global_per_layer"],
            "final_bias_spread_per_layer": h["bias_spread_per_layer"],
            "train_seconds": runs["variants"][n]["train_seconds"]}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = {n: cfg["variants"][n]["label"] for n in names}
    color = {n: f"C{i}" for i, n in enumerate(names)}
    max_vio = setup["n_routed_experts"] / setup["top_k"] - 1

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for n in names:
        ax.plot(m[n]["step"], m[n]["max_violation"], color=color[n], lw=0.5, alpha=0.3)
        ax.plot(m[n]["step"], smooth(m[n]["max_violation"]), color=color[n], lw=1.6, label=label[n])
    ax.axhline(floor_step, color="gray", ls="--", lw=0.8, label="uniform random routing (noise floor)")
    ax.axhline(max_vio, color="gray", ls=":", lw=0.8, label=f"max possible (E/K - 1 = {max_vio:g})")
    ax.set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", ylim=(0, max_vio * 1.05),
           title=f"{setup['preset']}: expert-load MaxVio per training batch (10-step mean; raw faint)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "maxvio.png"), dpi=110)
    plt.close(fig)

    cols = min(L, 2)
    fig, axes = plt.subplots(-(-L // cols), cols, figsize=(11, 3.4 * -(-L // cols)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= L:
            ax.axis("off")
            continue
        for n in names:
            ax.plot(m[n]["step"], smooth(m[n]["max_violation_per_layer"][:, i]), color=color[n], lw=1.2,
                    label=label[n])
        ax.axhline(floor_step, color="gray", ls="--", lw=0.8)
        ax.set(title=layer_names[i], xlabel="step", ylabel="MaxVio (10-step mean)", ylim=(0, max_vio * 1.05))
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "maxvio_layers.png"), dpi=100)
    plt.close(fig)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    ref = names[0]
    for n in names:
        a.plot(m[n]["step"], smooth(m[n]["lm_loss"]), color=color[n], lw=1.2, label=label[n])
        b.plot(m[n]["step"], smooth(m[n]["lm_loss"] - m[ref]["lm_loss"]), color=color[n], lw=1.2)
    a.set(xlabel="step", ylabel="LM loss (10-step mean)", title="training LM loss", yscale="log")
    a.legend(fontsize=7)
    b.axhline(0, color="gray", lw=0.8)
    b.set(xlabel="step", ylabel=f"LM loss - {ref} (10-step mean)", title=f"difference to '{label[ref]}'")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    plt.close(fig)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "load_balancing"))
    p.add_argument("--out", default=HERE, help="where metrics_*.jsonl, runs.json, summary.json and plots go")
    p.add_argument("--analyse-only", action="store_true", help="reuse the metrics_*.jsonl and runs.json in --out")
    p.add_argument("--preset", help="override config.json's preset")
    p.add_argument("--steps", type=int, help="override config.json's steps")
    p.add_argument("--seed", type=int, help="override config.json's seed (initial weights and data order)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra training overrides for every variant (after config.json's)")
    p.add_argument("--variants", nargs="+", help="train only these (default: all in config.json)")
    args = p.parse_args()
    cfg = json.load(open(os.path.join(HERE, "config.json")))
    if not args.analyse_only:
        sets = cfg["set"] + args.set
        over = parse_overrides(sets)
        model = ModelConfig.preset(args.preset or cfg["preset"], **over["model"])
        data, train_cfg = DataConfig(**over["data"]), TrainConfig(**over["train"])
        setup = {"preset": args.preset or cfg["preset"], "steps": args.steps or cfg["steps"],
                 "seed": cfg["seed"] if args.seed is None else args.seed,
                 "set": sets, "seq_len": data.seq_len,
                 "tokens_per_step": data.seq_len * data.batch_size * train_cfg.grad_accum,
                 "n_routed_experts": model.n_routed_experts, "top_k": model.num_experts_per_tok,
                 "mtp_layers": model.num_nextn_predict_layers}
        os.makedirs(args.out, exist_ok=True)
        runs_path = os.path.join(args.out, "runs.json")
        runs = json.load(open(runs_path)) if os.path.exists(runs_path) else {}
        if runs.get("setup") != setup:
            runs = {"setup": setup, "variants": {}}
        names = args.variants or list(cfg["variants"])
        for name in names:
            workdir = os.path.join(args.workdir, name)
            shutil.rmtree(workdir, ignore_errors=True)
            cmd = command(setup, cfg["variants"][name], workdir)
            print(" ".join(cmd), flush=True)
            t0 = time.time()
            subprocess.run(cmd, check=True, cwd=ROOT)
            seconds = time.time() - t0
            print(f"{name}: {seconds:.0f} s", flush=True)
            shutil.copy(os.path.join(workdir, "metrics.jsonl"), os.path.join(args.out, f"metrics_{name}.jsonl"))
            shown = [os.path.relpath(a, ROOT) if a == workdir else a for a in cmd[1:]]
            runs["variants"][name] = {"command": " ".join(["python", *shown]), "train_seconds": seconds}
            with open(runs_path, "w") as f:
                json.dump(runs, f, indent=1)
        text, files = heldout_text(cfg["heldout_min_bytes"])
        with open(os.path.join(args.workdir, "heldout.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        runs["heldout_files"] = files
        for name in names:
            runs["variants"][name]["heldout"] = evaluate(os.path.join(args.workdir, name), text, setup["seq_len"])
            print(name, json.dumps(runs["variants"][name]["heldout"]), flush=True)
        with open(runs_path, "w") as f:
            json.dump(runs, f, indent=1)
    print(json.dumps(analyse(cfg, args.out)))


if __name__ == "__main__":
    main()
