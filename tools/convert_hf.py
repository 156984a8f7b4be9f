"""DeepSeek-V3 PyTorch weights -> Orbax checkpoint, streaming.

    python tools/convert_hf.py SRC OUT_DIR [--layout L] [--config JSON] [--dtype bfloat16|float32]

SRC is any of (detected from its file names, or chosen with --layout):
  safetensors  a HF directory: model.safetensors or shards + index (BF16/FP32 or block FP8)
  official     DeepSeek's inference layout written by its convert.py: model{r}-mp{n}.safetensors
               (reassembled from the model-parallel slices; it has no MTP layer)
  torch        PyTorch state dicts: pytorch_model.bin, pytorch_model-*.bin + index, or one
               *.bin/*.pt/*.pth file (read with torch.load(weights_only=True): needs torch)
The config is the config.json beside the weights unless --config gives one: a HF config.json or
DeepSeek's ModelArgs json (inference/configs/config_671B.json).
OUT_DIR gets config.json and params/ (see dsv3_jax/convert/checkpoint.py), and the source's
tokenizer files; it must not exist or be empty, and is only created once the conversion has
succeeded (an error, Ctrl-C or SIGTERM leaves nothing behind).
"""

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dsv3_jax.convert import LAYOUTS, convert_hf  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory (or one PyTorch pickle)")
    p.add_argument("out_dir")
    p.add_argument("--layout", choices=LAYOUTS, help="source layout (default: detected)")
    p.add_argument("--config", help="HF config.json or DeepSeek ModelArgs json (default: SRC's config.json)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="stored param dtype (the router is always float32)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the temporary output is removed
    try:
        config = convert_hf(args.src, args.out_dir, param_dtype=jnp.dtype(args.dtype), layout=args.layout,
                            config=args.config,
                            progress=lambda it, total: tqdm(it, total=total, desc="params", unit="leaf"))
    except (ValueError, OSError) as e:  # bad checkpoints, configs and paths (CheckpointError is a ValueError)
        sys.exit(f"error: {e}")
    print(f"wrote {args.out_dir} ({config.num_hidden_layers} layers, "
          f"{config.num_nextn_predict_layers} MTP)")


if __name__ == "__main__":
    main()
