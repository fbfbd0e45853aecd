"""Bad weight files given to the converter (docs/checkpoints.md): safetensors attacks, tensors that do not fit the
spec, pickles that would run code, a .pt that is no checkpoint. A one-line error naming the file and the problem, and
DST exactly as it was."""

import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import torch_model
from shared_config import CheckpointError, SpecError, init_weights, save_checkpoint
from shared_config.formats.hf import config_from_spec

from ..support.common import error_line, load_script, make_spec, one_line_error, run_script

convert = load_script("convert").convert


# --- safetensors attacks ------------------------------------------------------------------------

OK_ENTRY = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


def safetensors_bytes(header, data=b"", header_len=None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def f32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


# name: (file contents, what the error must say)
ATTACKS = {
    "header_length_larger_than_file": (
        safetensors_bytes({"a": OK_ENTRY}, bytes(16), header_len=10_000),
        "header length 10000 is larger than the file",
    ),
    "huge_header": (
        safetensors_bytes({"a": OK_ENTRY}, bytes(16), header_len=2**40),
        "header length 1099511627776 is over the 100000000-byte limit",
    ),
    "header_not_json": (safetensors_bytes(b"{'a': 1}"), "header is not JSON"),
    "header_not_utf8": (safetensors_bytes(b'{"\xff\xfe": 1}'), "header is not UTF-8"),
    "overlapping_offsets": (
        safetensors_bytes({"a": f32([2], [0, 8]), "b": f32([2], [4, 12])}, bytes(12)),
        "tensor 'b': data_offsets [4, 12] overlap the tensor before",
    ),
    "offsets_past_the_end": (
        safetensors_bytes({"a": f32([4], [0, 16])}, bytes(8)),
        "tensor 'a': data_offsets [0, 16] run past the end of the data (8 bytes)",
    ),
    "offsets_not_shape_x_dtype": (
        safetensors_bytes({"a": f32([3], [0, 16])}, bytes(16)),
        "tensor 'a': data_offsets [0, 16] hold 16 bytes, shape [3] F32 needs 12",
    ),
    "entry_not_an_object": (  # was "unknown dtype null", a key the entry never had
        safetensors_bytes({"a": ["F32", [2, 2], [0, 16]]}, bytes(16)),
        "tensor 'a': must be a JSON object of dtype, shape and data_offsets, got ['F32', [2, 2], [0, 16]]",
    ),
    "bytes_not_covered": (safetensors_bytes({"a": OK_ENTRY}, bytes(20)), "the tensors cover 16 of the 20 data bytes"),
}


@pytest.mark.parametrize("name", ATTACKS)
def test_safetensors_attacks_are_refused_before_reading_data(tmp_path, name):
    contents, says = ATTACKS[name]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(contents)
    with pytest.raises(CheckpointError) as e:
        convert(bad, tmp_path / "out.pt")
    assert f"not a valid safetensors file: {says}" in error_line(e, bad)
    assert not (tmp_path / "out.pt").exists()


def test_truncated_safetensors_file(tmp_path):
    spec = make_spec()
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, init_weights(spec, 0), spec)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(CheckpointError) as e:
        convert(bad, tmp_path / "out.pt")
    assert "run past the end of the data" in error_line(e, bad)


# --- weights that do not fit the spec -----------------------------------------------------------


@pytest.mark.parametrize("source", ["safetensors", "torch"])
def test_non_finite_values_refused_unless_allowed(tmp_path, source):
    spec = make_spec(n_layers=3)
    w = init_weights(spec, 0)
    w["model.layers.1.mlp.down_proj.weight"][0, 0] = np.nan
    w["model.layers.2.mlp.down_proj.weight"][1, 2] = np.inf
    w["lm_head.weight"][3, 3] = -np.inf
    src = tmp_path / ("m.safetensors" if source == "safetensors" else "m.pt")
    (save_checkpoint if source == "safetensors" else torch_model.save_state_dict_file)(src, w, spec)
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "out-hf", to="hf")
    msg = error_line(e, src)
    assert msg.endswith("non-finite values (NaN/Inf) in: model.layers.{1..2}.mlp.down_proj.weight, lm_head.weight")
    assert not (tmp_path / "out-hf").exists()
    convert(src, tmp_path / "out-hf", to="hf", allow_nonfinite=True)  # asked for: converted as it is


def test_missing_unexpected_and_misshapen_tensors_reported_together(tmp_path):
    spec = make_spec(n_layers=3, fused_qkv=False)
    w = init_weights(spec, 0)
    for i in range(3):
        del w[f"model.layers.{i}.mlp.up_proj.weight"]
    w["model.layers.1.self_attn.attn_bias"] = np.zeros(4, np.float32)
    w["lm_head.weight"] = np.ascontiguousarray(w["lm_head.weight"].T)
    expected = (
        "missing keys: model.layers.{0..2}.mlp.up_proj.weight; "
        "unexpected keys: model.layers.1.self_attn.attn_bias; "
        "shape mismatches: lm_head.weight expected [97, 48] found [48, 97]"
    )
    torch.save({k: torch.from_numpy(v) for k, v in w.items()}, tmp_path / "bare.pt")  # the torch reader
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config_from_spec(spec, "hf")))
    save_file(w, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})  # the canonical check
    for src in (tmp_path / "bare.pt", tmp_path / "hf"):
        with pytest.raises(CheckpointError) as e:
            convert(src, tmp_path / "out.safetensors", spec=spec)
        assert error_line(e, src).endswith(expected)


def test_spec_disagreeing_with_the_given_one_and_invalid_specs(tmp_path):
    spec = make_spec(n_layers=3)
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, init_weights(spec, 0), spec)
    convert(src, tmp_path / "m-hf", to="hf")
    for path in (src, tmp_path / "m-hf"):
        with pytest.raises(CheckpointError) as e:
            convert(path, tmp_path / "out.pt", spec=make_spec(n_layers=2))
        assert error_line(e, path).endswith("disagrees with the given spec: n_layers: file 3 vs given 2")
    with pytest.raises(SpecError, match="no spec preset or file named 'tiny-typo'"):
        convert(src, tmp_path / "out.pt", spec="tiny-typo")
    (tmp_path / "bad.yaml").write_text(json.dumps({**spec.to_dict(), "n_kv_heads": 4}))
    with pytest.raises(SpecError, match="bad.yaml: n_kv_heads=4 must divide n_heads=6"):
        convert(src, tmp_path / "out.pt", spec=tmp_path / "bad.yaml")
    convert(src, tmp_path / "m-flax", to="flax")
    (tmp_path / "m-flax" / "spec.json").write_text('{"vocab_size": 97')
    with pytest.raises(CheckpointError) as e:
        convert(tmp_path / "m-flax", tmp_path / "out.pt")
    assert "invalid spec: Expecting" in error_line(e, tmp_path / "m-flax" / "spec.json")
    assert not (tmp_path / "out.pt").exists()


# --- pickles --------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs os.mkdir(marker): a stand-in for any code an attacker would run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path):
    marker, evil = tmp_path / "payload-ran", tmp_path / "evil.pt"
    torch.save({"spec": make_spec().to_json(), "state_dict": {"model.norm.weight": Payload(marker)}}, evil)
    with pytest.raises(CheckpointError) as e:
        convert(evil, tmp_path / "out.safetensors")
    assert "refused by torch.load(weights_only=True)" in error_line(e, evil)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    torch.load(evil, weights_only=False)  # the payload is live: unsafe loading would have run it
    assert marker.is_dir()


# --- the command line -----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_errors_are_one_line_exit_2_no_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(ATTACKS["offsets_past_the_end"][0])
    marker, evil = tmp_path / "payload-ran", tmp_path / "evil.pt"
    torch.save({"state_dict": Payload(marker)}, evil)
    damaged = tmp_path / "damaged-flax"
    (damaged / "state").mkdir(parents=True)  # Orbax itself logs warnings and prints tracebacks here
    cases = [
        ([bad, tmp_path / "out.pt"], f"error: {bad}: not a valid safetensors file: tensor 'a'"),
        ([evil, tmp_path / "out.safetensors", "--spec", "tiny"], f"error: {evil}: refused by torch.load"),
        ([damaged, tmp_path / "out.pt", "--spec", "tiny"], f"error: {damaged / 'state'}: not a readable Orbax"),
        ([bad, tmp_path / "out", "--to", "onnx"], "error: argument --to: invalid choice: 'onnx'"),
    ]
    for args, starts in cases:
        assert one_line_error(run_script("convert", *args)).startswith(starts)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "damaged-flax", "evil.pt"]  # no output
    debug = run_script("convert", bad, tmp_path / "out.pt", "--debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


@pytest.mark.parametrize("content", [b"junk\n", b"", b"PK\x03\x04not a zip"])
def test_a_pt_file_that_is_not_a_checkpoint_is_a_one_line_error(tmp_path, content):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    with pytest.raises(CheckpointError) as e:
        convert(junk, tmp_path / "out.safetensors")
    assert "refused by torch.load(weights_only=True)" in error_line(e, junk)
    assert not (tmp_path / "out.safetensors").exists()
    if content == b"junk\n":  # torch.load's KeyError was the whole message: "refused by ...: 174812789"
        assert "not a torch checkpoint: neither a zip file nor a pickle (torch.load's KeyError " in error_line(e, junk)
