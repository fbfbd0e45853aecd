"""What Triton's compiler makes of the JAX twin's Pallas GLA kernels for a GPU, measured without one.

    python bench/gla_triton.py [--batch 8 --heads 4 --tokens 2048 --key 96 --value 192] [--arch 90] [--json F]
    python bench/gla_triton.py --ir-only --out DIR      # the kernels' Triton IR as text, no compiler needed

Lowers the forward and backward of jax_model/gla_kernel.py for CUDA (jax.export) and catches each kernel's module
in the Triton dialect (TTIR) as Pallas' Triton lowering builds it (a hook on JAX's own lowering function). With the
`triton` package installed (`pip install triton`, about 600 MB; not a project dependency), each kernel is then
compiled for sm_<arch> with the warps and stages the kernel file launches it with (gla_kernel.LAUNCH), as XLA would
on the GPU, and ptxas reports per kernel: registers per thread, spill stores and loads (bytes of spill code), Triton's
shared memory (bytes) and the compile time (seconds, on this machine's CPU). Also per kernel: its number of dots,
and how many run on tensor cores (`inputPrecision = tf32x3`; a float32 dot in Triton runs as scalar FMAs). XLA
compiles these modules with the Triton inside jaxlib, not the `triton` package: the figures are a close stand-in.
The numbers in docs/gla.md came from here. The table goes to stdout a row at a time (`--json -`: the JSON alone, the
table to stderr); progress on stderr, a kernel at a time (a bar on a terminal, a plain line every 10 s otherwise;
--quiet: none).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from bench.runners import fd_to
from shared_config.cli import Parser, UsageError, at_least, check_out_dir, check_outputs, run
from shared_config.progress import progress
from shared_config.report import report_on_stdout, write_report


TARGET_GPU = "NVIDIA H200"  # the device kind the kernels are lowered for (sm_90, as --arch's default)


def kernel_ir(B: int, H: int, T: int, K: int, V: int) -> dict[str, str]:
    """The Triton-dialect module of each kernel (forward and backward of pallas_gla at [B, H, T, K|V]), as text."""
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.pallas.triton import lowering

    from jax_model.gla_kernel import pallas_gla

    modules, lower = {}, lowering.lower_jaxpr_to_triton_module

    def hooked(jaxpr, *args, **kwargs):
        result = lower(jaxpr, *args, **kwargs)
        modules[jaxpr.debug_info.func_name] = result.module.operation.get_asm(enable_debug_info=False)
        return result

    def loss(*xs):
        o, S = pallas_gla(*xs, interpret=False)
        return o.sum() + S.sum()

    shapes = [(B, H, T, K), (B, H, T, K), (B, H, T, V), (B, H, T, K), (B, H, K, V)]
    triton = "__gpu$xla.gpu.triton"
    # jax >= 0.11 asks the device for its compute capability while lowering; with no GPU here, an abstract H200 answers
    # (jax's own way to lower for a device that is not present)
    h200 = jax.sharding.AbstractDevice(device_kind=TARGET_GPU, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=h200)
    lowering.lower_jaxpr_to_triton_module = hooked
    try:
        with jax.sharding.use_abstract_mesh(mesh):
            export.export(jax.jit(jax.grad(loss, argnums=range(5))), platforms=["cuda"],
                          disabled_checks=[export.DisabledSafetyCheck.custom_call(triton)])(
                *(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
    finally:
        lowering.lower_jaxpr_to_triton_module = lower
    return modules


def dots(ir: str) -> tuple[int, int]:
    """(dots, of which on tensor cores in three TF32 passes) in a kernel's TTIR."""
    found = re.findall(r"tt\.dot [^\n]*", ir)
    return len(found), sum("inputPrecision = tf32x3" in d for d in found)


def compile_kernel(path: Path, arch: int, warps: int, stages: int) -> dict:
    """Compile one TTIR file with the `triton` package for sm_<arch>; ptxas' figures and the compile seconds."""
    import triton
    from triton.backends.compiler import GPUTarget

    log = path.with_suffix(".ptxas")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's report to file descriptor 1
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cached kernel would skip ptxas: no report, no compile time
    with open(log, "w") as sink, fd_to(1, sink):
        start = time.perf_counter()
        compiled = triton.compile(str(path), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        seconds = time.perf_counter() - start
    text = log.read_text()
    regs, spills = re.search(r"Used (\d+) registers", text), re.search(r"(\d+) bytes spill stores, (\d+) bytes spill "
                                                                        r"loads", text)
    return {"warps": warps, "stages": stages, "compile_s": round(seconds, 1),
            "registers": int(regs.group(1)) if regs else None,
            "spill_store_bytes": int(spills.group(1)) if spills else None,
            "spill_load_bytes": int(spills.group(2)) if spills else None, "shared_bytes": compiled.metadata.shared}


def parse_args(argv):
    p = Parser(description=__doc__.splitlines()[0])
    for flag, default in (("batch", 8), ("heads", 4), ("tokens", 2048), ("key", 96), ("value", 192), ("arch", 90)):
        p.add_argument(f"--{flag}", type=at_least(1), default=default, help=f"(default {default})")
    p.add_argument("--ir-only", action="store_true", help="write the kernels' TTIR to --out and compile nothing")
    p.add_argument("--out", type=Path, default=None, help="keep each kernel's TTIR and ptxas report here")
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.ir_only and args.out is None:
        raise UsageError("--ir-only writes the kernels' IR to --out: name a directory")
    check_outputs(args.json)
    if args.out is not None:
        check_out_dir("--out", args.out)
    if not args.ir_only:
        try:
            import triton  # noqa: F401
        except ImportError:
            raise UsageError("compiling needs the triton package (pip install triton); --ir-only needs none") from None
    from jax_model.gla_kernel import LAUNCH

    modules = kernel_ir(args.batch, args.heads, args.tokens, args.key, args.value)
    with contextlib.ExitStack() as stack:
        stack.enter_context(report_on_stdout(args.json))  # `--json -`: the table goes to stderr
        out = args.out or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        out.mkdir(parents=True, exist_ok=True)
        print(f"# Pallas GLA kernels, B {args.batch} H {args.heads} T {args.tokens} K {args.key} V {args.value}, "
              f"sm_{args.arch}")
        print("| kernel | dots (tf32x3) | warps | stages | registers | spill stores / loads B | shared B | compile s "
              "|\n|---|---|---|---|---|---|---|---|")
        rows = []
        # progress on stderr, a kernel at a time: a kernel's compile took from 1 s to past 25 minutes (docs/gla.md)
        for name, ir in progress(modules.items(), desc="ttir" if args.ir_only else "compile", unit="kernel",
                                 total=len(modules), quiet=args.quiet):
            path = out / f"{name}.ttir"
            path.write_text(ir)
            row = {"kernel": name, "dots": dots(ir)[0], "tf32x3_dots": dots(ir)[1]}
            if not args.ir_only:
                row |= compile_kernel(path, args.arch, *LAUNCH[name])
            rows.append(row)
            cells = ([row["warps"], row["stages"], row["registers"],
                      f"{row['spill_store_bytes']} / {row['spill_load_bytes']}", row["shared_bytes"], row["compile_s"]]
                     if not args.ir_only else [""] * 6)
            tqdm.write(f"| {name} | {row['dots']} ({row['tf32x3_dots']}) | {' | '.join(map(str, cells))} |",
                       file=sys.stdout)  # above a bar on a terminal, not into it
            sys.stdout.flush()
        if args.json:
            write_report(args.json, {"env": vars(args) | {"json": str(args.json), "out": str(args.out)},
                                     "results": rows}, complete=True)
    return 0


if __name__ == "__main__":
    run(main)
