"""python -m dsv3_jax.train --preset small --steps 300 --workdir runs/small [--set SECTION.FIELD=VALUE ...]

Trains a DeepSeek-V3-shaped model; with no --data, on the embedded corpus with a byte-level BPE
tokenizer trained on it (cached in the workdir). Running again with the same workdir and a
larger --steps continues from the last checkpoint. `--init-from DIR` starts from the weights
of a converted checkpoint (tools/convert_hf.py) or another run's workdir instead of a random
model, with their model config and tokenizer.
"""

from __future__ import annotations

import argparse
import sys

import jax

from dsv3_jax import parallel
from dsv3_jax.checkpoint.manager import CheckpointCorrupt
from dsv3_jax.config import ModelConfig
from dsv3_jax.data.pipeline import DataConfig
from dsv3_jax.fp8 import PRECISIONS
from dsv3_jax.inference.checkpoint import stored_config
from dsv3_jax.train.config import TrainConfig, parse_overrides
from dsv3_jax.train.loop import NonFiniteError, train


def build_configs(args) -> tuple[ModelConfig, TrainConfig, DataConfig]:
    sets = parse_overrides(args.set)
    if args.init_from and args.preset:
        raise ValueError("--init-from takes the model from the checkpoint; drop --preset "
                         "(--set model.FIELD=VALUE changes fields that keep the parameters' shapes)")
    if args.init_from:
        model = stored_config(args.init_from).replace(**sets["model"])
    else:
        model = ModelConfig.preset(args.preset or "small", **sets["model"])
    train_kw = {"steps": args.steps, **sets["train"]}
    data_kw = {**({"paths": tuple(args.data)} if args.data else {}),
               **({"val_paths": tuple(args.val_data)} if args.val_data else {}), **sets["data"]}
    for flag, section, field in ((args.batch_size, data_kw, "batch_size"), (args.seq_len, data_kw, "seq_len"),
                                 (args.text_field, data_kw, "text_field"), (args.seed, train_kw, "seed"),
                                 (args.precision, train_kw, "precision")):
        if flag is not None:
            section[field] = flag
    train_cfg = TrainConfig(**train_kw)
    data = DataConfig(**{"seed": train_cfg.seed, **data_kw})
    return model, train_cfg, data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsv3_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="model preset: tiny, small (default), bench, v3_671b")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from these weights (a converted checkpoint or a training workdir) with their model "
                        "config and tokenizer, instead of a random model; a fresh optimizer and schedules")
    p.add_argument("--steps", type=int, default=TrainConfig.steps, help="total step target")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", nargs="+", help="text / JSONL / ArrayRecord files or directories")
    p.add_argument("--val-data", nargs="+", metavar="PATH",
                   help="held-out files (same formats): their LM loss is logged as val_lm_loss every "
                        "train.eval_every steps (default: at each checkpoint) and at the last step")
    p.add_argument("--text-field", help="JSONL field with the text (default: text)")
    p.add_argument("--tokenizer", help="a tokenizer.json to use instead of training one")
    p.add_argument("--batch-size", type=int, help="global sequences per micro-batch")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--precision", choices=PRECISIONS,
                   help="projection GEMMs: bf16 (default), fp8_emulated or fp8_native (DeepSeek's FP8 recipe)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any field of model (ModelConfig), train (TrainConfig) or data (DataConfig)")
    parallel.add_mesh_arguments(p, "all devices on data")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        parallel.start_processes(args)
        model, train_cfg, data = build_configs(args)
        history = train(args.workdir, model, train_cfg, data, args.tokenizer,
                        progress=not args.no_progress and jax.process_index() == 0, mesh=args.mesh,
                        init_from=args.init_from)
    except (ValueError, FileNotFoundError, NonFiniteError, CheckpointCorrupt) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if history:
        first, last = history[0], history[-1]
        held_out = f"; held-out LM loss {last['val_lm_loss']:.3f}" if "val_lm_loss" in last else ""
        print(f"steps {first['step']}..{last['step']}: loss {first['loss']:.3f} -> {last['loss']:.3f}{held_out}; "
              f"{args.workdir}/metrics.jsonl, {args.workdir}/training.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
