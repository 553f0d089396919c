#!/bin/bash
# DiT-B/2 + TREAD (the reference setup: route 2 -> 8 at 0.5, global batch 256) on one node x 8 GPUs.
#   sbatch slurm/train_b2.sh data.remote=s3://bucket/imagenet256-sdvae
#SBATCH --job-name=tread-b2
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail
source "${TREAD_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh"
tread_launch yamls/tread_b2.yaml "$@"
