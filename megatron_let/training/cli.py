"""Command-line entry of the lean trainer: one-line errors, exit codes, no tracebacks for bad input."""

import os
import sys

from megatron_let.errors import CheckpointWriteError, LETConfigError, LETNonFiniteError
from megatron_let.training.arguments import ArgumentError, parse_args


def main(argv=None) -> int:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        args = parse_args(argv, world_size=world_size)
        from megatron_let.preflight import check_launch

        check_launch(args, megatron_lm=False)  # before any process group or write
        from megatron_let.compat.cpu import enable_cpu_megatron  # heavy imports only for valid input
        from megatron_let.training.trainer import pretrain

        enable_cpu_megatron()  # only without CUDA
        from megatron_let.patch_registry import announce

        announce()

        from megatron_let.training.components import shutdown_parallel

        pretrain(args)
        shutdown_parallel()
    except (ArgumentError, LETConfigError) as error:
        _one_line(error)
        return 2
    except (LETNonFiniteError, CheckpointWriteError) as error:
        _one_line(error)
        return 1
    return 0


def _one_line(error: Exception) -> None:
    """Every rank hits the same error; rank 0 says it once, on one line (messages quoting a library's
    multi-line text included)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretrain_gpt_let.py: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
