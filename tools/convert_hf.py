"""HF DeepSeek-V3 safetensors (BF16/FP32 or block FP8) -> Orbax checkpoint, streaming.

    python tools/convert_hf.py HF_DIR OUT_DIR [--dtype bfloat16|float32]

OUT_DIR gets config.json and params/ (see dsv3_jax/convert/checkpoint.py); it must not exist
or be empty, and is only created once the conversion has succeeded.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dsv3_jax.convert import convert_hf  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="stored param dtype (the router is always float32)")
    args = p.parse_args(argv)
    config = convert_hf(args.hf_dir, args.out_dir, param_dtype=jnp.dtype(args.dtype),
                        progress=lambda it, total: tqdm(it, total=total, desc="params", unit="leaf"))
    print(f"wrote {args.out_dir} ({config.num_hidden_layers} layers, "
          f"{config.num_nextn_predict_layers} MTP)")


if __name__ == "__main__":
    main()
