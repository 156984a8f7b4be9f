"""Training FLOPs per token (PERF.md's convention): `python tools/count_flops.py --preset bench --seq 4096`.

    6 * N_active  +  3 * L * H * (d_qk + d_v) * S  [+ the MTP module's share]

N_active counts every matmul weight a token goes through in the main model: MLA projections,
dense FFNs, per MoE layer the router, the shared experts and top-K routed experts, and the LM
head; the embedding lookup is not a matmul and is excluded. 6 = forward (2) + backward (4).
The attention core costs 2 * 2 * S * H * (d_qk + d_v) per token forward for all S keys, halved by
the causal mask, times 3 for forward + backward. Recompute is not counted. `mtp=True` adds each
MTP module's share (eh_proj, one MoE decoder layer and a second pass through the LM head). PERF.md's
bench shape has no MTP module (2.95B parameters): 4.83 GFLOP/token; with the `bench` preset's one
it would be 6.74, 1.59 of it the second head pass. The released 671B shape: 250.4 GFLOP/token at
4,096 tokens (260.6 with its MTP module), DeepSeek's own "250 GFLOPS per token" (Insights into
DeepSeek-V3, ISCA 2025, Table 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3_jax.config import ModelConfig  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # MFU's denominator (PERF.md): an H100/H200's dense bf16 FLOP/s


def active_params(c: ModelConfig) -> dict[str, int]:
    """Matmul weights one token goes through, per part of the model."""
    D, H = c.hidden_size, c.num_attention_heads
    q = D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim if c.q_lora_rank else D * H * c.qk_head_dim
    attn = (q + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
            + H * c.v_head_dim * D)
    moe = D * c.n_routed_experts + 3 * D * c.moe_intermediate_size * (c.n_shared_experts + c.num_experts_per_tok)
    return {"attention": attn, "dense_ffn": 3 * D * c.intermediate_size, "moe_ffn": moe,
            "head": D * c.vocab_size, "mtp": 2 * D * D + attn + moe + D * c.vocab_size}


def attention_flops(c: ModelConfig, seq_len: int, layers: int) -> int:
    """Causal attention core, forward + backward, per token."""
    return 3 * layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len


def flops_per_token(c: ModelConfig, seq_len: int, mtp: bool = False) -> int:
    """Training FLOPs per token (module docstring)."""
    p = active_params(c)
    n = c.num_dense_layers * (p["attention"] + p["dense_ffn"]) + c.num_moe_layers * (p["attention"] + p["moe_ffn"])
    n += p["head"]
    flops = 6 * n + attention_flops(c, seq_len, c.num_hidden_layers)
    if mtp:
        N = c.num_nextn_predict_layers
        flops += N * (6 * p["mtp"] + attention_flops(c, seq_len, 1))
    return flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--seq", type=int, default=4096)
    args = p.parse_args()
    c = ModelConfig.preset(args.preset)
    print(json.dumps({"preset": args.preset, "seq": args.seq, "gflop_per_token": flops_per_token(c, args.seq) / 1e9,
                      "gflop_per_token_with_mtp": flops_per_token(c, args.seq, mtp=True) / 1e9}))


if __name__ == "__main__":
    main()
