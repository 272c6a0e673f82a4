"""The HPT paper's main comparison in miniature, on the built-in arithmetic task (CPU).

Trains SFT, GRPO, SFT-then-GRPO, LUFFY and HPT from the same tiny model with the same budget
(steps x prompts per step) and seed, evaluates each final policy on the held-out split (greedy,
all test problems), and prints a table in the shape of the paper's, then the HPT run's
SFT-routed fraction over steps. Both go to ``<out>/summary.md``.

    python examples/paper_in_miniature.py --steps 200 --prompts-per-step 48 --out runs/mini

Each method is one ``hpt train`` subprocess (``torch.distributed.run``, ``--nproc`` gloo
processes with the parallel layout of ``--config``), run one after another. A method whose run
directory already holds a finished run with the same settings is reused, not retrained;
``--force`` retrains it. With the defaults it takes about 15 minutes on 2 CPU cores.

Every preset runs with its own defaults (the base config's ``algorithm.options``, which sets
``entropy_coef: 0``, applies to all five); the only per-method setting is ``switch_step`` (half
the budget) for SFT-then-GRPO.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "examples" / "tiny_cpu.yaml"

# method label (as in the paper's tables) -> preset
METHODS = {
    "sft": ("SFT", "sft"),
    "grpo": ("GRPO", "grpo"),
    "sft_then_grpo": ("SFT -> GRPO", "sft_then_grpo"),
    "luffy": ("LUFFY", "luffy"),
    "hpt": ("HPT", "hpt"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per method")
    p.add_argument("--prompts-per-step", type=int, default=48, help="prompts per step")
    p.add_argument("--out", default="runs/paper_in_miniature", help="output folder")
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base YAML")
    p.add_argument("--seed", type=int, default=1234, help="run.seed, the same for every method")
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="validation interval (default: a quarter of --steps, rounded so the last step "
        "validates)",
    )
    p.add_argument(
        "--curve-every", type=int, default=25, help="steps between points of the SFT curve"
    )
    p.add_argument("--force", action="store_true", help="retrain methods that already finished")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every method (repeatable)",
    )
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if args.steps < 1 or args.prompts_per_step < 1:
        p.error("--steps and --prompts-per-step must be >= 1")
    if args.val_every is None:
        args.val_every = _divisor_near(args.steps, max(1, args.steps // 4))
    if args.steps % args.val_every:
        p.error(f"--val-every {args.val_every} must divide --steps {args.steps}")
    return args


def _divisor_near(n: int, target: int) -> int:
    """The divisor of ``n`` closest to ``target`` (so that step ``n`` validates)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - target), -d))


def overrides(args: argparse.Namespace, method: str, run_dir: Path) -> list[str]:
    _, preset = METHODS[method]
    out = [
        f"run.output_dir={run_dir}",
        f"run.name=mini_{method}",
        f"run.seed={args.seed}",
        f"run.steps={args.steps}",
        f"run.val_every={args.val_every}",
        f"data.prompts_per_step={args.prompts_per_step}",
        f"algorithm.preset={preset}",
        "checkpoint.save_every=0",  # only the final checkpoint (and the best validated one)
        "logging.progress_bar=false",
    ]
    if method == "sft_then_grpo":
        out.append(f"algorithm.options.switch_step={args.steps // 2}")
    return out + list(args.set)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash
    # A resumed run may log a step twice: keep the last record of each step.
    by_step = {int(r["step"]): r for r in rows if "step" in r}
    return [by_step[s] for s in sorted(by_step)]


def finished(args: argparse.Namespace, method: str, run_dir: Path) -> bool:
    """``run_dir`` holds a run of this method with these settings that reached its last step."""
    record = run_dir / "wall_time.json"
    rows = read_metrics(run_dir)
    if not record.exists() or not rows:
        return False
    cmd = json.loads(record.read_text()).get("cmd", [])
    wanted = [args.config, *overrides(args, method, run_dir)]
    same = cmd[-len(wanted) :] == wanted
    return same and rows[-1]["step"] == args.steps and "val/accuracy" in rows[-1]


def train(args: argparse.Namespace, method: str, run_dir: Path) -> float:
    """Run one method to the end; returns its wall time in seconds."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.nproc),
        "--standalone",
        "-m",
        "hpt_megatron.cli",
        "train",
        args.config,
        *overrides(args, method, run_dir),
    ]
    print(f"\n=== {METHODS[method][0]}: {' '.join(cmd)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"{method} failed (exit {proc.returncode}); see {log}:\n{tail}")
    (run_dir / "wall_time.json").write_text(json.dumps({"wall_s": wall, "cmd": cmd}))
    print(f"=== {METHODS[method][0]}: done in {wall / 60:.1f} min", flush=True)
    return wall


def summarize(method: str, run_dir: Path, steps: int) -> dict:
    rows = read_metrics(run_dir)
    val = [r for r in rows if "val/accuracy" in r]
    rewards = [r["reward/mean"] for r in rows if "reward/mean" in r]
    last = rewards[-10:]
    wall = json.loads((run_dir / "wall_time.json").read_text())["wall_s"]
    return {
        "method": METHODS[method][0],
        "accuracy": val[-1]["val/accuracy"] if val else None,
        "val_curve": [(r["step"], r["val/accuracy"]) for r in val],
        "final_reward": sum(last) / len(last) if last else None,
        "steps": rows[-1]["step"] if rows else 0,
        "wall_s": wall,
        "sft_fraction": [
            (r["step"], r["gate/sft_fraction"]) for r in rows if "gate/sft_fraction" in r
        ],
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def render(args: argparse.Namespace, results: list[dict]) -> str:
    budget = args.steps * args.prompts_per_step
    lines = [
        f"# The paper in miniature: arithmetic (level 1), {args.steps} steps x "
        f"{args.prompts_per_step} prompts = {budget} prompts per method, seed {args.seed}",
        "",
        "Held-out accuracy: greedy, the whole test split, at the last step. Final reward: mean "
        "training reward (8 rollouts per prompt, temperature 1) over the last 10 steps; SFT "
        "generates no rollouts.",
        "",
        "| method | held-out accuracy (%) | final reward | steps | wall time |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        reward = "n/a" if r["final_reward"] is None else f"{r['final_reward']:.3f}"
        lines.append(
            f"| {r['method']} | {_pct(r['accuracy'])} | {reward} | {r['steps']} | "
            f"{r['wall_s'] / 60:.1f} min |"
        )
    lines += ["", "Held-out accuracy (%) at each validation:", ""]
    val_steps = sorted({s for r in results for s, _ in r["val_curve"]})
    lines.append("| method | " + " | ".join(f"step {s}" for s in val_steps) + " |")
    lines.append("|---|" + "---:|" * len(val_steps))
    for r in results:
        curve = dict(r["val_curve"])
        lines.append(
            f"| {r['method']} | " + " | ".join(_pct(curve.get(s)) for s in val_steps) + " |"
        )
    hpt = next((r for r in results if r["method"] == METHODS["hpt"][0]), None)
    if hpt and hpt["sft_fraction"]:
        lines += [
            "",
            "HPT: share of prompts routed to SFT (all 8 rollouts wrong), mean over the "
            f"{args.curve_every} steps ending at each step:",
            "",
            "| steps | SFT-routed fraction |",
            "|---|---:|",
        ]
        frac = hpt["sft_fraction"]
        for end in range(args.curve_every, args.steps + args.curve_every, args.curve_every):
            window = [f for s, f in frac if end - args.curve_every < s <= end]
            if window:
                first = max(1, end - args.curve_every + 1)
                lines.append(
                    f"| {first}-{min(end, args.steps)} | {sum(window) / len(window):.3f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = []
    t_all = time.perf_counter()
    for method in args.methods:
        run_dir = out / method
        if finished(args, method, run_dir) and not args.force:
            print(f"=== {METHODS[method][0]}: reusing the finished run in {run_dir}", flush=True)
        else:
            if run_dir.exists():
                shutil.rmtree(run_dir)  # a stale or partial run of other settings
            train(args, method, run_dir)
        results.append(summarize(method, run_dir, args.steps))
    text = render(args, results)
    (out / "summary.md").write_text(text)
    print("\n" + text)
    print(f"total {(time.perf_counter() - t_all) / 60:.1f} min; written to {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
