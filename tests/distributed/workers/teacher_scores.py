"""The in-trainer teacher (``trainer/teacher.py``) built from HF folders at one TP/PP layout scores
sequences; the writer prints JSON.

    torchrun ... teacher_scores.py --tp 2 --input IN.jsonl HF_DIR [HF_DIR ...]

Each sequence is a sample with its first token as the prompt and the rest as the response; prints
``{HF_DIR: [[log pi_T of each response token...], ...]}`` on the last stage's TP rank 0.
"""

from __future__ import annotations

import argparse
import json

from hpt_megatron.config.sections import ModelConfig, ParallelConfig, TrainerConfig
from hpt_megatron.data.sample import Sample
from hpt_megatron.parallel.runtime import init_distributed, shutdown_distributed
from hpt_megatron.score import read_sequences
from hpt_megatron.trainer.batching import collate
from hpt_megatron.trainer.teacher import TeacherPolicy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--input", required=True)
    parser.add_argument("folders", nargs="+")
    args = parser.parse_args()
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    ctx = init_distributed(parallel)
    samples = [
        Sample(prompt_id=str(i), group_id=i, prompt_ids=s[:1], response_ids=s[1:])
        for i, s in enumerate(read_sequences(args.input))
    ]
    microbatches = [collate(samples, [0, 1]), collate(samples, [2])]
    results = {}
    for folder in args.folders:
        teacher = TeacherPolicy.build(folder, ModelConfig(), parallel, TrainerConfig(), ctx)
        out = teacher.forward_logprobs(microbatches)
        if out is None:
            continue  # not the last stage
        rows = []
        for mb, logprobs_bs in zip(microbatches, out):
            mask_bs = mb.loss_mask_bs.bool()
            rows += [logprobs_bs[b][mask_bs[b]].tolist() for b in range(mask_bs.shape[0])]
        results[folder] = rows
    if ctx.is_last_stage and ctx.tp_rank == 0 and ctx.dp_rank == 0:
        print(json.dumps(results))
    shutdown_distributed()


if __name__ == "__main__":
    main()
