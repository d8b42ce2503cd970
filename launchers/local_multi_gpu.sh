#!/bin/bash
# Run the outer-grid points of a TASKS_FILE one after another on this machine, no SLURM.
# Each point gets every local GPU (devices=auto), so points must not run side by side.
#
#   launchers/local_multi_gpu.sh TASKS_FILE [RUN_ROOT]
#
# TASKS_FILE and the run dir names are as in launchers/slurm_array.sbatch: one point per
# line (Hydra overrides separated by spaces; blank and # lines skipped), point -> RUN_ROOT/
# <line as a dir name> (default RUN_ROOT: ./runs). `devices=auto` is added unless the
# line sets devices= itself.
# Same environment knobs: SAE_ENSEMBLE_DIR, SWEEP_PYTHON, SWEEP_PROGRAM.
#
# Ctrl-C / SIGTERM: forwarded to the running point, which checkpoints and exits 75; the
# script then stops and exits 75. Rerun the same command to resume: finished points are
# no-ops (exit 0 at once), the interrupted one resumes from its checkpoint.
# Exit code: 0 all points done, 75 interrupted, else the first failing point's code (sweep.py's:
# 1 a worker failed or Hydra refused the line, 2 bad config or input, 3 members froze); a
# failing point does not stop the later ones.

set -uo pipefail

EXIT_BAD_CONFIG=2
EXIT_INTERRUPTED=75

die() { echo "local_multi_gpu.sh: $*" >&2; exit "$EXIT_BAD_CONFIG"; }

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    die "usage: launchers/local_multi_gpu.sh TASKS_FILE [RUN_ROOT] (got $# arguments)"
fi

SAE_ENSEMBLE_DIR=${SAE_ENSEMBLE_DIR:-$(cd "$(dirname "$0")/.." && pwd)}
# shellcheck source=launchers/run_name.sh
source "$SAE_ENSEMBLE_DIR/launchers/run_name.sh"
SWEEP_PYTHON=${SWEEP_PYTHON:-$SAE_ENSEMBLE_DIR/.venv/bin/python}
SWEEP_PROGRAM=${SWEEP_PROGRAM:-$SAE_ENSEMBLE_DIR/sweep.py}
TASKS_FILE=$1
RUN_ROOT=${2:-$PWD/runs}
[ -r "$TASKS_FILE" ] || die "TASKS_FILE '$TASKS_FILE' is not a readable file"
[ -x "$SWEEP_PYTHON" ] || die "SWEEP_PYTHON '$SWEEP_PYTHON' is not executable; run 'make setup' or set SWEEP_PYTHON"
[ -f "$SWEEP_PROGRAM" ] || die "SWEEP_PROGRAM '$SWEEP_PROGRAM' does not exist; set SAE_ENSEMBLE_DIR or SWEEP_PROGRAM"

# Read all points first: the loop below must not hold the file open while points run.
mapfile -t lines < <(grep -v -E '^[[:space:]]*(#|$)' "$TASKS_FILE")
[ ${#lines[@]} -gt 0 ] || die "TASKS_FILE '$TASKS_FILE' has no tasks (only blank or # lines)"

child=
interrupted=0
on_signal() {
    interrupted=1
    echo "local_multi_gpu.sh: got a stop signal, forwarding SIGTERM to pid $child so it checkpoints"
    [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
}
# A background child of a non-interactive shell ignores SIGINT, so Ctrl-C is forwarded as
# the SIGTERM the sweep handles; the child runs in the background so the trap fires at once.
trap on_signal TERM INT

first_failure=0
for i in "${!lines[@]}"; do
    if [ "$interrupted" -ne 0 ]; then  # a signal arrived between two points
        echo "local_multi_gpu.sh: interrupted before point $((i + 1)); rerun the same command to resume"
        exit "$EXIT_INTERRUPTED"
    fi
    read -r -a overrides <<< "${lines[$i]}"
    run_dir=$RUN_ROOT/$(run_name_for "${lines[$i]}")
    case " ${lines[$i]} " in
        *" devices="*) ;;                    # the line chose its devices
        *) overrides+=("devices=auto") ;;  # all local GPUs for this point
    esac
    echo "local_multi_gpu.sh: point $((i + 1))/${#lines[@]}: ${lines[$i]} -> $run_dir"

    "$SWEEP_PYTHON" "$SWEEP_PROGRAM" "${overrides[@]}" "hydra.run.dir=$run_dir" &
    child=$!
    # A signal that came while the child was starting found no pid to forward to.
    [ "$interrupted" -ne 0 ] && kill -TERM "$child" 2>/dev/null
    wait "$child"
    rc=$?
    # The trap interrupts `wait` (status 128+signal) while the child still checkpoints;
    # wait again for its real code (127: already reaped, keep the first status).
    while [ "$interrupted" -eq 1 ]; do
        interrupted=2
        wait "$child"
        rc_again=$?
        [ "$rc_again" -ne 127 ] && rc=$rc_again
        [ "$interrupted" -eq 2 ] && break  # no new signal arrived during the second wait
    done
    child=

    if [ "$interrupted" -ne 0 ] || [ "$rc" -eq "$EXIT_INTERRUPTED" ]; then
        echo "local_multi_gpu.sh: interrupted at point $((i + 1)) (exit $rc); rerun the same command to resume"
        exit "$EXIT_INTERRUPTED"
    fi
    if [ "$rc" -ne 0 ]; then
        echo "local_multi_gpu.sh: point $((i + 1)) failed with exit $rc; continuing with the next" >&2
        [ "$first_failure" -eq 0 ] && first_failure=$rc
    fi
done
exit "$first_failure"
