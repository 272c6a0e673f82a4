"""Post-training algorithms as pure torch: the Unified Policy Gradient Estimator and HPT.

Public API::

    from hpt_megatron.algorithms import policy_loss, compute_advantages, hpt_route

The spec they compute with (``AlgorithmSpec``) and the presets are pure data, so they live in
``hpt_megatron.config.algorithm_spec`` and ``hpt_megatron.config.presets``, which the config
loads without torch. See docs/algorithms.md for the four parts, every preset and the trainer
contract.
"""

from hpt_megatron.algorithms.advantages import (
    compute_advantages,
    fold_kl_into_rewards,
    gae,
    kl_penalised_advantages,
)
from hpt_megatron.algorithms.aggregation import pack_totals, unpack_totals
from hpt_megatron.algorithms.dapo import dynamic_sampling_keep, overlong_penalty
from hpt_megatron.algorithms.distill import distill_advantages, reverse_kl_tokens
from hpt_megatron.algorithms.gate import HPTGate, HPTPlan, hpt_batch_plan, hpt_gate, hpt_route
from hpt_megatron.algorithms.loss import (
    loss_totals,
    policy_loss,
    resolve_spec,
    row_weights,
    zero_gradient_rows,
)
from hpt_megatron.algorithms.parts import kl_estimate
from hpt_megatron.algorithms.value import (
    explained_variance,
    prompt_explained_variance_bound,
    value_loss,
)

__all__ = [
    "HPTGate",
    "HPTPlan",
    "compute_advantages",
    "distill_advantages",
    "dynamic_sampling_keep",
    "explained_variance",
    "fold_kl_into_rewards",
    "gae",
    "hpt_batch_plan",
    "hpt_gate",
    "hpt_route",
    "kl_estimate",
    "kl_penalised_advantages",
    "loss_totals",
    "overlong_penalty",
    "pack_totals",
    "policy_loss",
    "prompt_explained_variance_bound",
    "resolve_spec",
    "reverse_kl_tokens",
    "row_weights",
    "zero_gradient_rows",
    "unpack_totals",
    "value_loss",
]
