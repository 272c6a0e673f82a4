"""The SGLang engine of ``hpt train`` (``rollout.engine: sglang``) and the folder it serves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpt_megatron.config.rollout import RolloutConfig
from hpt_megatron.rollout.sglang.engine import SGLangEngine

if TYPE_CHECKING:
    from hpt_megatron.models.hf_config import HFModelConfig
    from hpt_megatron.rollout.sglang.nodes import NodeServerGroup


def build_sglang_engine(
    cfg: RolloutConfig,
    *,
    hf: HFModelConfig,
    tokenizer: Any,
    run_dir: str | Path,
    model_path: str | Path | None = None,
    nodes: NodeServerGroup | None = None,
) -> SGLangEngine:
    """The scheduler's entry point for ``rollout.engine: sglang``.

    With ``nodes`` (a run over several nodes), the engine drives the servers every node started
    (``nodes.start_node_servers``). Otherwise it launches this node's servers on ``serve_path``'s
    folder, or connects to ``rollout.sglang.urls``.
    """
    if cfg.sglang.urls:  # the user's servers serve their own model; the trainer's weights follow
        engine = SGLangEngine.connect(cfg.sglang, run_dir=run_dir)
    elif nodes is not None:
        assert nodes.endpoints is not None, "the driver holds every node's endpoints"
        endpoints, key = nodes.endpoints, nodes.api_key
        engine = SGLangEngine.over(endpoints, cfg.sglang, run_dir=run_dir, api_key=key)
    else:
        model_path = serve_path(hf, tokenizer, run_dir, model_path)
        engine = SGLangEngine.launch(cfg.sglang, model_path=model_path, run_dir=run_dir)
    if cfg.sglang.routed_experts:
        engine.record_routing(hf.num_experts_per_tok)
    return engine


def serve_path(
    hf: HFModelConfig, tokenizer: Any, run_dir: str | Path, model_path: str | Path | None
) -> Path:
    """The folder the servers start from: ``model_path`` (an HF folder) when given; otherwise a
    randomly initialised model of config ``hf`` plus ``tokenizer`` in
    ``<run_dir>/sglang_init_model``, the trainer then overwriting the weights at step 0 (fine for
    small models; for large ones pass the checkpoint folder)."""
    if model_path is not None:
        return Path(model_path)
    path = Path(run_dir) / "sglang_init_model"
    if not (path / "config.json").is_file():
        _write_init_model(hf, tokenizer, path)
    return path


def _write_init_model(hf: HFModelConfig, tokenizer: Any, path: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(hf.to_transformers()).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
