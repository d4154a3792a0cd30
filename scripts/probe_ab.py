"""Health-probe latency during an attack, old vs new interleaved in one run: for each case and
round, a fresh default `normserve serve` from each checkout (order old, new, new, old, ...), the
case's concurrent requests, and /v2/health/live probed every 50 ms from a process of its own.
Prints per case and checkout the worst, p99 and median probe over all rounds, with the load
average. Run it under the bench lock; this venv runs both checkouts' code.

    flock /tmp/normserve-bench.lock .venv/bin/python scripts/probe_ab.py /tmp/old . --rounds 2
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "service"))

import servers  # noqa: E402
from images import encode, noise  # noqa: E402
from PIL import Image  # noqa: E402
from test_adversarial import PROBE, png16_zeros, smooth_png, tiff_float, v2_classifier, v2_image  # noqa: E402

PNG = {"content-type": "image/png"}
Job = tuple[str, bytes, dict[str, str]]  # path, body, headers


def same(path: str, make: Callable[[], bytes], n: int) -> Callable[[], list[Job]]:
    return lambda: [(path, make(), PNG)] * n


def mix() -> list[Job]:
    """test_adversarial's mix of 64 at once."""
    small = encode(Image.fromarray(noise(32, 32)), "PNG")
    body, headers = v2_classifier()
    return (
        [("/classify", small, PNG)] * 24
        + [("/classify", png16_zeros(), PNG)] * 8
        + [("/features?resize=false", encode(Image.fromarray(noise(384, 384)), "PNG"), PNG)] * 8
        + [("/reconstruct", smooth_png(1500, 1000), PNG)] * 8
        + [("/v2/models/gncnn/infer", body, headers)] * 16
    )


def v2_json(mib: float) -> bytes:
    """A V2 JSON request of about `mib` MiB to the denoiser, (1, 3, H, 64) values written as
    "0.123456," (scripts/json_stall.py's), answered as JSON numbers too."""
    h = max(8, int(mib * 2**20 / 9 / (3 * 64)))
    values = ",".join(["0.123456"] * (3 * h * 64))
    return f'{{"inputs":[{{"name":"image","shape":[1,3,{h},64],"datatype":"FP32","data":[{values}]}}]}}'.encode()


CASES: dict[str, Callable[[], list[Job]]] = {
    "/features?resize=false 384x384 x 4": same(
        "/features?resize=false", lambda: encode(Image.fromarray(noise(384, 384)), "PNG"), 4
    ),
    "RGB PNG 40 MP x 8": same("/classify", lambda: smooth_png(7300, 5470), 8),
    "16-bit PNG 6324x6324 x 8": same("/classify", png16_zeros, 8),
    "float TIFF 6000x6000 x 8": same("/classify", tiff_float, 8),
    "mix of 64": mix,
    "V2 gncnn 384x384 with every output as JSON x 2": lambda: [("/v2/models/gncnn/infer", *v2_image(384))] * 2,
    "V2 JSON 3.9 MiB to the denoiser x 8": lambda: [("/v2/models/in_autoencoder/infer", v2_json(3.9), {})] * 8,
}


def warm(base_url: str) -> None:
    """A few small requests, so that both workers have served (as the attack suite's server)."""
    with httpx.Client(base_url=base_url, timeout=60) as c:
        for _ in range(4):
            c.post("/classify", content=encode(Image.fromarray(noise(32, 32)), "PNG"), headers=PNG)


def start_prober(base_url: str, script: str = PROBE) -> subprocess.Popen[str]:
    """The health probe in a process of its own, up (its first probe read); stop it with
    `.communicate("stop\\n")`, which returns one line per probe."""
    prober = subprocess.Popen(
        [sys.executable, "-c", script, base_url + "/v2/health/live"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert prober.stdout is not None
    prober.stdout.readline()
    return prober


def post_all(base_url: str, jobs: list[Job]) -> list[int]:
    """Every job at once; their statuses."""
    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(
            pool.map(lambda j: httpx.post(base_url + j[0], content=j[1], headers=j[2], timeout=90).status_code, jobs)
        )


def attack(tree: Path, jobs: list[Job]) -> list[float]:
    servers.SERVER_TREE = tree
    with tempfile.TemporaryDirectory() as tmp, servers.running_server(Path(tmp) / "server.log") as s:
        warm(s.base_url)
        prober = start_prober(s.base_url)
        post_all(s.base_url, jobs)
        out, _ = prober.communicate("stop\n", timeout=30)
    return [float(line.split()[0]) for line in out.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--case", action="append", choices=list(CASES), help="default: every case")
    args = parser.parse_args()
    trees = {"old": args.old.resolve(), "new": args.new.resolve()}
    print("| case | checkout | probes | worst, ms | p99, ms | median, ms | load average |")
    print("|---|---|---|---|---|---|---|")
    for name in args.case or list(CASES):
        jobs = CASES[name]()
        probes: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for which in ("old", "new") if r % 2 == 0 else ("new", "old"):
                probes[which] += attack(trees[which], jobs)
                time.sleep(1)
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        for which, p in probes.items():
            ms = 1000 * np.array(p)
            print(
                f"| {name} | {which} | {len(ms)} | {ms.max():.0f} | {np.percentile(ms, 99):.0f} "
                f"| {np.median(ms):.1f} | {load} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
