"""Orbax checkpoint -> HF DeepSeek-V3 directory (safetensors shards + index + config.json).

    python tools/export_hf.py CKPT_DIR HF_DIR [--fp8] [--max-shard-size 5GB]

CKPT_DIR is a converted checkpoint (`tools/convert_hf.py`: config.json + params/) or a training
workdir (checkpoints/: its latest step). A converted checkpoint streams: each HF tensor is read
as one slice of its leaf, written and dropped; a workdir's model is loaded whole (the models one
trains here fit in host memory). Params keep their stored dtype; --fp8 writes the released
128x128 block-FP8 format.
MTP layers are written as model.layers.{L+k}.* (HF transformers ignores them on load).
"""

import argparse
import os
import re
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dsv3_jax.convert import open_params, save_hf  # noqa: E402
from dsv3_jax.inference.checkpoint import load_model, stored_param_dtype  # noqa: E402

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt_dir")
    p.add_argument("hf_dir")
    p.add_argument("--fp8", action="store_true", help="block-FP8 projection weights (released format)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the temporary output is removed
    try:
        if os.path.isdir(os.path.join(args.ckpt_dir, "checkpoints")):  # a training workdir
            model, _ = load_model(args.ckpt_dir, dtype=stored_param_dtype(args.ckpt_dir))
            config, params = model.config, model
        else:
            config, params = open_params(args.ckpt_dir)
        save_hf(config, params, args.hf_dir, fp8_weights=args.fp8, max_shard_size=args.max_shard_size)
    except (ValueError, OSError) as e:  # bad checkpoints and paths (CheckpointError is a ValueError)
        sys.exit(f"error: {e}")
    print(f"wrote {args.hf_dir}")


if __name__ == "__main__":
    main()
