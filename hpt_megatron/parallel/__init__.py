"""Process groups and the parallel math that needs them (the only reader of Megatron's state)."""

from hpt_megatron.parallel.runtime import (
    ParallelContext,
    check_world_size,
    init_distributed,
    shutdown_distributed,
)

__all__ = ["ParallelContext", "check_world_size", "init_distributed", "shutdown_distributed"]
