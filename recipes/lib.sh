# Shared by the recipes: timed stage headers and side-by-side training that skips finished runs.
# Source it after `cd` to the repository root; CORPUS and SEED must be set.

started=${started:-$(date +%s)}
stage() { echo "=== [$(( $(date +%s) - started ))s] $*"; }

# train_side_by_side YAML...: trains each YAML (one core each: num_threads 1 in the mini YAMLs,
# which on a 2-core machine beats one after the other with two threads each), logging to
# results/<experiment>.log. A run whose results.json exists is done and skipped; one that was
# killed resumes from its last checkpoint.
train_side_by_side() {
    local pids=() logs=() yaml name run
    mkdir -p results
    for yaml in "$@"; do
        name=$(sed -n 's/^experiment_name: *//p' "$yaml")
        run=results/$name/$SEED
        if [ -f "$run/results.json" ]; then
            echo "$run: done (results.json), skipped"
            continue
        fi
        echo "training $yaml -> $run (log: results/$name.log)"
        python train.py "$yaml" --data_folder "$CORPUS" --seed "$SEED" > "results/$name.log" 2>&1 &
        pids+=($!); logs+=("results/$name.log")
    done
    local i failed=0
    for i in "${!pids[@]}"; do
        if ! wait "${pids[$i]}"; then
            echo "FAILED: ${logs[$i]} ends with:"; tail -n 30 "${logs[$i]}"; failed=1
        fi
    done
    return $failed
}

# train_each "YAML NAME [OVERRIDE...]"...: trains each spec as results/NAME/$SEED (train.py's
# --experiment_name NAME plus the overrides; words split on spaces), JOBS at a time (default 2,
# one core each). Finished runs (results.json) are skipped, killed ones resume. Fails if any
# run did not finish, showing the end of its log.
train_each() {
    local jobs=${JOBS:-2} spec run failed=0
    local -a words
    mkdir -p results
    for spec in "$@"; do
        read -r -a words <<< "$spec"
        run=results/${words[1]}/$SEED
        if [ -f "$run/results.json" ]; then
            echo "$run: done (results.json), skipped"
            continue
        fi
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
        echo "training ${words[0]} -> $run (log: results/${words[1]}.log)"
        python train.py "${words[0]}" --data_folder "$CORPUS" --seed "$SEED" \
            --experiment_name "${words[1]}" "${words[@]:2}" > "results/${words[1]}.log" 2>&1 &
    done
    wait || true
    for spec in "$@"; do
        read -r -a words <<< "$spec"
        if [ ! -f "results/${words[1]}/$SEED/results.json" ]; then
            echo "FAILED: results/${words[1]}.log ends with:"; tail -n 30 "results/${words[1]}.log"
            failed=1
        fi
    done
    return $failed
}
