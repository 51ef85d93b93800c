# Shared by the recipes: timed stage headers and side-by-side training that skips finished runs.
# Source it after `cd` to the repository root; CORPUS must be set, and SEED for all but
# train_queue.

started=${started:-$(date +%s)}
stage() { echo "=== [$(( $(date +%s) - started ))s] $*"; }

# is_done RUN YAML [OVERRIDE...]: true when RUN has its results.json; fails the recipe when that
# finished run was made with other settings than YAML and these overrides (conformer-prune
# check-run names the keys): a stale result must not be reused as this one. A run trained as
# asked but decoded with other search settings (check-run's exit 3) is not done: train.py,
# resuming it, only decodes it again.
is_done() {
    local run=$1 said status
    shift
    [ -f "$run/results.json" ] || return 1
    said=$(conformer-prune check-run "$run" "$@" 2> >(grep -v quirks >&2))
    status=$?
    case $status in
        0) return 0 ;;
        3) echo "$said"; return 1 ;;
        *) echo "FAILED: $run is finished but was trained with other settings (above)"; exit 1 ;;
    esac
}

# run_train LOG ARGUMENT...: python train.py ARGUMENT..., its output appended to LOG after a line
# with the date and the command, so that a resumed run (killed, or decoded again with other
# search settings) keeps what its earlier attempts said.
run_train() {
    local log=$1
    shift
    echo "=== $(date '+%F %T') python train.py $*" >> "$log"
    python train.py "$@" >> "$log" 2>&1
}

# train_lm: the character LM every mini recogniser decodes with (their lm_folder), trained on
# $CORPUS with both cores; done, it only writes its folder again; made with other settings, it
# stops the recipe (train_lm.py checks, as train.py does).
train_lm() {
    mkdir -p results
    python train_lm.py hparams/mini/lm_char.yaml --data_folder "$CORPUS" --num_threads 2 \
        > results/lm_char_mini.log 2>&1 || { tail -n 30 results/lm_char_mini.log; return 1; }
    tail -n 1 results/lm_char_mini.log
}

# train_side_by_side YAML...: trains each YAML (one core each: num_threads 1 in the mini YAMLs,
# which on a 2-core machine beats one after the other with two threads each), logging to
# results/<experiment>.log. A run whose results.json exists is done and skipped (unless its
# settings changed since: then the recipe stops); one that was killed resumes from its last
# checkpoint.
train_side_by_side() {
    local pids=() logs=() yaml name run
    mkdir -p results
    for yaml in "$@"; do
        name=$(sed -n 's/^experiment_name: *//p' "$yaml")
        run=results/$name/$SEED
        if is_done "$run" "$yaml" --data_folder "$CORPUS" --seed "$SEED"; then
            echo "$run: done (results.json), skipped"
            continue
        fi
        echo "training $yaml -> $run (log: results/$name.log)"
        run_train "results/$name.log" "$yaml" --data_folder "$CORPUS" --seed "$SEED" &
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

# shrink_and_decode RUN: shrinks a gated run into RUN/compact (conformer-prune shrink) and
# decodes the compact model on $CORPUS, unless it was decoded already (its results.json) since
# the run itself was last decoded (a run decoded again with other search settings: the compact
# folder takes them from it).
shrink_and_decode() {
    local run=$1 decoded=$1/compact/results.json
    conformer-prune shrink "$run" --out "$run/compact"
    if [ -f "$decoded" ] && ! [ "$run/results.json" -nt "$decoded" ]; then
        echo "$run/compact: decoded (results.json), skipped"
    else
        conformer-prune decode "$run/compact" --data-folder "$CORPUS"
    fi
}

# train_each "YAML NAME [OVERRIDE...]"...: train_queue at this $SEED.
train_each() {
    local spec specs=()
    for spec in "$@"; do specs+=("$SEED $spec"); done
    train_queue "${specs[@]}"
}

# train_queue "SEED YAML NAME [OVERRIDE...]"...: trains each spec as results/NAME/SEED
# (train.py's --seed SEED --experiment_name NAME plus the overrides; words split on spaces),
# JOBS at a time (default 2, one core each), in the order given. Finished runs (results.json)
# are skipped, killed ones resume; a finished run with other settings stops the recipe before
# anything trains. Fails if any run did not finish, showing the end of its log
# (results/NAME_SEED.log).
train_queue() {
    local jobs=${JOBS:-2} spec run log failed=0
    local -a words todo=()
    mkdir -p results
    for spec in "$@"; do
        read -r -a words <<< "$spec"
        run=results/${words[2]}/${words[0]}
        if is_done "$run" "${words[1]}" --data_folder "$CORPUS" --seed "${words[0]}" \
                --experiment_name "${words[2]}" "${words[@]:3}"; then
            echo "$run: done (results.json), skipped"
        else
            todo+=("$spec")
        fi
    done
    for spec in "${todo[@]}"; do
        read -r -a words <<< "$spec"
        run=results/${words[2]}/${words[0]}
        log=results/${words[2]}_${words[0]}.log
        while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
        echo "training ${words[1]} -> $run (log: $log)"
        run_train "$log" "${words[1]}" --data_folder "$CORPUS" --seed "${words[0]}" \
            --experiment_name "${words[2]}" "${words[@]:3}" &
    done
    wait || true
    for spec in "$@"; do
        read -r -a words <<< "$spec"
        log=results/${words[2]}_${words[0]}.log
        if [ ! -f "results/${words[2]}/${words[0]}/results.json" ]; then
            echo "FAILED: $log ends with:"; tail -n 30 "$log"
            failed=1
        fi
    done
    return $failed
}
