"""The generate CLI's streaming: characters split over tokens are printed once complete."""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dsv3_jax.generate import complete_text


def test_characters_split_over_tokens_wait_until_complete():
    byte_chars = pre_tokenizers.ByteLevel.alphabet()  # one token per byte
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(byte_chars))}, []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    ids = tok.encode("é中").ids
    assert len(ids) == 5  # 2 + 3 UTF-8 bytes
    shown = [complete_text(tok, ids[:n]) for n in range(1, 6)]
    assert shown == ["", "é", "é", "é", "é中"]
