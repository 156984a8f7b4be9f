import json
import pathlib

import jax
import numpy as np
import pytest
import transformers
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import DeepSeekV3

RELEASED = pathlib.Path(__file__).parent / "data" / "deepseek_v3_671b_config.json"


def test_released_config_round_trips_exactly():
    text = RELEASED.read_text()
    config = ModelConfig.from_hf(RELEASED)
    assert config == ModelConfig.preset("v3_671b")
    out = config.to_hf()
    assert out == json.loads(text) and list(out) == list(json.loads(text))
    assert json.dumps(out, indent=2) + "\n" == text  # byte for byte, unused fields and all
    assert config.extra["quantization_config"]["weight_block_size"] == [128, 128]


def test_reads_what_transformers_5_writes(tmp_path):
    ours = ModelConfig.preset("tiny", q_lora_rank=None, norm_topk_prob=False)
    transformers.DeepseekV3Config(**ours.to_hf()).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written
    back = ModelConfig.from_hf(tmp_path)
    assert back.to_hf() == written
    # transformers adds "rope_type" beside our "type"; the rope itself is the same
    assert back.rope_type == "yarn" and back.rope_scaling["factor"] == ours.rope_scaling["factor"]
    assert back.replace(rope_scaling=ours.rope_scaling) == ours
    assert ModelConfig.preset("tiny").rope_scaling == {**ours.rope_scaling}  # our dicts were not edited


def test_absent_keys_mean_what_transformers_takes_them_to_mean():
    """A hand-written config.json without max_position_embeddings or rope scaling: HF reads 4096
    positions and no scaling (not the released model's 163840 and YaRN); writing it back keeps
    them absent."""
    given = {k: v for k, v in ModelConfig.preset("tiny").to_hf().items()
             if k not in ("max_position_embeddings", "rope_scaling")}
    hf = transformers.DeepseekV3Config(**given)
    ours = ModelConfig.from_hf(given)
    assert ours.max_position_embeddings == hf.max_position_embeddings
    assert ours.rope_scaling is None and hf.rope_parameters["rope_type"] == "default"
    assert ours.to_hf() == given


def test_directory_file_and_dict_sources_agree(tmp_path):
    ModelConfig.preset("small").save_hf(tmp_path)
    assert ModelConfig.from_hf(tmp_path) == ModelConfig.from_hf(tmp_path / "config.json") == ModelConfig.preset("small")


def test_presets_round_trip_and_are_valid():
    for name in ("tiny", "small", "bench", "v3_671b"):
        c = ModelConfig.preset(name)
        assert ModelConfig.from_hf(c.to_hf()) == c
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.preset("huge")


def _count(config):
    model = nnx.eval_shape(lambda: DeepSeekV3(config, rngs=nnx.Rngs(0)))
    sizes = {"/".join(str(p.key) for p in k): int(np.prod(v.shape)) for k, v in
             jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]}
    total = sum(sizes.values())
    mtp = sum(v for k, v in sizes.items() if k.startswith("mtp"))
    experts = {k: v for k, v in sizes.items() if "experts" in k}
    per_moe_layer_expert = sum(experts.values()) / (config.num_moe_layers + config.num_nextn_predict_layers)
    inactive = per_moe_layer_expert * (1 - config.num_experts_per_tok / config.n_routed_experts)
    emb = config.vocab_size * config.hidden_size
    active_main = total - mtp - emb - inactive * config.num_moe_layers
    return total, mtp, active_main


def test_parameter_counts_match_published_figures():
    """671B main + 11.5B unique MTP; the hub's 685B also stores the MTP layer's copies of the
    embedding and head; 37B activated (SPEC D, PAPER); bench 2.95B / 0.68B (PERF.md)."""
    config = ModelConfig.preset("v3_671b")
    total, mtp, active = _count(config)
    assert (total - mtp) / 1e9 == pytest.approx(671, abs=1)
    assert mtp / 1e9 == pytest.approx(11.5, abs=0.15)  # 11.61B counted; the README rounds to 11.5B
    assert (total + 2 * config.vocab_size * config.hidden_size) / 1e9 == pytest.approx(685, abs=1)
    assert active / 1e9 == pytest.approx(37, abs=1)
    total, mtp, active = _count(ModelConfig.preset("bench"))
    assert (total - mtp) / 1e9 == pytest.approx(2.95, abs=0.05)
    assert active / 1e9 == pytest.approx(0.68, abs=0.05)


@pytest.mark.parametrize("changes, field", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(n_group=8), "n_group"),  # 8 experts in 8 groups: one per group
    (dict(num_experts_per_tok=5, topk_group=2), "num_experts_per_tok"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(num_nextn_predict_layers=-1), "num_nextn_predict_layers"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(num_attention_heads=0), "num_attention_heads"),
    (dict(q_lora_rank=0), "q_lora_rank"),
    (dict(rope_scaling={"type": "longrope", "factor": 2.0}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn"}), "rope_scaling"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
])
def test_invalid_configs_name_field_and_constraint(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=.*: "):
        ModelConfig.preset("tiny", **changes)


def test_invalid_hf_dict_is_refused_too():
    bad = ModelConfig.preset("tiny").to_hf() | {"rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(ValueError, match="unknown rope type"):
        ModelConfig.from_hf(bad)
    with pytest.raises(ValueError, match="rope_interleave"):
        ModelConfig.from_hf(ModelConfig.preset("tiny").to_hf() | {"rope_interleave": False})


@pytest.mark.parametrize("changes, field", [
    (dict(n_shared_experts=None), "n_shared_experts"),  # DeepSeek-V2 configs write null for none
    (dict(num_nextn_predict_layers=None), "num_nextn_predict_layers"),
    (dict(first_k_dense_replace=None), "first_k_dense_replace"),
    (dict(rms_norm_eps="1e-6"), "rms_norm_eps"),
    (dict(q_lora_rank=0.5), "q_lora_rank"),
    (dict(hidden_size=True), "hidden_size"),
    (dict(norm_topk_prob="false"), "norm_topk_prob"),  # a truthy string would normalize
    (dict(rope_theta=0), "rope_theta"),
    (dict(routed_scaling_factor=None), "routed_scaling_factor"),
])
def test_values_of_the_wrong_type_name_the_field(changes, field):
    """A config.json value of the wrong type is a ValueError naming the field, not a TypeError
    from a comparison (or, for floats, bools and strings, accepted and misread)."""
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}=.*: "):
        ModelConfig.from_hf(ModelConfig.preset("tiny").to_hf() | changes)


@pytest.mark.parametrize("rope_scaling, message", [
    ({"factor": 4.0}, "names no 'rope_type'"),  # was read as no scaling at all
    ({"rope_type": "default", "factor": 4.0}, "default rope does not use 'factor'"),
    ({"type": "yarn", "factor": 4.0, "partial_rotary_factor": 0.5}, "does not use 'partial_rotary_factor'"),
    ({"type": "yarn", "rope_type": "default", "factor": 4.0}, "'type' and 'rope_type' differ"),
    ({"type": "yarn", "factor": "4"}, "factor must be a number >= 1"),
    ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": None}, "must be a positive int"),
    ({"type": "yarn", "factor": 4.0, "truncate": "no"}, "truncate must be true or false"),
    ("yarn", "must be a dict or null"),
    ({"type": "yarn", "factor": 4.0, "rope_theta": 50000.0}, "its rope_theta differs from rope_theta=10000"),
])
def test_rope_scaling_the_rope_would_misread_is_refused(rope_scaling, message):
    with pytest.raises(ValueError, match=rf"ModelConfig\.rope_scaling=.*: .*{message}"):
        ModelConfig.from_hf(ModelConfig.preset("tiny").to_hf() | {"rope_scaling": rope_scaling})


def test_every_key_transformers_yarn_reads_is_accepted():
    """The required and optional keys of transformers' `_validate_yarn_rope_parameters` all pass
    (rope_theta when it agrees with the top-level field: transformers 5 adds it to a rope_scaling
    dict it is given)."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.0,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0, "truncate": True,
            "rope_theta": 10000}
    assert ModelConfig.preset("tiny", rope_scaling=yarn).rope_type == "yarn"
    null_beta = {"type": "yarn", "factor": 4.0, "beta_fast": None}  # HF: null means the default
    assert ModelConfig.preset("tiny", rope_scaling=null_beta).rope_type == "yarn"
    given = ModelConfig.preset("tiny").to_hf()
    transformers.DeepseekV3Config(**given)  # edits given["rope_scaling"] in place
    assert "rope_theta" in given["rope_scaling"] and ModelConfig.from_hf(given).rope_type == "yarn"


@pytest.mark.parametrize("alias, field, value", [("num_local_experts", "n_routed_experts", 16),
                                                 ("num_mtp_layers", "num_nextn_predict_layers", 0)])
def test_transformers_aliases_are_not_ignored(alias, field, value):
    """transformers reads `num_local_experts` / `num_mtp_layers` as our fields; we kept them as
    unused extras (16 experts in the file, 256 or 8 in the model). Refused unless they agree."""
    src = lambda: {k: v for k, v in ModelConfig.preset("tiny").to_hf().items() if k != field}
    assert getattr(transformers.DeepseekV3Config(**src(), **{alias: value}), field) == value  # what HF makes of it
    for given in (src(), src() | {field: ModelConfig.preset("tiny").to_hf()[field]}):
        with pytest.raises(ValueError, match=rf"extra\['{alias}'\]={value}: transformers reads it as {field}"):
            ModelConfig.from_hf(given | {alias: value})
    agreeing = ModelConfig.from_hf(src() | {field: value, alias: value})
    assert getattr(agreeing, field) == value and agreeing.to_hf()[alias] == value
