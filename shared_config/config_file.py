"""Reading and checking flat YAML configs (the model spec and the train config): the error type, unknown-key and
field-type checks with "did you mean" suggestions, presets by name or path, and `--set key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import yaml

from .limits import MAX_YAML_BYTES, LimitError, parse_yaml, quote, read_capped, shorten_numbers, yaml_number


class SpecError(ValueError):
    """A spec (or train config) that breaks a rule; the message names the field, the value and the rule, with numbers
    past limits.MAX_DIGITS digits cut (`shorten_numbers`), however the message quoted them."""

    def __init__(self, message: Any = ""):
        super().__init__(shorten_numbers(str(message)))


def from_mapping(cls, d: Mapping[str, Any], what: str):
    """`cls(**d)` for a dataclass of checked fields, once `d` is a mapping of known keys holding every required one."""
    if not isinstance(d, Mapping):
        raise SpecError(f"a {what} must be a mapping of keys to values, got {quote(d)}")
    check_keys(d, [f.name for f in fields(cls)], what)
    missing = [f.name for f in fields(cls) if f.default is dataclasses.MISSING and f.name not in d]
    if missing:
        raise SpecError(f"{what} is missing required key(s): {', '.join(missing)}")
    return cls(**d)


def did_you_mean(name: Any, valid: Iterable[str], cutoff: float = 0.5) -> str:
    """` (did you mean 'x'?)` for the valid name closest to `name` (difflib's ratio >= cutoff), else ''. For every
    error that looks a name up: keys, presets, choices, options."""
    close = difflib.get_close_matches(str(name)[:100], [str(v) for v in valid], n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_keys(d: Mapping[str, Any], valid: list[str], what: str) -> None:
    """Reject unknown keys, suggesting the closest valid one."""
    for key in d:
        if key not in valid:
            shown = quote(str(key))[1:-1]  # a hostile key may be megabytes long
            hint = did_you_mean(key, valid) or f"; valid keys: {', '.join(valid)}"
            raise SpecError(f"unknown {what} key '{shown}'{hint}")


def check_type(f: dataclasses.Field, value: Any, choices: Mapping[str, tuple], aliases: Mapping[str, dict] = {}) -> Any:
    """Check one field's type against its annotation (enum fields against `choices`); normalize aliases and ints given
    for floats."""
    name, kind = f.name, f.type
    if value is None and "None" in kind:
        return None
    if kind.startswith("int"):
        # numpy's integers too (a size computed with numpy), stored as int: a spec's JSON holds plain numbers
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise SpecError(f"{name}={quote(value)} must be an integer")
        if int(value).bit_length() > MAX_INT_BITS:  # a rule's message could not print it (str() raises past 4,300
            # digits)
            raise SpecError(f"{name}={quote(int(value))} is past every bound a field has")
        return int(value)
    if kind == "float":
        if isinstance(value, str) and (number := yaml_number(value)) is not None:
            # "1e-5" from a mapping given in Python, or a record written before parse_yaml read YAML 1.2's floats: read
            # as `--set` reads it (YAML 1.2; float() also took " 1.5", "1_0.5", "infinity" and other digits than 0-9)
            value = number
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) or not _finite(value):
            raise SpecError(f"{name}={quote(value)} must be a finite number")
        return float(value)
    if kind.startswith("bool"):
        if not isinstance(value, (bool, np.bool_)):
            yaml11 = isinstance(value, str) and value.lower() in YAML11_BOOLS
            raise SpecError(f"{name}={quote(value)} must be true or false"
                            + (" (YAML 1.2, which these files and --set follow, reads yes/no/on/off as text)" if yaml11
                               else ""))
        return bool(value)
    if not isinstance(value, str):
        raise SpecError(f"{name}={quote(value)} must be one of {', '.join(choices[name])}")
    value = aliases.get(name, {}).get(value, value)
    if value not in choices[name]:
        raise SpecError(f"{name}={quote(value)} must be one of "
                        f"{', '.join(choices[name])}{did_you_mean(value, choices[name])}")
    return value


MAX_INT_BITS = 4096  # integers given in Python (YAML and JSON stop at 4,300 digits): far past any field's bound
YAML11_BOOLS = ("yes", "no", "on", "off", "y", "n")  # booleans of YAML 1.1 (some readers), text in YAML 1.2


def _finite(x: numbers.Real) -> bool:
    """Whether `x` is finite as a float: an int past float's range (`10**400`) is not, and raises no OverflowError."""
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


FLOAT32_MAX, FLOAT32_NORMAL = float(np.finfo(np.float32).max), float(np.finfo(np.float32).tiny)  # 3.4e38, 1.2e-38
INT32_MAX = 2**31 - 1  # max_seq_len, rope_original_max_seq_len and dtf_window at most: positions are int32 in the twins


def check_float32(name: str, value: float, does: str, zero: bool = False) -> None:
    """Refuse (SpecError) a float field that float32 arithmetic cannot hold: past float32's range (inf there), or not
    0 yet 0 or subnormal in float32, where XLA flushes subnormals to 0 and torch keeps them (the twins would differ).
    `zero`: 0 itself is a value of the field; `does`: what the value does in float32, for the message."""
    with np.errstate(over="ignore"):
        f = np.float32(value)
    if np.isfinite(f) and (value == 0 or abs(f) >= FLOAT32_NORMAL):
        return
    problem = "past float32's range" if not np.isfinite(f) else "0 in float32" if f == 0 else "subnormal in float32"
    raise SpecError(f"{name}={value} is {problem}: it must be {'0 or ' if zero else ''}a normal float32 number, of "
                    f"magnitude 1.2e-38 to 3.4e38 ({does})")


def load_yaml(source: str | Path, what: str) -> dict[str, Any]:
    """Read a YAML mapping within the limits of `shared_config.limits` (size, nesting, aliases), turning parse
    errors into one-line errors (SpecError) that say what is wrong and where (line and column), not the file: the
    caller names it (load_preset_or_file)."""
    try:
        d = parse_yaml(read_capped(source, MAX_YAML_BYTES, f"{what} file").decode("utf-8"))
    except OSError as e:
        raise SpecError(f"cannot read the {what} file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SpecError(f"the {what} file is not UTF-8 text") from None
    except LimitError as e:
        raise SpecError(f"{what} file: {str(e).removeprefix(f'{source}: ')}") from None
    except yaml.YAMLError as e:  # PyYAML's first line was its context alone ("while scanning for the next token")
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError(f"the {what} file is not valid YAML{where}: {problem}") from None
    if not isinstance(d, dict):
        raise SpecError(f"the {what} file must hold a mapping of keys to values")
    return d


def yaml_names(presets: Path) -> list[str]:
    """The preset names (YAML file stems) in `presets`, sorted."""
    return sorted(p.stem for p in presets.glob("*.yaml"))


def load_preset_or_file(source: str | Path, presets: Path, what: str, from_dict: Callable[[dict], Any]) -> Any:
    """`from_dict` of the YAML that a preset name (a file in `presets`) or a path names; errors name the file."""
    if not isinstance(source, (str, os.PathLike)):  # Path(5) would be a TypeError naming no config; a Python
        # caller's value, named as Python writes it
        raise SpecError(f"a {what} is given as a preset name, a YAML path or a mapping of keys, not "
                        f"{type(source).__name__} {source!r:.80}")
    path = Path(source)
    if (presets / f"{source}.yaml").is_file() and path.suffix not in (".yaml", ".yml"):
        path = presets / f"{source}.yaml"
    elif str(source) and path.is_dir():  # "" is Path("."), a directory: it names no file (the message below)
        raise SpecError(f"{what} {quote(str(source))} is a directory; give a preset name or a YAML file")
    elif os.path.islink(path) and not path.exists():  # it said "no spec preset or file named" of a link that is there
        raise SpecError(f"{what} {quote(str(source))} is a symbolic link that leads to no file (a loop of links, or "
                        f"a target that does not exist: {quote(os.readlink(path))})")
    elif str(source) and path.exists() and not path.is_file():  # /dev/null, a pipe: "no spec preset or file named"
        raise SpecError(f"{what} {quote(str(source))} is not a regular file (a device, a pipe or a socket); give a "
                        "preset name or a YAML file")
    elif not path.is_file():
        names = yaml_names(presets)
        raise SpecError(f"no {what} preset or file named {quote(str(source))}{did_you_mean(source, names)}; "
                        f"presets: {', '.join(names)}")
    try:
        return from_dict(load_yaml(path, what))
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


def parse_overrides(items: list[str] | None, flag: str = "--set") -> dict[str, Any]:
    """`--set key=value` items as a dict, values parsed as YAML scalars (`8`, `1e-5`, `true`, `dyt`); errors name
    `flag`, the option the items came from."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"{flag} {quote(item)} must look like key=value")
        if key.strip() in out:  # the last one won without a word (`--set n_layers=2 --set n_layers=3`)
            raise SpecError(f"{flag} {key.strip()}: given twice; pass each key once")
        try:
            out[key.strip()] = parse_yaml(value) if value.strip() else value
        except (yaml.YAMLError, LimitError) as e:
            # a tag that cannot read its value says so: ('96.0' cannot be read as !!int)
            raise SpecError(f"{flag} {quote(item)}: the value is not a YAML scalar"
                            + (f" ({e.problem})" if isinstance(e, yaml.constructor.ConstructorError) else "")) from None
    return out
