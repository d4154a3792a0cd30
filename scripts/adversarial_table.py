"""Print the adversarial suite's report (the JSON lines tests/service/test_adversarial.py writes)
as one Markdown table: case → statuses, slowest answer, health probe worst / p99 / median, peak
RSS of the server tree over its start-up RSS, and the case's own figure (CPU-s after a
disconnect, idle RSS ratio, slowloris closure times). With two reports (`--before OLD NEW`), the
probe and RSS columns show old → new.

    python scripts/adversarial_table.py runs/adversarial.jsonl
    python scripts/adversarial_table.py --before runs/adversarial-before.jsonl runs/adversarial.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load(path: Path) -> dict[str, dict[str, Any]]:
    return {(r := json.loads(line))["case"]: r for line in path.read_text().splitlines() if line.strip()}


def statuses(r: dict[str, Any]) -> str:
    s = r.get("statuses")
    if s is None:
        return str(r.get("status", "—"))
    if isinstance(s, list):
        s = {str(v): s.count(v) for v in sorted(set(s), key=str)}
    return ", ".join(f"{n} × {k}" for k, n in s.items())


def other(r: dict[str, Any]) -> str:
    if "cpu_after_disconnect_s" in r:
        return f"{r['cpu_after_disconnect_s']} CPU-s after the disconnect"
    if "cpu_after_answer_s" in r:
        return f"504 in {r['answered_s']} s, {r['cpu_after_answer_s']} CPU-s after it"
    if "idle_ratio" in r:
        return f"idle RSS {r['idle_rss_mb']} MB = {r['idle_ratio']} × start-up ({r['startup_rss_mb']} MB)"
    if "closed_last_s" in r:
        return f"{r['closed']} closed, after {r['closed_first_s']}–{r['closed_last_s']} s"
    return ""


def cell(new: dict[str, Any], old: dict[str, Any] | None, key: str, fmt: str = "{:,.0f}") -> str:
    if key not in new or new[key] is None:
        return "—"
    value = fmt.format(new[key])
    if old is not None and old.get(key) is not None:
        return f"{fmt.format(old[key])} → {value}"
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path)
    parser.add_argument("--before", type=Path, help="a report of the old code, for old → new columns")
    args = parser.parse_args()
    rows, before = load(args.report), load(args.before) if args.before else {}
    print(
        "| case | statuses | slowest, s | probe worst, ms | probe p99, ms | probe median, ms "
        "| peak RSS over start-up, MB | other | load average |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        old = before.get(name)
        load_avg = " ".join(r.get("loadavg", []))
        print(
            f"| {name} | {statuses(r)} | {r.get('slowest_s', '—')} | {cell(r, old, 'health_max_ms')} "
            f"| {cell(r, old, 'health_p99_ms')} | {cell(r, old, 'health_p50_ms', '{:.1f}')} "
            f"| {cell(r, old, 'peak_over_startup_mb')} | {other(r)} | {load_avg} |"
        )


if __name__ == "__main__":
    main()
