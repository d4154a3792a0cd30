"""`normserve eval denoiser` on tiny images through the real ORT session: the two noise
protocols, reproducible noise, PSNR against a direct computation, the files it writes,
`--update-config` read back by the service, and the classical baselines."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from eval_data import RepoFactory, save, session, smooth_image, version_dir
from PIL import Image

from normserve.contract import ModelConfigFile
from normserve.evaluation.cli import main
from normserve.evaluation.denoiser import gaussian_noise, model_input, noisy_float, noisy_uint8, wilcoxon_p
from normserve.quality import psnr
from normserve.service.imaging import DecodedImage, to_tensor
from normserve.service.model import ServedModel
from normserve.service.settings import Settings


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Three small PNGs; the first has pure black and white regions, so clipping shows."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "clean"
    first = smooth_image(rng, 24, 20)
    first[:6] = 0
    first[-6:] = 255
    save(first, folder / "a.png")
    save(smooth_image(rng, 18, 26), folder / "b.png")
    save(smooth_image(rng, 20, 20), folder / "c.png")
    return folder


def run_eval(repo: Path, data: Path, out: Path, *extra: str) -> dict:
    args = ["denoiser", "--repository", str(repo), "--data", str(data), "--out", str(out)]
    args += ["--latency-runs", "1", "--latency-size", "32", *extra]
    assert main(args) == 0
    return json.loads((out / "denoiser.json").read_text())


# --------------------------------------------------------------------------- protocols


def test_same_seed_same_noise_and_each_image_and_sigma_its_own() -> None:
    a = gaussian_noise((8, 8, 3), 25, 0, "x.png")
    assert np.array_equal(a, gaussian_noise((8, 8, 3), 25, 0, "x.png"))
    for other in (gaussian_noise((8, 8, 3), 25, 1, "x.png"), gaussian_noise((8, 8, 3), 25, 0, "y.png")):
        assert not np.allclose(a, other)
    # sigma changes the stream, not only the scale
    assert not np.allclose(a / 25, gaussian_noise((8, 8, 3), 50, 0, "x.png") / 50)
    big = gaussian_noise((200, 200, 3), 25, 0, "big")
    assert big.std() * 255 == pytest.approx(25, rel=0.02)


def test_uint8_protocol_clips_and_rounds_the_float_one_does_not() -> None:
    clean = np.zeros((16, 16, 3), np.uint8)
    clean[8:] = 255
    noise = gaussian_noise(clean.shape, 50, 0, "k")
    f = noisy_float(clean, noise)
    u = noisy_uint8(clean, noise)
    assert f.min() < 0 and f.max() > 1  # unclipped
    assert u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
    expected = np.clip(np.rint(clean.astype(np.float64) + 255 * noise), 0, 255)
    assert np.array_equal(u, expected)
    x, u2 = model_input(clean, noise, "uint8")
    assert np.array_equal(u2, u)
    assert np.array_equal(x, to_tensor(DecodedImage(u, "PNG"))[0].transpose(1, 2, 0))  # what the service feeds
    assert x.min() >= 0 and x.max() <= 1
    xf, _ = model_input(clean, noise, "float")
    assert np.array_equal(xf, f)


def test_psnr() -> None:
    ref = np.full((4, 4, 3), 0.5)
    assert psnr(ref + 0.1, ref) == pytest.approx(20.0)
    assert psnr(ref, ref) == math.inf


# --------------------------------------------------------------------------- the command


def test_denoiser_eval_matches_direct_computation_and_writes_results(
    tmp_path: Path, model_repo: RepoFactory, images: Path
) -> None:
    repo = model_repo("in_autoencoder")
    out = tmp_path / "out"
    result = run_eval(repo, images, out, "--limit", "2", "--sigmas", "15,50", "--seed", "7")
    res = result["results"]
    assert res["images"] == 2
    assert len(res["per_image"]) == 2 * 2 * 2 * 2  # images x sigmas x protocols x (noisy, model)

    # The float protocol at sigma 50 on a.png, recomputed with a plain ORT session.
    clean_u8 = np.asarray(Image.open(images / "a.png").convert("RGB"))
    clean = clean_u8 / 255.0
    noisy = (clean + gaussian_noise(clean_u8.shape, 50, 7, "a.png")).astype(np.float32)
    y = session(repo, "in_autoencoder").run(["reconstruction"], {"image": noisy.transpose(2, 0, 1)[None]})[0][0]
    expected = 10 * np.log10(1 / np.mean((np.clip(y.transpose(1, 2, 0), 0, 1) - clean) ** 2))
    rec = next(
        r
        for r in res["per_image"]
        if (r["image"], r["sigma"], r["protocol"], r["method"]) == ("a.png", 50.0, "float", "normserve")
    )
    assert rec["psnr"] == pytest.approx(expected, abs=1e-4)
    noisy_rec = next(
        r
        for r in res["per_image"]
        if (r["image"], r["sigma"], r["protocol"], r["method"]) == ("a.png", 50.0, "float", "noisy")
    )
    assert noisy_rec["psnr"] == pytest.approx(10 * np.log10(1 / np.mean((noisy - clean) ** 2)), abs=1e-4)

    summary = res["summary"]
    assert set(summary) == {"float", "uint8"} and set(summary["float"]) == {"15", "50"}
    mine = [
        r["psnr"]
        for r in res["per_image"]
        if r["method"] == "normserve" and r["protocol"] == "uint8" and r["sigma"] == 15.0
    ]
    assert summary["uint8"]["15"]["normserve"]["psnr"] == pytest.approx(np.mean(mine))
    assert 0 < summary["float"]["50"]["normserve"]["ssim"] <= 1
    assert res["latency"]["input_hw"] == [32, 32] and res["latency"]["median_ms"] > 0
    assert result["settings"]["seed"] == 7 and result["environment"]["packages"]["onnxruntime"]

    md = (out / "denoiser.md").read_text()
    assert "| float, denoised |" in md and "| uint8, noisy input |" in md
    assert (out / "denoiser_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_update_config_and_publish(tmp_path: Path, model_repo: RepoFactory, images: Path) -> None:
    repo = model_repo("in_autoencoder")
    docs = tmp_path / "docs"
    result = run_eval(repo, images, tmp_path / "out", "--sigmas", "25", "--update-config", "--publish", str(docs))
    assert sorted(p.name for p in docs.iterdir()) == ["denoiser.json", "denoiser.md", "denoiser_grid.png"]
    vdir = version_dir(repo, "in_autoencoder")
    metrics = ModelConfigFile.load(vdir / "config.json").metrics["cbsd68"]
    assert metrics["images"] == 3
    assert metrics["psnr_float"]["25"] == pytest.approx(
        result["results"]["summary"]["float"]["25"]["normserve"]["psnr"]
    )
    # The service still loads the version with its metrics.
    model = ServedModel(vdir, "in_autoencoder", vdir.name)
    model.load(Settings(_env_file=None, model_repository=repo))  # type: ignore[call-arg]
    assert model.ready, model.reason


def test_baselines_on_the_same_noisy_images(tmp_path: Path, model_repo: RepoFactory, images: Path) -> None:
    pytest.importorskip("cv2")
    pytest.importorskip("skimage")
    repo = model_repo("in_autoencoder")
    methods = "opencv_nlm,skimage_wavelet,skimage_tv"
    extra = ("--sigmas", "50", "--baselines", "--baseline-methods", methods, "--baselines-limit", "2")
    result = run_eval(repo, images, tmp_path / "out", *extra)
    summary = result["results"]["summary"]["float"]["50"]
    for method in methods.split(","):
        entry = summary[method]
        assert entry["images"] == 2  # --baselines-limit
        assert entry["seconds_per_image"] > 0
        # A real denoiser on sigma 50: better than the noisy input it got.
        assert entry["psnr"] > summary["noisy"]["psnr"] + 1
        same = [r for r in result["results"]["per_image"] if r["method"] == "normserve" and r["protocol"] == "float"]
        assert entry["model_psnr_same_images"] == pytest.approx(np.mean([r["psnr"] for r in same[:2]]))
    assert result["results"]["baselines"]["params"]["skimage_tv"]["50"] == {"weight": pytest.approx(0.15)}
    assert "scikit-image denoise_wavelet" in (tmp_path / "out" / "denoiser.md").read_text()


def test_unknown_baseline_and_wrong_task_are_errors(
    tmp_path: Path, model_repo: RepoFactory, images: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = model_repo("in_autoencoder")
    base = ["--repository", str(repo), "--data", str(images), "--out", str(tmp_path)]
    assert main(["denoiser", *base, "--baselines", "--baseline-methods", "median"]) == 2
    assert "unknown baselines ['median']" in capsys.readouterr().err
    assert main(["classifier", *base, "--model", "in_autoencoder"]) == 2
    assert "is a denoising model, not a classifier" in capsys.readouterr().err
    assert main(["denoiser", *base, "--model", "nope"]) == 2
    assert "model 'nope' not found" in capsys.readouterr().err


# --------------------------------------------------------------------------- --compare


def test_compare_pairs_each_noisy_image_with_the_other_version(
    tmp_path: Path, model_repo: RepoFactory, images: Path, committed_model_repository: Path
) -> None:
    """--compare 1 --compare-repository R: the other version sees the same noisy images, its PSNR
    matches a plain ORT session, and the paired differences and the Wilcoxon p follow from them."""
    repo = model_repo("in_autoencoder")  # the newest committed version
    other_dir = min((committed_model_repository / "in_autoencoder").iterdir(), key=lambda d: int(d.name))
    extra = ("--sigmas", "25,50", "--compare", other_dir.name, "--compare-repository", str(committed_model_repository))
    result = run_eval(repo, images, tmp_path / "out", *extra)
    res = result["results"]
    cmp = res["comparison"]
    assert cmp["other"] == f"in_autoencoder/{other_dir.name}"
    assert cmp["model"]["onnx_sha256"] == hashlib.sha256((other_dir / "model.onnx").read_bytes()).hexdigest()

    # The other version's float-protocol PSNR on b.png at sigma 25, recomputed with a plain ORT session.
    clean_u8 = np.asarray(Image.open(images / "b.png").convert("RGB"))
    clean = clean_u8 / 255.0
    noisy = (clean + gaussian_noise(clean_u8.shape, 25, 0, "b.png")).astype(np.float32)
    other = ort.InferenceSession(str(other_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    y = other.run(["reconstruction"], {"image": noisy.transpose(2, 0, 1)[None]})[0][0]
    expected = 10 * np.log10(1 / np.mean((np.clip(y.transpose(1, 2, 0), 0, 1) - clean) ** 2))
    by_key = {(r["method"], r["protocol"], r["sigma"], r["image"]): r["psnr"] for r in res["per_image"]}
    assert by_key[("compare", "float", 25.0, "b.png")] == pytest.approx(expected, abs=1e-4)

    for protocol in ("float", "uint8"):
        for sigma in (25.0, 50.0):
            names = ("a.png", "b.png", "c.png")
            diff = np.array(
                [by_key[("normserve", protocol, sigma, n)] - by_key[("compare", protocol, sigma, n)] for n in names]
            )
            e = cmp["protocols"][protocol][f"{sigma:g}"]
            assert e["images"] == 3
            assert e["mean_difference_db"] == pytest.approx(diff.mean())
            assert (e["this_better"], e["other_better"], e["ties"]) == (
                int((diff > 0).sum()),
                int((diff < 0).sum()),
                int((diff == 0).sum()),
            )
            assert e["wilcoxon_p"] == pytest.approx(wilcoxon_p(diff))
    md = (tmp_path / "out" / "denoiser.md").read_text()
    assert f"Against in_autoencoder/{other_dir.name} on the same noisy images" in md


@pytest.mark.parametrize(
    ("diff", "p"),
    [
        ([0.5, 0.3, 0.2], 0.25),  # all three the same sign: 2 x (1/2)^3
        ([0.5, 0.3, -0.2, 0.1], 0.375),  # the one negative difference has rank 2 of 4: W = 2, p = 2 x 3/16
        ([0.5, 0.0, 0.2, 0.3], 0.25),  # the zero difference is dropped
        ([0.0, 0.0, 0.0], 1.0),
    ],
)
def test_wilcoxon_p_is_the_exact_signed_rank_tail(diff: list[float], p: float) -> None:
    assert wilcoxon_p(np.array(diff)) == pytest.approx(p)


def test_compare_with_itself_ties_on_every_image(tmp_path: Path, model_repo: RepoFactory, images: Path) -> None:
    repo = model_repo("in_autoencoder")
    version = version_dir(repo, "in_autoencoder").name
    result = run_eval(repo, images, tmp_path / "out", "--sigmas", "15", "--compare", version)
    for protocol in ("float", "uint8"):
        e = result["results"]["comparison"]["protocols"][protocol]["15"]
        assert (e["ties"], e["this_better"], e["other_better"]) == (3, 0, 0)
        assert e["mean_difference_db"] == 0 and e["wilcoxon_p"] == 1.0
