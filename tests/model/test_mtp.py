"""MTP against HF transformers' own `MtpModel` (embedding-first concat, normed chain), 2 depths."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from transformers import DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

from dsv3_jax.config import ModelConfig
from dsv3_jax.convert import load_hf
from tests.hf_reference import hf_config, randomize_, t2n


def mtp_checkpoint_tensors(mtp: MtpModel, num_hidden_layers: int) -> dict[str, np.ndarray]:
    """HF MtpModel depth k -> the released layout `model.layers.{L+k}.*` (SPEC D), experts unfused."""
    out = {}
    for name, t in mtp.state_dict().items():
        if not name.startswith("layers."):
            continue
        _, k, rest = name.split(".", 2)
        prefix = f"model.layers.{num_hidden_layers + int(k)}."
        rest = rest.replace("mtp_block.", "").replace("post_norm.", "shared_head.norm.")
        if rest.endswith("experts.gate_up_proj"):
            F = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[prefix + f"mlp.experts.{e}.gate_proj.weight"] = t2n(t[e, :F])
                out[prefix + f"mlp.experts.{e}.up_proj.weight"] = t2n(t[e, F:])
        elif rest.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[prefix + f"mlp.experts.{e}.down_proj.weight"] = t2n(t[e])
        else:
            out[prefix + rest] = t2n(t)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    config = ModelConfig.preset("tiny", num_nextn_predict_layers=2)
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(hf_config(config)).eval()
    mtp = MtpModel(hf, 2).eval()
    for module, seed in ((hf, 1), (mtp, 2)):
        randomize_(module, seed)
    with torch.no_grad():
        for p in mtp.parameters():  # MtpModel's own init leaves some tensors empty
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.05)
        mtp.tie_with_main_model(hf)
    d = tmp_path_factory.mktemp("hf_mtp")
    hf.save_pretrained(d)
    extra = mtp_checkpoint_tensors(mtp, config.num_hidden_layers)
    for k in range(2):
        prefix = f"model.layers.{config.num_hidden_layers + k}."
        extra[prefix + "embed_tokens.weight"] = t2n(hf.model.embed_tokens.weight)
        extra[prefix + "shared_head.head.weight"] = t2n(hf.lm_head.weight)
    save_file(extra, str(d / "model-mtp.safetensors"))
    with safe_open(str(d / "model.safetensors"), "np") as f:
        main_names = list(f.keys())
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in main_names}
             | {n: "model-mtp.safetensors" for n in extra}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _, ours = load_hf(d)
    return config, hf, mtp, ours


def test_mtp_logits_match_hf_mtp_model_at_both_depths(models):
    config, hf, mtp, ours = models
    B, T = 2, 90  # past original_max_position_embeddings (64): YaRN on
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (B, T))
    out = ours(jnp.asarray(tokens))
    pos = torch.arange(T)[None].expand(B, T)
    with torch.no_grad():
        h = hf.model(torch.tensor(tokens)).last_hidden_state
        np.testing.assert_allclose(out.hidden_states, t2n(h), rtol=1e-5, atol=1e-5)
        for k in range(2):
            # depth k+1 reads token i+k+1 at position i and the previous depth's (normed) output
            h = mtp.forward_layer(k, h, pos, None, input_ids=torch.tensor(np.roll(tokens, -(k + 1), axis=1)))
            ref = t2n(mtp._project_to_logits(h))
            valid = T - (k + 1)
            np.testing.assert_allclose(np.asarray(out.mtp_logits[k])[:, :valid], ref[:, :valid], rtol=1e-4, atol=1e-5)


def test_mtp_layers_report_their_expert_load(models):
    config, _, _, ours = models
    T = 12
    out = ours(jnp.zeros((1, T), jnp.int32))
    K = config.num_experts_per_tok
    assert out.expert_load.shape == (config.num_moe_layers + 2, config.n_routed_experts)
    np.testing.assert_array_equal(out.expert_load.sum(-1), [T * K] * config.num_moe_layers + [(T - 1) * K, (T - 2) * K])
