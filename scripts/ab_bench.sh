#!/usr/bin/env bash
# Throughput of two checkouts, interleaved A B B A in one run: /classify c=32 and V2 binary c=32,
# then /reconstruct 512² c=4, all driven by this checkout's `normserve bench` (one load generator,
# one way of measuring), each side's server running its own code (`--checkout`). Then
# `scripts/ab_summary.py` prints every run, how each server's CPU was spread over its workers, and
# new/old over all runs and over the runs whose connections were spread over the workers.
#   flock /tmp/normserve-bench.lock scripts/ab_bench.sh OUT OLD_TREE NEW_TREE [ROUNDS]
# Trees are frozen copies (`git archive REV | tar -x -C DIR`, so edits made meanwhile do not leak
# in). OLD_TREE's server runs with OLD_TREE/.venv when it has one, else with this checkout's; a
# tree from before the normserve/ package needs a two-line normserve/cli.py that calls its
# service.cli main. ROUNDS (default 4) runs of each side.
set -euo pipefail
out=$(realpath -m "${1:?output folder}"); old=$(realpath "${2:?old tree}"); new=$(realpath "${3:?new tree}")
rounds=${4:-4}
venv=$(realpath .venv)
mkdir -p "$out"
common=(--servers normserve --no-raw --no-torch --no-plot --duration 10 --warmup 3)
run() {  # label round
  local label=$1 round=$2 tree python
  if [ "$label" = old ]; then tree=$old; else tree=$new; fi
  python=$venv/bin/python
  [ -x "$tree/.venv/bin/python" ] && python=$tree/.venv/bin/python  # not realpath: that is the bare interpreter
  local server=(--checkout "$tree" --server-python "$python" --repository "$tree/model_repository")
  echo "$(date -u +%T) $label round $round load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
  "$venv/bin/python" -m normserve.cli bench "${common[@]}" "${server[@]}" --workloads classify,v2 \
      --concurrency 32 --out "$out/$label-$round-c32" >>"$out/log.txt" 2>&1
  "$venv/bin/python" -m normserve.cli bench "${common[@]}" "${server[@]}" --workloads reconstruct512 \
      --concurrency 4 --out "$out/$label-$round-r512" >>"$out/log.txt" 2>&1
}
for ((k = 1; k <= rounds; k += 2)); do
  run old "$k"; run new "$k"
  if ((k + 1 <= rounds)); then run new $((k + 1)); run old $((k + 1)); fi
done
echo "$(date -u +%T) done load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/log.txt"
"$venv/bin/python" -m scripts.ab_summary "$out" | tee "$out/summary.txt"
