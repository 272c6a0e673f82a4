"""For every preset: d loss / d log pi equals the paper's estimator written out by hand.

Closed forms here use only torch arithmetic on the inputs, never the code under test.
Shapes: B rows, T positions.
"""

import pytest
import torch

from hpt_megatron.algorithms import policy_loss
from hpt_megatron.config.presets import PRESETS, get_preset

B, T = 6, 5


def make_inputs(seed: int = 0, demo_rows: tuple[int, ...] = ()) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 4, 1, 5, 2])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    logprobs = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3 - 0.05).requires_grad_()
    old = logprobs.detach() + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 0.8
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    is_demo = torch.zeros(B, dtype=torch.bool)
    is_demo[list(demo_rows)] = True
    return dict(logprobs=logprobs, old=old, adv=adv, mask=mask, lengths=lengths, is_demo=is_demo)


def grad_of(spec, x: dict, **kwargs) -> torch.Tensor:
    x["logprobs"].grad = None
    loss, _ = policy_loss(
        spec,
        logprobs=x["logprobs"],
        old_logprobs=x["old"],
        advantages=x["adv"],
        response_mask=x["mask"],
        is_demo=x["is_demo"],
        **kwargs,
    )
    loss.backward()
    return x["logprobs"].grad


def ppo_keep(adv, ratio, low, high):
    """1_stable of PPO clip: zero where the ratio left the band on the side sign(A) selects."""
    return ~(((adv > 0) & (ratio > 1 + high)) | ((adv < 0) & (ratio < 1 - low)))


def test_sft_is_token_mean_nll():
    x = make_inputs()
    ones = x["mask"].clone()
    loss, _ = policy_loss("sft", logprobs=x["logprobs"], advantages=ones, response_mask=x["mask"])
    n = x["mask"].sum()
    expected = -(x["logprobs"].detach() * x["mask"]).sum() / n
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    torch.testing.assert_close(x["logprobs"].grad, -x["mask"] / n)


def test_reinforce_gives_A_grad_log_pi():
    x = make_inputs(1)
    grad = grad_of("reinforce", x)
    torch.testing.assert_close(grad, -x["adv"] * x["mask"] / B)


def _ratio(x):
    return torch.exp(x["logprobs"].detach() - x["old"])


@pytest.mark.parametrize(
    "name,low,high",
    [("ppo", 0.2, 0.2), ("dapo", 0.2, 0.28), ("reinforce_pp", 0.2, 0.2)],
)
def test_token_mean_clip_presets(name, low, high):
    x = make_inputs(2)
    r = _ratio(x)
    keep = ppo_keep(x["adv"], r, low, high).double()
    expected = -x["adv"] * r * keep * x["mask"] / x["mask"].sum()
    torch.testing.assert_close(grad_of(name, x), expected)
    assert (keep[x["mask"].bool()] == 0).any(), "inputs must exercise the clip"


def test_grpo_seq_mean_token_mean():
    x = make_inputs(3)
    r = _ratio(x)
    keep = ppo_keep(x["adv"], r, 0.2, 0.2).double()
    expected = -x["adv"] * r * keep * x["mask"] / x["lengths"][:, None] / B
    torch.testing.assert_close(grad_of("grpo", x), expected)


def test_dr_grpo_token_sum_over_constant():
    x = make_inputs(4)
    r = _ratio(x)
    keep = ppo_keep(x["adv"], r, 0.2, 0.2).double()
    torch.testing.assert_close(grad_of("dr_grpo", x), -x["adv"] * r * keep * x["mask"] / 8192)


def test_cispo_clipped_weight():
    x = make_inputs(5)
    w = _ratio(x).clamp(0.0, 1.28)
    expected = -x["adv"] * w * x["mask"] / x["mask"].sum()
    torch.testing.assert_close(grad_of("cispo", x), expected)


def test_gspo_sequence_ratio():
    x = make_inputs(6)
    delta_b = torch.tensor([1e-3, 0.0, -1e-3, 1e-4, 2e-3, -2e-4], dtype=torch.float64)
    x["old"] = x["logprobs"].detach() - delta_b[:, None]  # log s_b = delta_b
    n = x["lengths"].double()
    s = torch.exp(((x["logprobs"].detach() - x["old"]) * x["mask"]).sum(-1) / n)
    a = x["adv"]
    keep = ~(((a > 0) & (s[:, None] > 1 + 4e-4)) | ((a < 0) & (s[:, None] < 1 - 3e-4)))
    expected = -a * s[:, None] * keep.double() * x["mask"] / n[:, None] / B
    torch.testing.assert_close(grad_of("gspo", x), expected)
    assert (~keep & x["mask"].bool()).any() and (keep & x["mask"].bool()).any()


def test_rloo_sequence_reinforce():
    x = make_inputs(7)
    torch.testing.assert_close(grad_of("rloo", x), -x["adv"] * x["mask"] / B)


def test_srft_demos_get_grad_pi():
    x = make_inputs(8, demo_rows=(1, 4))
    r = _ratio(x)
    pi = torch.exp(x["logprobs"].detach())
    keep = ppo_keep(x["adv"], r, 0.2, 0.2).double()
    demo = x["is_demo"][:, None]
    per_token = torch.where(demo, -x["adv"] * pi, -x["adv"] * r * keep)
    torch.testing.assert_close(grad_of("srft", x), per_token * x["mask"] / x["mask"].sum())


def test_luffy_policy_shaping_on_demos():
    x = make_inputs(9, demo_rows=(0, 3))
    r = _ratio(x)
    pi = torch.exp(x["logprobs"].detach())
    keep = ppo_keep(x["adv"], r, 0.2, 0.2).double()
    shaped = 0.1 * pi / (pi + 0.1) ** 2  # d/dlogpi [pi / (pi + 0.1)]
    per_token = torch.where(x["is_demo"][:, None], -x["adv"] * shaped, -x["adv"] * r * keep)
    torch.testing.assert_close(grad_of("luffy", x), per_token * x["mask"] / x["mask"].sum())


def test_sft_then_grpo_switches():
    spec = get_preset("sft_then_grpo").with_options(switch_step=10)
    x = make_inputs(10)
    torch.testing.assert_close(
        grad_of(spec.phase_for_step(9), x), -x["adv"] * x["mask"] / x["mask"].sum()
    )
    assert spec.phase_for_step(10).advantage == "grpo"
    r = _ratio(x)
    keep = ppo_keep(x["adv"], r, 0.2, 0.2).double()
    expected = -x["adv"] * r * keep * x["mask"] / x["lengths"][:, None] / B
    torch.testing.assert_close(grad_of(spec.phase_for_step(10), x), expected)
    with pytest.raises(ValueError, match="phase_for_step"):
        grad_of(spec, x)


@pytest.mark.parametrize("name", ["hpt", "hpt_paper"])
def test_hpt_presets(name):
    x = make_inputs(11, demo_rows=(2, 5))
    entropy = torch.rand(B, T, dtype=torch.float64).requires_grad_()
    grad = grad_of(name, x, entropy=entropy)
    r = _ratio(x)
    demo = x["is_demo"][:, None]
    on_tokens = (x["mask"] * ~demo).sum()
    demo_tokens = (x["mask"] * demo).sum()
    rl = -x["adv"] * r / (on_tokens if name == "hpt" else 8192)
    expected = torch.where(demo, -1.0 / demo_tokens, rl) * x["mask"]
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(entropy.grad, -0.001 * x["mask"] / x["mask"].sum())


def test_opd_gives_A_grad_log_pi_token_mean():
    x = make_inputs(12)
    torch.testing.assert_close(grad_of("opd", x), -x["adv"] * x["mask"] / x["mask"].sum())


def test_every_preset_has_a_closed_form_test():
    covered = {
        "sft",
        "reinforce",
        "ppo",
        "dapo",
        "reinforce_pp",
        "grpo",
        "dr_grpo",
        "cispo",
        "gspo",
        "rloo",
        "srft",
        "luffy",
        "sft_then_grpo",
        "hpt",
        "hpt_paper",
        "opd",
    }
    assert covered == set(PRESETS)
