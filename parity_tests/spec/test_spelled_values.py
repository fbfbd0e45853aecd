"""How a message names what a user wrote (docs/checkpoints.md, "Bad input"): a value from a spec or train config file,
a --set item or a JSON file (state.json, meta.json, config.json) as YAML and JSON spell it, `null`, `true`, `false`,
never Python's None, True, False or NoneType; a YAML key as the file writes it. In process: no training."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from shared_config import SpecError, load_spec, load_train_config
from shared_config.files import CheckpointError
from shared_config.limits import quote

from ..support.common import BASE
from ..tools.test_run_records import started


def test_quote_spells_null_and_the_booleans_as_yaml_and_json_do():
    assert [quote(v) for v in (None, True, False, np.bool_(True), 0, 1.5, "x")] == [
        "null", "true", "false", "true", "0", "1.5", "'x'"]
    assert quote({"a": None, "b": [True, (False, None)]}) == "{'a': null, 'b': [true, (false, null)]}"


@pytest.mark.parametrize("written", ["true", "True", "TRUE", "false", "null", "~", "+1", "1.50", "0x10", "0o17"])
@pytest.mark.parametrize("kind", ["spec", "train config"])
def test_a_key_that_yaml_reads_as_another_type_is_named_as_the_file_writes_it(written, kind, tmp_path):
    """`true: 3` in a spec file was "unknown spec key 'True'", `null: 3` "'None'", `0x10: 3` "'16'": Python's value
    of the key, which the file does not hold."""
    path = tmp_path / "config.yaml"
    known = BASE if kind == "spec" else {}
    path.write_text("".join(f"{k}: {v}\n" for k, v in known.items()) + f"{written}: 3\n")
    load = load_spec if kind == "spec" else load_train_config
    with pytest.raises(SpecError, match=f"^{re.escape(str(path))}: unknown {kind} key '{re.escape(written)}'"):
        load(str(path))


@pytest.mark.parametrize("written", ["null", "true", "0x10"])
@pytest.mark.parametrize("merged", ["<<: {{{key}: 3}}\n", "<<: [{{vocab_size: 257}}, {{{key}: 3}}]\n"])
def test_a_merged_key_is_named_as_the_file_writes_it(written, merged, tmp_path):
    """A key merged in (`<<: {null: 3}`, `<<: [*base, {0x10: 3}]`) was read by YAML's types after the file's own keys
    were read as written: "unknown spec key 'None'", "'16'"."""
    path = tmp_path / "config.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in BASE.items()) + merged.format(key=written))
    with pytest.raises(SpecError, match=f"unknown spec key '{re.escape(written)}'"):
        load_spec(str(path))


@pytest.mark.parametrize("item, says", [
    ("lr=null", "lr=null must be a finite number"), ("steps=true", "steps=true must be an integer"),
    ("norm_type=false", "norm_type=false must be one of"), ("qk_norm=null", "qk_norm=null must be true or false"),
])
def test_a_set_item_is_named_as_it_was_typed(item, says):
    from shared_config.run import split_overrides

    with pytest.raises(SpecError, match=f"^{says}"):
        split_overrides([item])


def test_json_files_nulls_and_booleans_are_named_as_json_writes_them(tmp_path):
    """Each said None or NoneType: a state.json step of null, a model.safetensors without a spec in its metadata
    ("invalid spec in metadata: ... got NoneType"), a meta.json of null or with a dtype of null (named the .bin file,
    not meta.json); a spec that disagrees with a checkpoint's said True, a config.json's true "(only False)"."""
    from safetensors.numpy import load_file, save_file

    from shared_config.data import load_data
    from shared_config.formats.checks import resolve_spec
    from shared_config.formats.hf import spec_from_config
    from shared_config.run_dir import read_state

    _, state_file = started(tmp_path / "run")
    checkpoint, state = state_file.parent, json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "data_position": {**state["data_position"], "step": None}}))
    with pytest.raises(CheckpointError, match="state.json data_position is at step null, state.json at 2$"):
        read_state(checkpoint)
    state_file.write_text(json.dumps(state))
    weights = checkpoint / "model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.safetensors: its metadata holds no spec"):
        read_state(checkpoint)

    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):
        (np.arange(3000) % 50).astype(np.uint16).tofile(data / f"{split}.bin")
    for meta, says in (("null", "meta.json: must hold a JSON object, got null"),
                       ('{"dtype": null}', "meta.json: dtype must be one of uint8, uint16, uint32, got null"),
                       ('{"vocab_size": true}', "meta.json: vocab_size must be an integer >= 1, got true")):
        (data / "meta.json").write_text(meta)
        with pytest.raises(ValueError, match=says):
            load_data(str(data))

    with pytest.raises(CheckpointError, match="tie_embeddings: file true vs given false$"):
        resolve_spec(load_spec({**BASE, "tie_embeddings": True}), BASE, "w.safetensors")
    config = {"model_type": "llama", "vocab_size": 97, "hidden_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 6, "intermediate_size": 80, "max_position_embeddings": 128, "mlp_bias": True}
    with pytest.raises(CheckpointError, match=r"mlp_bias=true is not supported \(only false\)$"):
        spec_from_config(config, "config.json")


def test_a_bench_variant_is_labelled_by_its_values_as_typed():
    """`--sweep d_model=null,96` was refused as "variant d_model=None", and a report's rows of `--sweep
    tie_embeddings=false,true` were labelled `tie_embeddings=False`; a value given twice was "True is given twice"."""
    from argparse import Namespace

    from shared_config.cli import UsageError

    from bench.options import variants

    def labels(*sweeps: str) -> list[str]:
        return [label for label, _ in variants(Namespace(spec="tiny", set=[], sweep=list(sweeps), dtype="float32"))]

    assert labels("tie_embeddings=false,true", "norm_eps=1e-5") == ["tie_embeddings=false,norm_eps=1e-5",
                                                                    "tie_embeddings=true,norm_eps=1e-5"]
    with pytest.raises(SpecError, match="^variant d_model=null: d_model=null must be an integer"):
        labels("d_model=null,96")
    with pytest.raises(UsageError, match="^--sweep qk_norm: true is given twice"):
        labels("qk_norm=true,false,True")


def test_an_init_from_set_item_is_named_as_it_was_typed(tmp_path):
    """`--init-from X --set embed_norm=false` on weights with the embeddings' norm said "with --set
    embed_norm=False"."""
    from shared_config.run import resolve_run

    train, state = started(tmp_path / "a", "--set", "embed_norm=true")
    with pytest.raises(ValueError, match="with --set embed_norm=false: unexpected keys: model.embed_norm."):
        resolve_run(train.parse_args(["--backend", "torch", "--out", str(tmp_path / "b"), "--init-from",
                                      str(state.parent), "--set", "embed_norm=false"]))


def test_a_repeated_value_is_named_in_one_line_however_long():
    """no_repeats spelled a repeated int with str(), which raises ValueError past Python's 4,300 digits."""
    from shared_config.cli import UsageError, no_repeats

    for value, shown in [(None, "null"), (True, "true"), (10**400, r"1000000000\.\.\.0000000000 \(401 digits\)"),
                         (10**5000, "<an integer of about 5,000 digits>"), ("x" * 300, "x{37}\\.\\.\\.x{38}")]:
        with pytest.raises(UsageError, match=f"^--sweep k: {shown} is given twice$"):
            no_repeats("--sweep k", [value, "other", value])
