"""python -m dsv3_jax.eval bpb --ckpt DIR --text FILE | choice --ckpt DIR --data FILE.jsonl [--shots K]

bpb: bits per byte of a UTF-8 text (BOS first when the config has one), sliding window.
choice: MMLU-style records {"question", "choices": [...], "answer": index or letter}; each choice
is scored by the summed log-likelihood of " {choice}" after a K-shot prompt (the first K records
are the examples and are not scored). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax.numpy as jnp
import numpy as np

from dsv3_jax.eval.scoring import bits_per_byte, choice_scores
from dsv3_jax.inference import check_prompts, load_model


def _answer(record: dict) -> int:
    a = record["answer"]
    return "ABCDEFGHIJ".index(a.strip().upper()) if isinstance(a, str) else int(a)


def _format(record: dict, with_answer: bool) -> str:
    text = f"Question: {record['question']}\nAnswer:"
    return text + f" {record['choices'][_answer(record)]}\n\n" if with_answer else text


def run_choice(model, tok, records: list[dict], shots: int) -> dict:
    if len(records) <= shots:
        raise ValueError(f"{len(records)} records: need more than --shots={shots}")
    prefix = "".join(_format(r, True) for r in records[:shots])
    contexts, conts, owner = [], [], []
    for i, r in enumerate(records[shots:]):
        ctx = tok.encode(prefix + _format(r, False)).ids
        for choice in r["choices"]:
            contexts.append(ctx)
            conts.append(tok.encode(f" {choice}").ids)
            owner.append(i)
    check_prompts([c + x for c, x in zip(contexts, conts)], model.config.vocab_size)
    scores = choice_scores(model, contexts, conts)
    owner = np.array(owner)
    correct = [int(np.argmax(scores[owner == i]) == _answer(r)) for i, r in enumerate(records[shots:])]
    return {"accuracy": float(np.mean(correct)), "questions": len(correct), "shots": shots}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    for name in ("bpb", "choice"):
        s = sub.add_parser(name)
        s.add_argument("--ckpt", required=True)
        s.add_argument("--tokenizer")
        s.add_argument("--dtype", default="bfloat16")
    sub.choices["bpb"].add_argument("--text", required=True)
    sub.choices["bpb"].add_argument("--window", type=int, default=512)
    sub.choices["bpb"].add_argument("--stride", type=int)
    sub.choices["choice"].add_argument("--data", required=True)
    sub.choices["choice"].add_argument("--shots", type=int, default=0)
    args = p.parse_args(argv)
    try:
        model, tok = load_model(args.ckpt, tokenizer=args.tokenizer, dtype=jnp.dtype(args.dtype))
        if tok is None:
            raise FileNotFoundError(f"{args.ckpt} has no tokenizer.json; pass --tokenizer")
        if args.task == "bpb":
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
            bos = model.config.bos_token_id
            ids = ([bos] if bos is not None else []) + tok.encode(text).ids
            check_prompts([ids], model.config.vocab_size)
            out = bits_per_byte(model, ids, len(text.encode("utf-8")), window=args.window, stride=args.stride)
        else:
            with open(args.data) as f:
                records = [json.loads(line) for line in f if line.strip()]
            out = run_choice(model, tok, records, args.shots)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
