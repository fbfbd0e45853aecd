"""Training data (numpy only): the synthetic corpus and its entropy rate, batches as a pure function of
(seed, step), token and text files, their errors, and scripts/prepare_data.py's byte and BPE modes."""

import json

import numpy as np
import pytest

from shared_config.corpus import entropy_rate, markov_chain, stationary, transition_matrix
from shared_config.data import DataError, TokenData, load_data, synthetic_corpus

from ..support.common import load_script

TEXT = "".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs; ça va? ünïcödé\n" for i in range(400))


@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(0)


def test_synthetic_corpus_is_deterministic_and_its_entropy_rate_is_right(corpus):
    again, other = synthetic_corpus(0), synthetic_corpus(1)
    assert np.array_equal(corpus.train, again.train) and np.array_equal(corpus.val, again.val)
    assert not np.array_equal(corpus.train[:1000], other.train[:1000])
    assert corpus.vocab_size == 256 and corpus.train.max() < 256
    P = transition_matrix(*markov_chain(0))
    pi = stationary(P)
    assert np.allclose(P.sum(1), 1) and np.allclose(pi @ P, pi) and pi.min() > 0
    assert corpus.entropy == entropy_rate(P)
    # the plug-in estimate of H(next | current) from the sampled tokens agrees with the exact rate
    counts = np.zeros((256, 256))
    np.add.at(counts, (corpus.train[:-1].astype(int), corpus.train[1:].astype(int)), 1)
    p = counts / counts.sum(1, keepdims=True)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    assert abs(counts.sum(1) / counts.sum() @ h - corpus.entropy) < 0.03
    assert 1.0 < corpus.entropy < np.log(256) - 1.0  # learnable structure, far from uniform


def test_data_is_identified_by_content_not_by_a_float_computed_at_run_time(corpus):
    """A resumed run compares `describe()`: the entropy rate's last bits move with the BLAS thread count
    (np.linalg.solve), so a run checkpointed under torchrun and resumed under python was refused."""
    import dataclasses

    nudged = dataclasses.replace(corpus, entropy=np.nextafter(corpus.entropy, np.inf))
    assert nudged.describe() == corpus.describe()
    assert all(not isinstance(v, float) for v in corpus.describe().values())
    assert corpus.describe() == synthetic_corpus(0).describe()  # another process describes it alike
    train = corpus.train.copy()
    train[12345] = (train[12345] + 1) % 256
    assert dataclasses.replace(corpus, train=train).describe()["sha256"] != corpus.describe()["sha256"]
    moved = dataclasses.replace(corpus, train=corpus.train[:-1], val=np.concatenate([corpus.train[-1:], corpus.val]))
    assert moved.describe()["sha256"] != corpus.describe()["sha256"]
    wide = dataclasses.replace(corpus, train=corpus.train.astype(np.uint32), val=corpus.val.astype(np.uint32))
    assert wide.describe() == corpus.describe()  # the ids are the data, not their storage dtype


def test_batches_are_a_pure_function_of_seed_and_step(corpus):
    b = corpus.batch(3, 17, 4, 32)
    assert b.dtype == np.int32 and b.shape == (4, 33)
    assert np.array_equal(b, synthetic_corpus(0).batch(3, 17, 4, 32))  # another process would build the same
    assert not np.array_equal(b, corpus.batch(3, 18, 4, 32)) and not np.array_equal(b, corpus.batch(4, 17, 4, 32))
    text = corpus.train.tobytes()
    assert all(row.astype(np.uint16).tobytes() in text for row in b)  # contiguous windows of the train split
    val = corpus.val_batches(2, 4, 32)
    assert len(val) == 2 and all(np.array_equal(a, c) for a, c in zip(val, corpus.val_batches(2, 4, 32)))


def test_token_and_text_files(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 300
    np.save(tmp_path / "t.npy", tokens)
    d = load_data(tmp_path / "t.npy")
    assert d.vocab_size == 300 and len(d.val) == 100 and np.array_equal(np.concatenate([d.train, d.val]), tokens)
    (tmp_path / "bin").mkdir()
    (tokens.astype(np.uint32) + 70000).tofile(tmp_path / "bin" / "t.bin")
    (tmp_path / "bin" / "meta.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 70300}))
    d = load_data(tmp_path / "bin" / "t.bin")
    assert d.vocab_size == 70300 and d.train[0] == 70000
    tokens.tofile(tmp_path / "raw.bin")  # no meta.json: uint16, nanoGPT's
    assert np.array_equal(load_data(tmp_path / "raw.bin").train, tokens[:900])
    assert load_data(tmp_path / "raw.bin", dtype="uint8").train.size == 1800
    # --data-dtype where no raw .bin reads it was ignored without a word; against meta.json's, ids of garbage
    for source, says in [(tmp_path / "t.npy", "a .npy file carries its own dtype"),
                         ("synthetic", "the synthetic corpus has none"),
                         (tmp_path / "bin" / "t.bin", "meta.json says dtype uint32")]:
        with pytest.raises(DataError, match=says):
            load_data(source, dtype="uint16")
    (tmp_path / "story.txt").write_text(TEXT)
    d = load_data(tmp_path / "story.txt")
    assert d.vocab_size == 256 and bytes(np.concatenate([d.train, d.val])) == TEXT.encode()


@pytest.mark.parametrize("name,content,message", [
    ("missing.bin", None, "missing.bin: no such file"),
    ("bad.npy", b"not a numpy file at all", "not a valid .npy file"),
    ("odd.bin", b"\x01\x02\x03", "3 bytes is not a whole number of uint16 tokens"),
    ("empty.txt", b"", "holds no tokens"),
    ("two_d.npy", np.zeros((2, 3), np.uint16), "must be a 1-D array"),
    ("floats.npy", np.zeros(10, np.float32), "token dtype float32 is not one of"),
])
def test_bad_files_are_data_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_data(path)


def test_the_model_must_fit_the_data():
    d = TokenData(np.zeros(100, np.uint16), np.zeros(10, np.uint16), 300, "x.bin")
    with pytest.raises(DataError,
                       match=r"token ids go up to 299 but the model's vocab_size is 257 \(pass --set vocab_size=300"):
        d.check(8, 257)
    with pytest.raises(DataError, match="the validation split holds 10 tokens, fewer than seq_len"):
        d.check(16, 300)


def test_data_past_the_init_from_models_vocabulary_is_not_told_to_set_vocab_size(tmp_path):
    """`train.py --init-from W` (vocab 97) on the synthetic corpus (256 ids) said "pass --set vocab_size=256", which
    --init-from then refused (W's embedding has 97 rows): the error names the weights' vocabulary instead."""
    from shared_config import save_checkpoint
    from shared_config.run import resolve_run

    from ..support.common import make_spec, parity_weights

    spec = make_spec()
    save_checkpoint(tmp_path / "w.safetensors", parity_weights(spec), spec)
    args = load_script("train").parse_args(["--backend", "torch", "--init-from", str(tmp_path / "w.safetensors"),
                                            "--out", str(tmp_path / "run")])
    with pytest.raises(DataError, match=r"ids go up to 255, past the vocabulary of --init-from .*w.safetensors "
                                        r"\(vocab_size 97: no embedding rows") as e:
        resolve_run(args)
    assert "--set vocab_size" not in str(e.value) and not (tmp_path / "run").exists()


def test_prepare_data_bytes_and_bpe(tmp_path):
    prepare = load_script("prepare_data")
    (tmp_path / "story.txt").write_text(TEXT)
    prepare.main([str(tmp_path / "story.txt"), "--out", str(tmp_path / "bytes")])
    d = load_data(tmp_path / "bytes")
    assert d.vocab_size == 256 and d.tokenizer is None and d.train.dtype == np.uint16
    assert bytes(np.concatenate([d.train, d.val]).astype(np.uint8)) == TEXT.encode()
    prepare.main([str(tmp_path / "story.txt"), "--out", str(tmp_path / "bpe"), "--tokenizer", "bpe", "--vocab-size",
                  "300"])
    d = load_data(tmp_path / "bpe")
    meta = json.loads((tmp_path / "bpe" / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == d.vocab_size <= 300
    assert d.tokenizer == tmp_path / "bpe" / "tokenizer.json"
    assert len(d.train) + len(d.val) < len(TEXT.encode()) / 2  # merges learned

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(d.tokenizer))
    assert tokenizer.decode(np.concatenate([d.train, d.val]).tolist()) == TEXT  # byte-level BPE is lossless


def test_a_split_that_is_no_file_is_named_as_such(tmp_path):
    """`val.bin -> /dev/zero` (or a broken link) was reported as a directory that "needs val.bin"."""
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "val.bin").symlink_to("/dev/zero")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'val.bin'}: not a file$"):
        load_data(tmp_path)
    (tmp_path / "val.bin").unlink()
    (tmp_path / "val.bin").symlink_to(tmp_path / "gone.bin")
    with pytest.raises(DataError, match=rf"^{tmp_path / 'val.bin'}: no such file$"):
        load_data(tmp_path)


def test_a_token_file_changed_after_prepare_data_is_refused(tmp_path):
    """meta.json's train_tokens and val_tokens were never compared with the files: a train.bin cut short by a copy
    (or replaced) trained on what was left, read with the vocabulary and tokenizer of a meta.json that no longer
    described it."""
    prepare = load_script("prepare_data")
    (tmp_path / "story.txt").write_text(TEXT)
    prepare.main([str(tmp_path / "story.txt"), "--out", str(tmp_path / "d")])
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    for name in ("train", "val"):
        path = tmp_path / "d" / f"{name}.bin"
        whole = path.read_bytes()
        path.write_bytes(whole[:-4])  # two uint16 tokens short
        with pytest.raises(DataError, match=rf"^{path}: holds {meta[f'{name}_tokens'] - 2:,} tokens, but "
                                            rf"{tmp_path / 'd' / 'meta.json'} says {name}_tokens "
                                            rf"{meta[f'{name}_tokens']}: the file was changed after it was written"):
            load_data(tmp_path / "d")
        path.write_bytes(whole)
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, "val_tokens": "many"}))
    with pytest.raises(DataError, match="says val_tokens 'many'"):
        load_data(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text(json.dumps({"dtype": "uint16"}))  # no counts: nothing to compare
    assert len(load_data(tmp_path / "d").train) == meta["train_tokens"]


@pytest.mark.parametrize("content, message", [(b'{"dtype": ', "meta.json: not valid JSON"),
                                              (b"[1, 2]", r"meta.json: must hold a JSON object, got \[1, 2\]")])
def test_bad_meta_json_is_a_data_error(tmp_path, content, message):
    (tmp_path / "train.bin").write_bytes(np.arange(100, dtype=np.uint16).tobytes())
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_data(tmp_path)


@pytest.mark.parametrize("vocab_size, message", [
    (10, r"meta.json: vocab_size is 10 but train.bin holds token id 255: it must be at least 256"),
    (256, None),  # exactly the largest id + 1
    (1000, None),  # a BPE's vocabulary may exceed the ids it uses
    ("x", r"meta.json: vocab_size must be an integer >= 1, got 'x'"),
    (0, r"meta.json: vocab_size must be an integer >= 1, got 0"),
    (True, r"meta.json: vocab_size must be an integer >= 1, got true"),
    (None, r"meta.json: vocab_size must be an integer >= 1, got null"),
])
def test_meta_json_vocab_size_must_cover_the_token_ids(tmp_path, vocab_size, message):
    for split in ("train", "val"):
        (tmp_path / f"{split}.bin").write_bytes(np.arange(256, dtype=np.uint16).tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": vocab_size}))
    if message is None:
        assert load_data(tmp_path).vocab_size == vocab_size
    else:
        with pytest.raises(DataError, match=message):
            load_data(tmp_path)


@pytest.mark.parametrize("args, says", [
    ((0, 0, 2, -1, 10), "seq_len=-1 must be an integer >= 1"),  # an IndexError
    ((0, 0, 2, 8, 0), "vocab_size=0 must be an integer >= 1"),  # numpy's ValueError: high <= 0
    ((0, 0, 2.0, 8, 10), "batch_size=2.0 must be an integer >= 1"),  # a TypeError
    ((-1, 0, 2, 8, 10), "seed=-1 must be an integer >= 0"),  # numpy's ValueError
])
def test_synthetic_batch_names_an_argument_it_cannot_draw_with(args, says):
    from shared_config.data import DataError, synthetic_batch

    with pytest.raises(DataError, match=f"^synthetic_batch: {says}$"):
        synthetic_batch(*args)
