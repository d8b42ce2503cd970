# Sourced by slurm_array.sbatch and local_multi_gpu.sh: one naming of run dirs, so either
# route resumes the other's runs.
#
# run_name_for LINE prints the run dir name of one outer point (a line of Hydra overrides):
# spaces -> commas, '/' (config group paths) and anything unsafe -> '_'. Very long lines
# get a hash instead, to stay under NAME_MAX.
run_name_for() {
    local -a words
    local name
    read -r -a words <<< "$1"
    name=$(printf '%s' "${words[*]}" | tr ' /' ',_' | tr -c 'A-Za-z0-9._=,+-' '_')
    if [ ${#name} -gt 200 ]; then
        name="task_$(printf '%s' "$1" | md5sum | cut -c1-16)"
    fi
    printf '%s' "$name"
}
