"""The HPT gate (docs/paper.md): per-prompt success rate P decides RL or SFT.

Shapes: B rows (responses), G groups (prompts).

Hard gate (the paper): RL when P > gamma (alpha = 1, beta = 0), otherwise SFT on the prompt's
demonstration (alpha = 0, beta = 1). Soft gates (an extension, off by default): ``linear`` sets
alpha = P, beta = 1 - P; ``sigmoid`` sets alpha = sigmoid((P - gamma) / temperature) and
beta = 1 - alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpt_megatron.algorithms._checks import Vector, as_vector, check_rewards, group_index
from hpt_megatron.config.algorithm_spec import parse_gamma

_TOL = 1e-6  # counts compared as k > gamma * n; keeps 0.29 * 100 from reading as 28.99..


@dataclass(frozen=True)
class HPTGate:
    """The gate's decision per group (tensors indexed by group, in ``group_ids_g`` order)."""

    group_ids_g: torch.Tensor  # [G] int64, sorted
    num_correct_g: torch.Tensor  # [G] int64
    group_size_g: torch.Tensor  # [G] int64
    success_rate_g: torch.Tensor  # [G] float64, P
    alpha_g: torch.Tensor  # [G] float64, RL weight of the group's rollouts
    beta_g: torch.Tensor  # [G] float64, SFT weight of the group's demonstration

    @property
    def route_rl_g(self) -> torch.Tensor:
        """[G] bool: True where the group's rollouts are trained with RL (alpha > 0)."""
        return self.alpha_g > 0

    def metrics(self) -> dict[str, float]:
        """``gate/sft_fraction`` (mean beta: the routed-to-SFT fraction under the hard gate),
        ``gate/success_rate`` (mean P) and ``gate/p_hist/k_of_n`` (groups with k of n correct)."""
        out = {
            "gate/sft_fraction": float(self.beta_g.mean()) if self.beta_g.numel() else 0.0,
            "gate/success_rate": float(self.success_rate_g.mean()) if self.beta_g.numel() else 0.0,
        }
        pairs = torch.stack([self.num_correct_g, self.group_size_g], dim=1).tolist()
        for k, n in sorted(set(map(tuple, pairs)), key=lambda kn: (kn[1], kn[0])):
            out[f"gate/p_hist/{k}_of_{n}"] = float(pairs.count([k, n]))
        return out


def hpt_gate(
    *,
    rewards: Vector,
    group_ids: Vector,
    gamma: int | float | str,
    mode: str = "hard",
    temperature: float = 0.1,
    success_threshold: float = 0.0,
) -> HPTGate:
    """Grade every group: P = (responses with reward > ``success_threshold``) / n, then route.

    Args:
        rewards: ``[B]`` reward of each on-policy response (demonstrations excluded).
        group_ids: ``[B]`` prompt/group id of each response.
        gamma: RL iff P > gamma; an int is a count of n, a float or "k/n" a fraction.
        mode: "hard" (the paper), "linear" or "sigmoid" (soft gates).
        temperature: width of the sigmoid soft gate.
        success_threshold: a response is correct when its reward exceeds this.
    """
    rewards_b = check_rewards(rewards)
    group_ids_b = as_vector("group_ids", group_ids, torch.int64, rewards_b.shape[0])
    unit, value = parse_gamma(gamma)
    ids_g, inverse_b, size_g = group_index(group_ids_b)
    correct_b = (rewards_b > success_threshold).to(torch.int64)
    correct_g = torch.zeros_like(size_g).scatter_add_(0, inverse_b, correct_b)
    p_g = correct_g.double() / size_g.double()
    threshold_g = torch.full_like(p_g, value) if unit == "count" else value * size_g.double()
    if mode == "hard":
        alpha_g = (correct_g.double() > threshold_g + _TOL).double()
    elif mode == "linear":
        alpha_g = p_g.clone()
    elif mode == "sigmoid":
        gamma_frac_g = threshold_g / size_g.double()
        alpha_g = torch.sigmoid((p_g - gamma_frac_g) / temperature)
    else:
        raise ValueError(f"mode: expected 'hard', 'linear' or 'sigmoid', got {mode!r}")
    return HPTGate(ids_g, correct_g, size_g, p_g, alpha_g, 1.0 - alpha_g)


def hpt_route(*, rewards: Vector, group_ids: Vector, gamma: int | float | str) -> dict[int, bool]:
    """The hard HPT gate: ``{group id: True if trained with RL, False if with SFT}``.

    Example: with 8 rollouts per prompt, ``gamma=0`` sends to SFT exactly the groups with no
    correct response; ``gamma="2/8"`` (or ``0.25``, or the count ``2``) also those with 1 or 2.
    """
    gate = hpt_gate(rewards=rewards, group_ids=group_ids, gamma=gamma)
    return dict(zip(gate.group_ids_g.tolist(), gate.route_rl_g.tolist(), strict=True))


@dataclass(frozen=True)
class HPTPlan:
    """How the scheduler builds the training batch from a gated rollout batch.

    ``keep_b``: which on-policy rows to train; ``rl_weight_b``: their alpha. ``demo_groups``: the
    groups that get one demonstration row, each with ``demo_sft_weight`` (beta) and rl_weight 0.
    """

    keep_b: torch.Tensor  # [B] bool
    rl_weight_b: torch.Tensor  # [B] float64
    demo_groups: list[int]
    demo_sft_weight: list[float]


def hpt_batch_plan(gate: HPTGate, group_ids: Vector) -> HPTPlan:
    """Drop the rollouts of SFT-routed groups (alpha = 0) and add a demonstration where beta > 0."""
    group_ids_b = as_vector("group_ids", group_ids, torch.int64, None)
    pos_b = torch.searchsorted(gate.group_ids_g, group_ids_b)
    pos_b = pos_b.clamp_max(max(gate.group_ids_g.numel() - 1, 0))
    if gate.group_ids_g.numel() == 0 or not bool((gate.group_ids_g[pos_b] == group_ids_b).all()):
        raise ValueError("group_ids: contains a group the gate has not graded")
    alpha_b = gate.alpha_g[pos_b]
    with_demo = (gate.beta_g > 0).nonzero().flatten()
    return HPTPlan(
        keep_b=alpha_b > 0,
        rl_weight_b=alpha_b,
        demo_groups=gate.group_ids_g[with_demo].tolist(),
        demo_sft_weight=gate.beta_g[with_demo].tolist(),
    )
