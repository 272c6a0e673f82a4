"""Mixture-of-experts settings: the tiny Qwen3-MoE example dry-runs, and bad expert layouts or
unsupported MoE variants are config errors naming the key before any process starts."""

import pathlib

import pytest

from hpt_megatron.cli import main

EXAMPLES = pathlib.Path(__file__).resolve().parents[3] / "examples"
MOE = str(EXAMPLES / "tiny_moe_cpu.yaml")
TINY = str(EXAMPLES / "tiny_cpu.yaml")
CPU_SERVERS = "rollout.sglang.device=cpu"
# The example with every layer sparse, served by SGLang (whose own Qwen3-MoE needs that).
SPARSE_SGLANG = ["model.inline.mlp_only_layers=[]", "rollout.engine=sglang", CPU_SERVERS]
ROUTED = ["rollout.sglang.routed_experts=true"]


@pytest.fixture(autouse=True)
def _no_torchrun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def _dry_run(capsys, *args: str) -> tuple[int, str]:
    code = main(["train", *args, "--dry-run"])
    return code, capsys.readouterr().err


def test_moe_example_dry_runs_at_ep2(capsys):
    code, err = _dry_run(capsys, MOE, "--world-size", "2")
    assert code == 0, err


@pytest.mark.parametrize(
    ("world", "overrides", "message"),
    [
        ("3", ["parallel.ep=3"], "parallel.ep=3 does not divide num_experts=8"),
        (
            "2",
            ["parallel.ep=4"],
            "parallel.etp * parallel.ep * parallel.pp = 1 * 4 * 1 = 4 does not divide the world "
            "size 2",
        ),
        ("4", ["parallel.etp=3", "parallel.ep=1"], "does not divide the world size 4"),
        (
            "3",
            ["parallel.etp=3", "parallel.ep=1"],
            "parallel.etp=3 does not divide moe_intermediate_size=64",
        ),
        (
            "2",
            ["model.inline.shared_expert_intermediate_size=64"],
            "shared_expert_intermediate_size=64 asks for shared experts",
        ),
        (
            "2",
            ["model.inline.scoring_func=sigmoid"],
            "scoring_func='sigmoid' asks for a non-softmax (e.g. sigmoid) router",
        ),
        ("2", ["model.inline.n_group=8"], "n_group=8 asks for grouped top-k routing"),
        ("2", ["model.inline.num_experts_per_tok=9"], "num_experts_per_tok=9 must be in [1, 8]"),
        (
            "2",
            ["model.inline.mlp_only_layers=[0,1,2,3]"],
            "no layer has experts (mlp_only_layers=[0, 1, 2, 3]",
        ),
        ("2", ["model.moe_aux_loss_coeff=-1"], "moe_aux_loss_coeff: must be >= 0"),
        (
            "2",
            ["rollout.engine=sglang"],
            "the model has dense layers [1] among its sparse ones (mlp_only_layers / "
            "decoder_sparse_step), which SGLang 0.5.23's own qwen3_moe ignores",
        ),
        (
            "2",
            ["rollout.sglang.routed_experts=true"],
            "rollout.sglang.routed_experts: returns the experts of a mixture-of-experts model "
            "served by SGLang; this run has rollout.engine cpu",
        ),
        (
            "2",
            [*SPARSE_SGLANG, "rollout.sglang.check_weights=true"],
            "rollout.sglang.check_weights: SGLang 0.5.23's Qwen3-MoE has no get_weights_by_name",
        ),
    ],
)
def test_bad_moe_settings_name_the_key(capsys, world, overrides, message):
    code, err = _dry_run(capsys, MOE, "--world-size", world, *overrides)
    assert code == 2 and message in err, err


def test_expert_parallel_on_a_dense_model_is_an_error(capsys):
    code, err = _dry_run(capsys, TINY, "--world-size", "4", "parallel.ep=2")
    assert code == 2 and "parallel.ep=2" in err and "dense model" in err, err


REPLAY = "algorithm.options.routing_replay=rollout"


def test_routing_replay_dry_runs_on_the_moe_example(capsys):
    code, err = _dry_run(capsys, MOE, "--world-size", "2", REPLAY)
    assert code == 0, err


@pytest.mark.parametrize(
    "overrides",
    [
        SPARSE_SGLANG,
        [*SPARSE_SGLANG, *ROUTED, REPLAY],
        [
            "rollout.engine=sglang",
            CPU_SERVERS,
            "rollout.sglang.extra_args=[--model-impl,transformers]",
        ],
    ],
    ids=["sparse", "sparse-replay", "dense-layer-transformers-backend"],
)
def test_moe_on_sglang_dry_runs(capsys, overrides):
    code, err = _dry_run(capsys, MOE, "--world-size", "2", *overrides)
    assert code == 0, err


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        (TINY, [], "routing_replay: rollout replays the experts of a mixture-of-experts model"),
        (
            MOE,
            [*SPARSE_SGLANG],
            "the SGLang servers return the experts they routed each token to only with "
            "rollout.sglang.routed_experts: true",
        ),
        (
            MOE,
            [*SPARSE_SGLANG, *ROUTED, "rollout.sglang.extra_args=[--model-impl,transformers]"],
            "SGLang's transformers backend (--model-impl transformers) routes with the HF "
            "model's own router",
        ),
        (MOE, ["model.recompute_granularity=selective"], "activation recomputation reruns"),
        (MOE, ["algorithm.options.routing_replay=sglang"], "algorithm.options.routing_replay"),
    ],
    ids=["dense", "sglang-unasked", "sglang-transformers", "recompute", "bad-value"],
)
def test_routing_replay_it_cannot_carry_out_is_an_error(capsys, config, overrides, message):
    replay = [] if overrides and "routing_replay" in overrides[0] else [REPLAY]
    code, err = _dry_run(capsys, config, "--world-size", "2", *replay, *overrides)
    assert code == 2 and message in err, err
