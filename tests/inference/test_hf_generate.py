"""Greedy generation equals HF transformers' `generate` token for token on a converted tiny model."""

import sys

import jax.numpy as jnp
import torch

sys.path.insert(0, __file__.rsplit("/", 2)[0] + "/convert")
from convert_testlib import make_hf  # noqa: E402

from dsv3_jax.convert import load_hf  # noqa: E402
from dsv3_jax.inference import generate  # noqa: E402

PROMPTS = [[5, 17, 60, 3, 25], [7, 1, 2, 30, 41, 42, 8]]


def test_greedy_equals_hf_generate(tmp_path):
    hf = make_hf(tmp_path, seed=3, mtp=False, yarn=True)
    with torch.no_grad():  # larger logits: no near-ties between the top two tokens
        hf.lm_head.weight.mul_(8.0)
    hf.save_pretrained(tmp_path)
    _, model = load_hf(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32)
    ours = generate(model, PROMPTS, 10).tokens
    for p, got in zip(PROMPTS, ours):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert got == ref[0, len(p):].tolist()
