"""Hugging Face interop, verified against transformers itself (offline, tiny random models).

Import: a transformers model saved with `save_pretrained` converts to our format and both twins
reproduce its logits. Export: our directory loads with `from_pretrained` and reproduces our logits.
"""

import copy
import json

import numpy as np
import pytest
import torch
import transformers

from shared_config import CheckpointError, layout, load_checkpoint, np_dtype, save_checkpoint
from shared_config.formats.hf import config_from_spec

from ..support.common import (FORWARD_TOL, jax_logits, load_script, make_spec, parity_weights, rel_err, tokens,
                              torch_logits)

convert = load_script("convert").convert

SIZES = dict(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, intermediate_size=80,
             max_position_embeddings=128, rms_norm_eps=1e-5)
# head_dim 10 and original_max 64 put RoPE wavelengths in all three llama3 bands (kept, smoothed, divided).
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

# name: (transformers config class, its keyword arguments, the spec it must import as)
CASES = {
    "llama_gqa_head_dim_llama3": (
        "LlamaConfig",
        dict(num_key_value_heads=2, head_dim=10, rope_theta=5000.0, rope_scaling=LLAMA3, tie_word_embeddings=False),
        dict(n_kv_heads=2, head_dim=10, rope_theta=5000.0, rope_scaling="llama3", rope_original_max_seq_len=64),
    ),
    "llama_tied_mha": (
        "LlamaConfig",
        dict(num_key_value_heads=6, tie_word_embeddings=True),
        dict(n_kv_heads=6, tie_embeddings=True),
    ),
    "qwen3_gqa_tied": (
        "Qwen3Config",
        dict(num_key_value_heads=2, head_dim=12, rope_theta=20000.0, tie_word_embeddings=True),
        dict(n_kv_heads=2, head_dim=12, rope_theta=20000.0, tie_embeddings=True, qk_norm=True),
    ),
    "qwen3_untied_llama3": (
        "Qwen3Config",
        dict(num_key_value_heads=3, head_dim=10, rope_scaling=LLAMA3, tie_word_embeddings=False),
        dict(n_kv_heads=3, head_dim=10, rope_scaling="llama3", rope_original_max_seq_len=64, qk_norm=True),
    ),
}


def case(name):
    """A transformers model holding our O(1)-logit test weights, and the spec it stands for."""
    config_class, kwargs, spec_changes = CASES[name]
    spec = make_spec(norm_eps=1e-5, **spec_changes)
    config = getattr(transformers, config_class)(**SIZES, **copy.deepcopy(kwargs))  # it edits rope_scaling in place
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    weights = {k: torch.from_numpy(v) for k, v in parity_weights(spec).items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # The canonical names are transformers' names: only the tied head is not a tensor of its own.
    assert unexpected == [] and missing == (["lm_head.weight"] if spec.tie_embeddings else [])
    return model, spec


def hf_logits(model, toks) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(toks)).logits.numpy()


def assert_twins_match(weights, spec, expected):
    toks = tokens(spec)
    for twin_logits in (jax_logits, torch_logits):
        assert rel_err(twin_logits(weights, spec, toks), expected) <= FORWARD_TOL, twin_logits.__name__


@pytest.mark.parametrize("name", CASES)
def test_import_reproduces_transformers_logits(tmp_path, name):
    model, spec = case(name)
    # one case saves shards, so the index (model.safetensors.index.json) is read too
    model.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if name == "llama_gqa_head_dim_llama3" else "1GB")
    convert(tmp_path / "hf", tmp_path / "ours.safetensors")
    weights, imported = load_checkpoint(tmp_path / "ours.safetensors")
    assert imported == spec
    assert_twins_match(weights, spec, hf_logits(model, tokens(spec)))


@pytest.mark.parametrize("name", CASES)
def test_export_loads_in_transformers_and_reproduces_our_logits(tmp_path, name):
    _, spec = case(name)
    weights = parity_weights(spec)
    save_checkpoint(tmp_path / "ours.safetensors", weights, spec)
    convert(tmp_path / "ours.safetensors", tmp_path / "hf", to="hf")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert type(model).__name__ == CASES[name][0].replace("Config", "ForCausalLM")
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.dtype == torch.float32
    assert_twins_match(weights, spec, hf_logits(model.eval(), tokens(spec)))


def test_transformers_4x_config_style_imports_the_same(tmp_path):
    """transformers 4.x keeps rope_theta and rope_scaling top-level (5.x: inside rope_parameters)."""
    model, spec = case("llama_gqa_head_dim_llama3")
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=rope, torch_dtype=config.pop("dtype", "float32"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    convert(tmp_path / "hf", tmp_path / "ours.safetensors")
    assert load_checkpoint(tmp_path / "ours.safetensors")[1] == spec


def test_round_trip_through_hf_is_bit_exact_and_keeps_the_whole_spec(tmp_path):
    # fields config.json has no key for (init, fusion, compute dtype) travel in model.safetensors' metadata
    spec = make_spec(tie_embeddings=True, qk_norm=True, fused_qkv=False, init_std=0.05, compute_dtype="bfloat16",
                     param_dtype="bfloat16", rope_scaling="llama3", rope_original_max_seq_len=64)
    weights = {k: v.astype(np_dtype("bfloat16")) for k, v in parity_weights(spec).items()}
    save_checkpoint(tmp_path / "a.safetensors", weights, spec)
    convert(tmp_path / "a.safetensors", tmp_path / "hf", to="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    convert(tmp_path / "hf", tmp_path / "b.safetensors")
    back, back_spec = load_checkpoint(tmp_path / "b.safetensors")
    assert back_spec == spec and list(back) == [t.name for t in layout(spec)]
    assert all(np.array_equal(back[k].view(np.uint16), weights[k].view(np.uint16)) for k in back)


def test_export_refuses_every_option_without_a_hugging_face_equivalent(tmp_path):
    spec = make_spec(norm_type="dyt", norm_placement="peri", position="learned", mlp="gelu", embed_scale="learnable",
                     embed_norm=True)
    with pytest.raises(CheckpointError) as e:
        config_from_spec(spec, tmp_path / "hf")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'hf'}: no Hugging Face equivalent for ")
    for option in ("norm_type=dyt", "norm_placement=peri", "embed_scale=learnable", "embed_norm=true",
                   "position=learned", "mlp=gelu"):
        assert option in msg
    assert "norm_bias" not in msg.split(" (")[0]  # only the offending options are listed
    assert "norm_bias=false, embed_scale=none, embed_norm=false" in msg  # as a spec file spells them, not Python
    with pytest.raises(CheckpointError, match=r"no Hugging Face equivalent for norm_bias=true \("):
        config_from_spec(make_spec(norm_bias=True), tmp_path / "hf")


@pytest.mark.parametrize("placement", ["deepnorm", "hybrid", "hybrid_star", "pre_post"])
def test_export_refuses_the_literature_placements_by_name(tmp_path, placement):
    """No Hugging Face Llama / Qwen3 computes DeepNorm, HybridNorm(*) or Pre-attention/Post-FFN: the export names the
    placement and writes nothing."""
    spec = make_spec(norm_placement=placement)
    src = tmp_path / "m.safetensors"
    save_checkpoint(src, parity_weights(spec), spec)
    with pytest.raises(CheckpointError, match=f"no Hugging Face equivalent for norm_placement={placement} "):
        convert(src, tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_llama_whose_heads_do_not_divide_its_width(tmp_path):
    """transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 (head_dim given apart): the export wrote
    a directory that AutoModelForCausalLM.from_pretrained could not load. Refused by name, nothing written; a Qwen3
    (qk_norm) takes such a geometry, loads and reproduces our logits."""
    spec = make_spec(n_heads=5, n_kv_heads=1, head_dim=10)
    save_checkpoint(tmp_path / "m.safetensors", parity_weights(spec), spec)
    with pytest.raises(CheckpointError, match=r"d_model=48 \(hidden_size\) not a multiple of n_heads=5"):
        convert(tmp_path / "m.safetensors", tmp_path / "hf", to="hf")
    assert not (tmp_path / "hf").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    spec = spec.replace(qk_norm=True)
    weights = parity_weights(spec)
    save_checkpoint(tmp_path / "q.safetensors", weights, spec)
    convert(tmp_path / "q.safetensors", tmp_path / "hf", to="hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    toks = tokens(spec)
    assert rel_err(torch_logits(weights, spec, toks), hf_logits(model.eval(), toks)) <= FORWARD_TOL


@pytest.mark.parametrize("model_type, config_class", [("llama", "LlamaConfig"), ("qwen3", "Qwen3Config")])
def test_the_defaults_table_holds_transformers_defaults(model_type, config_class):
    from shared_config.formats.config_json import DEFAULTS

    config = getattr(transformers, config_class)()
    for key, default in DEFAULTS[model_type].items():
        found = config.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(config, key)
        if default is None:  # derived by transformers as by our spec
            assert found == {"head_dim": config.hidden_size // config.num_attention_heads,
                             "num_key_value_heads": config.num_attention_heads}[key], key
        else:
            assert found == default, (key, found, default)


@pytest.mark.parametrize("deleted, expect", [
    ("head_dim", {"head_dim": 128}),  # Qwen3's documented default, where Llama derives d_model / n_heads
    ("num_key_value_heads", "n_kv_heads=32"),  # Qwen3's default: 32, refused for 6 heads as transformers cannot run it
    ("rms_norm_eps", {"norm_eps": 1e-6}),
    ("tie_word_embeddings", {"tie_embeddings": False}),
])
def test_keys_omitted_from_a_qwen3_config_take_transformers_defaults(tmp_path, deleted, expect):
    spec = make_spec(qk_norm=True, head_dim=128, n_kv_heads=2, norm_eps=1e-6)
    save_checkpoint(tmp_path / "m.safetensors", parity_weights(spec), spec)
    convert(tmp_path / "m.safetensors", tmp_path / "hf", to="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    del config[deleted]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    if isinstance(expect, str):
        with pytest.raises(CheckpointError, match=expect):
            convert(tmp_path / "hf", tmp_path / "back.safetensors")
        return
    assert getattr(transformers.AutoConfig.from_pretrained(tmp_path / "hf"), deleted) == getattr(
        transformers.Qwen3Config(), deleted)
    convert(tmp_path / "hf", tmp_path / "back.safetensors")
    assert load_checkpoint(tmp_path / "back.safetensors")[1] == spec.replace(**expect)
