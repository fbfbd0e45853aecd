"""A Hugging Face Llama (random small GQA config, saved offline) generates the same greedy tokens in
both twins as in transformers' own `generate`, with per-step logits that agree.

The Hugging Face directory is imported through scripts/convert.py, as a user would.
"""

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import jax_model
import torch_model
from jax_model import generate as jg
from shared_config import load_checkpoint
from torch_model import generate as tg

from ..support.common import FORWARD_TOL, load_script, parity_weights, rel_err, tokens
from .test_generate import step_logits

CONFIG = LlamaConfig(
    vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=128, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def test_hf_llama_greedy_tokens_match_both_twins(tmp_path):
    convert = load_script("convert")
    hf = LlamaForCausalLM(CONFIG).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert.convert(tmp_path / "hf", tmp_path / "init.safetensors")  # only for the spec: weights are replaced next
    _, spec = load_checkpoint(tmp_path / "init.safetensors")
    # O(1) logits (HF's 0.02-std init gives near-ties that any rounding could split); strict: the names map 1:1.
    hf.load_state_dict({k: torch.as_tensor(v) for k, v in parity_weights(spec).items()}, strict=True)
    hf.save_pretrained(tmp_path / "hf")
    convert.convert(tmp_path / "hf", tmp_path / "model.safetensors")
    weights, spec = load_checkpoint(tmp_path / "model.safetensors")

    prompt = list(tokens(spec, 1, 32)[0])
    with torch.no_grad():
        out = hf.generate(torch.as_tensor([prompt]), max_new_tokens=64, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
    expected = out.sequences[0, len(prompt):].tolist()
    hf_logits = torch.cat(out.logits).numpy()  # [64, V], the logits that chose each token
    assert hf_logits.std() > 0.5
    for twin, gen in [(jax_model, jg), (torch_model, tg)]:
        model = twin.from_weights(weights, spec)
        assert gen.generate(model, prompt, 64) == expected, twin.__name__
        ours = step_logits(gen.Decoder(model), prompt, expected)
        errs = [rel_err(ours[i], hf_logits[i]) for i in range(64)]
        assert max(errs) <= FORWARD_TOL, (f"{twin.__name__} vs transformers, step {int(np.argmax(errs))}: "
                                          f"{max(errs):.2e}")
