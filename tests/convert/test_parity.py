"""Logits of a HF checkpoint loaded by `load_hf` match HF transformers' DeepseekV3ForCausalLM."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from convert_testlib import hf_logits, make_hf

from dsv3_jax.convert import load_hf

# Together: q_lora_rank None/set; n_group/topk_group incl. 1; first_k_dense_replace 0, middle, = L;
# norm_topk_prob true/false; YaRN on (T=24 > original_max_position_embeddings=16) and off.
CONFIGS = {
    "qlora_yarn_mid": dict(first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True, yarn=True),
    "noqlora_allmoe": dict(q_lora_rank=None, first_k_dense_replace=0, n_group=1, topk_group=1,
                           norm_topk_prob=False),
    "qlora_alldense_yarn": dict(first_k_dense_replace=3, n_group=2, topk_group=1, norm_topk_prob=False,
                                yarn=True),
    "noqlora_groups1_yarn": dict(q_lora_rank=None, first_k_dense_replace=2, num_hidden_layers=4,
                                 n_group=4, topk_group=1, norm_topk_prob=True, yarn=True),
}
T = 24


def _tokens(vocab, seed=0):
    return np.random.RandomState(seed).randint(0, vocab, (2, T)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fp32_logits_match_hf(tmp_path, name):
    hf = make_hf(tmp_path, seed=1, mtp=True, **CONFIGS[name])
    tokens = _tokens(hf.config.vocab_size)
    config, model = load_hf(tmp_path, dtype=jnp.float32, param_dtype=jnp.float32)
    assert config.num_nextn_predict_layers == 1
    assert config.rope_type == ("yarn" if CONFIGS[name].get("yarn") else "default")
    out = model(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(out.logits), hf_logits(hf, tokens), atol=1e-4, rtol=0)
    assert len(out.mtp_logits) == 1 and out.mtp_logits[0].shape[-1] == hf.config.vocab_size


# bf16: HF in bf16 vs ours with bf16 params and compute. Both round differently (HF casts the
# norm output to bf16 before the weight, accumulation orders differ), so the documented bound is
# relative to the logit scale: max |diff| <= 2% of max |logit|, mean |diff| <= 0.3%
# (measured: about 0.5-0.7% and 0.07%).
@pytest.mark.parametrize("name", ["qlora_yarn_mid", "noqlora_allmoe"])
def test_bf16_logits_close_to_hf(tmp_path, name):
    hf = make_hf(tmp_path, seed=2, mtp=False, dtype=torch.bfloat16, **CONFIGS[name])
    tokens = _tokens(hf.config.vocab_size, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, model = load_hf(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ours = np.asarray(model(jnp.asarray(tokens)).logits.astype(jnp.float32))
    ref = hf_logits(hf, tokens)
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref)
    print(f"bf16 {name}: max {diff.max() / scale:.4f}, mean {diff.mean() / scale:.5f} of max|logit|")
    assert diff.max() <= 0.02 * scale and diff.mean() <= 0.003 * scale
