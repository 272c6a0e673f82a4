"""HPT with a teacher end to end (one process, the CPU engine): both routes of a prompt that
fails the gate without a demonstration. Route ``no_demo``: the distillation part on its own
rollouts, scored by the trainer's frozen teacher. Route ``generate``: a demonstration the
teacher writes (greedy, on the driver), trained with SFT when the reward grades it correct.

The student is the tiny config's random model; the teacher another random model of its
vocabulary. The reward (``tests/helpers/prefix_reward.py``) makes "correct" what the teacher's
greedy response starts with, so the student's sampled rollouts all fail, and the test knows in
advance which teacher demonstrations are kept: the prompts whose ground truth is the start of the
teacher's greedy response, not those given an answer nobody writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hpt_megatron.data.sample import TEACHER_DEMO_ROUTE, TEACHER_ROUTE, RolloutBatch
from tests.helpers import hpt_train
from tests.helpers.forked import run_cli
from tests.helpers.tiny_hf import build_tiny_teacher

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # whole `hpt train` runs

PROMPTS = 8  # the whole dataset is one step's prompts; the first half have demonstrations
NOBODY = "~~~~~~"  # a ground truth no response starts with (all fail)
MAX_NEW = 24
# The data settings the run and the test both tokenize the prompts with.
DATA = ["data.system_prompt=null", f"data.max_response_tokens={MAX_NEW}"]


def _rows(truths: list[str]) -> list[dict]:
    rows = []
    for i, truth in enumerate(truths):
        row = {"prompt": f"What is {i + 11}+{2 * i + 3}?", "answer": truth, "data_source": "t"}
        if i < PROMPTS // 2:
            row["target"] = f"{i + 11}+{2 * i + 3}={3 * i + 14}. \\boxed{{{3 * i + 14}}}"
        rows.append(row)
    return rows


def _argv(out: Path, data: Path, teacher: str, *extra: str) -> list[str]:
    argv = hpt_train.command(
        hpt_train.TINY,
        out,
        "run.steps=2",
        "run.val_every=0",
        "parallel.tp=1",
        f"data.train={data}",
        f"data.prompts_per_step={PROMPTS}",
        "rollout.n=4",
        f"rollout.max_new_tokens={MAX_NEW}",
        *DATA,
        "reward.fn=tests.helpers.prefix_reward:prefix_reward",
        "reward.num_workers=1",
        "logging.save_rollouts=true",
        "logging.progress_bar=false",
        "checkpoint.save_every=0",
        "checkpoint.export_hf=false",
        f"algorithm.teacher.hf_path={teacher}",
        *extra,
        nproc=1,
    )
    return argv[argv.index("hpt_megatron.cli") + 1 :]


def _greedy_starts(teacher: str, data: Path, out: Path) -> list[str]:
    """The teacher's greedy response to each prompt of ``data``, as the run tokenizes them."""
    from hpt_megatron.config import load_config
    from hpt_megatron.data import build_prompt_dataset
    from hpt_megatron.data.tokenizer import build_arithmetic_tokenizer
    from hpt_megatron.rollout.base import SamplingParams
    from hpt_megatron.rollout.cpu_engine import HFCpuEngine

    cfg = load_config(hpt_train.TINY, [f"data.train={data}", *DATA])
    tokenizer = build_arithmetic_tokenizer()
    prompts = list(build_prompt_dataset(cfg.data, tokenizer, "train"))
    engine = HFCpuEngine.from_pretrained(
        teacher,
        load_tokenizer=False,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=MAX_NEW)
    texts = {}
    for prompt in prompts:  # one at a time: no padding
        (gen,) = engine.generate([prompt.prompt_ids], params)
        texts[int(prompt.prompt_id.rsplit(":", 1)[1])] = tokenizer.decode(
            gen.token_ids, skip_special_tokens=True
        )
    return [texts[i] for i in range(PROMPTS)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("teacher_e2e")
    teacher = build_tiny_teacher(root / "teacher", seed=3)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows([NOBODY] * PROMPTS)))
    greedy = _greedy_starts(teacher, data, root)
    # Prompts 4 and 5 (no demonstration): right when a response starts like the teacher's (its
    # first 3 characters); 6 and 7: an answer nobody writes. Prompts 0-3 have demonstrations.
    kept = [i for i in (4, 5) if len(greedy[i]) >= 3]
    assert kept, f"the teacher's greedy responses are too short to grade: {greedy}"
    truths = [greedy[i][:3] if i in kept else NOBODY for i in range(PROMPTS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(truths)))
    return {"root": root, "teacher": teacher, "data": data, "kept": kept, "greedy": greedy}


def _run(setup: dict, name: str, *extra: str) -> tuple[dict, list[RolloutBatch]]:
    out = setup["root"] / name
    argv = _argv(out, setup["data"], setup["teacher"], *extra)
    code, output = run_cli(argv, setup["root"] / f"{name}.log")
    assert code == 0, output[-5000:]
    metrics = hpt_train.metrics(out)
    assert sorted(metrics) == [1, 2]
    batches = [RolloutBatch.load_jsonl(out / "rollouts" / f"step_{s:06d}.jsonl") for s in (1, 2)]
    return metrics, batches


def _index(sample) -> int:
    return int(sample.prompt_id.rsplit(":", 1)[1])


def test_distillation_route_trains_prompts_without_demonstrations(setup):
    """``teacher_route: no_demo``: the 4 failing prompts without a demonstration train with the
    distillation part on their own rollouts (no outcome advantage), the other 4 with SFT on
    theirs; the routes and the teacher's reverse KL on them are logged."""
    metrics, batches = _run(setup, "distill", "algorithm.options.distill_coef=1.0")
    for step, batch in zip((1, 2), batches):
        m = metrics[step]
        assert m["hpt/route_teacher_share"] == 0.5 and m["hpt/route_sft_share"] == 0.5
        assert m["hpt/route_rl_share"] == 0.0
        routed = [s for s in batch.samples if s.metadata.get("route") == TEACHER_ROUTE]
        assert {_index(s) for s in routed} == {4, 5, 6, 7} and len(routed) == 16
        assert all(s.advantage == 0.0 and s.rl_weight == 1.0 and not s.is_demo for s in routed)
        assert {_index(s) for s in batch.samples if s.is_demo} == {0, 1, 2, 3}
        assert m["teacher/kl_distill_mean"] > 0 and math.isfinite(m["teacher/kl_distill_max"])
        assert m["grad_norm"] > 0


def test_generate_route_trains_the_teachers_correct_demonstrations(setup):
    """``teacher_route: generate``: each failing prompt without a demonstration gets the
    teacher's greedy response; those graded correct are trained with SFT (marked, and equal to
    the teacher's text), the others are dropped and counted."""
    from hpt_megatron.data.tokenizer import build_arithmetic_tokenizer

    metrics, batches = _run(setup, "generate", "algorithm.options.teacher_route=generate")
    kept, tokenizer = set(setup["kept"]), build_arithmetic_tokenizer()
    for step, batch in zip((1, 2), batches):
        m = metrics[step]
        assert m["hpt/route_teacher_demo_share"] == len(kept) / PROMPTS
        assert m["hpt/teacher_demos_rejected"] == 4 - len(kept)
        assert m["hpt/route_sft_share"] == 0.5 and m["hpt/route_teacher_share"] == 0.0
        assert m["time/teacher_generation_s"] > 0 and m["grad_norm"] > 0
        written = [s for s in batch.samples if s.metadata.get("route") == TEACHER_DEMO_ROUTE]
        assert {_index(s) for s in written} == kept
        for s in written:
            assert s.is_demo and s.sft_weight == 1.0
            text = tokenizer.decode(s.response_ids, skip_special_tokens=True)
            assert text == setup["greedy"][_index(s)]
        assert {_index(s) for s in batch.samples if s.is_demo} == {0, 1, 2, 3} | kept
        # The failing rollouts of prompts 4-7 went to SFT's side of the gate: none is trained.
        assert {(_index(s), s.is_demo) for s in batch.samples if _index(s) >= 4} == {
            (i, True) for i in kept
        }
