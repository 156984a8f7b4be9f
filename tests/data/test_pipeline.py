import json

import numpy as np
import pytest

from dsv3_jax.data.pipeline import DataConfig, eval_batches, make_iterator, read_documents
from dsv3_jax.data.tokenizer import EOS, load_or_train_tokenizer, train_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT * 20, "def f(x):\n    return x + 1\n" * 20], vocab_size=300)


@pytest.fixture()
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(12):
        (d / f"doc{i:02d}.txt").write_text(f"document {i}. " + TEXT * (i + 1))
    return d


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_are_packed_with_segment_ids_and_positions(corpus, tokenizer):
    it = make_iterator(DataConfig(paths=(str(corpus),), seq_len=48, batch_size=4), tokenizer)
    b = next(it)
    assert {k: v.shape for k, v in b.items()} == {k: (4, 48) for k in ("tokens", "segment_ids", "positions")}
    eos = tokenizer.token_to_id(EOS)
    for row in range(4):
        seg, pos, tok = b["segment_ids"][row], b["positions"][row], b["tokens"][row]
        assert seg[0] == 1 and np.all(np.diff(seg) >= 0)
        starts = np.flatnonzero(np.diff(seg)) + 1  # a new document starts at position 0, after an EOS
        assert np.all(pos[starts] == 0) and np.all(tok[starts - 1] == eos)
    # Rows long enough to hold whole documents: every segment's positions count up by one, and a
    # segment with another on each side is exactly one document's tokens followed by EOS.
    docs = {tuple(tokenizer.encode(d).ids + [eos]) for d in read_documents((str(corpus),))}
    b, whole = next(make_iterator(DataConfig(paths=(str(corpus),), seq_len=512, batch_size=4), tokenizer)), 0
    for seg, pos, tok in zip(b["segment_ids"], b["positions"], b["tokens"]):
        ids = np.unique(seg)
        for s in ids:
            at = np.flatnonzero(seg == s)
            assert np.all(np.diff(pos[at]) == 1)
            if ids[0] < s < ids[-1]:
                assert pos[at[0]] == 0 and tuple(tok[at]) in docs
                whole += 1
    assert whole >= 2  # (three in this batch)


def test_same_seed_same_stream_and_resume_from_state(corpus, tokenizer):
    cfg = DataConfig(paths=(str(corpus),), seq_len=32, batch_size=2, seed=3)
    a, b = make_iterator(cfg, tokenizer), make_iterator(cfg, tokenizer)
    first = _take(a, 5)
    for x, y in zip(first, _take(b, 5)):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    state = a.get_state()
    ahead = _take(a, 6)  # crosses an epoch of the 12 documents
    c = make_iterator(cfg, tokenizer)
    c.set_state(state)
    for x, y in zip(ahead, _take(c, 6)):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    other = _take(make_iterator(DataConfig(paths=(str(corpus),), seq_len=32, batch_size=2, seed=4), tokenizer), 5)
    assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(first, other))


def test_a_state_through_json_resumes_exactly_at_every_step(corpus, tokenizer):
    """Checkpoints store the iterator state as JSON (tuples come back as lists); at every step,
    including those where no document is part way through a row, the stream goes on unchanged."""
    cfg = DataConfig(paths=(str(corpus),), seq_len=32, batch_size=2, seed=3)
    full = _take(make_iterator(cfg, tokenizer), 40)
    it = make_iterator(cfg, tokenizer)
    for k in range(39):
        resumed = make_iterator(cfg, tokenizer)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        for x, y in zip(full[k:k + 2], _take(resumed, 2)):
            np.testing.assert_array_equal(x["tokens"], y["tokens"], err_msg=f"resumed at {k}")
        next(it)


def test_each_process_reads_its_own_documents(tmp_path, tokenizer):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"unique{i} " * 3}) + "\n" for i in range(8)))
    cfg = DataConfig(paths=(str(path),), seq_len=8, batch_size=2)
    seen = []
    for p in range(2):
        it = make_iterator(cfg, tokenizer, process_index=p, process_count=2)
        text = "".join(tokenizer.decode(r.tolist()) for b in _take(it, 6) for r in b["tokens"])
        assert next(it)["tokens"].shape == (1, 8)  # half of the global batch
        seen.append({i for i in range(8) if f"unique{i} " in text})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_jsonl_and_array_record_sources(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "alpha beta"}) + "\n\n" + json.dumps({"body": "gamma"}) + "\n")
    assert read_documents((str(path),), "body") == ["alpha beta", "gamma"]
    from array_record.python.array_record_module import ArrayRecordWriter

    ar = tmp_path / "tokens.arrayrecord"
    w = ArrayRecordWriter(str(ar), "group_size:1")
    docs = [np.arange(1, 6, dtype="<i4"), np.arange(100, 103, dtype="<i4")]
    for d in docs:
        w.write(d.tobytes())
    w.close()
    b = next(make_iterator(DataConfig(paths=(str(ar),), seq_len=8, batch_size=1, seed=0), tokenizer))
    # the records as stored (no EOS added), one after the other in the epoch's shuffled order
    assert b["tokens"][0].tolist() in ([*range(1, 6), *range(100, 103)], [*range(100, 103), *range(1, 6)])
    first = 5 if b["tokens"][0][0] == 1 else 3
    assert b["segment_ids"][0].tolist() == [1] * first + [2] * (8 - first)
    assert b["positions"][0].tolist() == [*range(first), *range(8 - first)]


@pytest.mark.parametrize("content, message", [
    (b"", "empty file"),
    (b"  \n", "empty file"),
    (b"\xef\xbb\xbf\r\n", "empty file"),
    (b"caf\xe9 au lait", "not UTF-8 text"),
])
def test_bad_text_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"bad.txt.*{message}|{message}"):
        read_documents((str(path),))


def test_bad_jsonl_and_missing_paths(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        read_documents((str(path),))
    path.write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no string field 'text'"):
        read_documents((str(path),))
    with pytest.raises(FileNotFoundError, match="data path not found"):
        read_documents((str(tmp_path / "nope.txt"),))


def test_tokenizer_is_cached_in_the_workdir_and_user_files_are_checked(tmp_path):
    tok = load_or_train_tokenizer(None, str(tmp_path), [TEXT * 5], 280)
    assert (tmp_path / "tokenizer.json").exists()
    again = load_or_train_tokenizer(None, str(tmp_path), None, 280)  # no documents needed: cached
    assert again.encode(TEXT).ids == tok.encode(TEXT).ids
    assert tok.decode(tok.encode("ünïcödé ✓ " + TEXT).ids) == "ünïcödé ✓ " + TEXT  # byte-level: lossless
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        load_or_train_tokenizer(str(tmp_path / "missing.json"), str(tmp_path), None, 280)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="junk.json is not a tokenizers tokenizer.json"):
        load_or_train_tokenizer(str(tmp_path / "junk.json"), str(tmp_path), None, 280)


def test_a_given_tokenizer_stays_with_the_workdir(tmp_path):
    """A --tokenizer file is copied into the workdir on first use, so a resumed run without the
    flag keeps it (rather than training a new one); a different file for that workdir is refused."""
    mine, other = tmp_path / "mine.json", tmp_path / "other.json"
    train_tokenizer([TEXT * 5], 280).save(str(mine))
    train_tokenizer(["def f(x):\n    return x + 1\n" * 5], 270).save(str(other))
    work = tmp_path / "run"
    work.mkdir()
    first = load_or_train_tokenizer(str(mine), str(work), None, 300)
    assert (work / "tokenizer.json").is_file()
    resumed = load_or_train_tokenizer(None, str(work), None, 300)  # no documents: nothing is trained
    assert resumed.to_str() == first.to_str()
    assert load_or_train_tokenizer(str(mine), str(work), None, 300).to_str() == first.to_str()
    with pytest.raises(ValueError, match="other.json differs from .*run/tokenizer.json"):
        load_or_train_tokenizer(str(other), str(work), None, 300)


def test_held_out_batches_are_the_files_token_stream_in_order(corpus, tokenizer):
    """One pass, no shuffle: row after row, the batches hold the documents' tokens (each followed
    by EOS) in file order, the same on every call."""
    cfg = DataConfig(val_paths=(str(corpus),), seq_len=32, batch_size=2, val_batches=3)
    batches = eval_batches(cfg, tokenizer)
    assert [b["tokens"].shape for b in batches] == [(2, 32)] * 3
    eos = tokenizer.token_to_id(EOS)
    stream = np.concatenate([tokenizer.encode(d).ids + [eos] for d in read_documents((str(corpus),))])
    flat = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(flat, stream[:flat.size])
    np.testing.assert_array_equal(eval_batches(cfg, tokenizer)[2]["tokens"], batches[2]["tokens"])


def test_held_out_files_must_fill_their_batches(corpus, tokenizer):
    with pytest.raises(ValueError, match=r"hold \d+ batches of 4 x 512 tokens, fewer than data.val_batches=100"):
        eval_batches(DataConfig(val_paths=(str(corpus),), seq_len=512, batch_size=4, val_batches=100), tokenizer)
    with pytest.raises(ValueError, match="data.val_paths is empty"):
        eval_batches(DataConfig(), tokenizer)


def test_data_config_checks():
    assert DataConfig(paths="notes.txt").paths == ("notes.txt",)  # one bare path, not its characters
    assert DataConfig(val_paths="held_out.txt").val_paths == ("held_out.txt",)
    with pytest.raises(ValueError, match="val_batches=0"):
        DataConfig(val_batches=0)
    with pytest.raises(ValueError, match="seq_len=1"):
        DataConfig(seq_len=1)
    with pytest.raises(ValueError, match="batch_size=0"):
        DataConfig(batch_size=0)


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path):
    """Windows tools start UTF-8 files with U+FEFF: JSON refused such a first line, text kept it."""
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "alpha"}\r\n{"text": "beta"}\r\n')
    (tmp_path / "b.txt").write_bytes("\ufeffgamma \ufeff delta".encode())
    assert read_documents((str(tmp_path / "a.jsonl"),)) == ["alpha", "beta"]
    assert read_documents((str(tmp_path / "b.txt"),)) == ["gamma \ufeff delta"]  # only a leading one is a mark


def test_unusable_array_record_files_are_named(tmp_path, tokenizer):
    from array_record.python.array_record_module import ArrayRecordWriter

    empty, odd = tmp_path / "empty.arrayrecord", tmp_path / "odd" / "odd.arrayrecord"
    ArrayRecordWriter(str(empty), "group_size:1").close()
    with pytest.raises(ValueError, match=r"no documents in \[.*empty.arrayrecord'\]"):
        make_iterator(DataConfig(paths=(str(empty),)), tokenizer)
    odd.parent.mkdir()
    w = ArrayRecordWriter(str(odd), "group_size:1")
    w.write(np.arange(3, dtype="<i8").tobytes()[:10])  # not whole int32s
    w.close()
    with pytest.raises(ValueError, match=r"a record of 10 bytes in \[.*odd'\]: records must be token ids as "
                                         r"little-endian int32"):
        next(make_iterator(DataConfig(paths=(str(odd.parent),), seq_len=4, batch_size=1), tokenizer))
