"""The HPT paper's main claims in miniature, on the built-in arithmetic task (CPU), in the
paper's regime, with verdicts by rules fixed here before any run.

    python examples/paper_in_miniature.py --quick --out runs/mini_quick     # 8 min, 2 idle cores
    python examples/paper_in_miniature.py --out runs/mini                   # 48 min

Stages, each cached in ``--out`` (a finished stage is reused; ``--force`` redoes them all):

1. **Base** (``base/<size>/``): the tiny model pre-trained with SFT on half A of level 2's
   training prompts (every operation; ``tasks.py``), for the first of ``--base-steps`` (200, 250,
   300) whose base lands in the regime band on half B, where the methods train. The **regime
   checks**, measured on B's first 256 prompts and written to ``summary.json`` before any method
   runs (none involves HPT): the share of prompts the base solves 0 of 8 times at temperature 1
   between 20% and 50%, 8 of 8 at most 30%, in between at least 30%; the demonstrations' NLL
   under the base below 1 nat/token for every operation. After the runs, two more: SFT and GRPO
   each beat the base's validation accuracy by at least one standard deviation over seeds.
2. **Learning rate per method** (``lr/<method>/<lr>/``): every method, HPT included, picks its
   own from the same grid (1e-5, 3e-5, 1e-4) by the same rule: the best final greedy accuracy on
   the validation split (150 held-out problems, never a benchmark) after ``lr_steps`` (100) steps
   from the base, seed 1 (a tie goes to the smaller rate).
3. **Comparison** (``runs/<size>/<method>/seed<k>/``): SFT, GRPO, SFT->GRPO, LUFFY, HPT and
   ``hpt_paper`` from the base on half B, 200 steps x 32 prompts x 8 rollouts, 3 seeds; each
   preset keeps its own defaults (e.g. HPT's entropy bonus 0.001); SFT->GRPO switches at half the
   budget. Gate ablation: HPT with gamma 2/8, always SFT (gamma 8/8), always RL (no gate).
4. **Benchmarks** through ``hpt eval``'s code path (``hpt_megatron.eval``): avg@k (k = 32) at
   temperature 0.6, top-p 0.95, greedy accuracy, Pass@1..k; in distribution: level 2's held-out
   +, -, *; out of distribution: level 3 (three-digit + and -, two-digit by two-digit *).
5. **Report** (``report.py``): ``summary.md``, ``summary.json`` and PNG plots, with a verdict
   per claim (``report.VERDICT_RULES``): "supported", "inconclusive" or "falsified"; every one
   "withheld" when a regime check fails (the design is then out of the paper's regime and tests
   nothing of its claims).

Trainings run as ``hpt train`` subprocesses, ``--nproc 1`` with ``parallel.tp=1`` and
``OMP_NUM_THREADS=1``, ``--jobs`` (2) at a time. ``--quick``: one seed, 50 steps x 16 prompts,
learning rates chosen over (3e-5, 1e-4) in 25 steps. The grid is low because 40-step runs from
this base measured greedy validation falling at 3e-4 (SFT 42 -> 20 in 40 steps, GRPO 42 -> 7 in
25) and about holding at 1e-5 to 1e-4 (the miniature's doc has the figures).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "examples" / "paper_in_miniature"
sys.path.insert(0, str(HERE))

import report  # noqa: E402
import tasks  # noqa: E402

CONFIG = HERE / "tiny.yaml"
METHODS = ("sft", "grpo", "sft_then_grpo", "luffy", "hpt", "hpt_paper")
# gate ablation: name -> overrides on the hpt preset (gamma 0 is hpt itself)
ABLATIONS = {
    "gamma_2of8": ["algorithm.options.gate_gamma=2/8"],
    "always_sft": ["algorithm.options.gate_gamma=1.0"],
    "always_rl": ["algorithm.options.batch_rule=none"],
}
# model size -> overrides of the inline model (the large one has about 4x the parameters)
SIZES = {
    "tiny": [],
    "large": ["model.inline.hidden_size=256", "model.inline.intermediate_size=1024"],
}


@dataclass
class Budget:
    steps: int
    prompts: int
    base_steps: list[int] = field(default_factory=lambda: [200, 250, 300])
    lr_steps: int = 100  # the learning-rate runs
    lr_grid: list[float] = field(default_factory=lambda: [1e-5, 3e-5, 1e-4])
    val_every: int = 10
    eval_k: int = 32
    id_problems: int | None = None  # per benchmark (None: all)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/paper_in_miniature")
    p.add_argument("--quick", action="store_true", help="one seed, fewer steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sizes", default="tiny", help=f"comma-separated of {list(SIZES)}")
    p.add_argument("--steps", type=int, help="steps per method (default: 200, quick 50)")
    p.add_argument("--prompts-per-step", type=int, help="default: 32, quick 16")
    p.add_argument(
        "--base-steps",
        default="200,250,300",
        help="the base's pre-training lengths, tried in order (the first in the band is kept)",
    )
    p.add_argument(
        "--probe-prompts",
        type=int,
        default=tasks.PROBE_SIZE,
        help=f"half B's first prompts the base is probed on (default {tasks.PROBE_SIZE})",
    )
    p.add_argument("--lr-steps", type=int, help="steps of a learning-rate run (100, quick 25)")
    p.add_argument("--lr-grid", help="comma-separated (default 1e-5,3e-5,1e-4; quick 3e-5,1e-4)")
    p.add_argument("--lr", type=float, help="skip the choice: every method uses this rate")
    p.add_argument("--eval-k", type=int, help="samples per benchmark problem (default 32)")
    p.add_argument(
        "--eval-problems", type=int, help="first N problems per benchmark (default: 48, quick 32)"
    )
    p.add_argument(
        "--methods",
        default=",".join([*METHODS, *ABLATIONS]),
        help="comma-separated subset of the methods and ablations (default: all)",
    )
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    p.add_argument("--force", action="store_true", help="redo every stage")
    args = p.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    if any(m not in (*METHODS, *ABLATIONS) for m in args.methods):
        p.error(f"--methods: choose from {[*METHODS, *ABLATIONS]}")
    if any(s not in SIZES for s in args.sizes):
        p.error(f"--sizes: choose from {list(SIZES)}")
    if args.quick:
        args.seeds, args.sizes = 1, args.sizes[:1]
    budget = Budget(
        steps=args.steps or (50 if args.quick else 200),
        prompts=args.prompts_per_step or (16 if args.quick else 32),
        base_steps=[int(x) for x in args.base_steps.split(",") if x],
        lr_steps=args.lr_steps or (25 if args.quick else 100),
        eval_k=args.eval_k or 32,
        id_problems=args.eval_problems or (32 if args.quick else 48),
    )
    budget.val_every = _divisor_near(budget.steps, budget.steps / 10)
    if args.lr_grid:
        budget.lr_grid = [float(x) for x in args.lr_grid.split(",")]
    elif args.quick:
        budget.lr_grid = [3e-5, 1e-4]
    args.budget = budget
    return args


def _divisor_near(n: int, target: float) -> int:
    """The divisor of ``n`` closest to ``target`` (so that the last step validates)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def hpt_train(run_dir: Path, overrides: list[str]) -> list[str]:
    """The ``hpt train`` command of one run (one process, no tensor parallelism)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--standalone",
        "-m",
        "hpt_megatron.cli",
        "train",
        str(CONFIG),
        f"run.output_dir={run_dir}",
        "parallel.tp=1",
        "logging.progress_bar=false",
        *overrides,
    ]


def run_logged(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with log.open("a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd[:8])} ...; see {log}\n{tail}")


def _same_settings(run_dir: Path, overrides: list[str]) -> bool:
    """The finished run in ``run_dir`` was trained with ``overrides`` (else it is redone)."""
    record = run_dir / "overrides.json"
    return record.exists() and json.loads(record.read_text()) == overrides


def _digest(folder: Path) -> str:
    """A short hash of the benchmark files (a cached evaluation must have scored these)."""
    text = "".join(p.read_text() for p in sorted(folder.glob("*.jsonl")))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def job(run_dir: Path, overrides: list[str], sets_dir: Path, k: int, force: bool) -> Path:
    """Train (unless finished) and evaluate one run; returns its folder."""
    done = run_dir / "eval" / "scores.json"
    key = [*overrides, f"eval k={k} sets={_digest(sets_dir)}"]
    if done.exists() and not force and _same_settings(run_dir, key):
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    run_logged(hpt_train(run_dir, overrides), run_dir / "job.log")
    t1 = time.perf_counter()
    evaluate_cmd = [sys.executable, str(HERE / "evaluate.py"), "scores", str(run_dir / "hf")]
    run_logged([*evaluate_cmd, str(sets_dir), str(run_dir / "eval"), str(k)], run_dir / "job.log")
    wall = {"train_s": t1 - t0, "eval_s": time.perf_counter() - t1}
    (run_dir / "wall.json").write_text(json.dumps(wall))
    (run_dir / "overrides.json").write_text(json.dumps(key))
    print(
        f"  done {run_dir}: train {wall['train_s']:.0f} s, eval {wall['eval_s']:.0f} s", flush=True
    )
    return run_dir


def method_overrides(method: str, b: Budget, lr: float, seed: int, base: Path) -> list[str]:
    """``base``: the base model's HF folder, ``<out>/base/<size>/run/hf``."""
    preset, extra = (method, []) if method in METHODS else ("hpt", ABLATIONS[method])
    sets = base.parents[3] / "sets"
    out = [
        f"data.train={sets / 'train.jsonl'}",  # half B
        f"data.val={sets / 'val.jsonl'}",
        "data.system_prompt=null",
        f"model.hf_weights={base}",
        f"algorithm.preset={preset}",
        f"run.seed={seed}",
        f"run.steps={b.steps}",
        f"run.val_every={b.val_every}",
        f"data.prompts_per_step={b.prompts}",
        f"trainer.lr={lr}",
        *extra,
    ]
    if method == "sft_then_grpo":
        out.append(f"algorithm.options.switch_step={b.steps // 2}")
    return out


def base_overrides(out: Path, size: str, steps: int) -> list[str]:
    """SFT on half A for ``steps`` steps (cosine from 3e-3 to 3e-4 after 20 of warm-up)."""
    return [
        f"data.train={out / 'sets' / 'base_train.jsonl'}",
        "data.system_prompt=null",
        *SIZES[size],
        "algorithm.preset=sft",
        f"run.steps={steps}",
        "run.val_every=0",
        "data.prompts_per_step=64",
        "trainer.lr=3e-3",
        "trainer.min_lr=3e-4",
        "trainer.lr_schedule=cosine",
        "trainer.warmup_steps=20",
    ]


def regime_checks(probe: dict) -> dict:
    """The checks on the base, before any method runs: ``{check: {"value", "pass"}}``."""
    sr = probe["solve_rate"]
    checks = {
        "share_at_0_of_8": (sr["frac_zero"], 20.0 <= sr["frac_zero"] <= 50.0),
        "share_at_8_of_8": (sr["frac_all"], sr["frac_all"] <= 30.0),
        "share_mixed": (sr["frac_mixed"], sr["frac_mixed"] >= 30.0),
    }
    for op, nll in probe["demo_nll"].items():
        checks[f"demo_nll_{op}"] = (nll, nll < 1.0)
    return {k: {"value": v, "pass": bool(ok)} for k, (v, ok) in checks.items()}


def make_base(out: Path, size: str, b: Budget, force: bool) -> dict:
    """Pre-train one size's base: the first of ``b.base_steps`` whose regime checks pass (else
    the last tried, out of regime), its probe and its benchmark and validation scores."""
    folder = out / "base" / size
    summary = folder / "base.json"
    probe_rows = len((out / "sets" / "probe.jsonl").read_text().splitlines())
    key = {"candidates": b.base_steps, "sets": _digest(out / "sets"), "size": size}
    key["probe"] = probe_rows
    if summary.exists() and not force:
        cached = json.loads(summary.read_text())
        if cached["key"] == key:
            return cached
    tried = {}
    for steps in b.base_steps:
        print(f"== base model ({size}): SFT on half A for {steps} steps", flush=True)
        run = folder / f"steps{steps}"
        job(run, base_overrides(out, size, steps), out / "sets", b.eval_k, force)
        cmd = [sys.executable, str(HERE / "evaluate.py"), "probe", str(run / "hf")]
        cmd += [str(out / "sets" / "probe.jsonl"), str(run / "probe"), str(CONFIG)]
        cmd.append(str(out / "sets" / "val.jsonl"))
        run_logged(cmd, run / "job.log")
        probe = json.loads((run / "probe" / "probe.json").read_text())
        checks = regime_checks(probe)
        tried[steps] = {"probe": probe, "regime": checks}
        if all(c["pass"] for c in checks.values()):
            break
    chosen = steps
    scores = json.loads((folder / f"steps{chosen}" / "eval" / "scores.json").read_text())
    result = {
        "steps": chosen,
        "rule": f"the first of {b.base_steps} steps whose base passes every regime check",
        "tried": tried,
        "regime": tried[chosen]["regime"],
        "solve_rate": tried[chosen]["probe"]["solve_rate"],
        "demo_nll": tried[chosen]["probe"]["demo_nll"],
        "val_greedy": tried[chosen]["probe"]["val_greedy"],
        "scores": scores,
        "hf": str(folder / f"steps{chosen}" / "hf"),
        "key": key,
    }
    summary.write_text(json.dumps(result, indent=1))
    return result


def choose_lrs(
    args: argparse.Namespace, out: Path, base: Path, pool: ThreadPoolExecutor
) -> dict[str, dict]:
    """Each method's learning rate: the best final validation accuracy over the grid after
    ``lr_steps`` steps from the base, seed 1 (ties: the smaller rate)."""
    b = args.budget
    if args.lr is not None:
        return {m: {"lr": args.lr, "how": "given with --lr", "grid": {}} for m in args.methods}
    short = Budget(**{**b.__dict__, "steps": b.lr_steps, "val_every": b.lr_steps})
    futures = {}
    for method in args.methods:
        for lr in b.lr_grid:
            run_dir = out / "lr" / method / f"{lr:g}"
            overrides = method_overrides(method, short, lr, 1, base)
            futures[method, lr] = pool.submit(train_only, run_dir, overrides, args.force)
    how = (
        f"grid {[f'{x:g}' for x in b.lr_grid]}: the best greedy validation accuracy after "
        f"{b.lr_steps} steps from the base (seed 1; a tie goes to the smaller rate)"
    )
    chosen = {}
    for method in args.methods:
        grid = {lr: report.last_val(futures[method, lr].result()) for lr in b.lr_grid}
        best = max(grid, key=lambda lr: (grid[lr], -lr))
        chosen[method] = {"lr": best, "how": how, "grid": {f"{k:g}": v for k, v in grid.items()}}
    return chosen


def train_only(run_dir: Path, overrides: list[str], force: bool) -> Path:
    finished = (run_dir / "metrics.jsonl").exists() and (run_dir / "hf").exists()
    if finished and not force and _same_settings(run_dir, overrides):
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    run_logged(hpt_train(run_dir, [*overrides, "checkpoint.export_hf=false"]), run_dir / "job.log")
    (run_dir / "hf").mkdir()  # marks the run finished
    (run_dir / "overrides.json").write_text(json.dumps(overrides))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    b = args.budget
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sets = tasks.write_sets(out / "sets", b.id_problems)
    tasks.write_halves(out / "sets", args.probe_prompts)
    first = args.sizes[0]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = {size: pool.submit(make_base, out, size, b, args.force) for size in args.sizes}
        bases = {size: fut.result() for size, fut in pending.items()}
        # Written before any method runs: the regime checks do not depend on their results.
        (out / "regime.json").write_text(
            json.dumps({size: base["regime"] for size, base in bases.items()}, indent=1)
        )
        lrs = choose_lrs(args, out, Path(bases[first]["hf"]), pool)
        for name, chosen in lrs.items():
            print(f"== {name}: learning rate {chosen['lr']:g} ({chosen['grid']})", flush=True)
        futures = []
        for size in args.sizes:
            for name in args.methods:
                if name in ABLATIONS and size != first:
                    continue
                for seed in range(1, args.seeds + 1):
                    run_dir = out / "runs" / size / name / f"seed{seed}"
                    base = Path(bases[size]["hf"])
                    lr = lrs[name]["lr"]
                    overrides = [*SIZES[size], *method_overrides(name, b, lr, seed, base)]
                    futures.append(
                        pool.submit(job, run_dir, overrides, out / "sets", b.eval_k, args.force)
                    )
        for fut in futures:
            fut.result()
    settings = {
        "steps": b.steps,
        "prompts_per_step": b.prompts,
        "rollouts": 8,
        "seeds": args.seeds,
        "sizes": args.sizes,
        "lr_steps": b.lr_steps,
        "lr_grid": b.lr_grid,
        "eval_k": b.eval_k,
        "benchmarks": {name: len(path.read_text().splitlines()) for name, path in sets.items()},
        "wall_min": (time.perf_counter() - t0) / 60,
        "command": " ".join(["python", "examples/paper_in_miniature.py", *(argv or sys.argv[1:])]),
    }
    summary = report.write_all(out, settings, bases, lrs, METHODS, list(ABLATIONS))
    print(summary)
    print(f"total {settings['wall_min']:.1f} min; {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
