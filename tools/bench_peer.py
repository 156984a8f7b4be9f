"""The PyTorch peer (PERF.md): HF transformers' `DeepseekV3ForCausalLM` trained at a preset's shape,
`python tools/bench.py peer --preset bench --batch 4 --seq 4096 [--experts grouped_mm]`.

As PERF.md measures it: fp32 parameters, bf16 autocast, fused AdamW, random tokens as their own
labels, on the first CUDA device (the CPU where there is none). transformers' model has no MTP
module, so the preset's is left out, and the FLOPs per token are `tools/count_flops.py`'s for the
main model. Prints ONE JSON line: tokens/s and MFU from the median step time over the timed steps
(after `--warmup` untimed ones), the parameter count, peak memory. `bench.py train --peer` runs
this in the same invocation, before its own steps, and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import transformers
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from count_flops import PEAK_BF16_FLOPS, flops_per_token  # noqa: E402

from dsv3_jax.config import ModelConfig  # noqa: E402


def peer_model(config: ModelConfig, experts: str) -> DeepseekV3ForCausalLM:
    """transformers' model at `config`'s shape (its MTP module aside), fp32, randomly initialised."""
    hf = DeepseekV3Config(**config.to_hf())
    kw = {} if experts == "eager" else {"experts_implementation": experts}
    return DeepseekV3ForCausalLM._from_config(hf, dtype=torch.float32, **kw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bench")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--experts", default="eager", help="transformers' experts_implementation: eager|grouped_mm")
    args = p.parse_args()

    config = ModelConfig.preset(args.preset, num_nextn_predict_layers=0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = peer_model(config, args.experts).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    B, T = args.batch, args.seq
    tokens = torch.randint(0, config.vocab_size, (B, T), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens_per_s = B * T / step_s
    fpt = flops_per_token(config, T)
    print(json.dumps({
        "peer": "transformers DeepseekV3ForCausalLM", "transformers": transformers.__version__,
        "torch": torch.__version__, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "experts": args.experts, "preset": args.preset, "batch": B, "seq": T, "timed_steps": len(times),
        "params": sum(t.numel() for t in model.parameters()), "step_ms_median": 1e3 * step_s,
        "step_ms_min": 1e3 * min(times), "tokens_per_s": tokens_per_s, "gflop_per_token": fpt / 1e9,
        "mfu": fpt * tokens_per_s / PEAK_BF16_FLOPS, "loss": loss,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
