#!/bin/bash
# DiT-XL/2 + TREAD (route 2 -> 24 at 0.5, global batch 256) on N nodes x 8 GPUs.
#   sbatch slurm/train_xl.sh data.remote=s3://bucket/imagenet256-sdvae routing.routes[0].rate=0.5
#   sbatch --nodes=4 slurm/train_xl.sh parallelism.backend=fsdp
# Extra arguments are key=value overrides of yamls/tread_xl2.yaml. See slurm/common.sh for the knobs.
#SBATCH --job-name=tread-xl2
#SBATCH --nodes=2
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
tread_launch yamls/tread_xl2.yaml "$@"
