"""Results on disk: JSON with every number and setting, a Markdown table for the README, the
environment they were measured in, the optional copy into docs/, and `--update-config`."""

from __future__ import annotations

import json
import os
import platform
import shutil
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

from normserve.contract import CONFIG_FILE, ModelConfigFile
from normserve.evaluation.denoiser import MODEL, NOISY, PROTOCOLS
from normserve.service.model import ServedModel
from normserve.service.settings import usable_cpus

PACKAGES = ("onnxruntime", "numpy", "pillow", "scikit-image", "opencv-python-headless", "bm3d", "matplotlib")


def environment() -> dict[str, Any]:
    """Versions and the machine, so a number can be traced to where it was measured."""
    versions: dict[str, str | None] = {}
    for p in PACKAGES:
        try:
            versions[p] = pkg_version(p)
        except PackageNotFoundError:
            versions[p] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable_cpus(),  # the affinity mask, capped by a cgroup CPU quota
        # Timings depend on what else runs: the 1/5/15-minute load averages when the results were written.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "packages": versions,
    }


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")
    return path


def publish(files: list[Path], folder: Path) -> list[Path]:
    """Copy result files into `folder` (e.g. docs/eval) under the same names."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(f, folder / f.name)) for f in files]


def update_config(model: ServedModel, key: str, metrics: dict[str, Any]) -> Path:
    """Set config.json's metrics[key], validated by the service's schema, written atomically."""
    path = model.directory / CONFIG_FILE
    config = ModelConfigFile.load(path)
    config.metrics = {**config.metrics, key: metrics}
    tmp = path.with_name(f".{CONFIG_FILE}.tmp")
    config.dump(tmp)
    ModelConfigFile.load(tmp)  # what the service will read back
    tmp.chmod(path.stat().st_mode & 0o777)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- Markdown


def _load(env: dict[str, Any]) -> str:
    load = env.get("load_average")
    return "unknown" if not load else f"{load[0]:.1f}"


def _pct(x: float) -> str:
    return f"{100 * x:.2f} %"


def _header(data: dict[str, Any]) -> str:
    m, s = data["model"], data["settings"]
    env = data["environment"]
    trained = "trained" if m["trained"] else "**untrained (random init)**"
    return (
        f"`{m['name']}` v{m['version']} ({trained}, model.onnx sha256 `{m['onnx_sha256'][:12]}`), "
        f"ONNX Runtime {env['packages']['onnxruntime']} on {m['execution_provider']}, "
        f"{s['threads']} intra-op threads, {env['cpu']} ({env['cpus_usable']} usable CPUs, "
        f"load average {_load(env)} while measuring)."
    )


def classifier_markdown(data: dict[str, Any]) -> str:
    res = data["results"]
    sets = res["sets"]
    titles = {
        "test": sets["test"]["name"],  # what the data is: CIFAR-10's test split, or the user's own
        "lossless_prefix": "first canonical test images, lossless (the .npz prefix)",
        "jpeg_twins_of_prefix": "the same images, as JPEG",
    }
    top5 = sets["test"]["top5"] is not None  # only for more than five classes
    lines = [_header(data), "", f"Data: `{sets['test']['source']}`.", ""]
    lines += [
        "| test set | images | top-1 |" + (" top-5 |" if top5 else ""),
        "|---|---:|---:|" + ("---:|" if top5 else ""),
    ]
    for key, title in titles.items():
        if key in sets:
            s = sets[key]
            row = f"| {title} | {s['images']:,} | {_pct(s['top1'])} |"
            lines.append(row + (f" {_pct(s['top5'])} |" if top5 else ""))
    if "comparison" in res:
        c = res["comparison"]
        lines += [
            "",
            f"Against {c['other']} (top-1 {_pct(c['other_top1'])}) on the same {c['images']:,} test images: "
            f"{c['only_this_right']:,} only this one gets right, {c['only_other_right']:,} only {c['other']}; "
            f"McNemar's exact test p = {c['mcnemar_exact_p']:.3g}.",
        ]
    lat = res["latency"]
    h, w = lat["input_hw"]
    lines += [
        "",
        f"Latency: one batch of {lat['batch']} images of {h}×{w}, median {lat['median_ms']:.2f} ms "
        f"(p90 {lat['p90_ms']:.2f} ms, min {lat['min_ms']:.2f} ms; process CPU time {lat['cpu_median_ms']:.2f} ms) "
        f"per ONNX Runtime run, {lat['runs']} runs after {lat['warmup']} warm-up.",
        "",
    ]
    per_class = sets["test"]["per_class"]
    names = list(per_class)
    lines += [
        f"Per-class top-1 on {sets['test']['name']}:",
        "",
        "| " + " | ".join(names) + " |",
        "|" + "---:|" * len(names),
        "| " + " | ".join(f"{100 * per_class[n]['top1']:.1f}" for n in names) + " |",
    ]
    return "\n".join(lines) + "\n"


def _cell(entry: dict[str, Any] | None) -> str:
    return "–" if entry is None else f"{entry['psnr']:.2f} / {entry['ssim']:.3f}"


def _denoiser_comparison(c: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"Against {c['other']} on the same noisy images, image by image: mean PSNR (dB) of each, the mean "
        "difference, how many images each does better on, and the Wilcoxon signed-rank test (two-sided).",
        "",
        f"| protocol | σ | images | this | {c['other']} | difference | this better | other better | p |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for protocol, by_sigma in c["protocols"].items():
        for sigma, e in by_sigma.items():
            lines.append(
                f"| {protocol} | {sigma} | {e['images']} | {e['psnr']:.2f} | {e['other_psnr']:.2f} | "
                f"{e['mean_difference_db']:+.2f} | {e['this_better']} | {e['other_better']} | {e['wilcoxon_p']:.3g} |"
            )
    return lines


def denoiser_markdown(data: dict[str, Any]) -> str:
    res = data["results"]
    summary = res["summary"]
    sigmas = data["settings"]["sigmas"]
    keys = [f"{s:g}" for s in sigmas]
    lines = [
        _header(data),
        f"{res['images']} images of {data['settings']['data_name']}, noise seed {data['settings']['seed']}; "
        "PSNR (dB) / SSIM against the clean image, output clipped to [0, 1].",
        "",
        "| protocol | " + " | ".join(f"σ = {k}" for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for protocol in PROTOCOLS:
        if protocol in summary:
            for method, title in ((NOISY, "noisy input"), (MODEL, "denoised")):
                row = [_cell(summary[protocol].get(k, {}).get(method)) for k in keys]
                lines.append(f"| {protocol}, {title} | " + " | ".join(row) + " |")
    lat = res["latency"]
    lines += [
        "",
        f"float: noise added to clean/255 and not clipped (as the papers); uint8: the noisy image clipped and "
        f"rounded to 8 bits, as a client sending a PNG. Latency for one {lat['input_hw'][0]}×{lat['input_hw'][1]} "
        f"image: median {lat['median_ms']:.1f} ms (p90 {lat['p90_ms']:.1f} ms, min {lat['min_ms']:.1f} ms; "
        f"process CPU time {lat['cpu_median_ms']:.1f} ms), {lat['runs']} runs.",
    ]
    if "comparison" in res:
        lines += _denoiser_comparison(res["comparison"])
    baselines = res.get("baselines")
    if baselines:
        for protocol in PROTOCOLS:
            methods = [m for m in baselines["methods"] if any(m in summary.get(protocol, {}).get(k, {}) for k in keys)]
            if not methods:
                continue
            lines += [
                "",
                f"Baselines, {protocol} protocol, on the same noisy images: PSNR (dB) / SSIM, seconds per image "
                "(mean over the noise levels).",
                "",
                "| method | images | " + " | ".join(f"σ = {k}" for k in keys) + " | s / image |",
                "|---|---:|" + "---:|" * len(keys) + "---:|",
            ]
            rows = [(NOISY, "noisy input"), (MODEL, "normserve (ONNX Runtime)")]
            rows += [(m, baselines["titles"][m]) for m in methods]
            for method, title in rows:
                entries = [summary[protocol].get(k, {}).get(method) for k in keys]
                present = [e for e in entries if e is not None]
                if not present:
                    continue
                secs = sum(e["seconds_per_image"] for e in present) / len(present)
                sec_cell = "–" if method == NOISY else f"{secs:.3f}"
                n = present[0]["images"]
                lines.append(f"| {title} | {n} | " + " | ".join(_cell(e) for e in entries) + f" | {sec_cell} |")
                if method not in (NOISY, MODEL) and n < res["images"]:
                    same = [
                        None
                        if e is None
                        else {"psnr": e["model_psnr_same_images"], "ssim": e["model_ssim_same_images"]}
                        for e in entries
                    ]
                    lines.append(
                        f"| normserve on the same images | {n} | " + " | ".join(_cell(e) for e in same) + " | |"
                    )
        for note in baselines["notes"]:
            lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"
