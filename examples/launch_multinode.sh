#!/usr/bin/env bash
# Multi-node `hpt train`: one torchrun per node, all joined in one rendezvous.
#
# Inside a Slurm allocation (sbatch/salloc), run it once; it starts itself on every node with
# `srun --ntasks-per-node=1`, and each copy derives its torchrun arguments from Slurm:
#   --nnodes       $SLURM_NNODES
#   --node_rank    $SLURM_NODEID
#   --master_addr  the first host of $SLURM_JOB_NODELIST
#
#   bash examples/launch_multinode.sh examples/qwen2.5-math-7b-hpt.yaml [key.sub=value ...]
#
# Without Slurm, start it on every node with NNODES, NODE_RANK and MASTER_ADDR set by hand:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/launch_multinode.sh CONFIG ...
#
# Env: GPUS_PER_NODE (default: $SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 8),
#      MASTER_PORT (default 29500), SRUN_ARGS (extra srun arguments, e.g. container flags),
#      HPT_PYTHON (the trainer's python, default python3).
# The parallel layout (parallel.tp/pp/cp) comes from the config; data parallel is the rest of
# NNODES x GPUS_PER_NODE. Run every node from the same checkout (a shared file system) so that
# relative paths in the config (data/, runs/) resolve alike.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
REPO_ROOT="$(cd "$(dirname "$SCRIPT")/.." && pwd)"
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG.yaml [key.sub=value ...]" >&2; exit 2; }

# In an allocation but not yet in a job step (a batch script or salloc shell: no step id, or
# Slurm's reserved ids >= 4294967290 for the batch/extern/interactive steps): start one task per
# node, each running this script.
in_step() {
    [[ -n "${HPT_IN_SRUN:-}" ]] && return 0
    [[ -n "${SLURM_STEP_ID:-}" && "${SLURM_STEP_ID}" =~ ^[0-9]+$ ]] &&
        ((SLURM_STEP_ID < 4294967290))
}
if [[ -n "${SLURM_JOB_ID:-}" ]] && ! in_step; then
    # shellcheck disable=SC2086  # SRUN_ARGS is a list of words on purpose
    exec srun --nodes="${SLURM_NNODES}" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        ${SRUN_ARGS:-} env HPT_IN_SRUN=1 bash "$SCRIPT" "$@"
fi

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    NNODES="${SLURM_NNODES}"
    NODE_RANK="${SLURM_NODEID}"
    MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
fi
: "${NNODES:?set NNODES (or run inside a Slurm allocation)}"
: "${NODE_RANK:?set NODE_RANK (or run inside a Slurm allocation)}"
: "${MASTER_ADDR:?set MASTER_ADDR (or run inside a Slurm allocation)}"
MASTER_PORT="${MASTER_PORT:-29500}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        GPUS_PER_NODE="$SLURM_GPUS_ON_NODE"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        GPUS_PER_NODE="$(nvidia-smi --list-gpus | wc -l)"
    else
        GPUS_PER_NODE=8
    fi
fi

echo "[launch_multinode] $(hostname): node $NODE_RANK of $NNODES, $GPUS_PER_NODE GPUs," \
    "master $MASTER_ADDR:$MASTER_PORT" >&2
cd "$REPO_ROOT"
exec "${HPT_PYTHON:-python3}" -m torch.distributed.run \
    --nnodes "$NNODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" \
    --master_port "$MASTER_PORT" \
    -m hpt_megatron.cli train "$@"
