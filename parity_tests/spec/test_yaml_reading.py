"""How a spec's and a train config's YAML is read (docs/spec.md, "The spec"): YAML 1.2's core schema, in every reader
(--set, --sweep, spec and train config files), and only there (yaml.SafeLoader keeps YAML 1.1)."""

import datetime
import re

import pytest
import yaml

from shared_config import SpecError, load_spec, load_train_config, parse_overrides
from shared_config.limits import BoundedLoader, parse_yaml, quote

from ..support.common import BASE

# The core schema's patterns as the YAML 1.2.2 spec writes them (section 10.3.2), the oracle of what is what
CORE = {
    "null": r"null|Null|NULL|~|",
    "bool": r"true|True|TRUE|false|False|FALSE",
    "int": r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+",
    "float": r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?(\.inf|\.Inf|\.INF)|\.nan|\.NaN|\.NAN",
}
SCALARS = [  # YAML 1.1's booleans, nulls, numbers and near misses of each
    "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF", "y", "Y", "n", "N", "yEs",
    "true", "True", "TRUE", "false", "False", "FALSE", "tRUE", "fALSE", "t", "f",
    "null", "Null", "NULL", "~", "nULL", "none", "None",
    "0", "+1", "-1", "010", "-007", "08", "0o17", "0o8", "+0o1", "-0o17", "0x1f", "0x1F", "-0x1f", "0b11", "1_000",
    "1:30", "1:30.5", "+.5", ".5", "-.5", "1.", "+1.", "1.e5", ".5e1", "+.5e-1", "1e-3", "1E3", "1e", "e5", ".", "+.",
    "._5", "1_0.5", "1.0e+5", ".inf", "-.Inf", "+.INF", ".NaN", "nan", "inf", "-inf", ".infinity", "2024-01-01",
    "2001-12-14t21:59:43.10-05:00", "=", "0.", "-0", "+0.0",
]


def core_kind(text: str) -> str:
    """What YAML 1.2's core schema makes of a plain scalar: its first matching kind, else str."""
    return next((kind for kind, pattern in CORE.items() if re.fullmatch(pattern, text)), "str")


@pytest.mark.parametrize("text", SCALARS)
def test_plain_scalars_are_read_by_the_core_schema(text):
    """`--set`, a spec file and a train config file read each scalar as YAML 1.2's core schema does: a boolean only
    for true/false (YAML 1.1's yes/no/on/off, in any case, were booleans), a float for `+.5` (YAML 1.1: text), no
    dates, no base 60, no `1_000` or `0b11`; and whatever is text comes back exactly as written."""
    expected = {"null": type(None), "bool": bool, "int": int, "float": float, "str": str}[core_kind(text)]
    for value in (parse_overrides([f"k={text}"])["k"], parse_yaml(f"k: {text}\n")["k"]):
        assert type(value) is expected, (text, value)
        if expected is str:
            assert value == text


def test_booleans_of_yaml_1_1_are_refused_by_the_fields_that_read_them(tmp_path):
    """`--set norm_type=off` was refused as `norm_type=False`, and `tie_embeddings: yes` tied the embeddings: now each
    is the text it is, which an enum field names as such and a boolean field refuses, in one line naming the field."""
    with pytest.raises(SpecError, match=r"norm_type='off' must be one of rms, "):
        load_spec({**BASE, **parse_overrides(["norm_type=off"])})
    with pytest.raises(SpecError, match=r"routing='no' must be one of none, mod, dtf \(did you mean 'none'\?\)"):
        load_spec({**BASE, **parse_overrides(["routing=no"])})
    spec = tmp_path / "spec.yaml"
    spec.write_text("".join(f"{k}: {v}\n" for k, v in {**BASE, "tie_embeddings": "yes"}.items()))
    with pytest.raises(SpecError, match=r"spec.yaml: tie_embeddings='yes' must be true or false \(YAML 1.2"):
        load_spec(spec)
    (tmp_path / "cfg.yaml").write_text("decay_embeddings: On\n")
    with pytest.raises(SpecError, match=r"cfg.yaml: decay_embeddings='On' must be true or false"):
        load_train_config(tmp_path / "cfg.yaml")
    for text, value in (("True", True), ("FALSE", False)):
        assert load_spec({**BASE, **parse_overrides([f"qk_norm={text}"])}).qk_norm is value
    with pytest.raises(SpecError, match=r"qk_norm='tRUE' must be true or false$"):
        load_spec({**BASE, **parse_overrides(["qk_norm=tRUE"])})


def test_nulls_leave_an_optional_field_unset():
    for text in ("null", "Null", "NULL", "~"):
        assert load_spec({**BASE, **parse_overrides([f"head_dim={text}", f"residual_scaling={text}"])}).E == 8
    with pytest.raises(SpecError, match=r"head_dim='nULL' must be an integer"):
        load_spec({**BASE, **parse_overrides(["head_dim=nULL"])})


def test_explicit_tags_read_only_the_core_forms():
    """`!!bool yes` was True and `!!int 1:30` the text '1:30': a tag reads what its type's core pattern allows, and
    anything else is one YAML error naming the tag, in --set and in files alike."""
    assert parse_overrides(["a=!!bool TRUE", "b=!!int 0x1F", "c=!!float 3", "d=!!float +.5", "e=!!str 5",
                            "f=!!null ~", "g=!!null"]) == {"a": True, "b": 31, "c": 3.0, "d": 0.5, "e": "5", "f": None,
                                                           "g": None}
    for value, says in (("!!bool yes", "'yes' cannot be read as !!bool"), ("!!int 1:30", "'1:30' cannot be read as "
                        "!!int"), ("!!int 1_000", "'1_000' cannot be read as !!int"),
                        ("!!float 1_0.5", "'1_0.5' cannot be read as !!float"),
                        ("!!null 4", "'4' cannot be read as !!null")):  # was None: n_kv_heads left unset
        with pytest.raises(SpecError, match=re.escape(f"the value is not a YAML scalar ({says})")):
            parse_overrides([f"d_model={value}"])
        with pytest.raises(yaml.YAMLError, match=re.escape(says)):
            parse_yaml(f"d_model: {value}\n")


def test_an_integer_past_pythons_digits_is_named_by_its_length():
    """5,000 digits: int()'s ValueError became "'1111...' cannot be read as !!int", as if it were no integer."""
    with pytest.raises(SpecError, match=r"\(5,000 digits\)' has more digits than the 4,300 Python reads"):
        parse_overrides(["d_model=" + "1" * 5000])


@pytest.mark.parametrize("text", SCALARS + ["١٢", "infinity", "1e400", "3"])
def test_a_float_field_reads_a_string_as_yaml_reads_it(text):
    """A string given for a float field in Python (`{"lr": "1e-3"}`, or a record written before YAML 1.2's floats
    were read) is the number YAML reads (`+.5` too), or refused where YAML reads text: float() had also taken "1_0.5",
    "infinity", " 1.5" and other digits than 0-9, which --set and the files refused or read otherwise."""
    def outcome(value):
        try:
            return load_train_config({"lr": value}).lr
        except SpecError as e:
            return str(e).partition(" must ")[2]

    assert outcome(text) == outcome(parse_yaml(f"k: {text}\n")["k"])


def test_a_float_field_refuses_strings_that_are_no_plain_yaml_number():
    for text in (" 1.5", "1.5 ", "1_0.5", "infinity", "١٢", "0b11", "1" * 5000):
        with pytest.raises(SpecError, match=rf"^lr={re.escape(quote(text))} must be a finite number$"):
            load_train_config({"lr": text})
    assert load_train_config({"lr": "+.5e-3"}).lr == 5e-4 and load_spec({**BASE, "norm_eps": "1e-5"}).norm_eps == 1e-5


def test_yaml_safe_load_keeps_reading_yaml_1_1():
    """The loader's table is its own (PyYAML's add_implicit_resolver copies the dict, not its lists): other code in the
    process that calls yaml.safe_load still gets YAML 1.1."""
    assert yaml.safe_load("[yes, 010, 1e-3, 1:30, 2024-01-01]") == [True, 8, "1e-3", 90, datetime.date(2024, 1, 1)]
    ours, theirs = BoundedLoader.yaml_implicit_resolvers, yaml.SafeLoader.yaml_implicit_resolvers
    assert not any(ours[first] is theirs.get(first) for first in ours)
    assert ("tag:yaml.org,2002:bool", yaml.SafeLoader.yaml_implicit_resolvers["y"][0][1]) in theirs["y"]
