#!/bin/bash
# A job array over configs x seeds: each array task runs one (config, seed) on one GPU through
# python -m mgff.sweep, into the folder the whole sweep would use (OUT/<config stem>/seed<k>/), so
#   python -m mgff.report runs/sweep
# compares the finished tasks as it would a sweep run in one go. Edit CONFIGS and SEEDS, keep
# --array=0-(number of configs x number of seeds - 1), and submit from the repository root; arguments
# after the script go to every mgff.fit run:
#   sbatch experiments/slurm/sweep_array.sh
#   OUT=runs/ablations sbatch experiments/slurm/sweep_array.sh --data.init_args.root /data/CUB_200_2011
#   sbatch --array=4 experiments/slurm/sweep_array.sh --data.init_args.root /data/CUB_200_2011   # one task again
# Task i runs config i / (number of seeds) with seed i % (number of seeds). A finished run is skipped;
# an unfinished one resumes from its last checkpoint (see python -m mgff.sweep --help).
# Preemption / time limit: SIGUSR1 goes to the batch shell only (B:), which is mgff.sweep (exec); it
# passes the signal once to its mgff.fit run, which checkpoints (hpc_ckpt_N.ckpt in the run folder),
# requeues this array task and exits; the requeued task resumes from that checkpoint. No srun: a step's
# signal may reach every process of the step, and a second SIGUSR1 ends mgff.fit without a checkpoint.
#SBATCH --job-name=mgff-sweep
#SBATCH --array=0-8
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=B:SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

set -euo pipefail

# configs stacked with '+' are passed as repeated --config (a dataset config, then an ablation)
CONFIGS=(
    experiments/cub.yaml
    experiments/cub.yaml+experiments/ablation/no_se.yaml
    experiments/cub.yaml+experiments/ablation/no_gcn.yaml
)
SEEDS=(0 1 2)
OUT=${OUT:-runs/sweep}

TASK=${SLURM_ARRAY_TASK_ID:?not an array task: submit with sbatch (this script sets --array)}
RUNS=$(( ${#CONFIGS[@]} * ${#SEEDS[@]} ))
if (( TASK < 0 || TASK >= RUNS )); then
    echo "mgff: array task $TASK out of range: ${#CONFIGS[@]} configs x ${#SEEDS[@]} seeds = $RUNS runs, use --array=0-$(( RUNS - 1 ))" >&2
    exit 2
fi
# config-major, the order of mgff.sweep's own runs
CONFIG=${CONFIGS[$(( TASK / ${#SEEDS[@]} ))]}
SEED=${SEEDS[$(( TASK % ${#SEEDS[@]} ))]}
echo "mgff: array job ${SLURM_ARRAY_JOB_ID:-?} task $TASK restart ${SLURM_RESTART_COUNT:-0}: $CONFIG seed $SEED -> $OUT"

# --among: name the folder as the sweep over all CONFIGS would (configs sharing a file name)
exec python -m mgff.sweep --configs "$CONFIG" --seeds "$SEED" --out "$OUT" --among "${CONFIGS[@]}" \
    --threads "${SLURM_CPUS_PER_TASK:-1}" -- "$@"
