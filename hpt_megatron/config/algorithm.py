"""The ``algorithm`` section: a preset name plus part-by-part overrides.

``AlgorithmOptions`` is generated from ``AlgorithmSpec``: one field per spec field, typed like it
but ``None`` by default ("the preset's value"), so the loader's one type checker checks options like
every other key, and a new spec field is an option without more code.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from hpt_megatron.config.algorithm_spec import AGGREGATION_ALIASES, AlgorithmSpec, OptionError
from hpt_megatron.config.presets import get_preset

STALE_TIS_CAP = 2.0  # decoupled PPO's default truncation for stale batches (verl's too)


def _options_class() -> type:
    hints = typing.get_type_hints(AlgorithmSpec)
    fields = [
        (f.name, hints[f.name] | None, dataclasses.field(default=None))
        for f in dataclasses.fields(AlgorithmSpec)
        if f.name != "name"
    ]
    cls = dataclasses.make_dataclass("AlgorithmOptions", fields, kw_only=True)
    cls.__module__ = __name__
    cls.__doc__ = "Overrides of the preset's ``AlgorithmSpec`` fields; ``None``: the preset's."
    cls.ALIASES = {"aggregation": AGGREGATION_ALIASES}  # type: ignore[attr-defined]
    cls.OMIT_NONE = True  # type: ignore[attr-defined]  # dumps list only the options set
    return cls


AlgorithmOptions: Any = _options_class()


@dataclass(kw_only=True)
class ReferenceConfig:
    """The frozen reference policy of the KL terms (built only when ``kl_coef > 0``).

    Its weights: ``load`` (a Megatron checkpoint) or ``hf_weights`` (an HF folder) of a model
    with the policy's architecture; neither: the policy's starting weights (``model.load``,
    ``model.hf_weights`` or the run's initial random weights). ``offload``: keep its weights in
    host memory between uses (GPU only; checked by preflight).
    """

    load: str | None = None
    hf_weights: str | None = None
    offload: bool = False

    def validate(self) -> None:
        if self.load and self.hf_weights:
            raise ValueError("load and hf_weights: set at most one source of the reference")

    @property
    def is_set(self) -> bool:
        return bool(self.load or self.hf_weights or self.offload)


@dataclass(kw_only=True)
class TeacherConfig:
    """The teacher: of the distillation part (``options.distill_coef > 0``), and of HPT's
    demonstrations that the dataset lacks (``options.teacher_route: generate``, which the driver
    has it write: on its ``urls``, or with ``hf_path`` in transformers on the driver's CPU).

    One source: ``hf_path``, a Hugging Face folder (``config.json``, safetensors, and its
    tokenizer when it has one) of a model of any size in the policy's architecture family,
    sharing the policy's vocabulary (checked by preflight), which the trainer builds frozen in
    the policy's TP/PP layout (``trainer/teacher.py``); or ``urls``, SGLang servers the user
    started with the teacher, which score every rollout's tokens before the update
    (``rollout/sglang/scoring.py``; they must serve a model of the policy's vocabulary).
    """

    hf_path: str | None = None
    urls: list[str] = field(default_factory=list)
    # urls: how long a teacher server that stopped answering is waited for before the run fails
    timeout_s: float = 900.0

    def validate(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.hf_path is not None and not self.hf_path:
            raise ValueError("hf_path: must name the teacher's Hugging Face folder, got ''")
        if self.hf_path and self.urls:
            raise ValueError("hf_path and urls: set one source of the teacher")
        for i, url in enumerate(self.urls):
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"urls[{i}]: {url!r} is not an http(s) URL")

    @property
    def is_set(self) -> bool:
        return bool(self.hf_path or self.urls)


@dataclass(kw_only=True)
class CriticConfig:
    """The value model of advantage ``gae`` (preset ``ppo``; built only then).

    The policy's architecture with a one-output head in place of the vocabulary, in the policy's
    layout. Its weights: ``load`` (a critic checkpoint, ``<run>/checkpoints/critic/step_N``),
    else the policy's starting weights with a zero head. Its own AdamW and schedule (the
    trainer's betas, eps and micro-batching). ``cliprange_value``: the PPO value clip around
    the values before the update (None: no clip). ``critic_warmup_steps``: the first steps train
    only the critic.
    """

    load: str | None = None
    lr: float = 1e-5
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    cliprange_value: float | None = 0.5
    critic_warmup_steps: int = 0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr: must be in [0, lr], got {self.min_lr}")
        if self.cliprange_value is not None and self.cliprange_value <= 0:
            raise ValueError(f"cliprange_value: must be > 0 (or null), got {self.cliprange_value}")
        for key in ("warmup_steps", "critic_warmup_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("grad_clip and weight_decay: must be >= 0")


@dataclass(kw_only=True)
class AlgorithmConfig:
    """``preset`` names an entry of ``PRESETS`` (``presets.py``); ``options`` override its fields
    by name (``algorithm.options.clip_high=0.28``). See docs/algorithms.md."""

    preset: str = "hpt"
    options: AlgorithmOptions = field(default_factory=AlgorithmOptions)  # type: ignore[valid-type]
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The run's data.max_response_tokens, bound by ``HPTConfig`` (not a key of the file): the
    # divisor of ``token_sum_norm`` when the spec's ``loss_agg_constant`` is None.
    response_budget: int | None = field(default=None, init=False, repr=False, compare=False)

    def overrides(self) -> dict[str, Any]:
        """The options that are set (not ``None``)."""
        values = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}
        return {k: v for k, v in values.items() if v is not None}

    def spec(self, max_staleness: int = 0) -> AlgorithmSpec:
        """The resolved, validated spec (raises ``ValueError`` naming the bad key).

        Batches generated by older weights (``run.max_staleness > 0``) get decoupled PPO's
        correction, ``tis_cap: 2`` at token level, unless the preset or the options already
        correct against the rollout engine (``tis_cap`` or ``mis_high``; see
        ``algorithms/corrections.py``).

        A ``loss_agg_constant`` left None by the preset (``hpt_paper``) and the options becomes
        the run's ``response_budget`` (``data.max_response_tokens``) when one is bound.
        """
        try:
            base = get_preset(self.preset)
        except ValueError as err:
            raise ValueError(f"preset: {err}") from None
        try:
            spec = base.with_options(**self.overrides())
        except OptionError as err:
            raise ValueError(f"options.{err.key}: {err.detail}") from None
        if spec.loss_agg_constant is None and self.response_budget is not None:
            spec = spec.with_options(loss_agg_constant=float(self.response_budget))
        if max_staleness > 0 and not spec.corrects_rollout:
            spec = spec.with_options(tis_cap=STALE_TIS_CAP)
        return spec

    def validate(self) -> None:
        spec = self.spec()
        if self.reference.is_set and not spec.needs_ref_logprobs:
            raise ValueError(
                f"{_first_set(self.reference)}: set, but preset '{self.preset}' has no KL term "
                "that uses the reference (options.kl_coef is 0)"
            )
        if spec.needs_teacher and not self.teacher.is_set:
            why = (
                f"distils from a teacher (options.distill_coef={spec.distill_coef})"
                if spec.needs_teacher_logprobs
                else (
                    "has a teacher write demonstrations (algorithm.options.teacher_route=generate)"
                )
            )
            raise ValueError(
                f"teacher.hf_path: algorithm.preset '{self.preset}' {why}; set "
                "algorithm.teacher.hf_path to the teacher's Hugging Face folder (or "
                "algorithm.teacher.urls to its servers)"
            )
        if self.teacher.is_set and not spec.needs_teacher:
            raise ValueError(
                f"teacher.hf_path: set, but preset '{self.preset}' has no distillation part "
                "(options.distill_coef is 0) and no demonstrations written by the teacher "
                "(options.teacher_route is not generate)"
            )
        if self.critic != CriticConfig() and spec.advantage != "gae":
            raise ValueError(
                f"{_first_set(self.critic)}: set, but preset '{self.preset}' uses advantage "
                f"'{spec.advantage}', which needs no critic (only 'gae' does)"
            )
        if spec.batch_rule == "sft_then_rl" and spec.advantage == "gae":
            raise ValueError("preset: sft_then_rl with advantage 'gae' is not supported")


def _first_set(section: Any) -> str:
    """``section.key`` of the first field of ``section`` that differs from its default."""
    default = type(section)()
    name = next(
        f.name
        for f in dataclasses.fields(section)
        if getattr(section, f.name) != getattr(default, f.name)
    )
    return f"{type(section).__name__.removesuffix('Config').lower()}.{name}"
