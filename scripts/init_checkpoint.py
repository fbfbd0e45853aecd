"""Write a canonical checkpoint drawn by the framework-neutral numpy init.

    python scripts/init_checkpoint.py --spec tiny-dyt --seed 0 --out tiny-dyt.safetensors
"""

from __future__ import annotations

from pathlib import Path

from shared_config import load_spec, parse_overrides, save_checkpoint
from shared_config.cli import Parser, UsageError, check_not_inputs, check_out_dir, run
from shared_config.files import resolved
from shared_config.formats.safetensors import check_tensor_count
from shared_config.init import iter_init_weights
from shared_config.progress import QUICK_S, progress, writing
from shared_config.resources import weights_bytes
from shared_config.run import SPEC_KEYS


def main(argv=None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="preset name or YAML path")
    p.add_argument("--set", action="append", type=p.key_item(SPEC_KEYS, "spec"), metavar="KEY=VALUE",
                   help="override a spec key (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="init seed")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (shown past a few seconds)")
    args = p.parse_args(argv)
    spec = load_spec(args.spec)
    if args.set:
        spec = spec.replace(**parse_overrides(args.set))
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.out.is_dir():
        raise UsageError(f"{args.out} is a directory; a checkpoint is a file")
    if args.out.suffix != ".safetensors":  # the loaders tell a format by its extension: a.pt would be refused
        raise UsageError(f"--out {args.out}: init_checkpoint.py writes safetensors, so the name must end in "
                         ".safetensors; convert.py makes the other formats (.pt, Orbax, Hugging Face) from it")
    check_not_inputs([("--out", args.out)], [("--spec", args.spec)])  # --force through a link to the spec file
    if args.out.exists() and not args.force:
        raise UsageError(f"{args.out} exists; pass --force to overwrite it")
    # where the file goes: a link's target's folder (a dangling link into a missing one failed after the draws)
    parent = resolved(args.out).parent
    if not parent.is_dir():
        where = args.out.parent if parent == resolved(args.out.parent) else f"{parent}, where the link leads,"
        raise UsageError(f"--out {args.out}: {where} is not a directory")
    check_out_dir("--out", parent)  # a read-only place: "Read-only file system", naming nothing
    draws, weights = iter_init_weights(spec, args.seed), {}  # its memory check comes first, before any draw
    check_tensor_count(spec)  # a file the readers take, refused before the draws
    with progress(total=weights_bytes(spec), desc="draw", unit="B", unit_scale=True, delay=QUICK_S,
                  quiet=args.quiet) as bar:
        for name, x in draws:
            weights[name] = x
            bar.update(x.nbytes)
    with writing(args.out, weights_bytes(spec), args.quiet):
        save_checkpoint(args.out, weights, spec)
    print(args.out)


if __name__ == "__main__":
    run(main)
