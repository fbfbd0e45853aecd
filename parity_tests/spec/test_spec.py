"""The spec: presets, YAML round trip, aliases, and one test per validation rule."""

import dataclasses
import re

import numpy as np
import pytest
import yaml

from shared_config import ModelSpec, SpecError, load_spec, parse_overrides, preset_names
from shared_config.limits import parse_yaml
from shared_config.spec import CHOICES

from ..support.common import BASE, MIXERS, make_spec


def test_presets_load_and_have_the_documented_geometry():
    assert {"tiny", "tiny-dyt", "tiny-derf", "small", "llama-1b", "llama-1b-dyt"} <= set(preset_names())
    tiny = load_spec("tiny")
    assert tiny.K < tiny.H and tiny.D != tiny.F != tiny.V  # GQA, distinct sizes
    assert load_spec("tiny-dyt").norm_type == "dyt" and load_spec("tiny-derf").norm_type == "derf"
    llama = load_spec("llama-1b")
    assert (llama.D, llama.L, llama.H, llama.K, llama.E, llama.F, llama.V) == (2048, 16, 32, 8, 128, 8192, 128256)
    assert llama.rope_theta == 500000 and llama.tie_embeddings
    dyt = load_spec("llama-1b-dyt")
    assert dyt.to_dict() == {
        **llama.to_dict(), "tie_embeddings": False, "norm_type": "dyt", "embed_scale": "learnable",
    }
    assert dyt.norm_eps == 1e-5 and dyt.attn_alpha_init == dyt.ffn_alpha_init == dyt.final_alpha_init == 0.5


def test_yaml_keys_are_exactly_the_fields_and_round_trip(tmp_path):
    spec = load_spec({**BASE, "norm_type": "tanh", "rope_theta": 500000})
    assert set(spec.to_dict()) == {f.name for f in dataclasses.fields(ModelSpec)}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert load_spec(path) == spec and load_spec(str(path)) == spec
    assert load_spec(spec.to_dict()) == spec


def test_defaults_resolve_as_documented():
    spec = load_spec({**BASE, "n_kv_heads": None})
    assert spec.K == spec.H == 6 and spec.E == 48 // 6
    assert spec.to_dict()["n_kv_heads"] == 6 and spec.to_dict()["head_dim"] == 8
    assert spec.n_kv_heads is None  # derived values are properties; fields are never rewritten


@pytest.mark.parametrize("alias,name", [("tanh", "dyt"), ("shifterf", "derf")])
def test_norm_type_aliases(alias, name):
    assert load_spec({**BASE, "norm_type": alias}).norm_type == name


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_spec(BASE).d_model = 3


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"n_head": 6}, "unknown spec key 'n_head' (did you mean 'n_heads'?)"),
        ({"n_kv_heads": 4}, "n_kv_heads=4 must divide n_heads=6"),
        ({"d_model": 50}, "d_model=50 must be divisible by n_heads=6"),
        ({"head_dim": 7}, "head_dim=7 must be even when position=rope"),
        ({"vocab_size": 0}, "vocab_size=0 must be > 0"),
        ({"n_layers": -1}, "n_layers=-1 must be > 0"),
        ({"d_ff": 2.5}, "d_ff=2.5 must be an integer"),
        ({"n_heads": True}, "n_heads=true must be an integer"),
        ({"norm_eps": 0}, "norm_eps=0.0 must be > 0"),
        ({"norm_eps": "small"}, "norm_eps='small' must be a finite number"),
        ({"norm_type": "batchnorm"}, "norm_type='batchnorm' must be one of rms, layernorm, dyt, derf"),
        ({"norm_placement": "sandwich"},
         "norm_placement='sandwich' must be one of pre, peri, post, deepnorm, hybrid, hybrid_star, pre_post"),
        ({"embed_scale": "yes"}, "embed_scale='yes' must be one of none, learnable, constant"),
        ({"position": "alibi"}, "position='alibi' must be one of rope, learned, none"),
        ({"mlp": "geglu"}, "mlp='geglu' must be one of swiglu, gelu, gelu_tanh, relu2"),
        ({"init_scheme": "kaiming"}, "init_scheme='kaiming' must be one of normal, xavier_uniform, xavier_normal"),
        ({"param_dtype": "float16"}, "param_dtype='float16' must be one of float32, bfloat16"),
        ({"fused_qkv": "yes"}, "fused_qkv='yes' must be true or false"),
        ({"embed_norm": 1}, "embed_norm=1 must be true or false"),
        ({"rope_scaling": "yarn"}, "rope_scaling='yarn' must be one of none, llama3"),
        ({"rope_scaling": "llama3", "position": "learned"}, "rope_scaling=llama3 needs position=rope"),
        ({"rope_scaling": "llama3", "rope_low_freq_factor": 4.0}, "rope_low_freq_factor=4.0 must be > 0 and <"),
        ({"rope_scaling": "llama3", "rope_scaling_factor": 0.5}, "rope_scaling_factor=0.5 must be >= 1 when"),
        ({"init_std": -0.1}, "init_std=-0.1 must be > 0"),
        ({"norm_placement": "deepnorm", "residual_scaling": True},
         "residual_scaling=true is not allowed with norm_placement=deepnorm"),
        ({"norm_placement": "hybrid", "qk_norm": True}, "qk_norm=true is not allowed with norm_placement=hybrid"),
        ({"norm_placement": "hybrid_star", "qk_norm": True},
         "qk_norm=true is not allowed with norm_placement=hybrid_star"),
        ({"residual_scaling": "no"}, "residual_scaling='no' must be true or false"),
        ({"rope_theta": 10**400}, "must be a finite number"),  # was an OverflowError from math.isfinite
        ({"n_heads": np.bool_(True)}, "n_heads=true must be an integer"),
        # past float32's range: inf parameters with only a numpy warning, or NaN logits in JAX alone (RoPE)
        ({"norm_type": "dyt", "attn_alpha_init": 1e39}, "attn_alpha_init=1e+39 is past float32's range"),
        ({"shift_init": -1e300}, "shift_init=-1e+300 is past float32's range"),
        ({"init_std": 1e300}, "init_std=1e+300 must be <= 2.1e37: its draws must fit float32"),
        ({"norm_eps": 1e-320}, "norm_eps=1e-320 is 0 in float32: it must be a normal float32 number"),
        ({"max_seq_len": 2**31}, "max_seq_len=2147483648 must be <= 2,147,483,647 (positions are int32"),  # a RoPE
        # error naming rope_theta from 10**400 on
        ({"rope_theta": 1e-300}, "rope_theta=1e-300 gives RoPE angles past float32's range"),
    ],
)
def test_each_rule_names_field_value_and_rule(changes, message):
    with pytest.raises(SpecError) as e:
        load_spec({**BASE, **changes})
    assert message in str(e.value)


def test_residual_scaling_unset_is_on_except_under_deepnorm():
    """Unset, `residual_scaling` resolves to on (and to off under deepnorm, whose β init replaces it); the resolved
    value is what a spec file records, so equal architectures stay equal specs."""
    assert load_spec(BASE).residual_scaled and load_spec({**BASE, "residual_scaling": True}) == load_spec(BASE)
    deep = load_spec({**BASE, "norm_placement": "deepnorm"})
    assert not deep.residual_scaled and deep.to_dict()["residual_scaling"] is False
    assert (load_spec(deep.to_dict()) == deep
            == load_spec({**BASE, "norm_placement": "deepnorm", "residual_scaling": False}))


def test_every_placement_has_a_row_in_the_placement_table():
    from shared_config.placement import PLACEMENTS
    from shared_config.spec import CHOICES

    assert set(PLACEMENTS) == set(CHOICES["norm_placement"])


def test_every_mixer_has_a_base_spec():
    """MIXERS (support/common.py) is written by hand: a mixer added to the spec's CHOICES fails here until it has the
    changes that make a spec of it, which the grids holding every mixer start from."""
    assert set(MIXERS) == set(CHOICES["mixer"]), "add the mixer's row to MIXERS in parity_tests/support/common.py"
    assert all(make_spec(**changes).mixer == mixer for mixer, changes in MIXERS.items())


def test_extreme_but_representable_values_are_accepted():
    tiny = float(np.finfo(np.float32).tiny)  # float32's smallest normal number
    assert load_spec({**BASE, "rope_theta": 1e308, "norm_eps": tiny, "attn_alpha_init": -3e38}).rope_theta == 1e308
    assert load_spec({**BASE, "rope_theta": 1e-300, "position": "learned"}).rope_theta == 1e-300  # no RoPE: unused
    assert load_spec({**BASE, "rope_theta": 0.5}).rope_theta == 0.5


def test_odd_head_dim_is_fine_without_rope():
    assert load_spec({**BASE, "head_dim": 7, "position": "learned"}).E == 7


def test_missing_required_key_and_bad_sources(tmp_path):
    with pytest.raises(SpecError, match="missing required key.*vocab_size"):
        load_spec({k: v for k, v in BASE.items() if k != "vocab_size"})
    with pytest.raises(SpecError, match="no spec preset or file named 'nope'"):
        load_spec("nope")
    with pytest.raises(SpecError, match=f"spec '{tmp_path}' is a directory; give a preset name or a YAML file"):
        load_spec(tmp_path)  # it said "no spec preset or file named", of a path that exists
    with pytest.raises(SpecError, match="spec '/dev/null' is not a regular file \\(a device, a pipe or a socket\\)"):
        load_spec("/dev/null")  # the same
    for link, target in (("loop.yaml", "loop.yaml"), ("dangling.yaml", "gone.yaml")):
        (tmp_path / link).symlink_to(target)
        # (a long path is shortened in the middle by quote(): the link's own name ends it)
        with pytest.raises(SpecError, match=f"^spec '.*{link}' is a symbolic link that leads to no file "
                                            rf"\(a loop of links, or a target that does not exist: '{target}'\)$"):
            load_spec(tmp_path / link)
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML at line 2, column 1: expected ',' or ']'"):
        load_spec(bad)
    # PyYAML's first line was its context alone ("while scanning for the next token"), and the file was named twice
    bad.write_text("vocab_size: 80\n\td_model: 32\n")
    with pytest.raises(SpecError) as e:
        load_spec(bad)
    assert str(e.value) == (f"{bad}: the spec file is not valid YAML at line 2, column 1: found character '\\t' that "
                            "cannot start any token")
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="bad.yaml: the spec file must hold a mapping"):
        load_spec(bad)
    bad.write_bytes(b"d_model: \xff\xfe\n")
    with pytest.raises(SpecError, match="bad.yaml: the spec file is not UTF-8 text"):
        load_spec(bad)
    with pytest.raises(SpecError, match=r"mlp=\['swiglu'\] must be one of swiglu, "):  # not a TypeError (unhashable)
        load_spec({**BASE, "mlp": ["swiglu"]})


def test_every_enum_value_is_accepted():
    for field, values in CHOICES.items():
        for value in values:
            extra = {"position": "rope"} if field == "rope_scaling" else {}
            extra = MIXERS[value] if field == "mixer" else extra  # the mixer's rules
            assert getattr(load_spec({**BASE, **extra, field: value}), field) == value


def test_overrides_parse_yaml_scalars():
    overrides = parse_overrides(["n_layers=4", "norm_eps=1e-5", "qk_norm=true", "norm_type=dyt"])
    assert overrides == {"n_layers": 4, "norm_eps": 1e-5, "qk_norm": True, "norm_type": "dyt"}
    assert load_spec({**BASE, **overrides}).norm_eps == 1e-5
    with pytest.raises(SpecError, match="must look like key=value"):
        parse_overrides(["n_layers"])
    with pytest.raises(SpecError, match=r"--set 'd_model=\[1': the value is not a YAML scalar"):
        parse_overrides(["d_model=[1"])


def test_float_looking_values_are_numbers_in_every_yaml_read(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e30`, `1e-3`, `3e4` (no dot) and `1.0e5` (no exponent sign) as strings: a float field
    converted them, but a study's JSON recorded `"lr": "1e30"`, the string, as its change.
    Every YAML read (--set, --sweep, spec and train config files) takes them as numbers; a non-finite one is refused
    by name, and an integer field refuses a float."""
    from shared_config import load_train_config

    values = {"1e-3": 1e-3, "1e30": 1e30, "3e4": 3e4, "1.0e5": 1e5, "-2E-2": -0.02, ".5e1": 5.0, "1.5": 1.5, "3": 3}
    for text, number in values.items():
        parsed = parse_overrides([f"lr={text}"])["lr"]
        assert parsed == number and type(parsed) is type(number), text
    assert parse_overrides(["x=nan", "y=e5", "z=1e"]) == {"x": "nan", "y": "e5", "z": "1e"}  # no number: as given
    (tmp_path / "cfg.yaml").write_text("lr: 2e-3\nsteps: 40\nwarmup_steps: 4\n")
    assert load_train_config(tmp_path / "cfg.yaml").lr == 2e-3
    (tmp_path / "spec.yaml").write_text("".join(f"{k}: {v}\n" for k, v in {**BASE, "rope_theta": "5e5"}.items()))
    assert load_spec(tmp_path / "spec.yaml").rope_theta == 5e5
    for text in ("1e400", ".inf", "-.inf", "nan", ".nan", "inf"):
        with pytest.raises(SpecError, match="lr=.* must be a finite number"):
            load_train_config("cpu").replace(**parse_overrides([f"lr={text}"]))
    with pytest.raises(SpecError, match="steps=30000.0 must be an integer"):
        load_train_config("cpu").replace(**parse_overrides(["steps=3e4"]))


def test_integers_read_as_written():
    """YAML 1.1 reads a leading zero as octal (`--set n_layers=010` built 8 layers) but `08` as text, and `1:30` as
    base 60 (`--set steps=1:30` ran 90 steps). As YAML 1.2's core schema reads them: decimal, and text an integer field
    refuses (so are YAML 1.1's `1_000` and `0b11`)."""
    assert parse_overrides(["a=010", "b=08", "c=-007", "d=0x1f", "e=+1", "f=0"]) == {
        "a": 10, "b": 8, "c": -7, "d": 31, "e": 1, "f": 0}
    assert parse_overrides(["a=1:30", "b=1:30.5"]) == {"a": "1:30", "b": "1:30.5"}
    with pytest.raises(SpecError, match="n_layers='1:30' must be an integer"):
        load_spec({**BASE, **parse_overrides(["n_layers=1:30"])})
    assert load_spec({**BASE, **parse_overrides(["n_layers=010"])}).n_layers == 10


def test_yaml_1_2_octal_and_values_a_tag_cannot_read():
    """YAML 1.2's `0o17` is fifteen (YAML 1.1 read text, which an integer field refused). A value its explicit tag
    cannot read (`!!int 96.0`, `!!float abc`, `!!bool maybe`) was the constructor's ValueError or KeyError, a
    traceback from --set, --sweep and spec files alike: a YAML error, one line naming the tag, in every reader."""
    assert parse_overrides(["a=0o17", "b=!!int 0o17", "c=0o8"]) == {"a": 15, "b": 15, "c": "0o8"}
    for value, says in (("!!int 96.0", "'96.0' cannot be read as !!int"),
                        ("!!float abc", "'abc' cannot be read as !!float"),
                        ("!!bool maybe", "'maybe' cannot be read as !!bool"),
                        ('!!float ""', "'' cannot be read as !!float")):
        with pytest.raises(SpecError, match=re.escape(f"the value is not a YAML scalar ({says})")):
            parse_overrides([f"d_model={value}"])
        with pytest.raises(yaml.YAMLError, match=re.escape(says)):
            parse_yaml(f"d_model: {value}\n")


def test_replace_rederives_what_was_never_set():
    """`--set n_heads=...` on a preset that leaves head_dim and n_kv_heads derived must re-derive them."""
    tiny = load_spec("tiny")  # head_dim unset: d_model // n_heads = 16
    assert tiny.replace(d_model=192).E == 32 and tiny.replace(n_heads=4, n_kv_heads=2).E == 24
    assert load_spec({**BASE, "head_dim": 8}).replace(d_model=128).E == 8  # set explicitly: kept
    mha = load_spec({k: v for k, v in BASE.items() if k != "n_kv_heads"})
    assert mha.replace(n_heads=2).K == 2


def test_a_stored_spec_is_a_mapping_never_a_preset_name_or_path():
    from shared_config import CheckpointError
    from shared_config.formats.checks import spec_from_json

    assert spec_from_json(load_spec("tiny").to_json(), "w.safetensors") == load_spec("tiny")
    for text in ('"tiny"', '"/etc/passwd"', "[1]"):
        with pytest.raises(CheckpointError, match="w.safetensors: invalid spec: a spec must be a mapping"):
            spec_from_json(text, "w.safetensors")


def test_numpy_scalars_are_read_as_the_numbers_they_are():
    """A size computed with numpy was refused as "vocab_size=np.int64(97) must be an integer" (np.float64 passed, being
    a float subclass, np.float32 did not); the spec holds plain Python numbers, so its JSON is the same."""
    spec = load_spec({**BASE, "vocab_size": np.int64(97), "n_heads": np.int32(6), "norm_eps": np.float32(1e-5),
                      "rope_theta": np.float16(10), "qk_norm": np.bool_(True)})
    assert type(spec.vocab_size) is int and type(spec.norm_eps) is float and spec.qk_norm is True
    assert spec == load_spec({**BASE, "norm_eps": float(np.float32(1e-5)), "rope_theta": 10.0, "qk_norm": True})
    assert spec.to_json() == load_spec(spec.to_dict()).to_json()


@pytest.mark.parametrize("source", [5, 1.5, [1], b"tiny", None])
def test_a_spec_source_of_another_type_is_a_spec_error(source):
    with pytest.raises(SpecError, match=f"a spec is given as a preset name, a YAML path or a mapping of keys, not "
                                        f"{type(source).__name__}"):
        load_spec(source)  # was a TypeError from Path(), naming no spec
