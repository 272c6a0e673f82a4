"""GPU only (skipped without CUDA or the SGLang venv): ``weight_sync: distributed`` over NCCL and
``tensor`` over CUDA IPC into a real SGLang server on the GPU, the same code as gloo and shared
memory on CPU (``tests/sglang``): every tensor of a push reads back equal, and a second push
too. A Llama model: SGLang 0.5.23's Qwen2 has no ``/get_weights_by_name``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.sglang_cpu import require_sglang, server_config
from tests.helpers.tiny_hf import build_tiny_model, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.sglang, pytest.mark.timeout(1200)]


@pytest.mark.parametrize("transport", ["distributed", "tensor"])
def test_gpu_push_reads_back_equal(tmp_path, transport):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    require_sglang()
    from hpt_megatron.rollout.sglang import SGLangEngine
    from hpt_megatron.rollout.weight_sync.distributed import Target, read_back

    model = build_tiny_model(tmp_path / "model", config=tiny_config("llama"))
    cfg = server_config(device="cuda", weight_sync=transport, router=False)
    cfg.mem_fraction_static = 0.2
    with SGLangEngine.launch(cfg, model_path=tmp_path / "model", run_dir=tmp_path) as engine:
        assert engine.transport.name == transport
        if transport == "distributed":
            assert engine.transport.backend == "nccl"  # type: ignore[attr-defined]
        targets = [Target(0, engine.servers[0].url, engine.servers[0].auth_headers())]
        for version in (1, 2):
            bucket = [
                (name, (p.detach() + 0.01 * version).cuda())
                for name, p in model.state_dict().items()
                if name != "lm_head.weight" or not model.config.tie_word_embeddings
            ]
            engine.update_weights([bucket], version)
            cpu = [(name, t.cpu()) for name, t in bucket]
            assert read_back(targets, iter([cpu]), 60.0) == len(bucket)
