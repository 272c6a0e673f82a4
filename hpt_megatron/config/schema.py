"""The root of the configuration tree and the loader used by every command."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hpt_megatron.config.algorithm import AlgorithmConfig
from hpt_megatron.config.base import from_dict, merge_and_resolve, to_dict, validate_tree
from hpt_megatron.config.data import DataConfig, RewardConfig
from hpt_megatron.config.fault import FaultConfig
from hpt_megatron.config.rollout import RolloutConfig
from hpt_megatron.config.sections import (
    CheckpointConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainerConfig,
)


@dataclass(kw_only=True)
class HPTConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)

    def __post_init__(self) -> None:
        # The algorithm's spec divides by the response budget where its preset says so.
        self.algorithm.response_budget = self.data.max_response_tokens

    def validate(self) -> None:
        """Checks across sections (each section checks its own keys)."""
        spec = self.algorithm.spec()
        replaces = spec.batch_rule == "demo_in_group" and spec.demos_replace_rollouts
        if replaces and self.rollout.n <= spec.demos_per_group:
            raise ValueError(
                f"rollout.n: {self.rollout.n} leaves no rollout beside the "
                f"{spec.demos_per_group} demonstration(s) per group (preset "
                f"'{self.algorithm.preset}' puts them in rollouts' places); raise rollout.n "
                "or set algorithm.options.demos_replace_rollouts=false"
            )


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> HPTConfig:
    """Load a YAML file (or nothing) over the defaults, apply ``key.sub=value`` overrides, resolve
    interpolations (``${run.name}``, ``${oc.env:VAR}``), then build and validate the typed tree.

    Raises:
        ConfigError: naming the dotted key (or the file) of the first problem.
    """
    data = merge_and_resolve(to_dict(HPTConfig()), path, list(overrides or []))
    config = from_dict(HPTConfig, data)
    validate_tree(config)  # sections left at their defaults are checked too
    return config
