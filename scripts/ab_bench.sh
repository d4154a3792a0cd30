#!/usr/bin/env bash
# Throughput of two checkouts, interleaved A B B A in one run: /classify c=32 and V2 binary c=32,
# then /reconstruct 512² c=4, with `normserve bench` (req/s in each run's bench.json).
#   flock /tmp/normserve-bench.lock scripts/ab_bench.sh OUT OLD_TREE NEW_TREE
# OLD_TREE runs with its own .venv; NEW_TREE (a frozen copy, e.g. `git archive HEAD | tar -x -C
# DIR`, so edits made meanwhile do not leak in) with this checkout's .venv and PYTHONPATH=NEW_TREE.
set -euo pipefail
out=$(realpath -m "${1:?output folder}"); old=$(realpath "${2:?old tree}"); new=$(realpath "${3:?new tree}")
venv=$(realpath .venv)
mkdir -p "$out"
common=(--servers normserve --no-raw --no-torch --no-plot --duration 10 --warmup 3)
run() {  # label round
  local label=$1 round=$2 tree python pythonpath
  if [ "$label" = old ]; then tree=$old python=$old/.venv/bin/python pythonpath=""
  else tree=$new python=$venv/bin/python pythonpath=$new; fi
  echo "$(date -u +%T) $label round $round load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
  (cd "$tree" && PYTHONPATH=$pythonpath "$python" -m normserve.cli bench "${common[@]}" --workloads classify,v2 \
      --concurrency 32 --out "$out/$label-$round-c32") >>"$out/log.txt" 2>&1
  (cd "$tree" && PYTHONPATH=$pythonpath "$python" -m normserve.cli bench "${common[@]}" --workloads reconstruct512 \
      --concurrency 4 --out "$out/$label-$round-r512") >>"$out/log.txt" 2>&1
}
run old 1; run new 1; run new 2; run old 2; run old 3; run new 3; run new 4; run old 4
echo "$(date -u +%T) done load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
