"""Long numbers in error messages (docs/spec.md, "The spec"): a number past limits.MAX_DIGITS digits is shown as its
first and last ten digits and its length, by one rule (`shorten_numbers`) that `quote`, every SpecError and every
command's error line apply: a 400-digit `--set` value was echoed whole."""

import re
from dataclasses import fields

import pytest

from shared_config import ModelSpec, SpecError, load_spec, load_train_config, parse_overrides
from shared_config.cli import UsageError, fail, run
from shared_config.limits import MAX_DIGITS, quote, shorten_numbers
from shared_config.train_config import TrainConfig

from ..support.common import BASE, load_script

LONG = "1234567890" * 40  # 400 digits
SHOWN = "1234567890...1234567890 (400 digits)"


def assert_short(message: str) -> None:
    assert not re.search(rf"\d{{{MAX_DIGITS + 1}}}", message) and len(message) < 400, message


@pytest.mark.parametrize("sign", ["", "-"])
def test_every_numeric_field_quotes_a_400_digit_value_shortened(sign):
    """Each int and float field of the spec and the train config, given 400 digits by --set: accepted (a size, which
    the memory check refuses later) or refused in a message that shows the number cut, with its digit count."""
    for cls, build in ((ModelSpec, lambda d: load_spec({**BASE, **d})), (TrainConfig, load_train_config)):
        for f in fields(cls):
            if f.type.split(" |")[0] not in ("int", "float"):
                continue
            try:
                build(parse_overrides([f"{f.name}={sign}{LONG}"]))
            except SpecError as e:
                assert_short(str(e))
                # the value, or a float field's refusal, named by the key given (d_model's odd head_dim said
                # "head_dim=2057613150...0205761315 (399 digits) must be even", a key the user never wrote)
                assert re.search(rf"\b{f.name}={sign}\d{{10}}\.\.\.\d{{10}} \(400 digits\)", str(e)) or (
                    f"{f.name}=" in str(e) and "a finite number" in str(e)), str(e)


def test_a_derived_head_dim_is_named_by_d_model():
    """d_model / n_heads odd under RoPE: the key given (d_model) is named, not head_dim, which was derived; a head_dim
    given is named as before."""
    with pytest.raises(SpecError, match=r"^d_model=54 must be an even multiple of n_heads=6 when position=rope: "):
        load_spec({**BASE, "d_model": 54})
    with pytest.raises(SpecError, match=r"^head_dim=9 must be even when position=rope$"):
        load_spec({**BASE, "head_dim": 9})


def test_quote_cuts_long_numbers_and_names_integers_repr_cannot_print():
    assert quote(int(LONG)) == SHOWN and quote(-int(LONG)) == f"-{SHOWN}"
    assert quote(LONG) == f"'{SHOWN}'" and quote(f"1:{LONG}") == f"'1:{SHOWN}'"
    assert quote([int(LONG), 10**20]) == f"[{SHOWN}, 100000000000000000000]"  # 21 digits: whole
    assert quote(10**5000) == "<an integer of about 5,000 digits>"  # repr() raises past 4,300 digits
    assert shorten_numbers(f"x={LONG}, y=1.5e+300, z=2,147,483,647") == f"x={SHOWN}, y=1.5e+300, z=2,147,483,647"
    assert str(SpecError(f"d_model={LONG} must be > 0")) == f"d_model={SHOWN} must be > 0"


def test_an_integer_given_in_python_past_every_bound_is_refused_by_name():
    """d_model = 10**5000 from Python: a rule's message raised ValueError (str() of an int past 4,300 digits)."""
    with pytest.raises(SpecError, match=r"^d_model=<an integer of about 5,000 digits> is past every bound"):
        load_spec({**BASE, "d_model": 10**5000})


def test_a_commands_error_line_cuts_long_numbers(tmp_path, capsys):
    """`init_checkpoint.py --set d_model=` 400 digits, `--seed` 5,000 (argparse's own message) and a UsageError: the
    one `error:` line shows each number cut."""
    main = load_script("init_checkpoint").main
    out = str(tmp_path / "w.safetensors")
    for argv in (["--spec", "tiny", "--set", f"d_model={LONG}", "--out", out],
                 ["--spec", "tiny", "--seed", "7" * 5000, "--out", out]):
        with pytest.raises(SystemExit) as e:
            run(main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert_short(err)
    with pytest.raises(SystemExit):
        fail(UsageError(f"--steps 3 and --set steps={LONG}: pass one of them"))
    assert capsys.readouterr().err == f"error: --steps 3 and --set steps={SHOWN}: pass one of them\n"


def test_a_long_run_of_digits_in_a_name_or_path_stays_whole(tmp_path, capsys):
    """A spec file in `run-20261206194600123456789012345/` (a timestamp to the nanosecond and a counter) was named
    `run-2026120619...6789012345 (29 digits)/spec.yaml` by its error line: a file that is not there. A run of digits
    inside a name or path stays whole up to MAX_NAME_DIGITS; a number, or a run longer than that, is cut as before."""
    from shared_config.limits import MAX_NAME_DIGITS

    folder = tmp_path / "run-20261206194600123456789012345"
    folder.mkdir()
    (folder / "spec.yaml").write_text("vocab_size: 64\nbogus: 1\n")
    with pytest.raises(SpecError) as e:
        load_spec(str(folder / "spec.yaml"))
    assert str(e.value).startswith(f"{folder / 'spec.yaml'}: unknown spec key 'bogus'")
    with pytest.raises(SystemExit):
        fail(UsageError(f"{folder}: d_model={LONG[:30]} and x{LONG}"))
    assert capsys.readouterr().err == (f"error: {folder}: d_model=1234567890...1234567890 (30 digits) and "
                                       f"x{SHOWN}\n")
    kept = "7" * MAX_NAME_DIGITS
    for name in (f"a_{kept}", f"{kept}.bin", f"/{kept}/", f"v-{kept}", f"{kept}-x"):
        assert shorten_numbers(name) == name
    assert shorten_numbers(f"={kept}") != f"={kept}" and shorten_numbers(f"'{kept}'") != f"'{kept}'"
    assert shorten_numbers(f"a_{kept}7") == f"a_7777777777...7777777777 ({MAX_NAME_DIGITS + 1} digits)"
