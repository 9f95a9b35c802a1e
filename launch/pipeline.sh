#!/usr/bin/env bash
# Submit the passreid pipeline as chained SLURM jobs: pre-training, then fine-tuning / USL from its backbone
# export, then UDA from the fine-tuned model. Each job starts only when the one it needs ended well
# (--dependency=afterok, and is cancelled if that one failed); requeued jobs keep their place in the chain.
#
#   launch/pipeline.sh [--profile FILE] [--run-dir DIR] [--stages pretrain,finetune,usl[,uda]] [--dry-run]
#                      [--data-root DIR] [--<stage>-config FILE] [--<stage>-opts "key=value ..."]
#                      [-- extra sbatch options for every job]
#
# Defaults: profile launch/profiles/default.yaml (edit it, or copy it and pass --profile), run directory
# runs/pipeline-<date-time>, stages pretrain,finetune,usl,uda, the demo config of each stage. A demo config
# with no --data-root (nor data.root in its opts) reads the demo worlds, rendered first into <run-dir>/worlds
# (python -m passreid.demo). Stage <s> writes <run-dir>/<s>; SLURM logs go to <run-dir>/logs. Prints one line
# per job: "<stage> <job id> <output dir>".
# Environment: PROFILE, RUN_DIR, STAGES, DATA_ROOT, PYTHON; <STAGE>_CONFIG and <STAGE>_OPTS (e.g. FINETUNE_OPTS).
set -euo pipefail

root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
profile="${PROFILE:-$root/launch/profiles/default.yaml}"
run_dir="${RUN_DIR:-runs/pipeline-$(date +%Y%m%d-%H%M%S)}"
stages="${STAGES:-pretrain,finetune,usl,uda}"
data_root="${DATA_ROOT:-}"
dry_run=0
extra_sbatch=()
declare -A config=(
    [pretrain]="${PRETRAIN_CONFIG:-$root/configs/pretrain/demo.yaml}"
    [finetune]="${FINETUNE_CONFIG:-$root/configs/finetune/demo.yaml}"
    [usl]="${USL_CONFIG:-$root/configs/usl/demo.yaml}"
    [uda]="${UDA_CONFIG:-$root/configs/uda/demo.yaml}"
)
declare -A opts=(
    [pretrain]="${PRETRAIN_OPTS:-}" [finetune]="${FINETUNE_OPTS:-}" [usl]="${USL_OPTS:-}" [uda]="${UDA_OPTS:-}"
)
# What each stage starts from: "<upstream stage> <override key> <upstream file>".
declare -A starts_from=(
    [finetune]="pretrain model.pretrained backbone_final.pth"
    [usl]="pretrain model.pretrained backbone_final.pth"
    [uda]="finetune model.init_from model_final.pth"
)

die() {
    echo "pipeline: $*" >&2
    exit 2
}

need_value() {
    [ "$2" -ge 2 ] || die "$1 needs a value"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --profile) need_value "$1" $#; profile="$2"; shift ;;
        --run-dir) need_value "$1" $#; run_dir="$2"; shift ;;
        --stages) need_value "$1" $#; stages="$2"; shift ;;
        --data-root) need_value "$1" $#; data_root="$2"; shift ;;
        --dry-run) dry_run=1 ;;
        --pretrain-config|--finetune-config|--usl-config|--uda-config)
            need_value "$1" $#; name="${1#--}"; config["${name%-config}"]="$2"; shift ;;
        --pretrain-opts|--finetune-opts|--usl-opts|--uda-opts)
            need_value "$1" $#; name="${1#--}"; opts["${name%-opts}"]="$2"; shift ;;
        -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; extra_sbatch=("$@"); break ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
export PASSREID_ROOT="$root"   # the jobs find the checkout through it (sbatch exports the environment)
[ -f "$profile" ] || die "profile '$profile' not found (see launch/profiles/)"
IFS=',' read -r -a stage_list <<< "$stages"
[ "${#stage_list[@]}" -gt 0 ] || die "no stages given"

# The arguments of <stage>'s script (launch/<stage>.sh: the config first) into stage_args.
declare -A demo_args_of=()
stage_arguments() {
    local stage="$1"
    stage_args=("${config[$stage]}" --output-dir "$run_dir/$stage")
    [ -z "$data_root" ] || stage_args+=(--data-root "$data_root")
    if reads_demo_worlds "$stage"; then
        if [ -z "${demo_args_of[$stage]+set}" ]; then   # asked once per stage: the call imports torch
            demo_args_of[$stage]="$("$python" -m passreid.demo --out "$run_dir/worlds" --arguments-for "$stage")"
        fi
        mapfile -t demo_args <<< "${demo_args_of[$stage]}"
        # ${a[@]+"${a[@]}"}: bash before 4.4 (RHEL 7) calls an empty array unbound under set -u.
        stage_args+=(${demo_args[@]+"${demo_args[@]}"})
    fi
    if [ -n "${starts_from[$stage]+set}" ]; then
        read -r upstream key file <<< "${starts_from[$stage]}"
        stage_args+=("$key=$run_dir/$upstream/$file")
    fi
    read -r -a stage_opts <<< "${opts[$stage]}"
    stage_args+=(${stage_opts[@]+"${stage_opts[@]}"})
}

reads_demo_worlds() {   # a demo recipe with no folder given reads the demo worlds
    [ -z "$data_root" ] && [ "${config[$1]}" = "$root/configs/$1/demo.yaml" ] && [[ " ${opts[$1]} " != *" data.root="* ]]
}

# Every stage's arguments must load (its script's --print-config) before the first job is queued, so that a
# wrong key or value fails now rather than when its job leaves the queue. The checks run side by side (each
# imports torch); paths that the jobs create (an upstream stage's export) need not exist yet.
check_dir="$(mktemp -d)"
trap 'rm -rf "$check_dir"' EXIT
declare -A check_pid=()
checked=()
for stage in "${stage_list[@]}"; do
    [ -n "${config[$stage]+set}" ] || die "unknown stage '$stage' (expected pretrain, finetune, usl, uda)"
    [ -f "${config[$stage]}" ] || die "config '${config[$stage]}' of stage $stage not found (working directory $(pwd))"
    if [ -n "${starts_from[$stage]+set}" ] && [ "$dry_run" = 0 ]; then
        read -r upstream _ file <<< "${starts_from[$stage]}"
        [[ " ${checked[*]} " == *" $upstream "* ]] || [ -f "$run_dir/$upstream/$file" ] \
            || die "$stage starts from $run_dir/$upstream/$file: list $upstream before $stage, or run it first"
    fi
    checked+=("$stage")
    stage_arguments "$stage"
    "$python" "$root/$stage/train.py" --config-file "${stage_args[@]}" --print-config >/dev/null \
        2>"$check_dir/$stage" &
    check_pid[$stage]=$!
done
for stage in "${stage_list[@]}"; do
    if ! wait "${check_pid[$stage]}"; then
        cat "$check_dir/$stage" >&2
        die "the arguments of stage $stage do not load (above); nothing was submitted"
    fi
done

submitted=()   # stages submitted so far, for the dependency lookup
declare -A job_id=()
if [ "$dry_run" = 0 ]; then
    mkdir -p "$run_dir/logs"
    for stage in "${stage_list[@]}"; do
        if reads_demo_worlds "$stage"; then   # the demo worlds, before any job starts
            "$python" -m passreid.demo --out "$run_dir/worlds" >&2 || die "could not render the demo worlds"
            break
        fi
    done
fi

for stage in "${stage_list[@]}"; do
    mapfile -t profile_options < <("$python" "$root/launch/submit.py" sbatch-args --profile "$profile" --stage "$stage")
    [ "${#profile_options[@]}" -gt 0 ] || die "could not read the sbatch options of profile $profile"
    command=(sbatch --parsable --job-name="passreid-$stage" --output="$run_dir/logs/%x-%j.out"
             "${profile_options[@]}")
    stage_arguments "$stage"
    if [ -n "${starts_from[$stage]+set}" ]; then
        read -r upstream _ <<< "${starts_from[$stage]}"
        if [[ " ${submitted[*]} " == *" $upstream "* ]]; then
            command+=(--dependency="afterok:${job_id[$upstream]}" --kill-on-invalid-dep=yes)
        fi
    fi
    command+=(${extra_sbatch[@]+"${extra_sbatch[@]}"} "$root/launch/$stage.sh" "${stage_args[@]}")
    if [ "$dry_run" = 1 ]; then
        job_id[$stage]="<$stage-job-id>"
        printf '%q ' "${command[@]}"
        printf '\n'
    else
        job_id[$stage]="$("${command[@]}")"
        job_id[$stage]="${job_id[$stage]%%;*}"   # --parsable prints "id[;cluster]"
        echo "$stage ${job_id[$stage]} $run_dir/$stage"
    fi
    submitted+=("$stage")
done
