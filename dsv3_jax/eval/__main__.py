"""python -m dsv3_jax.eval bpb --ckpt DIR --text FILE | choice --ckpt DIR --data FILE.jsonl [--shots K]

bpb: bits per byte of a UTF-8 text (BOS first when the config has one), sliding window.
choice: MMLU-style records {"question", "choices": [...], "answer": index or letter}; each choice
is scored by the summed log-likelihood of " {choice}" after a K-shot prompt (the first K records
are the examples and are not scored). Prints one JSON line. --mesh (training's syntax) shards the
model over all devices and runs the scoring on that mesh; default: one device. Multi-process runs
take training's --coordinator / --num-processes / --process-id, and process 0 prints.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import parallel
from dsv3_jax.eval.scoring import bits_per_byte, choice_scores
from dsv3_jax.inference import check_prompts, load_model


def _answer(record: dict) -> int:
    """The index of the right choice: an int, or a letter (A = 0)."""
    a, n = record["answer"], len(record["choices"])
    if isinstance(a, str) and len(a.strip()) == 1 and "A" <= a.strip().upper() <= "Z":
        a = ord(a.strip().upper()) - ord("A")
    elif isinstance(a, bool) or not isinstance(a, int):
        raise ValueError(f"answer {a!r}: give a choice's index or letter")
    if not 0 <= a < n:
        raise ValueError(f"answer {record['answer']!r} is out of range for {n} choices")
    return a


def read_records(path: str) -> list[dict]:
    """MMLU-style records from a jsonl file, each checked; errors name the file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if not isinstance(r, dict) or not isinstance(r.get("question"), str):
                    raise ValueError('a record is an object with a "question" string')
                choices = r.get("choices")
                if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
                    raise ValueError('"choices" must be a non-empty list of strings')
                if "answer" not in r:
                    raise ValueError('no "answer"')
                _answer(r)
            except ValueError as e:  # json.JSONDecodeError included
                raise ValueError(f"{path}:{line_no}: {e}") from None
            records.append(r)
    return records


def _format(record: dict, with_answer: bool) -> str:
    text = f"Question: {record['question']}\nAnswer:"
    return text + f" {record['choices'][_answer(record)]}\n\n" if with_answer else text


def text_tokens(tok, text: str, bos: int | None) -> list[int]:
    """BOS (if the config has one) and the text's tokens, without the tokenizer's own special
    tokens (a tokenizer that adds BOS itself would give two)."""
    return ([bos] if bos is not None else []) + tok.encode(text, add_special_tokens=False).ids


def run_choice(model, tok, records: list[dict], shots: int, mesh=None) -> dict:
    if shots < 0:
        raise ValueError(f"--shots={shots}: must be >= 0")
    if len(records) <= shots:
        raise ValueError(f"{len(records)} records: need more than --shots={shots}")
    prefix = "".join(_format(r, True) for r in records[:shots])
    contexts, conts, owner = [], [], []
    for i, r in enumerate(records[shots:]):
        ctx = tok.encode(prefix + _format(r, False)).ids
        for choice in r["choices"]:
            contexts.append(ctx)
            conts.append(tok.encode(f" {choice}", add_special_tokens=False).ids)  # no BOS inside a continuation
            owner.append(i)
    check_prompts([c + x for c, x in zip(contexts, conts)], model.config.vocab_size)
    scores = choice_scores(model, contexts, conts, mesh=mesh)
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
        s.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
        parallel.add_mesh_arguments(s, "one device")
    sub.choices["bpb"].add_argument("--text", required=True)
    sub.choices["bpb"].add_argument("--window", type=int, default=512)
    sub.choices["bpb"].add_argument("--stride", type=int)
    sub.choices["choice"].add_argument("--data", required=True)
    sub.choices["choice"].add_argument("--shots", type=int, default=0)
    args = p.parse_args(argv)
    try:
        parallel.start_processes(args)
        mesh = parallel.make_mesh(args.mesh) if args.mesh else None
        model, tok = load_model(args.ckpt, tokenizer=args.tokenizer, dtype=jnp.dtype(args.dtype),
                                require_tokenizer=True, mesh=mesh)
        if args.task == "bpb":
            with open(args.text, encoding="utf-8") as f:
                text = f.read()
            ids = text_tokens(tok, text, model.config.bos_token_id)
            check_prompts([ids], model.config.vocab_size)
            out = bits_per_byte(model, ids, len(text.encode("utf-8")), window=args.window, stride=args.stride,
                                mesh=mesh)
        else:
            out = run_choice(model, tok, read_records(args.data), args.shots, mesh)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if jax.process_index() == 0:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
