"""Train either twin on the embedded synthetic corpus, a token file or text, with checkpoints either twin resumes.

    python scripts/train.py --backend jax                     # tiny on the synthetic corpus, ~20 s on 2 CPU cores
    python scripts/train.py --backend jax --spec tiny-dyt --out runs/dyt --steps 400 --stop-at 200   # DyT, half...
    python scripts/train.py --backend torch --out runs/dyt --resume   # ...the rest in PyTorch
    python scripts/prepare_data.py input.txt --out data/text --tokenizer bpe --vocab-size 2048
    python scripts/train.py --backend torch --data data/text --set lr=3e-3 --set steps=2000

Both twins read the same batches (a pure function of the seed and the step) and write the same
checkpoints (canonical weights and AdamW moments), so a run continues in either framework.
Progress goes to stderr, metrics to OUT/metrics.jsonl, a JSON summary to stdout. Bad input is one
`error:` line and exit code 2; a non-finite loss or gradient stops the run with exit code 1, naming
the step and the first tensor that went non-finite, and keeps the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from shared_config.cli import USER_ERRORS, Parser, at_least, fail, nonempty, run as run_main
from shared_config.compile_cache import add_compile_cache_option, use_compile_cache
from shared_config.data import TOKEN_DTYPES
from shared_config.files import first_missing, json_text
from shared_config.loop import Loop, NonFiniteError, trainer_factory
from shared_config.parallel import mesh_devices, rows_per_shard, torchrun_error, world_size
from shared_config.resources import ResourceError, is_out_of_memory
from shared_config.run import (
    BACKENDS, DEFAULT_CADENCE, DEFAULT_EVAL_BATCHES, DEFAULT_SPEC, DEFAULT_TRAIN_CONFIG, RESUME_MEMORY, SPEC_KEYS,
    TRAIN_KEYS, is_main_process, refuse_used_out, resolve_run, resumed_checkpoint,
)
from shared_config.run_dir import (
    CADENCE_MIN, latest_checkpoint, lock_run, recover_run_dir, remove_run_files, run_file_ids,
)
from shared_config.twins import twin


def parse_args(argv: list[str] | None):
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=BACKENDS, help="the twin that trains")
    p.add_argument("--spec", help=f"preset name or YAML path (default: {DEFAULT_SPEC} with the data's vocabulary size)")
    p.add_argument("--train-config", help=f"train preset name or YAML path (default: {DEFAULT_TRAIN_CONFIG})")
    p.add_argument("--set", action="append", type=p.key_item(SPEC_KEYS + TRAIN_KEYS, "spec or train config"),
                   metavar="KEY=VALUE", help="override a spec or train config key (repeatable)")
    p.add_argument("--data", type=nonempty,
                   help="synthetic[:SEED] (default), a prepare_data.py directory, a .bin/.npy token file, or text")
    p.add_argument("--data-dtype", choices=TOKEN_DTYPES,
                   help="dtype of a .bin token file (default: its meta.json, else uint16)")
    p.add_argument("--out", type=Path, help="the run directory (default: runs/SPEC)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out, written by either twin")
    p.add_argument("--init-from", type=Path, help="start from these weights (any format convert.py reads)")
    p.add_argument("--steps", type=at_least(1),
                   help="total updates (the schedule's length); shorthand for --set steps=N")
    p.add_argument("--seed", type=at_least(0), help="init and batch-order seed; shorthand for --set seed=N")
    p.add_argument("--stop-at", type=at_least(1),
                   help="stop after this update without changing the schedule (resume later)")
    cadence = {"log_every": "fetch metrics and log alpha/shift/embed_scale every N steps",  # run_dir.CADENCE_MIN's
               "eval_every": "validation loss every N steps (0: at the end only)",
               "save_every": "checkpoint every N steps (0: at the end only)",
               "keep": "keep the newest K checkpoints (0: all)"}
    for key, what in cadence.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=at_least(CADENCE_MIN[key]),
                       help=f"{what}; default {DEFAULT_CADENCE[key]}, or the resumed run's")
    p.add_argument("--eval-batches", type=at_least(1),
                   help=f"validation batches per evaluation (default {DEFAULT_EVAL_BATCHES}, or the resumed run's)")
    p.add_argument("--compile", action="store_true", help="torch: torch.compile the steps (JAX always jits)")
    p.add_argument("--devices", type=at_least(1), help="JAX: data-parallel over N devices (a data=N mesh)")
    p.add_argument("--mesh", help="JAX: a device mesh, e.g. data=2,fsdp=4 (parameters and moments over fsdp)")
    p.add_argument("--parallel", choices=["ddp", "fsdp2"],
                   help="torch under torchrun: DDP or FSDP2 (default under torchrun: ddp)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_compile_cache_option(p)
    args = p.parse_args(argv)
    check_scale_out(p, args)
    args.out = args.out if args.out is not None else Path("runs") / Path(args.spec or DEFAULT_SPEC).stem
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def check_scale_out(p, args) -> None:
    """--devices/--mesh go with JAX, torchrun with torch; on CPU a JAX mesh needs that many host devices, which
    XLA reads once, before JAX starts (GPUs are counted as they are)."""
    torchrun = world_size() > 1  # world_size checks WORLD_SIZE (0 would divide the batch by 0)
    if args.devices and args.mesh:
        p.error("--devices N and --mesh: pass one (--devices N is --mesh data=N)")
    devices = mesh_devices(args.mesh, args.devices)  # `--mesh ''` ran unsharded; 2,000 CPU devices took 17 GB
    if (args.devices or args.mesh) and args.backend != "jax":
        p.error("--devices/--mesh scale the JAX twin; the torch twin scales out under torchrun (--parallel ddp|fsdp2)")
    if error := torchrun_error(args.parallel, args.backend == "torch", "scripts/train.py"):
        p.error(error)
    if args.compile and args.backend == "jax":  # it was ignored without a word
        p.error("--compile: torch.compile steers the torch twin's steps; the JAX twin always jits (drop --compile)")
    args.parallel = args.parallel or ("ddp" if torchrun else None)
    args.mesh = args.mesh or (f"data={args.devices}" if args.devices else None)
    args.shards = devices or world_size()  # what the global batch splits over
    if devices:
        os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                                   f"--xla_force_host_platform_device_count={devices}").strip()


def main(argv=None):
    args = parse_args(argv)
    run = resolve_run(args)
    # the global batch splits evenly, and each shard's rows into the micro-batches, or fail before any work
    rows_per_shard(run.cfg.batch_size, args.shards, run.cfg.grad_accum_steps)
    use_compile_cache(args.compile_cache)
    if args.backend == "jax":
        from jax_model.distributed import init_distributed

        init_distributed()  # several JAX processes: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
        from jax_model.attention import device_platform

        device_platform()  # JAX_PLATFORMS naming a missing platform: one error line before the run directory is made
    made = first_missing(run.out)  # the first directory this run makes on --out's path (lock_run makes them all)
    finished = False
    try:
        trainer = twin(args.backend, "trainer").Trainer  # imported when chosen: one framework starts
        make_trainer = trainer_factory(trainer, run, args.compile or None, args.mesh or args.parallel)
        with lock_run(run.out) if is_main_process() else contextlib.nullcontext():
            if is_main_process():
                recover_run_dir(run.out)  # what a killed run left: half-built checkpoints, a cut-short prune
                if latest_checkpoint(run.out) != (resumed_checkpoint(args)[0] if args.resume else None):
                    raise ResourceError(f"{run.out}: another process wrote a checkpoint while this run started")
                if not args.resume:  # another fresh run's files, written (and left) while this one started
                    refuse_used_out(run.out, tokenizer=run.data.tokenizer)
            loop, before = None, run_file_ids(run.out)
            try:
                loop = Loop(run, make_trainer, progress=not args.quiet)
                summary = loop()
            except (KeyboardInterrupt, *USER_ERRORS) as e:  # Ctrl-C, SIGTERM ("partial outputs removed") or bad
                # input found as the run starts (RANK without torchrun's other variables), before its first step:
                # with no checkpoint, what this run wrote goes (else run.json, lock and metrics of a run that cannot
                # be resumed would stay): the directories it made, or its files in a --out it was given; an error of
                # a run that stepped keeps its metrics, as a full disk does
                set_up = isinstance(e, KeyboardInterrupt) or loop is None or not loop.stepping
                if is_main_process() and latest_checkpoint(run.out) is None and set_up:
                    if made:
                        shutil.rmtree(made, ignore_errors=True)
                    else:
                        remove_run_files(run.out, before)
                raise
        finished = True
    except NonFiniteError as e:
        fail(str(e), 1)
    except Exception as e:
        if args.parallel and twin("torch", "distributed").peer_left(e):  # was this rank's traceback, beside the
            # failing rank's own error line (rank 1 out of memory: rank 0's gloo "Connection closed by peer")
            fail("another rank of this torchrun left the process group (its error line above, or torchrun's summary "
                 "of its exit code, says why); this rank stopped with it", 1)
        if is_out_of_memory(e):  # a resume keeps its batch (check_resume): "lower them" led to that refusal
            lower = RESUME_MEMORY if args.resume else "lower them (--set batch_size=N, --set seq_len=N)"
            raise ResourceError(f"the {args.backend} training job ran out of memory at batch {run.cfg.batch_size} x "
                                f"seq {run.cfg.seq_len}: {lower}") from e
        raise
    finally:
        if args.parallel and not finished:  # an error: leave the group without waiting for the other ranks
            from torch_model.distributed import close_distributed

            close_distributed(finished=False)
    if is_main_process():
        print(json_text(summary))
    if args.parallel:  # everything is written: leave without torch's teardown at exit (exit_rank says why)
        from torch_model.distributed import exit_rank

        exit_rank()


if __name__ == "__main__":
    run_main(main)
