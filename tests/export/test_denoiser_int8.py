"""scripts/denoiser_int8.py and `quantize_int8(keep_float=…)`, on the shipped denoiser graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from normserve.export.quantize import quantize_int8
from scripts import denoiser_int8

SIDE = 64


def write_images(folder: Path, n: int, hw: tuple[int, int], seed: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, (hw[0] // 8, hw[1] // 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((hw[1], hw[0]), Image.Resampling.BILINEAR).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def served() -> Path:
    return denoiser_int8.newest_version()


def expected_macs(config: dict[str, int], side: int) -> list[int]:
    """Multiply-adds of each 3x3 conv of the skip + residual autoencoder, in graph order."""
    b, c, k = config["base"], config["in_ch"], 9
    half, quarter = (side // 2) ** 2, (side // 4) ** 2
    return [
        b * c * k * half,  # enc1, stride 2
        2 * b * b * k * quarter,  # enc2, stride 2
        *[2 * b * 2 * b * k * quarter] * config["bottleneck_depth"],
        b * (2 * b + b) * k * half,  # dec1 over [upsampled bottleneck, enc1]
        b * (b + c) * k * side**2,  # dec2 over [upsampled dec1, image]
        c * (b + c) * k * side**2,  # projection over [dec2, image]
    ]


def test_conv_infos_match_the_architecture(served: Path) -> None:
    config = json.loads((served / "config.json").read_text())["model"]["config"]
    infos = denoiser_int8.conv_infos(served / "model.onnx", SIDE)
    assert [c.macs for c in infos] == expected_macs(config, SIDE)
    assert infos[0].out_hw == (SIDE // 2, SIDE // 2) and infos[-1].out_hw == (SIDE, SIDE)


def test_keep_float_leaves_those_convs_unquantized(served: Path, tmp_path: Path) -> None:
    infos = denoiser_int8.conv_infos(served / "model.onnx", SIDE)
    calibration = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)
    out = tmp_path / "q.onnx"
    quantize_int8(served / "model.onnx", out, calibration, keep_float=[c.name for c in infos[1:]])
    proto = onnx.load(str(out))
    convs = {n.name: n for n in proto.graph.node if n.op_type == "Conv"}
    produced_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    int8 = [name for name, n in convs.items() if produced_by.get(n.input[1]) == "DequantizeLinear"]
    assert int8 == [infos[0].name]
    assert sum(i.name.endswith("_quantized") for i in proto.graph.initializer) == 1


def test_report_has_every_conv_and_consistent_variants(
    served: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    test = write_images(tmp_path / "test", 2, (40, 56), 0)
    train = write_images(tmp_path / "train", 3, (48, 48), 1)
    argv = ["--model", str(served), "--data", str(test), "--train-data", str(train), "--images", "2"]
    argv += ["--calibration", "6", "--crop", "32", "--side", str(SIDE), "--rounds", "1", "--tolerance", "0.05"]
    assert denoiser_int8.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    infos = denoiser_int8.conv_infos(served / "model.onnx", SIDE)
    rows = [line.split() for line in lines if line.startswith(tuple(c.name for c in infos))]
    assert [r[0] for r in rows] == [c.name for c in infos]
    total = sum(c.macs for c in infos)
    for row, info in zip(rows, infos, strict=True):
        assert row[1] == "x".join(map(str, info.weight))
        assert float(row[3].rstrip("%")) == pytest.approx(100 * info.macs / total, abs=0.06)
    alone = {r[0]: float(r[4]) for r in rows}
    variants = {line.split("  ")[0]: line.split()[-4:] for line in lines[-3:]}
    assert list(variants) == ["fp32", "every Conv int8", "int8 where alone >= -0.05 dB"]
    assert variants["fp32"][:2] == ["0%", "+0.000"] and variants["fp32"][-1] == "1.00"
    assert variants["every Conv int8"][0] == "100%" and float(variants["every Conv int8"][1]) != 0.0
    safe_share = sum(c.macs for c in infos if alone[c.name] >= -0.05) / total
    assert float(variants["int8 where alone >= -0.05 dB"][0].rstrip("%")) == pytest.approx(100 * safe_share, abs=0.6)


@pytest.mark.parametrize("option", ["--images", "--calibration", "--crop", "--side", "--threads", "--rounds"])
def test_counts_below_one_are_refused(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        denoiser_int8.main([option, "0"])
    assert exit_info.value.code == 2
    assert f"{option} must be at least 1" in capsys.readouterr().err
