"""The distributed torch runs of test_distributed_torch.py, under torchrun with 2 processes on gloo.

    python -m torch.distributed.run --standalone --nproc_per_node=2 parity_tests/support/distributed_torch_run.py DIR

From DIR/init.safetensors with DIR/train.json, eight runs: DDP, FSDP2, both with the step
torch.compile'd, FSDP2 with pytorch/pytorch#162338 planted (the reduce-scatter sums when asked
to average, as gloo did), and DDP, FSDP2 and compiled FSDP2 with the memory options;
each writes what parallel_runs.py says, plus FSDP2's placements and this rank's shard shapes, and
what the gradient-average probe saw, and (runs not compiled) a Trainer's validation losses over the ranks with the
rows each rank evaluated. Then DDP and FSDP2 in each subdirectory DIR/NAME (the routed variants,
parallel_common.ROUTED). Rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp._fully_shard import _fsdp_collectives

import torch_model
from parity_tests.support.parallel_runs import ignored_batch, masked_batch, read_config, save_run
from shared_config.parity import max_rel
from torch_model import distributed, train
from torch_model.loss import IGNORE_INDEX
from torch_model.trainer import Trainer

# every memory option (docs/training.md, "Training bigger models")
MEMORY = dict(grad_accum_steps=2, remat="block", loss_chunk=48)


@contextlib.contextmanager
def avg_sums():
    """Plant #162338 into FSDP2's own reduce-scatter (torch 2.13.0's gloo averages correctly)."""
    reduce_scatter = _fsdp_collectives.DefaultReduceScatter.__call__

    def summing(self, output_tensor, input_tensor, group, op, async_op=False):
        op = dist.ReduceOp.SUM if op == dist.ReduceOp.AVG else op
        return reduce_scatter(self, output_tensor, input_tensor, group, op, async_op)

    _fsdp_collectives.DefaultReduceScatter.__call__ = summing
    try:
        yield
    finally:
        _fsdp_collectives.DefaultReduceScatter.__call__ = reduce_scatter


def probe(parallel: str) -> dict:
    """The probe's gradient factor as FSDP2 reduces, and with its SUM-then-divide switch (1: averages, 2: sums)."""
    if parallel == "ddp":
        return {}
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return {"factor": distributed.probe_gradient_factor(mesh),
            "factor_force_sum": distributed.probe_gradient_factor(mesh, force_sum=True)}


def run(directory: Path, name: str, parallel: str, compile: bool = False, **changes) -> None:
    cfg = read_config(directory).replace(**changes)
    model = torch_model.from_safetensors(directory / "init.safetensors")  # every rank reads the file
    record = {"loss": [], "grad_norm": [], "probe": probe(parallel)}
    graphs_before = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, train_step = distributed.parallelize(model, cfg, parallel, compile=compile)
    record["warnings"] = [str(w.message) for w in caught if "162338" in str(w.message)]
    record["placements"] = {n: {"dim": p.placements[0].dim, "local": list(p.to_local().shape)}
                            for n, p in model.named_parameters() if parallel == "fsdp2"}
    for step in range(cfg.steps):
        state, metrics = train_step(state, *masked_batch(cfg, step, model.spec.V))
        record["loss"].append(float(metrics["loss"]))
        record["grad_norm"].append(float(metrics["grad_norm"]))
    record["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs_before  # dynamo's graphs of this run
    distributed.to_safetensors(model, directory / f"{name}.safetensors")
    canonical = train.get_train_state(model, state)  # FSDP2: every rank gathers the shards
    # loss_and_grads on the wrapped model (what the non-finite diagnosis replays) against one process's, same weights
    batch = masked_batch(cfg, cfg.steps, model.spec.V)
    one_process = torch_model.from_weights(canonical["weights"], model.spec)
    grads, ref = (train.loss_and_grads(m, *batch)[1] for m in (model, one_process))  # every rank: FSDP2 gathers
    record["inspect_grad_err"] = max(max_rel(grads[k], r) for k, r in ref.items())
    if not compile:
        record["eval"] = evaluate(model.spec, cfg, canonical, parallel)
    if dist.get_rank() == 0:
        save_run(directory, name, record, canonical)


def evaluate(spec, cfg, canonical: dict, parallel: str) -> dict:
    """The validation losses of a Trainer over the ranks (what loop.Loop.evaluate reads) on an ignored_batch (each row,
    so each rank, counting a different number of targets) and on its first 3 rows (a batch 2 ranks do not divide),
    with the rows each rank's forwards read per evaluation."""
    trainer = Trainer(spec, cfg, canonical, parallel=parallel)
    rows = []
    trainer.model.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    record = {}
    batch_BN = ignored_batch(cfg, cfg.steps + 1, spec.V, IGNORE_INDEX)
    for name, tokens_BN in (("even", batch_BN), ("odd", batch_BN[:3])):
        rows.clear()
        losses = trainer.fetch(trainer.eval_loss(tokens_BN))
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, rows[:])
        record[name] = {"losses": {k: float(v) for k, v in losses.items()}, "rows": seen}
    return record


if __name__ == "__main__":
    distributed.init_distributed()
    directory = Path(sys.argv[1])
    run(directory, "torch-ddp", "ddp")
    run(directory, "torch-fsdp2", "fsdp2")
    with avg_sums():
        run(directory, "torch-fsdp2-planted", "fsdp2")
    run(directory, "torch-ddp-compiled", "ddp", compile=True)
    run(directory, "torch-fsdp2-compiled", "fsdp2", compile=True)
    for parallel, compile in (("ddp", False), ("fsdp2", False), ("fsdp2", True)):  # 2 micro-batches of 2 rows per rank
        run(directory, f"torch-{parallel}-memory{'-compiled' * compile}", parallel, compile, **MEMORY)
    for variant in sorted(p for p in directory.iterdir() if p.is_dir()):  # routed variants (parallel_common.ROUTED)
        for parallel in ("ddp", "fsdp2"):
            run(variant, f"torch-{parallel}", parallel)
    dist.destroy_process_group()
