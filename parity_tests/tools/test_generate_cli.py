"""scripts/generate.py: streams the tokens generate() gives, in either twin; text prompts through bytes
or a tokenizer.json beside the weights; bad input is one `error:` line and exit code 2."""

import io

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import jax_model
import torch_model
from jax_model import generate as jg
from shared_config import CheckpointError, save_checkpoint
from torch_model import generate as tg

from ..support.common import load_script, make_spec, parity_weights, run_main, run_script

cli = load_script("generate")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A checkpoint whose vocabulary holds bytes (V = 300 >= 256)."""
    spec = make_spec(vocab_size=300)
    path = tmp_path_factory.mktemp("cli") / "model.safetensors"
    save_checkpoint(path, parity_weights(spec), spec)
    return path


def run_cli(*args):
    return run_script("generate", *args)


@pytest.mark.parametrize("backend,quiet", [("jax", False), ("torch", True)])
def test_streams_the_tokens_generate_gives(weights, backend, quiet):
    twin, gen = (jax_model, jg) if backend == "jax" else (torch_model, tg)
    expected = gen.generate(twin.from_safetensors(weights), [3, 1, 4, 1, 5], 12)
    r = run_cli("--backend", backend, "--weights", weights, "--tokens", "3,1,4,1,5", "--max-new-tokens", 12,
                *["--quiet"] * quiet)
    assert r.returncode == 0, r.stderr
    assert [int(t) for t in r.stdout.split()] == expected
    if quiet:  # the timing line was the only way to silence stderr: 2>/dev/null hid errors too
        assert r.stderr == ""
    else:
        assert "tokens/s" in r.stderr.splitlines()[-1]


def test_each_token_is_written_before_the_next_is_drawn():
    out, err = io.StringIO(), io.StringIO()

    def steps():
        for i, token in enumerate([5, 6, 7]):
            yield token
            assert out.getvalue().split() == ["5", "6", "7"][: i + 1]  # written and flushed already

    cli.emit(steps(), lambda t: f"{t} ", out, err)
    assert "3 tokens in" in err.getvalue()


def test_text_prompts_as_bytes_or_through_tokenizer_json(weights, tmp_path):
    spec = make_spec(vocab_size=300)
    by_bytes = cli.load_tokenizer(weights, spec)
    assert by_bytes.encode("hé") == [104, 195, 169]
    stream = cli.TextStream(by_bytes.decode)
    # é waits for its second byte; 299 is no byte
    assert [stream(t) for t in [104, 195, 169, 299]] == ["h", "", "é", ""]
    assert stream.rest() == ""
    cut = cli.TextStream(by_bytes.decode)
    out = io.StringIO()
    cli.emit(iter([104, 105, 195]), cut, out, io.StringIO(), rest=cut.rest)  # ends inside a character
    assert out.getvalue() == "hi\ufffd\n", "a character cut off at the end shows as U+FFFD, not nothing"

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "once": 1, "upon": 2, "a": 3, "time": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    beside = cli.load_tokenizer(tmp_path / "model.safetensors", spec)
    assert beside.encode("once upon a time") == [1, 2, 3, 4]
    assert cli.load_tokenizer(tmp_path / "model.safetensors", make_spec()).encode("a") == [3]
    with pytest.raises(cli.UsageError, match="--tokens"):
        cli.load_tokenizer(weights, make_spec())  # 97 tokens cannot hold bytes, and no tokenizer.json
    with pytest.raises(cli.UsageError, match="tokenizer.json: the tokenizer has 5 tokens but the model's vocab_size "
                                             "is 4: not the tokenizer these weights were trained with"):
        cli.load_tokenizer(tmp_path / "model.safetensors", make_spec(vocab_size=4))  # a prompt's id 4: "outside"
    tok.add_special_tokens(["<|end|>"])  # id 5, past a 5-token model, which encoding text does not yield
    tok.save(str(tmp_path / "tokenizer.json"))
    assert cli.load_tokenizer(tmp_path / "model.safetensors", make_spec(vocab_size=5)).encode("a time") == [3, 4]
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").symlink_to(tmp_path / "gone.json")  # a link left dangling: it encoded bytes instead
    with pytest.raises(CheckpointError, match="tokenizer.json: cannot read: No such file"):
        cli.load_tokenizer(tmp_path / "model.safetensors", spec)


@pytest.mark.parametrize("args, message", [
    (["--tokens", "1,x"], "must be comma-separated integer ids"),
    (["--tokens", "1,300"], "token id 300 is outside the vocabulary 0..299"),
    (["--tokens", "1," + "9" * 5000], "--tokens: id '9999999999...9999999999 (5,000 digits)' is outside any"),
    (["--tokens", ",".join(["1"] * 100), "--max-new-tokens", "29"], "exceeds max_seq_len=128"),
    (["--prompt", "x" * 200], "a prompt of 200 tokens plus --max-new-tokens 64 exceeds max_seq_len=128"),
    (["--prompt", ""], "--prompt '' encodes to no tokens"),  # was "every prompt needs at least one token"
    (["--tokens", "1", "--top-p", "1.5"], "--top-p 1.5 must be a number in (0, 1]"),  # the option, not top_p=
    (["--tokens", "1", "--attention", "sdpa"], "not offered by the jax twin"),
])
def test_bad_input_is_one_error_line_and_exit_2(weights, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        cli.run(cli.main, ["--backend", "jax", "--weights", str(weights), *args])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error:") and message in err, err


def test_a_prompt_the_tokenizer_encodes_past_the_vocabulary_names_the_tokenizer(tmp_path, capsys):
    """An added token's text in --prompt (its id past the model's vocabulary) said "prompt 0: token id 5 is outside
    the vocabulary 0..4", generate()'s words for a batch, naming neither --prompt nor the tokenizer."""
    spec = make_spec(vocab_size=5)
    save_checkpoint(tmp_path / "m.safetensors", parity_weights(spec), spec)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "once": 1, "upon": 2, "a": 3, "time": 4}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|end|>"])  # id 5
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SystemExit) as e:
        cli.run(cli.main, ["--backend", "torch", "--weights", str(tmp_path / "m.safetensors"), "--prompt", "a <|end|>"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --prompt: {tmp_path / 'tokenizer.json'} encodes it to token id 5, past the model's "
                          "vocabulary 0..4"), err


def test_a_cache_past_the_machines_memory_is_one_error_line_before_a_framework_loads(tmp_path, capsys, monkeypatch):
    """--max-new-tokens 10**9 at max_seq_len 2**31 - 1: the cache's size refused with the resources' exit code 3,
    before a framework is loaded (it was the kernel's refusal of a 128 GB allocation, where it does not overcommit)."""
    from shared_config import resources

    monkeypatch.setattr(resources, "accelerator_present", lambda: False)
    monkeypatch.setattr(resources, "machine_memory", lambda: (16 * 2**30, "of memory on this machine"))
    spec = make_spec(max_seq_len=2**31 - 1)
    save_checkpoint(tmp_path / "long.safetensors", parity_weights(spec), spec)
    with pytest.raises(SystemExit) as e:
        cli.run(cli.main, ["--backend", "torch", "--weights", str(tmp_path / "long.safetensors"), "--tokens", "1",
                           "--max-new-tokens", str(10**9)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 3 and len(err.splitlines()) == 1, err
    assert err.startswith("error: decoding 1 rows with a cache of 1,000,000,000 slots") and "--max-new-tokens" in err


def test_weights_that_are_missing_or_a_directory(weights, capsys):
    (weights.parent / "empty").mkdir(exist_ok=True)  # a directory with model.safetensors is read as a run's checkpoint
    for path, message in [(weights.parent / "nope.safetensors", "no such file"),
                          (weights.parent / "empty", "neither a Hugging Face")]:
        with pytest.raises(SystemExit) as e:
            cli.run(cli.main, ["--backend", "torch", "--weights", str(path), "--tokens", "1"])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("error:") and message in err, err


@pytest.mark.slow
def test_a_hugging_face_directory_generates_what_its_canonical_file_does(weights, tmp_path, capsys):
    """generate.py's main in process (the streaming command line is test_streams_the_tokens_generate_gives')."""
    load_script("convert").convert(weights, tmp_path / "hf", to="hf")
    a, b = (run_main(cli.main, "--backend", "torch", "--weights", path, "--tokens", "3,1,4", "--max-new-tokens", 8,
                     capsys=capsys) for path in (weights, tmp_path / "hf"))
    assert a.out == b.out and len(b.out.split()) == 8
