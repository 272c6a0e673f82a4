"""Presets as frozen specs, overrides, config validation, DAPO helpers and policy_loss errors."""

import dataclasses

import pytest
import torch

from hpt_megatron.algorithms import dynamic_sampling_keep, overlong_penalty, policy_loss
from hpt_megatron.config.algorithm import AlgorithmConfig
from hpt_megatron.config.algorithm_spec import OptionError
from hpt_megatron.config.base import ConfigError, from_dict
from hpt_megatron.config.presets import PRESETS, get_preset
from hpt_megatron.config.schema import load_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_frozen_documented_and_valid(name):
    spec = get_preset(name)
    assert spec.name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.clip_low = 0.1  # type: ignore[misc]
    doc = PRESETS[name].__doc__ or ""
    assert len(doc) > 80, f"{name} needs a docstring naming its paper and deviations"
    if name == "sft_then_grpo":
        spec = spec.with_options(switch_step=5)
    spec.validate()


def test_with_options_overrides_field_by_field():
    spec = get_preset("grpo").with_options(clip_high=0.28, aggregation="token_mean", clip_low=0)
    assert (spec.clip_high, spec.aggregation, spec.clip_low) == (0.28, "token_mean", 0.0)
    assert isinstance(spec.clip_low, float)
    assert get_preset("grpo").clip_high == 0.2  # the preset itself is untouched


def test_option_errors_name_the_key():
    with pytest.raises(OptionError, match="clip_hgh: unknown; did you mean clip_high"):
        get_preset("grpo").with_options(clip_hgh=0.3)
    with pytest.raises(OptionError, match="aggregation: 'token_meen' is not one of"):
        get_preset("grpo").with_options(aggregation="token_meen")
    with pytest.raises(OptionError, match="clip_low: expected float, got str"):
        get_preset("grpo").with_options(clip_low="big")
    with pytest.raises(OptionError, match="mask: 'clip' needs denominator 'old'"):
        get_preset("grpo").with_options(denominator="current")
    with pytest.raises(OptionError, match="switch_step"):
        get_preset("sft_then_grpo").validate()


def test_needs_flags():
    assert get_preset("hpt_paper").needs_old_logprobs
    assert not get_preset("sft").needs_old_logprobs
    assert not get_preset("hpt").needs_ref_logprobs
    assert get_preset("hpt").batch_rule == "hpt_gate"
    assert get_preset("luffy").batch_rule == "demo_in_group"
    assert get_preset("dapo").batch_rule == "dynamic_sampling"
    assert get_preset("grpo").advantage_options == {"std_unbiased": True, "eps": 1e-6}


def test_unknown_preset():
    with pytest.raises(ValueError, match="did you mean grpo"):
        get_preset("grpoo")


def test_config_validate_names_the_option_key():
    # The options are a typed section of the config tree (one checker for every key).
    with pytest.raises(
        ConfigError,
        match=r"^unknown key 'options.clip_hgh'; did you mean "
        r"'options.clip_high'",
    ):
        from_dict(AlgorithmConfig, {"preset": "grpo", "options": {"clip_hgh": 0.3}})
    with pytest.raises(ConfigError, match=r"^options.clip_low: expected float, got str"):
        from_dict(AlgorithmConfig, {"preset": "grpo", "options": {"clip_low": "big"}})
    with pytest.raises(ValueError, match="^preset: unknown preset 'hptt'"):
        AlgorithmConfig(preset="hptt").validate()
    cfg = from_dict(AlgorithmConfig, {"preset": "dapo", "options": {"clip_high": 0.3}})
    assert cfg.spec().clip_high == 0.3
    assert cfg.overrides() == {"clip_high": 0.3}  # unset options keep the preset's values
    assert cfg.spec().clip_low == get_preset("dapo").clip_low


def test_config_tree_prefixes_the_section():
    base = ["model.inline={hidden_size: 8}"]
    cfg = load_config(None, [*base, "algorithm.preset=hpt_paper", "algorithm.options.sft_coef=0.3"])
    assert cfg.algorithm.spec().sft_coef == 0.3
    with pytest.raises(ConfigError, match="unknown key 'algorithm.options.clip_hgh'"):
        load_config(None, [*base, "algorithm.options.clip_hgh=0.3"])
    with pytest.raises(ConfigError, match=r"^algorithm.options.clip_low: expected float"):
        load_config(None, [*base, "algorithm.options.clip_low=big"])
    with pytest.raises(ConfigError, match=r"^algorithm.options.mask: 'clip' needs denominator"):
        load_config(None, [*base, "algorithm.preset=grpo", "algorithm.options.denominator=one"])


@pytest.mark.parametrize(
    ("verl", "ours"),
    [
        ("token-mean", "token_mean"),
        ("seq-mean-token-mean", "seq_mean_token_mean"),
        ("seq-mean-token-sum", "seq_mean_token_sum"),
        ("seq-mean-token-sum-norm", "token_sum_norm"),
    ],
)
def test_verl_aggregation_spellings_are_accepted(verl, ours):
    cfg = load_config(
        None, ["model.inline={hidden_size: 8}", f"algorithm.options.aggregation={verl}"]
    )
    assert cfg.algorithm.options.aggregation == ours
    assert cfg.algorithm.spec().aggregation == ours
    assert get_preset("grpo").with_options(aggregation=verl).aggregation == ours


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["algorithm.reference.load=/some/ckpt"],
            r"^algorithm.reference.load: set, but preset 'hpt' has no KL term .*kl_coef is 0",
        ),
        (
            [
                "algorithm.options.kl_coef=0.1",
                "algorithm.reference.load=/a",
                "algorithm.reference.hf_weights=/b",
            ],
            r"^algorithm.reference.load and hf_weights: set at most one",
        ),
        (
            ["algorithm.critic.lr=1e-4"],
            r"^algorithm.critic.lr: set, but preset 'hpt' uses advantage 'dr_grpo'.*only 'gae'",
        ),
        (["algorithm.preset=ppo", "algorithm.critic.lr=0"], r"^algorithm.critic.lr: must be > 0"),
        (
            ["algorithm.preset=ppo", "algorithm.critic.cliprange_value=-1"],
            r"^algorithm.critic.cliprange_value: must be > 0",
        ),
        (
            [
                "algorithm.preset=sft_then_grpo",
                "algorithm.options.switch_step=2",
                "algorithm.options.advantage=gae",
            ],
            r"^algorithm.preset: sft_then_rl with advantage 'gae' is not supported",
        ),
    ],
)
def test_settings_hpt_train_cannot_run_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.inline={hidden_size: 8}", *overrides])
    get_preset("ppo").validate()


@pytest.mark.parametrize(
    "overrides",
    [["algorithm.preset=ppo"], ["algorithm.preset=grpo", "algorithm.options.advantage=gae"]],
)
def test_gae_builds_a_critic(overrides):
    cfg = load_config(
        None, ["model.inline={hidden_size: 8}", *overrides, "algorithm.critic.lr=1e-4"]
    )
    assert cfg.algorithm.spec().advantage == "gae" and cfg.algorithm.critic.lr == 1e-4


@pytest.mark.parametrize("mode", ["loss", "reward"])
def test_kl_penalty_is_accepted_in_both_modes(mode):
    cfg = load_config(
        None,
        [
            "model.inline={hidden_size: 8}",
            "algorithm.preset=rloo",
            "algorithm.options.kl_coef=0.01",
            f"algorithm.options.kl_mode={mode}",
        ],
    )
    spec = cfg.algorithm.spec()
    assert spec.needs_ref_logprobs and spec.kl_mode == mode
    assert cfg.algorithm.reference.load is None  # the policy's starting weights


def test_dapo_dynamic_sampling_keep():
    keep = dynamic_sampling_keep(rewards=[1, 1, 0, 0, 1, 0, 1], group_ids=[0, 0, 1, 1, 2, 2, 3])
    assert keep.tolist() == [False, False, False, False, True, True, False]


def test_dapo_overlong_penalty():
    out = overlong_penalty(response_lengths=[10, 12, 14, 16, 20], max_len=16, buffer=4)
    assert out.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="overlong_buffer"):
        overlong_penalty(response_lengths=[1], max_len=4, buffer=4)


def test_policy_loss_bad_inputs():
    lp = torch.zeros(2, 3, requires_grad=True)
    ok = dict(
        logprobs=lp,
        old_logprobs=torch.zeros(2, 3),
        advantages=torch.zeros(2, 3),
        response_mask=torch.ones(2, 3),
    )
    with pytest.raises(ValueError, match=r"advantages: shape \[2, 4\] does not match \[2, 3\]"):
        policy_loss("grpo", **{**ok, "advantages": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="old_logprobs: preset 'grpo' needs it"):
        policy_loss("grpo", **{**ok, "old_logprobs": None})
    with pytest.raises(ValueError, match="is_demo: expected 2 entries"):
        policy_loss("grpo", **ok, is_demo=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="entropy: preset 'hpt' needs it"):
        policy_loss("hpt", **ok)
    with pytest.raises(ValueError, match="advantages: contain NaN"):
        policy_loss("grpo", **{**ok, "advantages": torch.full((2, 3), float("nan"))})
    with pytest.raises(OptionError, match="clip_hgh"):
        policy_loss("grpo", **ok, clip_hgh=0.3)
    with pytest.raises(ValueError, match="global_num_tokens: missing keys"):
        policy_loss("grpo", **ok, global_num_tokens={"rl": 6})
    loss, metrics = policy_loss("grpo", **ok, clip_high=0.3)
    assert loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in metrics.values())
