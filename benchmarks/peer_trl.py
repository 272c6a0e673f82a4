"""``hpt train`` versus TRL's GRPOTrainer on the same work: steps/s and completion tokens/s, with
the generation / training split of each.

    python benchmarks/peer_trl.py --steps 30 --rounds 3             # builds TRL's venv once
    python benchmarks/peer_trl.py --trl-python /opt/hpt-trl-venv/bin/python --start sft
    python benchmarks/peer_trl.py --elision off   # hpt training every row, as TRL does
    python benchmarks/peer_trl.py --start mini --mini-out runs/mini_quick   # the miniature's base

Both systems start from the same HF folder, train GRPO with the same prompts (text and token ids,
checked), the same math reward (``hpt_megatron.rewards.math_reward``), 64 prompts x 8
completions, temperature 1, no KL, one update per step. The starts (``--start``, comma-separated):

- ``random``: the tiny Llama of ``examples/tiny_cpu.yaml`` with random weights, on the built-in
  arithmetic task, 48 new tokens, lr 3e-3. Every reward is 0, so every advantage is 0 and row
  elision skips the whole update.
- ``sft``: those weights after ``--sft-steps`` of ``preset=sft`` (answers vary in length).
- ``mini``: the base of ``examples/paper_in_miniature.py`` (pre-trained on half A of level 2) on
  the half B it is trained on there, with its config (``examples/paper_in_miniature/tiny.yaml``),
  64 new tokens and lr 1e-4 (GRPO's rate in its grid). The base partly solves these prompts, so
  rewards are mixed within groups and elision skips only the rows of all-equal groups. The base is
  read from ``--mini-out`` (a miniature run's ``--out``), built there by the miniature's own
  stage when missing.

Runs are interleaved over ``--rounds`` rounds so machine noise hits all systems alike; the first
step of each run is warm-up and not counted. TRL runs in its own virtual environment
(``--trl-venv``, built with ``torch==2.13.0 trl==1.16.0 math-verify`` when missing, or
``--trl-python`` to reuse one), in one process with all cores, as a TRL user on this machine
would run it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, SAMPLES = 64, 8
TRL_PINS = ("torch==2.13.0", "trl==1.16.0", "math-verify")


@dataclass
class Start:
    """Where a comparison starts: the HF folder, the config and the data both systems use."""

    name: str
    hf: Path
    config: Path = ROOT / "examples/tiny_cpu.yaml"
    data: list[str] = field(default_factory=list)  # overrides naming the prompts
    new_tokens: int = 48
    lr: float = 3e-3


# ---------------------------------------------------------------------------------- set-up (hpt)
def make_start(out: Path, seed: int) -> Path:
    """The shared random starting policy: an HF folder with weights and the arithmetic tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from hpt_megatron.config import load_config
    from hpt_megatron.data.tokenizer import load_tokenizer
    from hpt_megatron.models.provider import load_hf_config

    cfg = load_config(ROOT / "examples/tiny_cpu.yaml")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        load_hf_config(dict(cfg.model.inline)).to_transformers()
    )
    model.save_pretrained(out)
    load_tokenizer("arithmetic", out).save_pretrained(str(out))
    return out


def mini_start(out: Path) -> Start:
    """The miniature's base and half B, from (or built into) a miniature run's ``out`` folder."""
    sys.path.insert(0, str(ROOT / "examples"))
    import paper_in_miniature as mini

    quick = mini.parse_args(["--quick", "--out", str(out)]).budget
    base_json = out / "base" / "tiny" / "base.json"
    if base_json.exists():
        hf = Path(json.loads(base_json.read_text())["hf"])
    else:  # the miniature's own stage 1, with its quick run's benchmark sets
        print(f"building the miniature's base in {out} ...", flush=True)
        mini.tasks.write_sets(out / "sets", quick.id_problems)
        mini.tasks.write_halves(out / "sets")
        hf = Path(mini.make_base(out, "tiny", quick, force=False)["hf"])
    data = [f"data.train={out / 'sets' / 'train.jsonl'}", "data.system_prompt=null"]
    return Start("mini", hf, mini.CONFIG, data, new_tokens=64, lr=1e-4)


def write_prompts(start: Start, path: Path) -> None:
    """The start's train split as TRL rows: the templated prompt text, its ids, the answer."""
    from hpt_megatron.config import load_config
    from hpt_megatron.data import build_prompt_dataset
    from hpt_megatron.data.tokenizer import load_tokenizer

    cfg = load_config(start.config, start.data)
    dataset = build_prompt_dataset(cfg.data, load_tokenizer(str(start.hf), start.hf))
    with path.open("w") as fh:
        for rec in dataset:
            row = {"prompt": rec.prompt_text, "prompt_ids": rec.prompt_ids}
            fh.write(json.dumps({**row, "ground_truth": rec.ground_truth}) + "\n")


def hpt_command(procs: int, start: Start, out: Path, steps: int, extra: list[str]) -> list[str]:
    tokens = start.new_tokens
    return [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)),
        *("-m", "hpt_megatron.cli", "train", str(start.config), *start.data),
        *(f"parallel.tp={procs}", f"model.hf_weights={start.hf}", f"run.steps={steps}"),
        *("run.val_every=0", "checkpoint.save_every=0", "logging.progress_bar=false"),
        *(f"data.prompts_per_step={PROMPTS}", f"rollout.n={SAMPLES}", f"trainer.lr={start.lr}"),
        *(f"rollout.max_new_tokens={tokens}", f"data.max_response_tokens={tokens}"),
        *("trainer.lr_schedule=constant", "trainer.warmup_steps=0", "rollout.temperature=1.0"),
        *(f"run.output_dir={out}", *extra),
    ]


def run_hpt(
    procs: int, start: Start, out: Path, steps: int, elide: bool = True
) -> list[dict[str, float]]:
    extra = ["algorithm.preset=grpo", "checkpoint.export_hf=false"]
    extra.append(f"trainer.elide_zero_rows={str(elide).lower()}")
    cmd = hpt_command(procs, start, out, steps, extra)
    _run(cmd)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "step_s": r["time/step_s"],
            "generation_s": r["time/generation_s"] + r.get("time/grading_s", 0.0),
            "tokens": r["response/length_mean"] * PROMPTS * SAMPLES,
            # rows not forwarded or backwarded (zero advantage): TRL trains them all
            "elided": r.get("train/rows_elided_frac", 0.0),
            "reward": r["reward/mean"],
        }
        for r in rows[1:]
    ]


def sft_start(random_start: Start, out: Path, steps: int) -> Start:
    """The random start after ``steps`` of SFT on the demonstrations (answers vary in length)."""
    cmd = hpt_command(2, random_start, out, steps, ["algorithm.preset=sft"])
    _run(cmd)
    return Start("sft", out / "hf")


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-4000:]}")


# ------------------------------------------------------------------------------------- TRL side
def trl_python(args: argparse.Namespace) -> str:
    if args.trl_python:
        return args.trl_python
    venv = Path(args.trl_venv)
    python = venv / "bin/python"
    if not python.exists():
        print(f"building TRL's virtual environment in {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PINS], check=True)
    return str(python)


def run_trl(python: str, start: Start, prompts: Path, out: Path, steps: int) -> list[dict]:
    shape = json.dumps({"steps": steps, "new_tokens": start.new_tokens, "lr": start.lr})
    cmd = [python, __file__, "--worker", str(start.hf), str(prompts), str(out), shape]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"TRL run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())[1:]


def trl_worker(start: str, prompts: str, out: str, shape: dict) -> None:
    """Runs inside TRL's venv: GRPOTrainer on the shared start, per-step wall times to ``out``;
    ``shape``: the run's ``steps``, ``new_tokens`` and ``lr``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from hpt_megatron.rewards.math_grader import math_reward

    tokenizer = AutoTokenizer.from_pretrained(start)
    rows = [json.loads(line) for line in Path(prompts).read_text().splitlines()]
    for row in rows[:256]:  # the same token ids as hpt's prompts, as TRL tokenises them
        ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        assert ids == row["prompt_ids"], (row["prompt"], ids, row["prompt_ids"])
    data = Dataset.from_list(
        [{"prompt": r["prompt"], "ground_truth": r["ground_truth"]} for r in rows]
    )

    def reward(completions: list[str], ground_truth: list[str], **_: object) -> list[float]:
        scores = [math_reward(c, g) for c, g in zip(completions, ground_truth)]
        timings[-1]["reward_sum"] += sum(scores)
        timings[-1]["reward_n"] += len(scores)
        return scores

    config = GRPOConfig(
        output_dir=str(Path(out).parent / "trl_out"),
        per_device_train_batch_size=PROMPTS * SAMPLES,
        num_generations=SAMPLES,
        max_completion_length=shape["new_tokens"],
        learning_rate=shape["lr"],
        lr_scheduler_type="constant",
        temperature=1.0,
        beta=0.0,
        max_steps=shape["steps"],
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=0,
    )
    timings: list[dict[str, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            timings.append({"t0": time.perf_counter(), "generation_s": 0.0, "tokens": 0.0})
            timings[-1].update(reward_sum=0.0, reward_n=0)

        def on_step_end(self, *a: object, **k: object) -> None:
            step = timings[-1]
            step["step_s"] = time.perf_counter() - step.pop("t0")
            step["reward"] = step.pop("reward_sum") / max(1, step.pop("reward_n"))

    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(start),
        reward_funcs=reward,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    generate = trainer._generate_and_score_completions

    def timed(inputs: list) -> dict:
        t0 = time.perf_counter()
        result = generate(inputs)
        timings[-1]["generation_s"] += time.perf_counter() - t0
        timings[-1]["tokens"] += float(result["completion_mask"].sum())
        return result

    trainer._generate_and_score_completions = timed  # type: ignore[method-assign]
    trainer.train()
    Path(out).write_text(json.dumps(timings))


# ------------------------------------------------------------------------------------------ main
def summarise(name: str, rows: list[dict], base: dict[str, float] | None) -> dict[str, float]:
    step = statistics.median(r["step_s"] for r in rows)
    gen = statistics.median(r["generation_s"] for r in rows)
    tok = sum(r["tokens"] for r in rows) / sum(r["step_s"] for r in rows)
    fig = {"step_s": step, "tokens_per_s": tok}
    ratio = "" if base is None else f"  steps/s {base['step_s'] / step:4.2f}x TRL"
    ratio += "" if base is None else f", tokens/s {tok / base['tokens_per_s']:4.2f}x TRL"
    extra = ""
    if "elided" in rows[0]:
        extra += f"  rows elided {statistics.mean(r['elided'] for r in rows):.0%}"
    if "reward" in rows[0]:
        extra += f"  reward {statistics.mean(r['reward'] for r in rows):.3f}"
    print(
        f"  {name:46} {step:6.2f} s/step  gen {gen:5.2f}  train {step - gen:5.2f}  "
        f"{tok:8,.0f} tok/s{ratio}{extra}"
    )
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--start",
        default="random,sft",
        help="comma-separated of random, sft, mini ('both': random,sft)",
    )
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument(
        "--mini-out",
        default=os.path.expanduser("~/.cache/hpt-megatron/peer_trl_mini"),
        help="a paper_in_miniature.py --out folder holding (or to hold) its base",
    )
    ap.add_argument(
        "--elision",
        choices=["on", "off", "both"],
        default="both",
        help="hpt with row elision (the default), with trainer.elide_zero_rows=false, or both",
    )
    ap.add_argument("--trl-python", help="a python with trl installed (skips building the venv)")
    ap.add_argument("--trl-venv", default=os.path.expanduser("~/.cache/hpt-megatron/trl-venv"))
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return trl_worker(*args.worker[:3], json.loads(args.worker[3]))
    kinds = ["random", "sft"] if args.start == "both" else args.start.split(",")
    if unknown := set(kinds) - {"random", "sft", "mini"}:
        ap.error(f"--start: unknown {sorted(unknown)}; choose from random, sft, mini")
    python = trl_python(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        starts: dict[str, Start] = {}
        if "random" in kinds or "sft" in kinds:
            starts["random"] = Start("random", make_start(work / "start_random", seed=0))
        if "sft" in kinds:
            starts["sft"] = sft_start(starts["random"], work / "sft", args.sft_steps)
        if "mini" in kinds:
            starts["mini"] = mini_start(Path(args.mini_out).resolve())
        for kind in kinds:
            compare(starts[kind], python, args, work)


def compare(start: Start, python: str, args: argparse.Namespace, work: Path) -> None:
    """TRL and every hpt arm from ``start``, interleaved over ``args.rounds`` rounds."""
    prompts = work / f"prompts_{start.name}.jsonl"
    write_prompts(start, prompts)
    arms = [
        (procs, elide)
        for elide in {"on": [True], "off": [False], "both": [True, False]}[args.elision]
        for procs in (1, 2)
    ]

    def arm(procs: int, elide: bool) -> str:
        name = "hpt tp=1, 1 process" if procs == 1 else "hpt tp=2, 2 processes (README)"
        return name if elide else f"{name}, no elision"

    runs: dict[str, list[dict]] = {"TRL GRPOTrainer": []}
    runs.update({arm(*a): [] for a in arms})
    for r in range(args.rounds):
        tag = f"{start.name}_{r}"
        trl = run_trl(python, start, prompts, work / f"trl_{tag}.json", args.steps)
        runs["TRL GRPOTrainer"] += trl
        for procs, elide in arms:
            out = work / f"hpt{procs}_{'e' if elide else 'n'}_{tag}"
            runs[arm(procs, elide)] += run_hpt(procs, start, out, args.steps, elide)
    print(f"{start.name} start: {args.rounds} rounds x {args.steps - 1} steps, medians", flush=True)
    base = summarise("TRL GRPOTrainer", runs.pop("TRL GRPOTrainer"), None)
    for name, rows in runs.items():
        summarise(name, rows, base)


if __name__ == "__main__":
    main()
