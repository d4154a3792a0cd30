"""A server's process tree read from /proc: its pids, resident memory and CPU time (for the
adversarial suites, which measure what an attack makes the server spend)."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def rss(pids: list[int]) -> int:
    """Resident bytes of these processes (VmRSS); those that have gone count 0."""
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def rss_breakdown(pids: list[int]) -> dict[str, dict[str, int]]:
    """Per process (by pid): resident anonymous and file-backed MB (smaps_rollup's Rss and
    Anonymous), to tell heap growth from mapped libraries and models."""
    out: dict[str, dict[str, int]] = {}
    for p in pids:
        try:
            fields = {
                line.split(":")[0]: int(line.split()[1])
                for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()[1:]
            }
        except OSError:
            continue
        anon = fields.get("Anonymous", 0)
        out[str(p)] = {"anon_mb": round(anon / 1024), "file_mb": round((fields.get("Rss", 0) - anon) / 1024)}
    return out


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants."""
    return rss(tree(root))


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds these processes have used."""
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / CLK_TCK
