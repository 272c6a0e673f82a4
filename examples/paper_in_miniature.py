"""The HPT paper's main claims in miniature, on the built-in arithmetic task (CPU).

    python examples/paper_in_miniature.py --quick --out runs/mini_quick     # 9-15 min
    python examples/paper_in_miniature.py --out runs/mini                   # the full run

Stages, each cached in ``--out`` (a finished stage is reused; ``--force`` redoes them all):

1. **Base** (``base/<size>/``): the tiny model pre-trained with SFT on level 1 (two-digit
   addition) only; its solve rate on the training prompts (level 2: +, -, *) at temperature 1,
   n = 8, is measured and written down (the paper's base models solve part of their training set).
2. **Learning rate** (``lr/``): one shared learning rate for every method, chosen once on the
   validation split (50 held-out problems per operation, never a benchmark): the grid value with the
   best mean greedy validation accuracy of the two single-signal baselines, SFT and GRPO, after
   a short run from the base. HPT plays no part in the choice.
3. **Comparison** (``runs/<size>/<method>/seed<k>/``): SFT, GRPO, SFT->GRPO, LUFFY, HPT and
   ``hpt_paper`` from the base, the same budget (steps x prompts x rollouts) and the same shared
   settings; each preset keeps its own defaults (e.g. HPT's entropy bonus 0.001); SFT->GRPO
   switches at half the budget. Gate ablation on the first size: HPT with gamma 2/8, always
   SFT (gamma 8/8) and always RL (no gate). ``--quick``: one seed, the tiny size, 50 x 16.
4. **Benchmarks** through ``hpt eval``'s code path (``hpt_megatron.eval``): avg@k at temperature
   0.6, top-p 0.95, greedy accuracy, Pass@1..k; in distribution: level 2's held-out +, -, *;
   out of distribution: level 3 (three-digit + and -, two-digit by two-digit *).
5. **Report**: ``summary.md``, ``summary.json`` and PNG plots (see ``report.py``).

Trainings run as ``hpt train`` subprocesses, ``--nproc 1`` with ``parallel.tp=1`` and
``OMP_NUM_THREADS=1``, ``--jobs`` (2) at a time.
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
    base_steps: int = 300
    lr_steps: int = 0  # the learning-rate runs (default: half of steps)
    lr_grid: list[float] = field(default_factory=lambda: [3e-5, 1e-4, 3e-4, 1e-3])
    val_every: int = 10
    eval_k: int = 32
    id_problems: int | None = None  # per benchmark (None: all)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/paper_in_miniature")
    p.add_argument("--quick", action="store_true", help="one seed, one size, fewer steps")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--sizes", default="tiny,large", help=f"comma-separated of {list(SIZES)}")
    p.add_argument("--steps", type=int, help="steps per method (default: 100, quick 50)")
    p.add_argument("--prompts-per-step", type=int, help="default: 32, quick 16")
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument(
        "--lr-grid",
        help="comma-separated learning rates (default 3e-5,1e-4,3e-4,1e-3; quick 1e-4,3e-4)",
    )
    p.add_argument("--lr", type=float, help="skip the choice and use this learning rate")
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
        steps=args.steps or (50 if args.quick else 100),
        prompts=args.prompts_per_step or (16 if args.quick else 32),
        base_steps=args.base_steps,
        eval_k=args.eval_k or 32,
        id_problems=args.eval_problems or (32 if args.quick else 48),
    )
    budget.lr_steps = max(1, budget.steps // 2)
    budget.val_every = _divisor_near(budget.steps, budget.steps / 6)
    if args.lr_grid:
        budget.lr_grid = [float(x) for x in args.lr_grid.split(",")]
    elif args.quick:
        budget.lr_grid = [1e-4, 3e-4]
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
    out = [
        *tasks.task_overrides(tasks.TRAIN_LEVELS),
        f"data.val={base.parents[3] / 'sets' / 'val.jsonl'}",
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


def make_base(out: Path, size: str, b: Budget, force: bool) -> dict:
    """Pre-train one size's base model and measure its solve rate on the training prompts."""
    folder = out / "base" / size
    summary = folder / "base.json"
    overrides = [
        *tasks.task_overrides(tasks.BASE_LEVELS),
        *SIZES[size],
        "algorithm.preset=sft",
        f"run.steps={b.base_steps}",
        "run.val_every=0",
        "data.prompts_per_step=64",
        "trainer.lr=3e-3",
        "trainer.min_lr=3e-4",
        "trainer.lr_schedule=cosine",
        "trainer.warmup_steps=20",
    ]
    if summary.exists() and not force:
        cached = json.loads(summary.read_text())
        if cached["overrides"] == overrides and cached["sets"] == _digest(out / "sets"):
            return cached
    print(f"== base model ({size}): SFT on level {tasks.BASE_LEVELS}", flush=True)
    job(folder / "run", overrides, out / "sets", b.eval_k, force)
    prompts = folder / "train_prompts.jsonl"
    prompts.write_text("".join(json.dumps(tasks.row(e)) + "\n" for e in tasks.train_prompts(256)))
    cmd = [sys.executable, str(HERE / "evaluate.py"), "solve", str(folder / "run" / "hf")]
    run_logged([*cmd, str(prompts), str(folder / "solve")], folder / "run" / "job.log")
    result = {
        "solve_rate": json.loads((folder / "solve" / "solve_rates.json").read_text()),
        "scores": json.loads((folder / "run" / "eval" / "scores.json").read_text()),
        "hf": str(folder / "run" / "hf"),
        "overrides": overrides,
        "sets": _digest(out / "sets"),
    }
    summary.write_text(json.dumps(result, indent=1))
    return result


def choose_lr(args: argparse.Namespace, out: Path, base: Path, pool: ThreadPoolExecutor) -> dict:
    """The shared learning rate: best mean validation accuracy of SFT and GRPO over the grid."""
    b = args.budget
    if args.lr is not None:
        return {"lr": args.lr, "how": "given with --lr", "grid": {}}
    short = Budget(**{**b.__dict__, "steps": b.lr_steps, "val_every": b.lr_steps})
    futures = {}
    for lr in b.lr_grid:
        for method in ("sft", "grpo"):
            run_dir = out / "lr" / f"{lr:g}" / method
            overrides = method_overrides(method, short, lr, 1, base)
            futures[lr, method] = pool.submit(train_only, run_dir, overrides, args.force)
    grid = {}
    for (lr, method), fut in futures.items():
        grid.setdefault(f"{lr:g}", {})[method] = report.last_val(fut.result())
    best = max(grid, key=lambda lr: sum(grid[lr].values()) / len(grid[lr]))
    how = (
        f"grid {[f'{x:g}' for x in b.lr_grid]}, {b.lr_steps} steps of SFT and of GRPO from the "
        "base (seed 1), greedy accuracy on the validation split (50 held-out problems per "
        "operation, none in a benchmark); the best mean of the two"
    )
    return {"lr": float(best), "how": how, "grid": grid}


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
    first = args.sizes[0]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        pending = {size: pool.submit(make_base, out, size, b, args.force) for size in args.sizes}
        bases = {size: fut.result() for size, fut in pending.items()}
        lr = choose_lr(args, out, Path(bases[first]["hf"]), pool)
        print(f"== shared learning rate {lr['lr']:g} ({lr['how']})", flush=True)
        futures = []
        for size in args.sizes:
            for name in args.methods:
                if name in ABLATIONS and size != first:
                    continue
                for seed in range(1, args.seeds + 1):
                    run_dir = out / "runs" / size / name / f"seed{seed}"
                    base = Path(bases[size]["hf"])
                    overrides = [*SIZES[size], *method_overrides(name, b, lr["lr"], seed, base)]
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
        "lr": lr,
        "eval_k": b.eval_k,
        "benchmarks": {name: len(path.read_text().splitlines()) for name, path in sets.items()},
        "wall_min": (time.perf_counter() - t0) / 60,
        "command": " ".join(["python", "examples/paper_in_miniature.py", *(argv or sys.argv[1:])]),
    }
    summary = report.write_all(out, settings, bases, METHODS, list(ABLATIONS))
    print(summary)
    print(f"total {settings['wall_min']:.1f} min; {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
