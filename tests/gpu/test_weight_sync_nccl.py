"""GPU only (skipped without CUDA or the SGLang venv): ``weight_sync: distributed`` over NCCL into
a real SGLang server on the GPU, the same code as gloo on CPU (``tests/sglang``): every tensor
of a push reads back equal, and a second push into the same group too."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.sglang_cpu import require_sglang, server_config
from tests.helpers.tiny_hf import build_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.sglang, pytest.mark.timeout(1200)]


def test_nccl_push_reads_back_equal(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    require_sglang()
    from hpt_megatron.rollout.sglang import SGLangEngine
    from hpt_megatron.rollout.weight_sync.distributed import Target, read_back

    model = build_tiny_model(tmp_path / "model")
    cfg = server_config(
        device="cuda", weight_sync="distributed", router=False, mem_fraction_static=0.2
    )
    with SGLangEngine.launch(cfg, model_path=tmp_path / "model", run_dir=tmp_path) as engine:
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
