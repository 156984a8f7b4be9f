"""Multi-token prediction (SPEC D) at small scale: one model trained with and without an MTP depth.

    python experiments/mtp/run.py [--workdir runs/mtp] [--preset P] [--steps N] [--seeds 0 1 ...]
                                  [--set SECTION.FIELD=VALUE ...] [--eval-only | --analyse-only]
                                  [--train-data PATH ... --val-data PATH ... [--tokenizer FILE]]

1. Splits the embedded corpus by document (every `val_every`-th document held out), writes
   train.jsonl / val.jsonl and a tokenizer trained on the training split only (or takes
   --train-data / --val-data: your own corpus, for a run at GPU/TPU scale).
2. Trains each variant of `config.json` per seed through the training CLI (same data, seed,
   schedule; the variants differ only in their `--set` lines), copies each metrics.jsonl here.
3. Loads each final checkpoint (`inference.load_model`) and scores the held-out documents:
   main-model loss on seq_len-token chunks (the training loss on unseen text), bits per byte
   (`eval.bits_per_byte`, sliding window) and, with MTP, the MTP depth's loss on t_{i+2}, its
   top-1 accuracy and how often its argmax equals the main model's next argmax (teacher forced).
4. Speculative decoding (`inference.generate(speculative=True)`) from prompts cut out of the
   held-out documents, one prompt at a time: drafts accepted / drafted, tokens per main-model
   forward, and whether greedy speculative output equals plain greedy token for token.
5. Writes eval.json, mtp.png and prints the numbers results.md quotes.

--eval-only redoes 3-5 from the checkpoints in --workdir; --analyse-only redoes 5 from the
committed metrics_*.jsonl and eval.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)  # the library, without installing it


# ---------------------------------------------------------------- data and training


def split_documents(docs: list[str], every: int, offset: int) -> tuple[list[str], list[str]]:
    """(train, held out): documents offset, offset + every, ... are held out."""
    held = set(range(offset, len(docs), every))
    return [d for i, d in enumerate(docs) if i not in held], [docs[i] for i in sorted(held)]


def prepare_data(cfg: dict, data_dir: str, train_paths=None, val_paths=None, tokenizer=None) -> dict:
    """{"train": paths, "val": paths, "tokenizer": path}. Default: the embedded corpus split into
    data_dir/train.jsonl and val.jsonl; a tokenizer, unless given, is trained on the training
    documents only (data_dir/tokenizer.json)."""
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.data.corpus import embedded_documents
    from dsv3_jax.data.pipeline import read_documents
    from dsv3_jax.data.tokenizer import load_or_train_tokenizer
    from dsv3_jax.train.config import parse_overrides

    os.makedirs(data_dir, exist_ok=True)
    if train_paths:
        out, train = {"train": list(train_paths), "val": list(val_paths)}, None
    else:
        out = {"train": [os.path.join(data_dir, "train.jsonl")], "val": [os.path.join(data_dir, "val.jsonl")]}
        train, val = split_documents(embedded_documents(), cfg["val_every"], cfg["val_offset"])
        for name, docs in (("train", train), ("val", val)):
            with open(os.path.join(data_dir, f"{name}.jsonl"), "w") as f:
                f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        print(f"{data_dir}: {len(train)} training / {len(val)} held-out documents", flush=True)
    out["tokenizer"] = tokenizer or os.path.join(data_dir, "tokenizer.json")
    if not tokenizer and not os.path.isfile(out["tokenizer"]):
        vocab = ModelConfig.preset(cfg["preset"], **parse_overrides(cfg["set"])["model"]).vocab_size
        load_or_train_tokenizer(None, data_dir, train or read_documents(tuple(train_paths)), vocab)
    return out


def train_command(cfg: dict, variant: str, seed: int, workdir: str, data: dict) -> list[str]:
    sets = cfg["set"] + cfg["variants"][variant]
    return [sys.executable, "-m", "dsv3_jax.train", "--preset", cfg["preset"], "--steps", str(cfg["steps"]),
            "--seed", str(seed), "--workdir", workdir, "--no-progress", "--data", *data["train"],
            "--tokenizer", data["tokenizer"], *[a for s in sets for a in ("--set", s)]]


# ---------------------------------------------------------------- held-out scoring


def chunks(docs_ids: list[list[int]], T: int) -> list[list[int]]:
    """Each document's tokens cut into consecutive pieces of at most T (>= 3: an MTP target)."""
    return [ids[i: i + T] for ids in docs_ids for i in range(0, len(ids), T) if len(ids[i: i + T]) >= 3]


def heldout_scores(model, docs_ids: list[list[int]], T: int, batch: int) -> dict:
    """Teacher-forced scores over non-overlapping T-token chunks of each document.

    Main model at i predicts t_{i+1}; the MTP depth at i (which also sees Emb(t_{i+1})) predicts
    t_{i+2}; greedy speculation would accept its guess iff it equals the main model's argmax at
    i+1 (`agree`), sampling at T=1 with probability p_main(guess) at i+1 (`p_accept`).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef = nnx.graphdef(model)

    @jax.jit
    def score(state, tokens):  # tokens [B,T]
        out = nnx.merge(graphdef, state)(tokens)
        logits = out.logits.astype(jnp.float32)  # [B,T,V]
        main = jnp.argmax(logits, -1)  # [B,T]
        res = {"main_nll": -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0],
               "main_top1": main[:, :-1] == tokens[:, 1:]}  # [B,T-1]
        if out.mtp_logits is not None:
            m = out.mtp_logits[0].astype(jnp.float32)  # [B,T,V] depth 1: position i predicts t_{i+2}
            guess = jnp.argmax(m[:, :-2], -1)  # [B,T-2]
            p_main = jax.nn.softmax(logits[:, 1:-1])  # [B,T-2,V] main model at i+1
            res |= {"mtp_nll": -jnp.take_along_axis(jax.nn.log_softmax(m[:, :-2]), tokens[:, 2:, None], -1)[..., 0],
                    "mtp_top1": guess == tokens[:, 2:], "agree": guess == main[:, 1:-1],
                    "p_accept": jnp.take_along_axis(p_main, guess[..., None], -1)[..., 0]}
        return res

    pieces = chunks(docs_ids, T)
    sums: dict[str, float] = {}
    counts = {"main": 0, "mtp": 0}
    state = nnx.state(model)
    for b in range(0, len(pieces), batch):
        rows = np.zeros((batch, T), np.int32)
        lengths = np.zeros((batch,), np.int64)
        for r, p in enumerate(pieces[b: b + batch]):
            rows[r, : len(p)], lengths[r] = p, len(p)
        res = jax.device_get(score(state, rows))
        for k, v in res.items():
            shift = 1 if k.startswith("main") else 2
            valid = np.arange(v.shape[1])[None, :] < (lengths - shift)[:, None]
            sums[k] = sums.get(k, 0.0) + float(np.where(valid, v, 0).astype(np.float64).sum())
        counts["main"] += int(np.clip(lengths - 1, 0, None).sum())
        counts["mtp"] += int(np.clip(lengths - 2, 0, None).sum())
    out = {"val_loss": sums["main_nll"] / counts["main"], "val_top1": sums["main_top1"] / counts["main"],
           "val_tokens": counts["main"], "chunks": len(pieces)}
    if "mtp_nll" in sums:
        out |= {"mtp_val_loss": sums["mtp_nll"] / counts["mtp"], "mtp_top1": sums["mtp_top1"] / counts["mtp"],
                "teacher_forced_acceptance": sums["agree"] / counts["mtp"],  # greedy
                "teacher_forced_acceptance_t1": sums["p_accept"] / counts["mtp"]}  # sampling at T=1
    return out


def heldout_bpb(model, docs: list[str], docs_ids: list[list[int]], window: int, stride: int, batch: int) -> dict:
    """`eval.bits_per_byte` per document (its first token is context only), pooled over documents."""
    from dsv3_jax.eval.scoring import bits_per_byte

    nll = n_bytes = scored = 0.0
    for text, ids in zip(docs, docs_ids):
        r = bits_per_byte(model, ids, len(text.encode("utf-8")), window=window, stride=stride, batch=batch)
        nll += r["nats_per_token"] * (r["tokens"] - 1)
        n_bytes += r["bytes"]
        scored += r["tokens"] - 1
    return {"bpb": nll / math.log(2) / n_bytes, "bpb_nats_per_token": nll / scored}


# ---------------------------------------------------------------- speculative decoding


def prompts_from(docs_ids: list[list[int]], n: int, length: int) -> list[list[int]]:
    """Up to n prompts of `length` tokens, each from the middle of a different document."""
    out = []
    for ids in docs_ids:
        if len(ids) >= length and len(out) < n:
            start = (len(ids) - length) // 2
            out.append(ids[start: start + length])
    return out


def speculation(model, prompts: list[list[int]], new_tokens: int, temperature: float, seed: int) -> dict:
    """Per prompt (batch 1, no stop token): drafts, accepted drafts, tokens emitted and decode rounds,
    speculative and plain; under greedy also whether both emit the same tokens. Wall times are
    measured after a warm-up call of each mode."""
    from dsv3_jax.inference import generate

    for spec in (False, True):  # compile both modes before timing
        generate(model, prompts[:1], new_tokens, temperature=temperature, speculative=spec)
    rows, seconds = [], {"plain": 0.0, "speculative": 0.0}
    for i, p in enumerate(prompts):
        kw = dict(temperature=temperature, seed=seed + i)  # independent random draws per prompt
        t0 = time.perf_counter()
        plain = generate(model, [p], new_tokens, **kw)
        t1 = time.perf_counter()
        spec = generate(model, [p], new_tokens, speculative=True, **kw)
        seconds["plain"] += t1 - t0
        seconds["speculative"] += time.perf_counter() - t1
        new = spec.tokens[0]
        row = {"drafted": spec.drafted, "accepted": spec.accepted, "emitted": len(new), "rounds": spec.steps,
               "plain_forwards": plain.steps, "distinct_fraction": len(set(new)) / len(new)}
        if temperature == 0:
            row["equals_plain"] = spec.tokens == plain.tokens
        rows.append(row)
    drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
    emitted = sum(r["emitted"] for r in rows)
    out = {"temperature": temperature, "prompts": len(rows), "drafted": drafted, "accepted": accepted,
           "acceptance": accepted / drafted,
           # the prefill forward emits the first token; each later forward is one round
           "tokens_per_decode_forward": (emitted - len(rows)) / drafted,
           "tokens_per_forward_with_prefill": emitted / (drafted + len(rows)),
           "acceptance_per_prompt": [r["accepted"] / r["drafted"] for r in rows],
           # low = the continuation loops over a few tokens, which a one-token-ahead guess finds easy
           "distinct_fraction": float(np.mean([r["distinct_fraction"] for r in rows])),
           "wall_seconds": seconds, "rows": rows}
    if temperature == 0:
        out["equals_plain_greedy"] = all(r["equals_plain"] for r in rows)
    return out


def evaluate(cfg: dict, workdir: str, data: dict) -> dict:
    import jax.numpy as jnp

    from dsv3_jax.data.pipeline import DataConfig, read_documents
    from dsv3_jax.data.tokenizer import eos_id
    from dsv3_jax.inference import load_model
    from dsv3_jax.train.config import parse_overrides

    e = cfg["eval"]
    T = parse_overrides(cfg["set"])["data"].get("seq_len", DataConfig.seq_len)  # the training context
    model, tok = load_model(workdir, tokenizer=data["tokenizer"], dtype=jnp.dtype(e["dtype"]))
    docs = read_documents(tuple(data["val"]))
    docs_ids = [tok.encode(d).ids + [eos_id(tok)] for d in docs]  # as the pipeline packs them
    t0 = time.time()
    out = heldout_scores(model, docs_ids, T, e["batch"])
    out |= heldout_bpb(model, docs, [ids[:-1] for ids in docs_ids], T, T // 2, e["batch"])
    if model.mtp is not None:
        prompts = prompts_from(docs_ids, e["prompts"], e["prompt_tokens"])
        out["speculative"] = [speculation(model, prompts, e["new_tokens"], t, seed=0) for t in e["temperatures"]]
    out["eval_seconds"] = time.time() - t0
    return out


# ---------------------------------------------------------------- analysis


def load_metrics(path: str) -> dict[str, np.ndarray]:
    rows = [json.loads(line) for line in open(path)]
    return {k: np.array([r[k] for r in rows]) for k in ("step", "lm_loss", "mtp_loss", "mtp_lambda", "step_seconds")}


def smooth(x: np.ndarray, n: int) -> np.ndarray:
    return np.convolve(x, np.ones(n) / n, mode="valid")


def analyse(cfg: dict) -> dict:
    runs = {v: {s: load_metrics(os.path.join(HERE, f"metrics_{v}_s{s}.jsonl")) for s in cfg["seeds"]}
            for v in cfg["variants"]}
    evals = json.load(open(os.path.join(HERE, "eval.json")))
    tail = slice(-cfg["tail_steps"], None)
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    out: dict = {"steps": cfg["steps"], "seeds": cfg["seeds"]}
    for v, by_seed in runs.items():
        ev = [evals[f"{v}/s{s}"] for s in cfg["seeds"]]
        row = {"final_lm_loss": mean([r["lm_loss"][-1] for r in by_seed.values()]),
               "tail_lm_loss": mean([r["lm_loss"][tail].mean() for r in by_seed.values()]),
               "median_step_seconds": mean([np.median(r["step_seconds"][5:]) for r in by_seed.values()]),
               **{k: mean([e[k] for e in ev]) for k in ("val_loss", "val_top1", "bpb")},
               "val_loss_per_seed": [e["val_loss"] for e in ev], "bpb_per_seed": [e["bpb"] for e in ev]}
        if "mtp_val_loss" in ev[0]:
            lam = next(iter(by_seed.values()))["mtp_lambda"]
            row |= {"tail_mtp_loss": mean([r["mtp_loss"][tail].mean() for r in by_seed.values()]),
                    "lambda_switch_step": int(np.argmax(lam < lam[0]) + 1) if (lam < lam[0]).any() else None,
                    **{k: mean([e[k] for e in ev]) for k in ("mtp_val_loss", "mtp_top1", "teacher_forced_acceptance",
                                                          "teacher_forced_acceptance_t1")}}
            for i, t in enumerate(cfg["eval"]["temperatures"]):
                name = "greedy" if t == 0 else f"T={t:g}"
                spec = [e["speculative"][i] for e in ev]
                row[f"spec_{name}"] = {
                    "acceptance": mean([s["acceptance"] for s in spec]),
                    "acceptance_per_seed": [s["acceptance"] for s in spec],
                    "acceptance_prompt_range": [min(min(s["acceptance_per_prompt"]) for s in spec),
                                                max(max(s["acceptance_per_prompt"]) for s in spec)],
                    "tokens_per_decode_forward": mean([s["tokens_per_decode_forward"] for s in spec]),
                    "tokens_per_forward_with_prefill": mean([s["tokens_per_forward_with_prefill"] for s in spec]),
                    "wall_speedup": mean([s["wall_seconds"]["plain"] / s["wall_seconds"]["speculative"] for s in spec]),
                    "distinct_fraction": mean([s["distinct_fraction"] for s in spec]),
                    "prompts": spec[0]["prompts"], "drafted": sum(s["drafted"] for s in spec)}
                if t == 0:
                    row[f"spec_{name}"]["equals_plain_greedy"] = all(s["equals_plain_greedy"] for s in spec)
        out[v] = row
    base, mtp = cfg["baseline"], cfg["treatment"]
    half = cfg["steps"] // 2
    paired = [runs[mtp][s]["lm_loss"] - runs[base][s]["lm_loss"] for s in cfg["seeds"]]  # same batches
    out["train_lm_loss_diff_first_half_per_seed"] = [float(d[:half].mean()) for d in paired]
    out["train_lm_loss_diff_second_half_per_seed"] = [float(d[half:].mean()) for d in paired]
    for key in ("val_loss", "bpb"):  # paired by seed: same initial main-model weights and data order
        out[f"{key}_diff_per_seed"] = [a - b for a, b in zip(out[mtp][f"{key}_per_seed"], out[base][f"{key}_per_seed"])]
    plot(cfg, runs, evals, out)
    return out


def plot(cfg: dict, runs: dict, evals: dict, out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(cfg["smooth"], cfg["steps"])
    base, treated = cfg["baseline"], cfg["treatment"]
    colors = {base: "tab:blue", treated: "tab:orange"}
    fig, ((a, b), (d, c)) = plt.subplots(2, 2, figsize=(13, 8.5))
    for v, by_seed in runs.items():  # a: seed-mean training curves
        r0 = next(iter(by_seed.values()))
        lm = np.mean([r["lm_loss"] for r in by_seed.values()], 0)
        a.plot(r0["step"][n - 1:], smooth(lm, n), color=colors[v], lw=1.2, label=f"{v}: LM loss")
        if r0["mtp_loss"].any():
            mtp = np.mean([r["mtp_loss"] for r in by_seed.values()], 0)
            a.plot(r0["step"][n - 1:], smooth(mtp, n), color=colors[v], lw=1, ls="--", label=f"{v}: MTP loss (t+2)")
    switch = out[treated].get("lambda_switch_step")
    if switch:
        a.axvline(switch, color="gray", lw=0.8, ls=":", label=f"MTP lambda 0.3 -> 0.1 (step {switch})")
    a.set(xlabel="step", ylabel="nats/token", yscale="log",
          title=f"training loss, mean of {len(cfg['seeds'])} seeds ({n}-step moving mean)")
    a.legend(fontsize=8)

    for s in cfg["seeds"]:  # b: paired difference (same initial weights and batches)
        diff = runs[treated][s]["lm_loss"] - runs[base][s]["lm_loss"]
        b.plot(runs[base][s]["step"][n - 1:], smooth(diff, n), lw=1, label=f"seed {s}")
    b.axhline(0, color="k", lw=0.8)
    b.set(xlabel="step", ylabel="nats/token", title=f"training LM loss, {treated} - {base} (same batches)")
    b.legend(fontsize=8)

    for k, key in enumerate(("val_loss", "bpb")):  # d: held-out differences per seed
        diffs = out[f"{key}_diff_per_seed"]
        d.scatter([k] * len(diffs), diffs, color="tab:orange", zorder=3, label="a seed" if k == 0 else None)
        d.hlines(np.mean(diffs), k - 0.25, k + 0.25, color="k", label="mean" if k == 0 else None)
    d.axhline(0, color="gray", lw=0.8)
    d.set_xticks([0, 1], ["LM loss (nats/token)", "bits per byte"])
    d.set(xlim=(-0.6, 1.6), title=f"held-out text: {treated} - {base} per seed (below 0: MTP better)")
    d.legend(fontsize=8)

    for i, t in enumerate(cfg["eval"]["temperatures"]):
        name = "greedy" if t == 0 else f"T={t:g}"
        acc = [x for s in cfg["seeds"] for x in evals[f"{treated}/s{s}"]["speculative"][i]["acceptance_per_prompt"]]
        mean_acc = out[treated][f"spec_{name}"]["acceptance"]
        c.hist(acc, bins=np.linspace(0, 1, 21), alpha=0.6, label=f"{name}: {mean_acc:.1%} of all drafts")
    for key, color, what in (("teacher_forced_acceptance", "tab:blue", "greedy"),
                             ("teacher_forced_acceptance_t1", "tab:orange", "T=1")):
        c.axvline(out[treated][key], color=color, ls="--", lw=1,
                  label=f"{what}, teacher forced on held-out text: {out[treated][key]:.1%}")
    c.axvspan(0.85, 0.90, color="green", alpha=0.15, label="paper (671B): 85-90%")
    c.set(xlabel="drafts accepted / drafted, per prompt", ylabel="prompts x seeds",
          title="MTP speculative decoding acceptance")
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "mtp.png"), dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "mtp"))
    p.add_argument("--preset", help="model preset (default: config.json's)")
    p.add_argument("--steps", type=int, help="training steps (default: config.json's)")
    p.add_argument("--seeds", type=int, nargs="+", help="default: config.json's")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="extra training overrides for every variant, after config.json's")
    p.add_argument("--train-data", nargs="+", help="your own training data (what dsv3_jax.train --data takes) "
                   "instead of the embedded corpus's split; needs --val-data")
    p.add_argument("--val-data", nargs="+", help="held-out text / JSONL files or directories")
    p.add_argument("--tokenizer", help="a tokenizer.json (default: one trained on the training documents)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eval-only", action="store_true", help="evaluate the checkpoints already in --workdir")
    mode.add_argument("--analyse-only", action="store_true", help="numbers and plot from the files beside this script")
    args = p.parse_args()
    if bool(args.train_data) != bool(args.val_data):
        p.error("--train-data and --val-data go together")
    cfg = json.load(open(os.path.join(HERE, "config.json")))
    cfg |= {k: v for k, v in (("preset", args.preset), ("steps", args.steps), ("seeds", args.seeds)) if v}
    cfg["set"] = cfg["set"] + args.set
    if not args.analyse_only:
        data = prepare_data(cfg, os.path.join(args.workdir, "data"), args.train_data, args.val_data, args.tokenizer)
        evals_path = os.path.join(HERE, "eval.json")  # other seeds' results are kept
        evals = json.load(open(evals_path)) if os.path.isfile(evals_path) else {}
        for seed in cfg["seeds"]:
            for variant in cfg["variants"]:
                workdir = os.path.join(args.workdir, f"{variant}_s{seed}")
                if not args.eval_only:
                    shutil.rmtree(workdir, ignore_errors=True)
                    cmd = train_command(cfg, variant, seed, workdir, data)
                    print(" ".join(cmd), flush=True)
                    t0 = time.time()
                    subprocess.run(cmd, check=True, cwd=ROOT)
                    print(f"{variant} seed {seed}: trained in {time.time() - t0:.0f} s", flush=True)
                shutil.copy(os.path.join(workdir, "metrics.jsonl"),
                            os.path.join(HERE, f"metrics_{variant}_s{seed}.jsonl"))
                evals[f"{variant}/s{seed}"] = evaluate(cfg, workdir, data)
                print(f"{variant} seed {seed}: " + json.dumps({k: v for k, v in evals[f'{variant}/s{seed}'].items()
                                                                if k != "speculative"}), flush=True)
                with open(evals_path, "w") as f:
                    json.dump(evals, f, indent=1)
    print(json.dumps(analyse(cfg), indent=1))


if __name__ == "__main__":
    main()
