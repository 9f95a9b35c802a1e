#!/usr/bin/env bash
# Unsupervised domain adaptation (UDA) as a SLURM batch job or job array.
#
#   sbatch [sbatch options] launch/uda.sh [CONFIG.yaml | LIST.txt] [--output-dir DIR] [--data-root DIR]
#          [--no-resume] [key=value ...]
#
#   sbatch launch/uda.sh configs/uda/msmt2market_pass_vit_s.yaml --data-root /data \
#       model.init_from=runs/finetune/124/model_final.pth
# Every #SBATCH value below is a default for 4 GPUs of an A100 node, the published run's 4 GPUs: the recipes'
# BN chunks (train.ghost_bn_size) split a 256-image batch as 4 processes do. The MSMT17-side recipes
# (ghost_bn_size 128) were published on 2 GPUs: sbatch --ntasks-per-node=2 --gpus-per-node=2 launch/uda.sh ...
# Override any value on the sbatch command line or with a profile (launch/pipeline.sh --profile).
# The same settings come from the environment too: CONFIG, OUTPUT_DIR (default runs/uda/<job id>),
# DATA_ROOT, OVERRIDES, PYTHON, RESUME=0. A job array over LIST.txt runs one line per task. See launch/README.md.
#SBATCH --job-name=passreid-uda
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=1-00:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file from the spool directory: look for the checkout in PASSREID_ROOT, next to
# this file (bash launch/uda.sh, no SLURM), in the submission directory, and where the submitted file is.
submitted_from="$(scontrol show job "${SLURM_JOB_ID:-none}" 2> /dev/null \
    | sed -n 's|^ *Command=\([^ ]*\)/launch/[^/ ]*\.sh.*|\1|p' | head -n 1 || true)"
for PASSREID_ROOT in "${PASSREID_ROOT:-}" "$(dirname -- "$0")/.." "${SLURM_SUBMIT_DIR:-.}" "$submitted_from"; do
    [ -f "$PASSREID_ROOT/launch/common.sh" ] && break
done
if [ ! -f "$PASSREID_ROOT/launch/common.sh" ]; then
    echo "passreid launch: cannot find the checkout; set PASSREID_ROOT" >&2
    exit 2
fi
PASSREID_ROOT="$(cd -- "$PASSREID_ROOT" && pwd)"
export PASSREID_ROOT
# shellcheck source=launch/common.sh
source "$PASSREID_ROOT/launch/common.sh"

passreid_run_stage uda configs/uda/msmt2market_pass_vit_s.yaml "$@"
