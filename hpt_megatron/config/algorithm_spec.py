"""The algorithm spec: one frozen dataclass holding the four UPGE parts and every extra setting.

A preset (``presets.py``) is an ``AlgorithmSpec`` with chosen values; users override any field by
name (``spec.with_options(clip_high=0.28)``, or ``algorithm.options.clip_high=0.28`` in YAML).
Field names are the option names. Pure data and checks, no torch: the ``algorithm`` config section
(``algorithm.py``) is generated from it, and ``hpt_megatron.algorithms`` computes with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Literal

from hpt_megatron.config.base import ConfigError, check_value

AdvantageKind = Literal[
    "none", "one", "reinforce", "grpo", "dr_grpo", "rloo", "reinforce_pp", "srft", "gae"
]
Denominator = Literal["current", "old", "one", "gspo"]
DemoDenominator = Literal["one", "current"]
Mask = Literal["none", "clip", "dual_clip", "cispo", "seq_clip"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm"]
KLEstimator = Literal["k1", "k2", "k3"]
KLMode = Literal["loss", "reward"]
CorrectionLevel = Literal["token", "sequence", "geometric"]
Normalization = Literal["global", "microbatch"]
BatchRule = Literal["none", "hpt_gate", "demo_in_group", "dynamic_sampling", "sft_then_rl"]
DemoTerm = Literal["rl", "sft"]
GateMode = Literal["hard", "linear", "sigmoid"]
RoutingReplayMode = Literal["none", "rollout"]
TeacherRoute = Literal["no_demo", "always", "generate"]

# verl's spellings of the aggregation modes, accepted as options (``loss_agg_mode``).
AGGREGATION_ALIASES = {
    "token-mean": "token_mean",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "token_sum_norm",
}


# The response budget of the HPT paper's released runs (``data.max_response_length=8192`` in
# Unify-Post-Training's exp_scripts/train.sh:51): the divisor of a spec whose
# ``loss_agg_constant`` is None (the run's budget) when it is used without a run.
RELEASED_RESPONSE_BUDGET = 8192.0


class OptionError(ValueError):
    """A bad algorithm option; ``key`` is the option's name (for config messages)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.detail = message


def parse_gamma(gamma: int | float | str) -> tuple[str, float]:
    """``gamma`` as ("count", c) for an int, or ("fraction", f) for a float or a "k/n" string.

    The reading of the HPT gate's threshold (``gate_gamma``; ``algorithms/gate.py`` applies it).
    An int is a number of correct responses out of n (``2`` with n = 8 is 2/8); a float in
    [0, 1] is a fraction; ``"2/8"`` is the fraction 0.25.
    """
    if isinstance(gamma, bool):
        raise ValueError(f"gamma: expected a count, a fraction or 'k/n', got {gamma!r}")
    if isinstance(gamma, int):
        if gamma < 0:
            raise ValueError(f"gamma: a count must be >= 0, got {gamma}")
        return "count", float(gamma)
    if isinstance(gamma, str):
        try:
            value = float(Fraction(gamma.strip()))
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"gamma: cannot read {gamma!r} as a fraction like '2/8'") from None
    else:
        value = float(gamma)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"gamma: a fraction must be in [0, 1], got {value}")
    return "fraction", value


@dataclass(frozen=True, kw_only=True)
class AlgorithmSpec:
    """The four parts of the estimator plus the extras (see docs/algorithms.md).

    grad = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta, aggregated over tokens.
    """

    name: str = "custom"
    # --- advantage A_hat -------------------------------------------------------------------
    advantage: AdvantageKind = "grpo"
    std_unbiased: bool = True  # GRPO/SRFT std: unbiased (n - 1) estimator
    adv_eps: float = 1e-6  # added to the std
    reward_threshold: float = 0.0  # reinforce: A = +1 if reward > this else -1
    gae_gamma: float = 1.0
    gae_lambda: float = 1.0
    gae_whiten: bool = True
    # The distillation part (algorithms/distill.py): distill_coef * (log pi_teacher - log pi_old)
    # per token, added to the outcome advantage of every on-policy RL row; needs a teacher.
    distill_coef: float = 0.0
    # --- reference-policy denominator pi_ref --------------------------------------------------
    denominator: Denominator = "old"  # for on-policy rows
    demo_denominator: DemoDenominator = "one"  # for demonstration rows in the RL term
    demo_term: DemoTerm = "rl"  # default loss term of demonstration rows (weights override)
    luffy_gamma: float | None = None  # policy shaping f(pi) = pi / (pi + gamma) on demo tokens
    # --- stabilization mask 1_stable ---------------------------------------------------------
    mask: Mask = "clip"
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip_c: float = 3.0
    # --- off-policy correction against the rollout engine (algorithms/corrections.py) -------
    tis_cap: float | None = None  # truncated IS weight min(rho, cap), rho = pi_old / pi_rollout
    tis_level: CorrectionLevel = "token"  # the level of the IS weight rho
    mis_high: float | None = None  # masked IS: drop where rho leaves [mis_low, mis_high]
    mis_low: float | None = None  # None: 1 / mis_high
    mis_level: CorrectionLevel = "token"  # token: drop tokens; sequence/geometric: whole rows
    # --- aggregation --------------------------------------------------------------------------
    aggregation: Aggregation = "token_mean"
    # Divisor of token_sum_norm. None: the run's data.max_response_tokens (the padded response
    # width the official code divides by); a spec used without a run: RELEASED_RESPONSE_BUDGET.
    loss_agg_constant: float | None = 8192.0
    normalization: Normalization = "global"
    # --- extra loss terms --------------------------------------------------------------------
    sft_coef: float = 1.0
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_estimator: KLEstimator = "k3"
    kl_mode: KLMode = "loss"
    # --- batch rule ---------------------------------------------------------------------------
    batch_rule: BatchRule = "none"
    gate_gamma: int | float | str = 0  # int: a count of n; float: a fraction; "k/n": a fraction
    gate_mode: GateMode = "hard"
    gate_temperature: float = 0.1  # sigmoid soft gate width
    success_threshold: float = 0.0  # a response counts as correct when reward > this
    demos_per_group: int = 1
    # demo_in_group: the demonstrations take rollouts' places, n - demos_per_group rollouts per
    # prompt (the official LUFFY: 7 + 1 of n = 8); False: n rollouts + the demonstrations
    demos_replace_rollouts: bool = False
    overlong_buffer: int | None = None  # DAPO soft overlong punishment length
    overlong_max_len: int | None = None  # None: the rollout's max new tokens
    overlong_penalty: float = 1.0
    switch_step: int | None = None  # sft_then_rl: first step trained with RL
    # hpt_gate with a teacher: what a prompt that fails the gate is trained with.
    # no_demo / always (distill_coef > 0): the distillation part on its own rollouts instead of
    # SFT on a demonstration (no_demo: prompts without one; always: all of them);
    # generate: a prompt without a demonstration gets one written by the teacher (greedy, kept
    # when the reward grades it correct), trained with SFT like the dataset's
    teacher_route: TeacherRoute = "no_demo"
    # --- mixture of experts ------------------------------------------------------------------
    routing_replay: RoutingReplayMode = "none"  # rollout: train with the engine's chosen experts

    # ---- derived -------------------------------------------------------------------------------
    @property
    def needs_old_logprobs(self) -> bool:
        """Whether the trainer must supply ``old_logprobs`` (recomputed or from the rollout)."""
        return self.denominator in ("old", "gspo") or self.corrects_rollout

    @property
    def agg_constant(self) -> float:
        """The divisor of ``token_sum_norm``: ``loss_agg_constant``, or when that is None (the
        run's budget, not resolved: a spec used without a run) ``RELEASED_RESPONSE_BUDGET``."""
        if self.loss_agg_constant is None:
            return RELEASED_RESPONSE_BUDGET
        return self.loss_agg_constant

    @property
    def needs_ref_logprobs(self) -> bool:
        """Whether a reference model must supply ``ref_logprobs``."""
        return self.kl_coef > 0

    @property
    def needs_teacher_logprobs(self) -> bool:
        """Whether a teacher must score the rollouts (the distillation part is on)."""
        return self.distill_coef > 0

    @property
    def needs_teacher_demos(self) -> bool:
        """Whether a teacher writes the demonstrations that the dataset lacks (HPT's gate)."""
        return self.batch_rule == "hpt_gate" and self.teacher_route == "generate"

    @property
    def needs_teacher(self) -> bool:
        """Whether the run needs a teacher at all (to score rollouts or to write demos)."""
        return self.needs_teacher_logprobs or self.needs_teacher_demos

    @property
    def corrects_rollout(self) -> bool:
        """Whether the on-policy term is reweighted against the rollout engine (TIS / MIS)."""
        return self.tis_cap is not None or self.mis_high is not None

    @property
    def needs_rollout_logprobs(self) -> bool:
        return self.corrects_rollout

    @property
    def mis_band(self) -> tuple[float, float]:
        """``(low, high)`` of masked IS (only meaningful when ``mis_high`` is set)."""
        assert self.mis_high is not None
        return (1.0 / self.mis_high if self.mis_low is None else self.mis_low), self.mis_high

    @property
    def advantage_options(self) -> dict[str, Any]:
        """Keyword options for ``compute_advantages(self.advantage, ...)``."""
        if self.advantage in ("grpo", "srft"):
            return {"std_unbiased": self.std_unbiased, "eps": self.adv_eps}
        if self.advantage == "reinforce":
            return {"threshold": self.reward_threshold}
        if self.advantage == "reinforce_pp":
            return {"eps": self.adv_eps}
        if self.advantage == "gae":
            return {"gamma": self.gae_gamma, "lam": self.gae_lambda, "whiten": self.gae_whiten}
        return {}

    def with_options(self, **options: Any) -> AlgorithmSpec:
        """A copy with fields overridden by name, type-checked and validated.

        Values are checked against the field types by the config loader's checker (the one type
        checker); verl's aggregation spellings (``AGGREGATION_ALIASES``) are accepted.

        Raises:
            OptionError: an unknown name (with the closest valid one), a wrong type or a bad value.
        """
        hints = typing.get_type_hints(AlgorithmSpec)
        names = [f.name for f in dataclasses.fields(self) if f.name != "name"]
        clean = {}
        for key, value in options.items():
            if key not in names:
                match = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
                hint = f"; did you mean {match[0]}" if match else f"; valid: {', '.join(names)}"
                raise OptionError(key, f"unknown{hint}")
            if key == "aggregation" and isinstance(value, str):
                value = AGGREGATION_ALIASES.get(value, value)
            try:
                clean[key] = check_value(value, hints[key], key)
            except ConfigError as err:
                raise OptionError(key, str(err).removeprefix(f"{key}: ")) from None
        spec = dataclasses.replace(self, **clean)
        spec.validate()
        return spec

    def phase_for_step(self, step: int) -> AlgorithmSpec:
        """The spec in force at ``step``: for ``sft_then_rl``, SFT before ``switch_step``."""
        if self.batch_rule != "sft_then_rl":
            return self
        assert self.switch_step is not None
        if step < self.switch_step:
            return dataclasses.replace(
                self,
                name=f"{self.name}:sft",
                advantage="one",
                denominator="current",
                demo_denominator="current",
                mask="none",
                aggregation="token_mean",
                batch_rule="none",
                kl_coef=0.0,
                tis_cap=None,
                mis_high=None,
                mis_low=None,
            )
        return dataclasses.replace(self, name=f"{self.name}:rl", batch_rule="none")

    def validate(self) -> None:
        """Check values and combinations; raises ``OptionError`` naming the field."""
        _validate_parts(self)
        _validate_extras(self)


def _validate_parts(s: AlgorithmSpec) -> None:
    _validate_mask(s)
    _validate_clip(s)
    _validate_corrections(s)
    if s.luffy_gamma is not None and s.luffy_gamma <= 0:
        raise OptionError("luffy_gamma", f"must be > 0, got {s.luffy_gamma}")
    if s.adv_eps < 0:
        raise OptionError("adv_eps", f"must be >= 0, got {s.adv_eps}")
    if not (0 <= s.gae_gamma <= 1 and 0 <= s.gae_lambda <= 1):
        raise OptionError("gae_gamma", "gae_gamma and gae_lambda must be in [0, 1]")


def _validate_mask(s: AlgorithmSpec) -> None:
    """The mask against the denominator it is defined for."""
    if s.mask in ("clip", "dual_clip", "cispo") and s.denominator != "old":
        raise OptionError("mask", f"'{s.mask}' needs denominator 'old', got '{s.denominator}'")
    if s.mask == "seq_clip" and s.denominator != "gspo":
        raise OptionError("mask", "'seq_clip' needs denominator 'gspo'")
    if s.denominator == "gspo" and s.mask not in ("none", "seq_clip"):
        raise OptionError(
            "mask", f"denominator 'gspo' takes mask 'none' or 'seq_clip', not '{s.mask}'"
        )


def _validate_clip(s: AlgorithmSpec) -> None:
    if not 0 <= s.clip_low <= 1:
        raise OptionError("clip_low", f"must be in [0, 1], got {s.clip_low}")
    if s.clip_high < 0:
        raise OptionError("clip_high", f"must be >= 0, got {s.clip_high}")
    if s.dual_clip_c <= 1:
        raise OptionError("dual_clip_c", f"must be > 1, got {s.dual_clip_c}")
    if s.loss_agg_constant is not None and s.loss_agg_constant <= 0:
        raise OptionError("loss_agg_constant", f"must be > 0, got {s.loss_agg_constant}")


def _validate_corrections(s: AlgorithmSpec) -> None:
    """TIS's cap and MIS's band (``algorithms/corrections.py``)."""
    if s.tis_cap is not None and s.tis_cap <= 0:
        raise OptionError("tis_cap", f"must be > 0, got {s.tis_cap}")
    if s.mis_high is not None and s.mis_high <= 0:
        raise OptionError("mis_high", f"must be > 0, got {s.mis_high}")
    if s.mis_low is not None:
        if s.mis_high is None:
            raise OptionError("mis_low", "masked IS is on only with mis_high; set it too")
        if not 0 <= s.mis_low <= s.mis_high:
            raise OptionError("mis_low", f"must be in [0, mis_high={s.mis_high}], got {s.mis_low}")


def _validate_extras(s: AlgorithmSpec) -> None:
    for key in ("sft_coef", "entropy_coef", "kl_coef", "overlong_penalty", "distill_coef"):
        if getattr(s, key) < 0:
            raise OptionError(key, f"must be >= 0, got {getattr(s, key)}")
    _validate_distill(s)
    if s.kl_mode == "reward" and s.kl_coef > 0 and s.advantage in ("one", "none"):
        raise OptionError("kl_mode", "KL folded into the reward needs a reward-based advantage")
    if s.batch_rule == "sft_then_rl" and (s.switch_step is None or s.switch_step < 0):
        raise OptionError("switch_step", "sft_then_rl needs the (>= 0) step at which RL starts")
    if s.batch_rule == "hpt_gate":
        try:
            parse_gamma(s.gate_gamma)
        except ValueError as err:
            raise OptionError("gate_gamma", str(err)) from None
    if s.gate_temperature <= 0:
        raise OptionError("gate_temperature", f"must be > 0, got {s.gate_temperature}")
    if s.demos_per_group < 1:
        raise OptionError("demos_per_group", f"must be >= 1, got {s.demos_per_group}")
    if s.overlong_buffer is not None and s.overlong_buffer < 1:
        raise OptionError("overlong_buffer", f"must be >= 1, got {s.overlong_buffer}")
    if (
        s.overlong_buffer is not None
        and s.overlong_max_len is not None
        and s.overlong_buffer >= s.overlong_max_len
    ):
        raise OptionError("overlong_buffer", "must be smaller than overlong_max_len")


def _validate_distill(s: AlgorithmSpec) -> None:
    """The distillation part (``distill_coef``) against the advantage and the gate's routing."""
    if s.advantage == "none" and s.distill_coef == 0:
        raise OptionError(
            "advantage", "'none' (no outcome part) trains nothing without distill_coef > 0"
        )
    if s.distill_coef > 0 and s.advantage == "gae":
        raise OptionError("distill_coef", "the distillation part is not combined with 'gae'")
    if s.teacher_route != "no_demo" and s.batch_rule != "hpt_gate":
        raise OptionError(
            "teacher_route",
            f"'{s.teacher_route}' routes the prompts that fail HPT's gate: the "
            f"batch rule is '{s.batch_rule}', not 'hpt_gate'",
        )
    if s.teacher_route == "always" and s.distill_coef == 0:
        raise OptionError(
            "teacher_route", "'always' routes prompts to the distillation part: set distill_coef"
        )
