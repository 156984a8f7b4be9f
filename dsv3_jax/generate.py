"""python -m dsv3_jax.generate --ckpt DIR --prompt "..." [--prompts-file FILE] [--max-new-tokens N] ...

Streams each continuation as it is decoded (latent cache; --speculative drafts with the MTP
module). DIR is a training workdir (latest checkpoint + tokenizer.json) or a converted checkpoint
(config.json + params/) with --tokenizer. --mesh (training's syntax) shards the model over all
devices and splits the prompts over the mesh's batch axes; default: one device. Multi-process
runs take training's --coordinator / --num-processes / --process-id; every process is given the
same prompts, and process 0 prints.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from dsv3_jax import parallel
from dsv3_jax.data.tokenizer import eos_id
from dsv3_jax.inference import generate, load_model


def complete_text(tok, ids: list[int]) -> str:
    """The decoded text up to its last complete character: a character whose bytes are still
    coming (split over tokens) decodes to U+FFFD and is held back."""
    return tok.decode(ids).rstrip("\ufffd")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--prompt", action="append", default=[], help="may be repeated")
    p.add_argument("--prompts-file", help="one prompt per line")
    p.add_argument("--tokenizer", help="tokenizer.json (default: DIR/tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parallel.add_mesh_arguments(p, "one device")
    args = p.parse_args(argv)
    try:
        parallel.start_processes(args)
        mesh = parallel.make_mesh(args.mesh) if args.mesh else None
        prompts = list(args.prompt)
        if args.prompts_file:
            with open(args.prompts_file) as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        if not prompts:
            raise ValueError("give --prompt or --prompts-file")
        model, tok = load_model(args.ckpt, tokenizer=args.tokenizer, dtype=jnp.dtype(args.dtype),
                                require_tokenizer=True, mesh=mesh)
        ids = [tok.encode(text).ids for text in prompts]
        pending = {r: [] for r in range(len(prompts))}
        shown = {r: "" for r in range(len(prompts))}

        def stream(row: int, new: list[int]) -> None:
            pending[row] += new
            text = complete_text(tok, pending[row])
            if len(prompts) == 1:  # one prompt: print as it comes
                say(text[len(shown[row]):], end="", flush=True)
            shown[row] = text

        result = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, stop_tokens=[eos_id(tok)], seed=args.seed,
                          speculative=args.speculative, mesh=mesh, stream=stream)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = {r: tok.decode(pending[r]) for r in pending}  # with any bytes that never completed a character
    if len(prompts) == 1:
        say(final[0][len(shown[0]):])
    else:
        for text, r in zip(prompts, range(len(prompts))):
            say(f"--- {text}\n{final[r]}")
    if args.speculative:
        say(f"[MTP acceptance {result.acceptance_rate:.1%} over {result.drafted} drafts]", file=sys.stderr)
    return 0


def say(*args, **kwargs) -> None:
    """print, on process 0 only (every process decodes the same rows)."""
    if jax.process_index() == 0:
        print(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
