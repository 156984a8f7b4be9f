"""tokamax flash attention alone at the bench shape, per configuration:
`python tools/bench.py attention [--batch 4 --seq 4096 --heads 16]` (GPU with tokamax).

Causal, q/k head dim 192, v 128, bf16, with packed documents as per-query k_start (what
`kernels.attention` passes; `--documents 1`: all 0, the bench batch) or without any
(`--documents 0`: the mask-free causal kernel). Prints one JSON line per configuration: forward and forward +
backward milliseconds and TFLOP/s (forward FLOPs B*H*S^2*(192+128) causal; backward counted as
2.5x the forward). The heuristic configuration is tokamax's own choice; the others are the
Mosaic GPU kernels' alternatives that fit in shared memory or say why not.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from bench_kernels import forward_backward, in_flight_ms


def timed(f, *args, n: int = 10) -> float:
    """Milliseconds per call of f(*args), n queued, after one untimed call (the compile)."""
    jax.block_until_ready(f(*args))
    return in_flight_ms(f, args, n)


def main():
    from tokamax._src.ops.attention import pallas_mosaic_gpu as fwd_lib
    from tokamax._src.ops.attention import pallas_mosaic_gpu_kernel_sm90 as sm90
    from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp as vjp_lib
    from tokamax._src.ops.attention import pallas_mosaic_gpu_vjp_common as vjp_common
    from tokamax._src.ops.attention.base import Mask

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--documents", type=int, default=1,
                   help="packed documents a row (1: k_start all 0; 0: no k_start, plain causal)")
    args = p.parse_args()
    B, S, H, D, Dv = args.batch, args.seq, args.heads, 192, 128
    rs = np.random.RandomState(0)
    q, k = (jnp.asarray(rs.randn(B, S, H, D), jnp.bfloat16) for _ in range(2))
    v, g = (jnp.asarray(rs.randn(B, S, H, Dv), jnp.bfloat16) for _ in range(2))
    docs = max(args.documents, 1)
    starts = jnp.asarray(np.repeat(np.arange(docs) * (S // docs), S // docs)[None].repeat(B, 0), jnp.int32)  # [B,S]
    mask = Mask(is_causal=True, k_start=starts[:, None, :] if args.documents else None)
    flop = B * H * S * S * (D + Dv)
    vjp_cfg = lambda blocks, stages, wgs: vjp_common.Config(block_q_dkv=blocks[0], block_kv_dkv=blocks[1],
                                                            block_q_dq=blocks[0], block_kv_dq=blocks[1],
                                                            num_stages=stages, compute_wgs=wgs)
    configs = {
        "heuristic": (None, None),
        "fwd block_q 128": (sm90.Config(block_q=128, block_kv=128, num_stages=2), None),
        "fwd block_kv 64, 3 stages": (sm90.Config(block_q=64, block_kv=64, num_stages=3), None),
        "bwd 1 stage": (None, vjp_cfg((64, 64), 1, 2)),
        "bwd 1 compute warpgroup": (None, vjp_cfg((64, 128), 2, 1)),
        "bwd blocks 64 x 128": (None, vjp_cfg((64, 128), 2, 2)),
        "bwd blocks 128 x 128": (None, vjp_cfg((128, 128), 2, 2)),
    }
    for name, (fwd_config, bwd_config) in configs.items():
        op = fwd_lib.PallasMosaicGpuFlashAttention(config=fwd_config,
                                                   vjp=vjp_lib.PallasMosaicGpuFlashAttentionVjp(config=bwd_config))
        attn = lambda q, k, v, op=op: op(q, k, v, mask=mask, logits_scale=D ** -0.5)
        try:
            t_f = timed(jax.jit(attn), q, k, v)
            t_fb = timed(forward_backward(attn), q, k, v, g)
            row = {"forward_ms": round(t_f, 3), "forward_tflops": round(flop / t_f / 1e9),
                   "forward_backward_ms": round(t_fb, 3), "forward_backward_tflops": round(3.5 * flop / t_fb / 1e9)}
        except Exception as e:  # a configuration the kernel refuses (shared memory)
            row = {"unavailable": f"{type(e).__name__}: {str(e)[:160]}"}
        print(json.dumps({"config": name, "documents": args.documents, **row}), flush=True)


if __name__ == "__main__":
    main()
