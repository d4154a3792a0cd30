"""An in-process view of a worker's memory, for debugging only (scripts/memprobe.py uses it).

Put this folder first on PYTHONPATH of a `normserve serve` and every Python process of the server
imports it at start (`site` imports `sitecustomize`): SIGUSR2 then makes a process write
`$MEMPROBE_DIR/<pid>-<n>.json` with, in this order,
- `as_is`: smaps_rollup, the anonymous mappings by kind (glibc's main heap, its thread arenas'
  64 MiB heaps, other anonymous maps: large malloc blocks, ORT's arena regions, pymalloc arenas),
  glibc's mallinfo2 and malloc_info per arena, pymalloc's arenas, the threads;
- then after each step: `malloc_trim` (glibc's malloc_trim(0) again), `gc` (gc.collect and
  malloc_trim), `shrink` (every ServedModel's shrink_arena and malloc_trim).
Also the numpy arrays of 64 KiB or more that something still references (and, for the largest,
the chain of referrers up to a coroutine, frame or module) and the count of gc-tracked objects by
type. With PYTHONTRACEMALLOC=<frames> the first dump keeps a tracemalloc snapshot and later dumps
list the largest growths against it. MEMPROBE_ORT_LOG=1 turns ONNX Runtime's default logger to
verbose: its arenas log each extension and shrink.

Nothing else runs until the signal comes. For debugging only: a dump unfreezes and
refreezes the collector's permanent generation (app.py freezes start-up's objects) to see every
object, which leaves what is alive at that moment frozen.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("MEMPROBE_DIR", tempfile.gettempdir()))
LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
HEAP_MAX = 64 * 1024 * 1024  # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's heap
_baseline: list[tracemalloc.Snapshot] = []
_count = [0]


MALLINFO2_FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in MALLINFO2_FIELDS]


def mallinfo2() -> dict[str, int]:
    LIBC.mallinfo2.restype = Mallinfo2
    m = LIBC.mallinfo2()
    return {name: int(getattr(m, name)) // 1024 for name in MALLINFO2_FIELDS}  # KiB (counts for *blks)


def malloc_info() -> list[dict[str, Any]]:
    """Per arena (glibc's <heap nr=...>): bytes from the system, free in bins, free fast, in KiB."""
    fd, path = tempfile.mkstemp(suffix=".xml")
    os.close(fd)
    LIBC.fopen.restype = ctypes.c_void_p
    LIBC.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    LIBC.fclose.argtypes = [ctypes.c_void_p]
    LIBC.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    f = LIBC.fopen(path.encode(), b"w")
    LIBC.malloc_info(0, f)
    LIBC.fclose(f)
    xml = Path(path).read_text()
    os.unlink(path)
    heaps = []
    for nr, body in re.findall(r'<heap nr="(\d+)">(.*?)</heap>', xml, re.S):
        fast = re.search(r'<total type="fast" count="(\d+)" size="(\d+)"/>', body)
        rest = re.search(r'<total type="rest" count="(\d+)" size="(\d+)"/>', body)
        current = re.search(r'<system type="current" size="(\d+)"/>', body)
        heaps.append(
            {
                "arena": int(nr),
                "system_kib": int(current.group(1)) // 1024 if current else None,
                "free_fast_kib": int(fast.group(2)) // 1024 if fast else None,
                "free_rest_kib": int(rest.group(2)) // 1024 if rest else None,
                "free_chunks": int(rest.group(1)) if rest else None,
            }
        )
    return heaps


def smaps() -> dict[str, Any]:
    """Resident anonymous KiB by kind of mapping, and the largest anonymous mappings."""
    kinds: dict[str, int] = {}
    largest = []
    text = Path("/proc/self/smaps").read_text().splitlines()
    header = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(.*)$")
    current: dict[str, Any] | None = None

    def close(m: dict[str, Any] | None) -> None:
        if m is None or m["anon"] == 0:
            return
        kinds[m["kind"]] = kinds.get(m["kind"], 0) + m["anon"]
        largest.append(m)

    for line in text:
        h = header.match(line)
        if h:
            close(current)
            start, end = int(h.group(1), 16), int(h.group(2), 16)
            name = h.group(5).strip()
            size = end - start
            if name == "[heap]":
                kind = "glibc main heap (brk)"
            elif name.startswith("[stack") or name in ("[vvar]", "[vdso]", "[vsyscall]"):
                kind = "stacks etc."
            elif name:
                kind = "file-backed (private dirty)"
            elif start % HEAP_MAX == 0 and size <= HEAP_MAX:
                kind = "glibc thread-arena heap (64 MiB aligned)"
            else:
                kind = "other anonymous (mmap: large malloc blocks, ORT arena regions, pymalloc arenas, ...)"
            current = {
                "start": hex(start),
                "size_kib": size // 1024,
                "perm": h.group(3),
                "name": name,
                "kind": kind,
                "anon": 0,
                "rss": 0,
            }
        elif current is not None and line.startswith("Anonymous:"):
            current["anon"] = int(line.split()[1])
        elif current is not None and line.startswith("Rss:"):
            current["rss"] = int(line.split()[1])
    close(current)
    largest.sort(key=lambda m: -m["anon"])
    return {"anon_kib_by_kind": kinds, "largest_anon": largest[:12]}


def rollup() -> dict[str, int]:
    lines = Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]
    fields = {line.split(":")[0]: int(line.split()[1]) for line in lines}
    return {k: fields[k] for k in ("Rss", "Anonymous", "Private_Dirty")}


def pymalloc() -> dict[str, int]:
    """pymalloc's arenas (sys._debugmallocstats, which writes to the C stderr)."""
    fd, path = tempfile.mkstemp()
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
    text = Path(path).read_text()
    os.unlink(path)
    out = {}
    for key, pattern in (
        ("arenas_now", r"# arenas allocated current\s*=\s*([\d,]+)"),
        ("arenas_highwater", r"# arenas highwater mark\s*=\s*([\d,]+)"),
        ("allocated_blocks_kib", r"# bytes in allocated blocks\s*=\s*([\d,]+)"),
        ("arenas_kib", r"(\d[\d,]*) arenas \* \d+ bytes/arena\s*=\s*([\d,]+)"),
    ):
        m = re.search(pattern, text)
        if m:
            value = int(m.groups()[-1].replace(",", ""))
            out[key] = value // 1024 if key.endswith("_kib") else value
    return out


def threads() -> dict[str, int]:
    names: dict[str, int] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        names[name] = names.get(name, 0) + 1
    return names


def view() -> dict[str, Any]:
    return {
        "rollup_kib": rollup(),
        "smaps": smaps(),
        "mallinfo2_kib": mallinfo2(),
        "malloc_info": malloc_info(),
        "pymalloc": pymalloc(),
    }


def served_models() -> list[Any]:
    module = sys.modules.get("normserve.service.model")
    if module is None:
        return []
    gc.unfreeze()  # the models were frozen at start-up (app.py): out of gc.get_objects' sight
    try:
        return [o for o in gc.get_objects() if isinstance(o, module.ServedModel)]
    finally:
        gc.freeze()


def live_arrays(limit: int = 20) -> list[dict[str, Any]]:
    """numpy arrays of at least 64 KiB reachable from a gc-tracked object (arrays themselves are
    not tracked), with what owns their memory (ORT's outputs: a PyCapsule) and who holds them."""
    np = sys.modules.get("numpy")
    if np is None:
        return []
    gc.unfreeze()
    try:
        objects = gc.get_objects()
        seen: dict[int, Any] = {}
        holders: dict[int, list[str]] = {}
        # arrays are not tracked, nor are dicts and tuples that hold only untracked objects:
        # look through those, a few levels down
        roots: dict[int, Any] = {}
        todo = [(o, _describe(o), 0, o) for o in objects]
        while todo:
            o, path, depth, root = todo.pop()
            for r in gc.get_referents(o):
                if isinstance(r, np.ndarray):
                    if r.nbytes >= 64 * 1024:
                        seen[id(r)] = r
                        holders.setdefault(id(r), []).append(path)
                        roots.setdefault(id(r), root)
                elif isinstance(r, (dict, tuple, list)) and not gc.is_tracked(r) and depth < 4:
                    todo.append((r, path + " > " + _describe(r), depth + 1, root))
    finally:
        gc.freeze()
    out = []
    if seen:
        biggest = max(seen.values(), key=lambda a: a.nbytes)
        root = roots[id(biggest)]
        del objects, todo, roots
        chains = referrer_chains(root, _describe(root))
    for key, a in sorted(seen.items(), key=lambda kv: -kv[1].nbytes)[:limit]:
        base, chain = a, []
        while getattr(base, "base", None) is not None:
            base = base.base
            chain.append(type(base).__name__)
        out.append(
            {
                "kib": a.nbytes // 1024,
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "base": chain,
                "held_by": holders[key][:4],
                "chains": chains if a is biggest else [],
            }
        )
    return out


def referrer_chains(target: Any, name: str, depth: int = 8, limit: int = 6) -> list[str]:
    """Paths of referrers up from `target`, each to a coroutine, task, frame or module dict."""
    import types

    gc.unfreeze()
    try:
        here = sys._getframe()
        ignore = {id(here)}
        found: list[str] = []

        def up(obj: Any, path: list[str], seen: set[int], d: int) -> None:
            if len(found) >= limit:
                return
            referrers = gc.get_referrers(obj)
            ignore.add(id(referrers))
            for r in referrers:
                if (
                    type(r).__name__ == "list_iterator"
                    or id(r) in ignore
                    or id(r) in seen
                    or (isinstance(r, types.FrameType) and r.f_code.co_filename == __file__)
                ):
                    continue
                name = _describe(r)
                if (
                    type(r).__name__ in ("coroutine", "Task", "frame", "module")
                    or (isinstance(r, dict) and "__name__" in r)
                    or d >= depth
                ):
                    found.append(" < ".join([*path, name]))
                    continue
                up(r, [*path, name], seen | {id(r)}, d + 1)

        up(target, [name], {id(target)}, 0)
        return found
    finally:
        gc.freeze()


def object_types() -> dict[str, int]:
    """How many gc-tracked objects of each type (frozen ones included)."""
    gc.unfreeze()
    try:
        counts: dict[str, int] = {}
        for o in gc.get_objects():
            t = type(o)
            key = f"{t.__module__}.{t.__qualname__}"
            counts[key] = counts.get(key, 0) + 1
        return counts
    finally:
        gc.freeze()


def _describe(o: Any) -> str:
    if isinstance(o, dict):
        return "dict(" + ",".join(map(str, list(o)[:5])) + ")"
    if type(o).__name__ in ("coroutine", "generator"):
        return f"{type(o).__name__} {o.__qualname__}"
    if type(o).__name__ == "frame":
        return f"frame {o.f_code.co_qualname} {o.f_code.co_filename.rsplit('/', 2)[-1]}:{o.f_lineno}"
    return type(o).__qualname__


def tracemalloc_growth() -> list[dict[str, Any]] | None:
    if not tracemalloc.is_tracing():
        return None
    snapshot = tracemalloc.take_snapshot()
    if not _baseline:
        _baseline.append(snapshot)
        return []
    stats = snapshot.compare_to(_baseline[0], "traceback")
    out = []
    for stat in sorted(stats, key=lambda s: -s.size_diff)[:12]:
        out.append(
            {"kib": stat.size_diff // 1024, "count": stat.count_diff, "where": [str(f) for f in stat.traceback][-6:]}
        )
    return out


def dump(*_: Any) -> None:
    threading.Thread(target=_dump, name="memprobe").start()  # not in the signal handler's frame


def _dump() -> None:
    _count[0] += 1
    report: dict[str, Any] = {"pid": os.getpid(), "argv": sys.argv[:3], "time": time.time(), "threads": threads()}
    report["tracemalloc_growth"] = tracemalloc_growth()
    report["as_is"] = view()
    report["arrays"] = live_arrays()
    report["types"] = object_types()
    trim = LIBC.malloc_trim
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    report["malloc_trim"] = view()
    gc.collect()
    trim(0)
    report["gc"] = view()
    models = served_models()
    for model in models:
        model.shrink_arena()
    trim(0)
    report["shrink"] = view()
    report["shrunk_models"] = [m.key for m in models]
    (OUT / f"{os.getpid()}-{_count[0]}.json").write_text(json.dumps(report, indent=1))


signal.signal(signal.SIGUSR2, dump)

if os.environ.get("MEMPROBE_ORT_LOG") == "1":  # ORT's arena logs its extensions and shrinks
    import onnxruntime

    onnxruntime.set_default_logger_severity(0)
