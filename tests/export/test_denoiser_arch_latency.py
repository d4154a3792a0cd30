"""scripts/denoiser_arch_latency.py: the served denoiser and each candidate are exported, timed and
counted, and candidates are overrides of the served config as `train --model` applies them."""

from __future__ import annotations

import pytest

from scripts import denoiser_arch_latency


def test_denoiser_arch_latency_prints_each_candidate(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", '{"scales": 3}', "--model", '{"base": 8, "stem": 1}', "--side", "64", "--rounds", "2"]
    argv += ["--train-rounds", "1", "--train-batch", "2", "--train-patch", "32", "--epoch-patches", "20"]
    assert denoiser_arch_latency.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in out[2:5]]
    assert [r[0] for r in rows] == ["served", '{"scales":', '{"base":']
    steps = [line.split() for line in out[-3:]]
    assert [r[0] for r in steps] == ["served", '{"scales":', '{"base":'] and float(steps[0][-1]) == 1.0
    assert all(float(r[-2]) == pytest.approx(10 * float(r[-3]), abs=0.06) for r in steps)  # 20 patches / 2
    served, deep = rows[0], rows[1]
    assert float(served[-1]) == 1.0  # the reference row
    # The served config at 64x64: enc1 3->32 at 32², enc2 32->64 at 16², four 64->64 at 16²,
    # dec1 (64+32)->32 at 32², dec2 (32+3)->32 at 64², proj (32+3)->3 at 64²; 3x3 kernels.
    convs = [3 * 32 * 32**2, 32 * 64 * 16**2, *[64 * 64 * 16**2] * 4, 96 * 32 * 32**2, 35 * 32 * 64**2, 35 * 3 * 64**2]
    assert float(served[-3]) == pytest.approx(9 * sum(convs) / 1e6, abs=0.1)
    assert int(served[-4]) == 206260  # v3's parameter count (docs/models/in_autoencoder.md)
    # The third scale moves the bottleneck to /8 with 128 channels: four times the weights there.
    assert int(deep[-4]) > 4 * int(served[-4])
