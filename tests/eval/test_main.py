"""The eval CLI's inputs: record checks that name the file and line, one BOS, k-shot bounds."""

import json

import jax.numpy as jnp
import pytest
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from dsv3_jax.config import ModelConfig
from dsv3_jax.eval import __main__ as cli
from dsv3_jax.model import DeepSeekV3

WORDS = ["<bos>", "Question:", "Answer:", "sky", "is", "blue", "red", "green", "grass", "the"]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A word-level tokenizer that puts <bos> in front of every encoding itself (as DeepSeek-V3's does)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="the"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return tok


def test_text_gets_one_bos(bos_tokenizer):
    assert bos_tokenizer.encode("the sky").ids == [0, 9, 3]
    assert cli.text_tokens(bos_tokenizer, "the sky", 0) == [0, 9, 3]
    assert cli.text_tokens(bos_tokenizer, "the sky", None) == [9, 3]


def test_continuations_carry_no_bos(bos_tokenizer, monkeypatch):
    seen = {}

    def scores(model, contexts, conts, mesh=None):
        seen.update(contexts=contexts, conts=conts)
        return jnp.asarray([0.0, 1.0] * (len(conts) // 2))

    monkeypatch.setattr(cli, "choice_scores", scores)
    model = DeepSeekV3(ModelConfig.preset("tiny"), rngs=nnx.Rngs(0), dtype=jnp.float32)
    records = [{"question": "sky is", "choices": ["blue", "red"], "answer": "B"},
               {"question": "grass is", "choices": ["green", "red"], "answer": 1}]
    out = cli.run_choice(model, bos_tokenizer, records, shots=1)
    assert out == {"accuracy": 1.0, "questions": 1, "shots": 1}
    assert seen["conts"] == [[7], [6]]  # " green", " red": no <bos>
    assert all(c[0] == 0 and 0 not in c[1:] for c in seen["contexts"])
    with pytest.raises(ValueError, match="--shots=-1"):
        cli.run_choice(model, bos_tokenizer, records, shots=-1)


@pytest.mark.parametrize("record, message", [
    ({"question": "q", "choices": ["a", "b"], "answer": "AB"}, "answer 'AB': give a choice's index or letter"),
    ({"question": "q", "choices": ["a", "b"], "answer": ""}, "answer '': give"),
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer 'C' is out of range for 2 choices"),
    ({"question": "q", "choices": ["a", "b"], "answer": -1}, "answer -1 is out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": "1"}, "answer '1': give"),
    ({"question": "q", "choices": [], "answer": 0}, '"choices" must be a non-empty list of strings'),
    ({"question": "q", "choices": "ab", "answer": 0}, '"choices" must be'),
    ({"question": "q", "choices": ["a"]}, 'no "answer"'),
    (["q", ["a"], 0], 'a record is an object with a "question" string'),
])
def test_bad_records_name_file_and_line(tmp_path, record, message):
    good = {"question": "q", "choices": ["a", "b"], "answer": "b"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=f"^{path}:3: .*" + message.replace("(", r"\(")):
        cli.read_records(str(path))


def test_records_read(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b", "c"], "answer": " c "}\n{"oops\n')
    with pytest.raises(ValueError, match=f"^{path}:2: "):
        cli.read_records(str(path))
    path.write_text('{"question": "q", "choices": ["a", "b", "c"], "answer": " c "}\n')
    assert [cli._answer(r) for r in cli.read_records(str(path))] == [2]
