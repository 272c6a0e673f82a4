"""The converter's schema on a machine with GPUs (simulated: torch.cuda.is_available() -> True
after the CPU process group is up): built on meta with local layers, never asking for
Transformer Engine or a CUDA tensor, and the same as on CPU.

    python schema_on_gpu_machine.py HF_DIR   # prints "OK <pieces>"
"""

from __future__ import annotations

import sys

import torch

from hpt_megatron.config.sections import ParallelConfig
from hpt_megatron.models import provider, torch_dist
from hpt_megatron.models.provider import load_hf_config
from hpt_megatron.parallel.runtime import init_distributed


def main() -> None:
    hf = load_hf_config(sys.argv[1])
    init_distributed(ParallelConfig())
    cpu = torch_dist.megatron_schema(hf, "bf16")
    torch.cuda.is_available = lambda: True  # as on a GPU machine

    def no_te(*_: object) -> bool:
        raise AssertionError("the schema must not ask for Transformer Engine")

    provider.use_transformer_engine = no_te
    gpu = torch_dist.megatron_schema(hf, "bf16")
    assert all(p.is_meta for p in gpu.params.values())
    assert gpu.pieces == cpu.pieces and gpu.objects.keys() == cpu.objects.keys()
    print("OK", len(gpu.pieces))


if __name__ == "__main__":
    main()
