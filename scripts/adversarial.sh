#!/usr/bin/env bash
# The adversarial suite with its heavy cases (issue 26), one server for the whole suite, under the
# bench lock; prints one table (scripts/adversarial_table.py): per case the statuses, the slowest
# answer, the health probe's worst / p99 / median, the peak RSS of the server tree over start-up,
# CPU after a disconnect, slowloris closure times and idle RSS 60 s after the suite, with the load
# average. ~6 min on 2 cores. NORMSERVE_ATTACK_FRESH=1: a fresh server per case.
#
#   scripts/adversarial.sh [REPORT [pytest args...]]
#   BEFORE_TREE=/tmp/old scripts/adversarial.sh ...   # first the same suite against the server of
#       another checkout (e.g. `git archive d9d79d9 | tar -x -C /tmp/old`; this venv runs it),
#       without the unfinished-bodies case (an old server holds all 3.75 GiB); the table shows old → new
set -euo pipefail
report=$(realpath -m "${1:-runs/adversarial.jsonl}")
mkdir -p "$(dirname "$report")"
run() {  # $1: the report to write; the rest: pytest arguments
    local out=$1; shift
    : > "$out"
    env NORMSERVE_HEAVY=1 NORMSERVE_ATTACK_REPORT="$out" .venv/bin/python -m pytest \
        tests/service/test_adversarial.py tests/service/test_budget.py -q -p no:cacheprovider "$@" || true
}
suite() {
    if [[ -n "${BEFORE_TREE:-}" ]]; then
        NORMSERVE_TEST_SERVER_TREE=$(realpath "$BEFORE_TREE") run "${report%.jsonl}-before.jsonl" \
            -k "not unfinished" "${@:2}"
    fi
    run "$report" "${@:2}"
}
export -f run suite
flock /tmp/normserve-bench.lock bash -c 'report=$0; suite "$@"' "$report" "$@"
if [[ -n "${BEFORE_TREE:-}" ]]; then
    .venv/bin/python scripts/adversarial_table.py --before "${report%.jsonl}-before.jsonl" "$report"
else
    .venv/bin/python scripts/adversarial_table.py "$report"
fi
