"""Cached decode benchmark:
`python tools/bench.py decode --preset bench --batch 32 --prompt-len 1024 --new-tokens 64 [--mtp]`.

Random weights (or `--ckpt`'s) in bf16 (`--dtype`; float32 on CPU), random prompts (all of
--prompt-len tokens), greedy. Prints ONE JSON line: decode tokens/s (new tokens after the first /
decode time), prefill seconds, ms per step, the HBM roofline (weights read per step + cache
bytes, at 4.8 TB/s) and the % of it reached, cache bytes per token; with --mtp also the
speculative acceptance rate and speed-up over plain decode. The roofline assumes every routed
expert is read each step (32 tokens x top-6 of 64 experts touch nearly all, as PERF.md counts)
and leaves out the embedding table and the MTP module.
`--profile DIR` traces one more generate call (`tools/profile_summary.py DIR --steps 1`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.inference import cache_bytes_per_token, decode, generate, load_model  # noqa: E402
from dsv3_jax.inference.decode import bucket, cache_size  # noqa: E402
from dsv3_jax.model import DeepSeekV3  # noqa: E402

HBM_BYTES_PER_S = 4.8e12


def weight_bytes_per_step(model: DeepSeekV3, itemsize: int) -> int:
    """Parameters one decode step reads: all but the embedding table and the MTP module."""
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return sum(v.size * itemsize for path, v in params
               if path[0] not in ("embed", "mtp") and not (len(path) > 3 and path[3] == "router"))


def timed(fn, repeats: int = 3):
    """(result, fastest wall time of `repeats` runs): the minimum is robust to one-off stalls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--mtp", action="store_true", help="also run MTP speculative decoding")
    p.add_argument("--profile", help="write a jax.profiler trace of one timed generate call here "
                   "(`tools/profile_summary.py DIR --steps 1`)")
    p.add_argument("--ckpt", help="a trained checkpoint instead of random weights (random MTP drafts are "
                                  "almost never accepted, so acceptance and speed-up need one)")
    p.add_argument("--dtype", help="params and compute (default bfloat16; float32 on CPU, whose runtime "
                                    "lacks some bf16 x bf16 -> f32 dots)")
    args = p.parse_args()
    dtype = jnp.dtype(args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16"))
    if args.ckpt:
        model, _ = load_model(args.ckpt, dtype=dtype)
        config = model.config
    else:
        config = ModelConfig.preset(args.preset)
        model = nnx.jit(lambda: DeepSeekV3(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))()
    prompts = np.random.default_rng(0).integers(2, config.vocab_size, (args.batch, args.prompt_len)).tolist()

    def run(new_tokens: int, speculative: bool = False):
        # stop tokens none: every row decodes all new tokens; max_len fixed so prefill-only and full runs share
        return generate(model, prompts, new_tokens, speculative=speculative,
                        max_len=cache_size(bucket(args.prompt_len), args.new_tokens))

    run(1), run(args.new_tokens)  # compile (and warm) prefill and step
    _, prefill_s = timed(lambda: run(1))
    result, total_s = timed(lambda: run(args.new_tokens))
    decode_s = total_s - prefill_s
    new = sum(len(t) for t in result.tokens) - args.batch  # tokens after the prefill's first
    slots = cache_size(bucket(args.prompt_len), args.new_tokens)
    cache_step = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize \
        * slots * args.batch
    roofline_s = (weight_bytes_per_step(model, dtype.itemsize) + cache_step) / HBM_BYTES_PER_S
    step_ms = 1e3 * decode_s / max(result.steps, 1)
    out = {"preset": args.preset, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "device": str(jax.devices()[0].device_kind), "decode_tokens_per_s": new / decode_s,
           "prefill_s": prefill_s, "ms_per_step": step_ms, "roofline_ms_per_step": 1e3 * roofline_s,
           "roofline_tokens_per_s": args.batch / roofline_s, "pct_of_roofline": 100 * 1e3 * roofline_s / step_ms,
           "weight_bytes_per_step": weight_bytes_per_step(model, dtype.itemsize), "cache_bytes_per_step": cache_step,
           "cache_bytes_per_token": cache_bytes_per_token(config, dtype),
           "cache_bytes_per_token_671b_bf16": cache_bytes_per_token(ModelConfig.preset("v3_671b"), jnp.bfloat16),
           "step_compiler_options": decode._compiler_options(decode.step)}
    if args.mtp:
        run(args.new_tokens, True)  # compile
        spec, spec_total = timed(lambda: run(args.new_tokens, True))
        spec_new = sum(len(t) for t in spec.tokens) - args.batch
        spec_rate = spec_new / (spec_total - prefill_s)
        out.update(mtp_acceptance_rate=spec.acceptance_rate, mtp_decode_tokens_per_s=spec_rate,
                   mtp_speedup=spec_rate / out["decode_tokens_per_s"], mtp_steps=spec.steps,
                   mtp_equals_greedy=spec.tokens == result.tokens)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            run(args.new_tokens)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
