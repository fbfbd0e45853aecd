"""Convert a checkpoint between the canonical safetensors file, torch, Flax (Orbax), Hugging Face and fla (GLA).

    python scripts/convert.py model.safetensors model.pt                 # -> torch state dict file
    python scripts/convert.py model.pt model-flax --to flax              # -> Orbax directory + spec.json
    python scripts/convert.py model-flax model-hf --to hf                # -> config.json + model.safetensors
    python scripts/convert.py model-hf model.safetensors --dtype bfloat16
    python scripts/convert.py gla.safetensors gla-fla --to fla           # -> flash-linear-attention GLA directory
    python scripts/convert.py bare_state_dict.pt model.safetensors --spec tiny

Every conversion is one path: SRC -> canonical numpy weights and spec -> checked against the layout
table (names, shapes, dtypes, NaN/Inf) -> cast if asked -> DST, written under a temporary name
beside it and renamed into place when complete, so that a failure leaves DST as it was.
"""

from __future__ import annotations

from pathlib import Path

from shared_config import CheckpointError, check_weights, fla, hf, np_dtype, save_checkpoint
from shared_config.cli import Parser, UsageError, check_input_outside, check_out_dir, run
from shared_config.data import tokenizer_beside
from shared_config.files import atomic_write, recover, resolved, write_errors
from shared_config.formats import (DIRECTORIES, FORMATS, SUFFIXES, checkpoint_path, quiet_libraries, read_any,
                                   source_format)
from shared_config.limits import MAX_JSON_BYTES
from shared_config.progress import writing


def _write_torch(path, weights, spec, force):
    # the frameworks load only when their format is written
    from shared_config.formats.torch_pt import save_state_dict_file

    save_state_dict_file(path, weights, spec)


def _write_flax(path, weights, spec, force):
    from shared_config.formats.orbax import save_orbax

    save_orbax(path, weights, spec, force)


# (path, weights, spec, force): a file is replaced by a rename anyway; a directory only when forced.
WRITERS = {
    "safetensors": lambda path, weights, spec, force: save_checkpoint(path, weights, spec),
    "torch": _write_torch,
    "flax": _write_flax,
    "hf": hf.write_hf,
    "fla": fla.write_fla,
}


# what marks a directory as a checkpoint convert.py writes: Hugging Face's and fla's config.json, Orbax's state/
CHECKPOINT_MARKERS = ("config.json", "state")


def target_format(dst: Path, to: str | None) -> str:
    """`--to`, else DST's extension, else the format of the directory already there."""
    if to is not None:
        return to
    if dst.suffix in SUFFIXES:
        return SUFFIXES[dst.suffix]
    if dst.is_dir() and ((dst / "config.json").is_file() or (dst / "state").is_dir()):
        return source_format(dst)
    raise UsageError(f"{dst}: cannot tell the format from the name; pass --to {'|'.join(FORMATS)}")


def check_destination(dst: Path, target: str, force: bool) -> None:
    """DST may exist only with --force, and then as what the target format writes (a file or a directory); a
    directory only when empty or a checkpoint (CHECKPOINT_MARKERS), so that --force never deletes unrelated files."""
    where = resolved(dst).parent if dst.is_symlink() else dst.parent  # a link is written through, to its target
    if not where.is_dir():
        raise UsageError(f"{where}: {'not a directory' if where.exists() else 'no such directory'}"
                         + (f" (where the link {dst} leads)" if dst.is_symlink() else ""))
    check_out_dir("DST", where)  # a read-only place: refused before the read, as every tool's output (exit 2)
    if not dst.exists():
        return
    if not force:
        raise UsageError(f"{dst} exists; pass --force to replace it")
    if dst.is_dir() != (target in DIRECTORIES):
        kind, other = ("a directory", "a file") if dst.is_dir() else ("a file", "a directory")
        raise UsageError(f"{dst} is {kind}, but a {target} checkpoint is {other}")
    if dst.is_dir() and not any((dst / name).exists() for name in CHECKPOINT_MARKERS) and any(dst.iterdir()):
        raise UsageError(f"{dst}: --force replaces only a checkpoint directory convert.py writes "
                         f"({' or '.join(CHECKPOINT_MARKERS)}), and this one holds neither; remove it yourself or "
                         "pick another DST")


def check_file_name(dst: Path, target: str) -> None:
    """A file format's DST must end in one of its extensions: the readers tell a file's format by it, so `--to torch`
    into x.safetensors wrote a file every reader refused with a misleading error (a header length of 10^17)."""
    if target not in DIRECTORIES and SUFFIXES.get(dst.suffix) != target:
        ends = " or ".join(s for s, f in SUFFIXES.items() if f == target)
        raise UsageError(f"{dst}: a {target} checkpoint is a file whose name ends in {ends} (the readers tell a "
                         "file's format by its extension); rename DST or change --to")


def source_tokenizer(src: Path) -> bytes | None:
    """The bytes of SRC's tokenizer.json (data.tokenizer_beside), which a directory DST holds too: generate.py
    --prompt encodes with the one beside the weights, and without it fell back to UTF-8 bytes as ids, other text.
    None where there is none (nor for one past MAX_JSON_BYTES, which no reader takes); one there that is no regular
    file (a dangling link, a directory) is refused, as generate.py refuses it: DST would have none, and bytes as ids."""
    path = tokenizer_beside(src)
    if not (path.exists() or path.is_symlink()):
        return None
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file (a link to nothing, a directory, a device): the "
                              "tokenizer.json beside SRC, which a directory DST holds too; put the file there or "
                              "remove it")
    return path.read_bytes() if path.stat().st_size <= MAX_JSON_BYTES else None


def convert(src, dst, to=None, spec=None, dtype=None, force=False, allow_nonfinite=False,
            quiet=True) -> tuple[str, str]:
    """SRC -> canonical weights and spec -> checked, cast -> DST (atomically); returns (source, target) formats.
    Not `quiet`: a bar of the bytes written on stderr, once the write takes a few seconds."""
    src, dst = Path(src), Path(dst)
    source_format(checkpoint_path(src))  # a missing, unknown or looped SRC is the first error, before DST's
    target = target_format(dst, to)
    recover(dst)  # a DST moved aside by a replace that was killed is DST again, before it is checked
    check_destination(dst, target, force)
    check_input_outside("DST", dst, "SRC", src)
    check_file_name(dst, target)
    weights, spec, source = read_any(src, spec)  # names, shapes, float dtypes checked: before any cast
    spec = spec.replace(param_dtype=dtype or spec.param_dtype)
    weights = {name: w.astype(np_dtype(spec.param_dtype), copy=False) for name, w in weights.items()}
    check_weights(weights, spec, src, allow_nonfinite)  # after the cast, which can overflow to inf
    tokenizer = source_tokenizer(src) if target in DIRECTORIES else None  # read before DST = SRC is replaced
    with write_errors(dst):  # a full disk is the environment's failure (exit code 3), whatever the writer raised
        with writing(dst, sum(w.nbytes for w in weights.values()), quiet):
            WRITERS[target](dst, weights, spec, force)
            if tokenizer is not None:
                atomic_write(dst / tokenizer_beside(src).name, lambda tmp: tmp.write_bytes(tokenizer))
    return source, target


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path, help="a .safetensors / .pt / .pth file, an Orbax, Hugging Face or "
                                          "flash-linear-attention directory, or a run's step-NNNNNNNN directory")
    p.add_argument("dst", type=Path, help="the file or directory to write")
    p.add_argument("--to", choices=FORMATS, help="the target format (default: from DST's extension)")
    p.add_argument("--spec", help="preset name or YAML path; required when SRC carries no spec (a bare state dict)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast floating tensors (and param_dtype)")
    p.add_argument("--force", action="store_true", help="replace an existing DST (a directory: one convert.py wrote)")
    p.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/Inf in the weights")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (shown for a write past a few seconds)")
    args = p.parse_args(argv)
    if not args.debug:
        quiet_libraries()
    source, target = convert(args.src, args.dst, args.to, args.spec, args.dtype, args.force, args.allow_nonfinite,
                             args.quiet)
    print(f"{args.src} ({source}) -> {args.dst} ({target})")


if __name__ == "__main__":
    run(main)
