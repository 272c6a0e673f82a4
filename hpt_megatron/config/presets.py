"""Presets: every algorithm of the paper's Table 1 (and a few more) as an ``AlgorithmSpec``.

Each builder's docstring names its paper and every deliberate deviation. ``get_preset(name)``
returns the frozen spec; override fields with ``spec.with_options(...)``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from hpt_megatron.config.algorithm_spec import AlgorithmSpec


def sft() -> AlgorithmSpec:
    """Supervised fine-tuning: token-mean negative log-likelihood.

    Table 1 row: pi_ref = pi_theta, A = 1, no mask. Every row (demonstration or not) is trained
    with grad log pi; the loss value is the token-mean NLL over the batch.
    """
    return AlgorithmSpec(
        name="sft",
        advantage="one",
        denominator="current",
        demo_denominator="current",
        mask="none",
        aggregation="token_mean",
    )


def reinforce() -> AlgorithmSpec:
    """REINFORCE (Williams 1992) with a reward-sign advantage, as in Table 1.

    pi_ref = pi_theta, A = +1 if reward > ``reward_threshold`` (0) else -1, no mask. The log-prob
    of a response is the sum over its tokens, averaged over responses (seq_mean_token_sum).
    """
    return AlgorithmSpec(
        name="reinforce",
        advantage="reinforce",
        denominator="current",
        mask="none",
        aggregation="seq_mean_token_sum",
    )


def ppo() -> AlgorithmSpec:
    """PPO (Schulman et al. 2017) with GAE (Schulman et al. 2016), as used for LLMs by
    Ouyang et al. 2022: pi_ref = pi_old, clip 0.2, token mean, whitened GAE advantages.

    Deviations: gamma = lambda = 1 (outcome rewards, no discounting) by default. The values come
    from the critic ``hpt train`` builds for it (``trainer/critic.py``); pure callers pass
    ``values`` to ``compute_advantages``.
    """
    return AlgorithmSpec(
        name="ppo",
        advantage="gae",
        denominator="old",
        mask="clip",
        clip_low=0.2,
        clip_high=0.2,
        aggregation="token_mean",
    )


def grpo() -> AlgorithmSpec:
    """GRPO (Shao et al. 2024, DeepSeekMath): group-normalised advantage, pi_old, clip 0.2,
    sequence mean of token means.

    Deviation: no KL penalty by default (DeepSeekMath used beta = 0.04 with the k3 estimator;
    set ``kl_coef=0.04``, which then needs a reference model), as HPT's GRPO baseline.
    """
    return AlgorithmSpec(
        name="grpo",
        advantage="grpo",
        denominator="old",
        mask="clip",
        aggregation="seq_mean_token_mean",
    )


def dr_grpo() -> AlgorithmSpec:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): no std division and no
    length normalisation: token sum divided by a constant (``loss_agg_constant`` = 8192).

    Deviation: the reference code also averages over sequences; for a fixed batch size that is a
    constant factor left to the learning rate.
    """
    return AlgorithmSpec(
        name="dr_grpo",
        advantage="dr_grpo",
        denominator="old",
        mask="clip",
        aggregation="token_sum_norm",
        loss_agg_constant=8192.0,
    )


def dapo() -> AlgorithmSpec:
    """DAPO (Yu et al. 2025): clip-higher (0.2 / 0.28), token-level mean, dynamic sampling that
    drops groups whose rewards are all equal, soft overlong punishment (4096-token buffer).

    Deviation: ``overlong_max_len`` defaults to the rollout's max new tokens (DAPO: 20480).
    Dynamic sampling and overlong shaping run in the scheduler (``algorithms/dapo.py`` functions).
    """
    return AlgorithmSpec(
        name="dapo",
        advantage="grpo",
        denominator="old",
        mask="clip",
        clip_low=0.2,
        clip_high=0.28,
        aggregation="token_mean",
        batch_rule="dynamic_sampling",
        overlong_buffer=4096,
    )


def cispo() -> AlgorithmSpec:
    """CISPO (MiniMax-M1, 2025): REINFORCE with the clipped, stop-gradient IS weight
    sg(clip(r, 1 - eps_low, 1 + eps_high)) instead of a mask, GRPO advantage, token mean.

    Deviation: MiniMax sets no lower bound and does not publish eps_high; we use eps_low = 1
    (lower bound 0: none) and eps_high = 0.28 (DAPO's).
    """
    return AlgorithmSpec(
        name="cispo",
        advantage="grpo",
        denominator="old",
        mask="cispo",
        clip_low=1.0,
        clip_high=0.28,
        aggregation="token_mean",
    )


def gspo() -> AlgorithmSpec:
    """GSPO (Zheng et al. 2025, Qwen): sequence-level ratio (pi/pi_old(y))^(1/|y|), clipped per
    sequence with eps = 3e-4 / 4e-4, GRPO advantage, sequence mean of token means.

    Implemented in the GSPO-token form, which with this aggregation equals sequence-level GSPO.
    """
    return AlgorithmSpec(
        name="gspo",
        advantage="grpo",
        denominator="gspo",
        mask="seq_clip",
        clip_low=3e-4,
        clip_high=4e-4,
        aggregation="seq_mean_token_mean",
    )


def rloo() -> AlgorithmSpec:
    """RLOO (Ahmadian et al. 2024, "Back to Basics"): REINFORCE on whole responses with the
    leave-one-out baseline; pi_ref = pi_theta, no clip, sequence-level log-prob (token sum).

    Deviation: no KL folded into the reward by default (set ``kl_coef`` with ``kl_mode=reward``).
    """
    return AlgorithmSpec(
        name="rloo",
        advantage="rloo",
        denominator="current",
        mask="none",
        aggregation="seq_mean_token_sum",
    )


def reinforce_pp() -> AlgorithmSpec:
    """REINFORCE++ (Hu 2025): returns whitened over the whole batch (no critic, no groups),
    PPO clip 0.2 against pi_old, token mean.

    Deviation: the paper folds a token-level KL penalty into the reward; it is off by default
    (set ``kl_coef`` > 0 and ``kl_mode=reward``; the scheduler passes ``token_rewards``).
    """
    return AlgorithmSpec(
        name="reinforce_pp",
        advantage="reinforce_pp",
        denominator="old",
        mask="clip",
        aggregation="token_mean",
        kl_mode="reward",
    )


def srft() -> AlgorithmSpec:
    """SRFT (Fu et al. 2025) as the paper's Table 1 row: demonstrations join their prompt's group,
    advantage (R - mean) / std over on-policy and demonstration rows; demonstrations use
    pi_ref = 1 (grad pi); on-policy rows pi_old with clip 0.2; token mean.

    Deviation: SRFT's entropy-adaptive weights (0.5 exp(-H) on SFT, 0.1 exp(H) on positive
    samples) are not reproduced; Table 1's simplification is.
    """
    return AlgorithmSpec(
        name="srft",
        advantage="srft",
        denominator="old",
        mask="clip",
        demo_denominator="one",
        demo_term="rl",
        aggregation="token_mean",
        batch_rule="demo_in_group",
    )


def luffy() -> AlgorithmSpec:
    """LUFFY (Yan et al. 2025): one demonstration in each group of n, in place of a rollout
    (n - 1 rollouts + 1 demonstration; advantage over on- and off-policy rows, with std),
    off-policy tokens with pi_ref = 1 and policy shaping f(pi) = pi / (pi + 0.1); on-policy rows
    pi_old with clip 0.2; token mean.

    The group as the official code builds it: with ``rollout.n=8`` and ``n_prefix=1`` at prefix
    ratio 1.0 (Unify-Post-Training exp_scripts/train_luffy.sh:63,87-89), each prompt's 8 samples
    are 1 whole demonstration and 7 generations (hpt/verl/verl/mix_src/mix_vllm_rollout.py:
    187-204, 227). ``demos_replace_rollouts=false`` keeps n rollouts + the demonstration.

    Note: the HPT paper's LUFFY baseline runs used no std, no clip and sum / 8192
    (``advantage=dr_grpo, mask=none, aggregation=token_sum_norm``).
    """
    return AlgorithmSpec(
        name="luffy",
        advantage="srft",
        denominator="old",
        mask="clip",
        demo_denominator="one",
        demo_term="rl",
        luffy_gamma=0.1,
        aggregation="token_mean",
        batch_rule="demo_in_group",
        demos_replace_rollouts=True,
    )


def sft_then_grpo() -> AlgorithmSpec:
    """SFT, then GRPO from ``switch_step`` (the two-stage baseline of the HPT paper).

    ``switch_step`` has no default: set it. ``spec.phase_for_step(step)`` gives the SFT spec
    before it and this GRPO spec from it on.
    """
    return AlgorithmSpec(
        name="sft_then_grpo",
        advantage="grpo",
        denominator="old",
        mask="clip",
        aggregation="seq_mean_token_mean",
        batch_rule="sft_then_rl",
    )


def hpt_paper() -> AlgorithmSpec:
    """HPT exactly as the released runs of Lv et al. 2025 did it (docs/paper.md).

    Gate gamma = 0 (count), hard. RL: group-mean advantage (no std), ratio pi / pi_old without
    clipping, token sum / the run's ``data.max_response_tokens`` (``loss_agg_constant`` None; a
    number set as an option wins); SFT: token mean of the demonstrations, sft_coef 1.0; entropy
    bonus 0.001 (token mean over all rows); no KL. Normalisation per micro-batch (see
    ``algorithms/loss.py``): the SFT and entropy means are over the micro-batch, micro-batch losses
    are summed and averaged over data-parallel ranks. Use ``gate_gamma=2`` for LLaMA-3.1-8B,
    ``sft_coef=0.3`` for 1.5B.

    The divisor: Unify-Post-Training's ``compute_policy_loss`` (hpt/verl/verl/trainer/ppo/
    core_algos.py:316-317, ``loss_remove_token_mean=True``) divides the token sum by
    ``eos_mask.shape[-1]``, the padded response width, which its rollout pads to
    ``response_length = data.max_response_length`` (mix_vllm_rollout.py:293-295): 8192 in its
    runs, the run's response budget in general. Used without a run (no budget):
    ``RELEASED_RESPONSE_BUDGET`` (8192).

    Deviation: none intended; the paper's equation 11 (clip, std) is not what its code ran.
    docs/paper.md lists what still differs from the official code.
    """
    return AlgorithmSpec(
        name="hpt_paper",
        advantage="dr_grpo",
        denominator="old",
        mask="none",
        demo_term="sft",
        aggregation="token_sum_norm",
        loss_agg_constant=None,
        normalization="microbatch",
        sft_coef=1.0,
        entropy_coef=0.001,
        batch_rule="hpt_gate",
        gate_gamma=0,
    )


def hpt() -> AlgorithmSpec:
    """HPT (Lv et al. 2025), clean variant: as ``hpt_paper`` but both terms normalised over the
    global mini-batch, so the loss does not depend on micro-batching or DP layout.

    Deviation from the paper's runs: RL is the token mean over all RL tokens of the mini-batch
    (the paper: per-rank token sum / 8192), SFT the token mean over all demonstration tokens
    (the paper: per micro-batch), entropy over all tokens. ``aggregation=token_sum_norm`` gives
    the paper's RL scale, still split-invariant.
    """
    return AlgorithmSpec(
        name="hpt",
        advantage="dr_grpo",
        denominator="old",
        mask="none",
        demo_term="sft",
        aggregation="token_mean",
        normalization="global",
        sft_coef=1.0,
        entropy_coef=0.001,
        batch_rule="hpt_gate",
        gate_gamma=0,
    )


def opd() -> AlgorithmSpec:
    """On-policy distillation: the student samples, a teacher scores every sampled token, and
    the per-token advantage is the reverse-KL signal ``log pi_teacher - log pi_theta``
    (``algorithms/distill.py``; Agarwal et al. 2024, GKD with reverse KL; Lu & Thinking Machines
    Lab 2025, "On-Policy Distillation").

    Table row (docs/algorithms.md): pi_ref = pi_theta, A = distill_coef * (log pi_T - log pi_old)
    per token (no outcome part: advantage ``none``), no mask, token mean over the batch. Needs a
    teacher (``algorithm.teacher``). Deviation from Thinking Machines: the gradient is grad
    log pi (one update per step, so pi_old = pi_theta) rather than an importance-weighted one
    against the sampler; rewards are still computed, for the metrics only.
    """
    return AlgorithmSpec(
        name="opd",
        advantage="none",
        distill_coef=1.0,
        denominator="current",
        mask="none",
        aggregation="token_mean",
    )


PRESETS: dict[str, Callable[[], AlgorithmSpec]] = {
    fn.__name__: fn
    for fn in (
        sft,
        reinforce,
        ppo,
        grpo,
        dr_grpo,
        dapo,
        cispo,
        gspo,
        rloo,
        reinforce_pp,
        srft,
        luffy,
        sft_then_grpo,
        hpt_paper,
        hpt,
        opd,
    )
}


def get_preset(name: str) -> AlgorithmSpec:
    """The spec of preset ``name`` (one of ``PRESETS``).

    Raises:
        ValueError: unknown name, with the closest known one.
    """
    if name not in PRESETS:
        match = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.5)
        hint = f"; did you mean {match[0]}" if match else f"; known: {', '.join(PRESETS)}"
        raise ValueError(f"unknown preset '{name}'{hint}")
    return PRESETS[name]()
