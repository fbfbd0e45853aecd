"""scripts/train.py under torchrun with one rank failing mid-run: rank 1 runs out of memory (planted) at its third
step, while rank 0 waits in that step's gradient all-reduce. test_train_scale_out.py runs it.

    python -m torch.distributed.run --standalone --nproc_per_node=2 parity_tests/support/failing_rank.py ARGS...
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import torch_model.trainer


def planted(step):
    """Trainer.step, raising MemoryError on rank 1's third call."""
    calls = 0

    def failing(self, tokens_BN):
        nonlocal calls
        calls += 1
        if os.environ.get("RANK") == "1" and calls == 3:
            raise MemoryError("planted: rank 1 out of memory")
        return step(self, tokens_BN)

    return failing


if __name__ == "__main__":
    torch_model.trainer.Trainer.step = planted(torch_model.trainer.Trainer.step)
    script = Path(__file__).resolve().parents[2] / "scripts" / "train.py"
    sys.argv = [str(script), *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
