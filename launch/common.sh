# shellcheck shell=bash
# Shared by launch/{pretrain,finetune,usl,uda}.sh: argument parsing, job-array lists, srun with signal forwarding.
# Sourced, not run. See launch/README.md for the user-facing description.
#
# Inputs, lowest precedence first (later ones win):
#   environment   CONFIG, OUTPUT_DIR, DATA_ROOT, OVERRIDES (space-separated key=value), PYTHON, RESUME=0
#   arguments     [CONFIG.yaml | LIST.txt] [--config-file F] [--output-dir D] [--data-root R] [--no-resume]
#                 [key=value ...]
#   list line     in a job array, the LIST.txt line of this task: CONFIG.yaml [key=value ...]

passreid_die() {
    echo "passreid launch: $*" >&2
    exit 2
}

# Parse the script's arguments into the passreid_* globals below.
passreid_parse_args() {
    passreid_config="${CONFIG:-}"
    passreid_output_dir="${OUTPUT_DIR:-}"
    passreid_data_root="${DATA_ROOT:-}"
    passreid_no_resume=0
    [ "${RESUME:-1}" = 0 ] && passreid_no_resume=1
    passreid_overrides=()
    if [ -n "${OVERRIDES:-}" ]; then
        local env_overrides
        read -r -a env_overrides <<< "$OVERRIDES"
        passreid_overrides+=("${env_overrides[@]}")
    fi
    local positional=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --config-file) [ $# -ge 2 ] || passreid_die "$1 needs a value"; passreid_config="$2"; shift ;;
            --config-file=*) passreid_config="${1#*=}" ;;
            --output-dir) [ $# -ge 2 ] || passreid_die "$1 needs a value"; passreid_output_dir="$2"; shift ;;
            --output-dir=*) passreid_output_dir="${1#*=}" ;;
            --data-root) [ $# -ge 2 ] || passreid_die "$1 needs a value"; passreid_data_root="$2"; shift ;;
            --data-root=*) passreid_data_root="${1#*=}" ;;
            --no-resume) passreid_no_resume=1 ;;
            -h|--help) passreid_usage; exit 0 ;;
            -*) passreid_die "unknown option $1 (expected --config-file, --output-dir, --data-root, --no-resume)" ;;
            *=*) passreid_overrides+=("$1") ;;
            *)
                [ -z "$positional" ] || passreid_die "two config files given: '$positional' and '$1'"
                positional="$1"
                ;;
        esac
        shift
    done
    [ -z "$positional" ] || passreid_config="$positional"
}

passreid_usage() {
    cat <<EOF
usage: sbatch [sbatch options] launch/${passreid_stage:-STAGE}.sh [CONFIG.yaml | LIST.txt] [--output-dir DIR]
              [--data-root DIR] [--no-resume] [key=value ...]
Environment: CONFIG OUTPUT_DIR DATA_ROOT OVERRIDES PYTHON RESUME=0 (arguments win). See launch/README.md.
EOF
}

# Line number $2 (0-based, counting only lines that are not blank or '#' comments) of list file $1.
passreid_list_line() {
    local file="$1" wanted="$2" index=0 line
    [ -f "$file" ] || passreid_die "list file '$file' not found (working directory $(pwd))"
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line%%#*}"
        [ -n "${line//[[:space:]]/}" ] || continue
        if [ "$index" -eq "$wanted" ]; then
            printf '%s\n' "$line"
            return 0
        fi
        index=$((index + 1))
    done < "$file"
    passreid_die "list file '$file' has $index entries; no entry for array task $wanted (use --array=0-$((index - 1)))"
}

# In a job array (config argument ending in .txt): take this task's config and overrides from its line
# and give the task its own output folder <output-dir>/task<ID>-<config name>.
passreid_apply_list() {
    case "$passreid_config" in
        *.txt) ;;
        *) return 0 ;;
    esac
    local task="${SLURM_ARRAY_TASK_ID:-${TASK_ID:-}}"
    [ -n "$task" ] || passreid_die "'$passreid_config' is a list of runs: submit it as an array" \
        "(sbatch --array=0-N ...), or set TASK_ID to run one entry without SLURM"
    local line words
    line="$(passreid_list_line "$passreid_config" "$task")" || exit 2
    read -r -a words <<< "$line"
    passreid_config="${words[0]}"
    passreid_overrides+=("${words[@]:1}")
    local name
    name="$(basename "$passreid_config")"
    passreid_output_dir="$(passreid_default_output_dir)/task${task}-${name%.*}"
}

# runs/<stage>/<job id> (an array: its parent id; requeued jobs keep their id, so they find their checkpoint).
passreid_default_output_dir() {
    if [ -n "$passreid_output_dir" ]; then
        printf '%s\n' "$passreid_output_dir"
    else
        printf 'runs/%s/%s\n' "$passreid_stage" "${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-local}}"
    fi
}

passreid_python() {
    if [ -n "${PYTHON:-}" ]; then
        printf '%s\n' "$PYTHON"
    elif [ -x "$PASSREID_ROOT/.venv/bin/python" ]; then
        printf '%s\n' "$PASSREID_ROOT/.venv/bin/python"
    else
        printf 'python3\n'
    fi
}

# Run "$@" as a job step with one process per task and forward the pre-emption signals to it.
# `#SBATCH --signal=USR1@N` and `scancel --signal=USR1 JOB` signal the step's processes directly;
# `--signal=B:USR1@N`, `scancel --batch` and SLURM's SIGTERM before a kill reach only this shell, which
# passes them on through srun (srun forwards USR1/TERM to every task).
passreid_srun() {
    local step_pid status
    srun --kill-on-bad-exit=1 "$@" &
    step_pid=$!
    # shellcheck disable=SC2064  # expand step_pid now
    trap "echo 'passreid launch: forwarding SIGUSR1 to the job step' >&2; kill -s USR1 $step_pid 2>/dev/null" USR1
    # shellcheck disable=SC2064
    trap "echo 'passreid launch: forwarding SIGTERM to the job step' >&2; kill -s TERM $step_pid 2>/dev/null" TERM
    while kill -0 "$step_pid" 2>/dev/null; do
        wait "$step_pid" || true    # returns early (status > 128) when a trapped signal arrives
    done
    wait "$step_pid"
    status=$?
    trap - USR1 TERM
    return "$status"
}

# Entry point of the stage scripts: passreid_run_stage STAGE DEFAULT_CONFIG "$@".
passreid_run_stage() {
    passreid_stage="$1"
    local default_config="$2"
    shift 2
    passreid_parse_args "$@"
    [ -n "$passreid_config" ] || passreid_config="$default_config"
    passreid_apply_list
    passreid_output_dir="$(passreid_default_output_dir)"
    # A relative config path is looked up in the working directory, then in the checkout.
    if [ ! -f "$passreid_config" ] && [ "${passreid_config#/}" = "$passreid_config" ] \
        && [ -f "$PASSREID_ROOT/$passreid_config" ]; then
        passreid_config="$PASSREID_ROOT/$passreid_config"
    fi
    [ -f "$passreid_config" ] || passreid_die "config file '$passreid_config' not found (working directory $(pwd))"

    local entry="$PASSREID_ROOT/$passreid_stage/train.py"
    [ -f "$entry" ] || passreid_die "stage entry point $entry not found"
    local command=("$(passreid_python)" -u "$entry" --config-file "$passreid_config"
                   --output-dir "$passreid_output_dir")
    [ -z "$passreid_data_root" ] || command+=(--data-root "$passreid_data_root")
    # --no-resume applies to the first start only: a requeued job must continue from its checkpoint.
    if [ "$passreid_no_resume" = 1 ] && [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
        command+=(--no-resume)
    fi
    # ${a[@]+"${a[@]}"}: bash before 4.4 (RHEL 7) calls an empty array unbound under set -u.
    command+=(${passreid_overrides[@]+"${passreid_overrides[@]}"})

    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export PYTHONUNBUFFERED=1
    echo "passreid launch: stage $passreid_stage, job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0})" \
         "on ${SLURM_JOB_NODELIST:-$(hostname)}, ${SLURM_NTASKS:-1} task(s); output $passreid_output_dir"
    echo "passreid launch: ${command[*]}"
    if [ -n "${SLURM_JOB_ID:-}" ] && command -v srun > /dev/null; then
        # Since Slurm 22.05 srun does not inherit --cpus-per-task from the allocation.
        [ -z "${SLURM_CPUS_PER_TASK:-}" ] || export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"
        passreid_srun "${command[@]}"
    else
        "${command[@]}"
    fi
}
