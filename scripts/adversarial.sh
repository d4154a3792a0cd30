#!/usr/bin/env bash
# The adversarial suite with its heavy cases (issue 26), under the bench lock, printing the figures
# of every case (status, slowest answer, health probe, peak RSS of the server tree, CPU after a
# disconnect) with the load average. ~3 min on 2 cores; NORMSERVE_ATTACK_FRESH=1: a fresh server per case.
set -euo pipefail
report=${1:-runs/adversarial.jsonl}
mkdir -p "$(dirname "$report")"; : > "$report"
flock /tmp/normserve-bench.lock env NORMSERVE_HEAVY=1 NORMSERVE_ATTACK_REPORT="$(realpath "$report")" \
    .venv/bin/python -m pytest tests/service/test_adversarial.py tests/service/test_budget.py -q -p no:cacheprovider "${@:2}"
cat "$report"
