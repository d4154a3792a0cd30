"""scripts/arch_latency.py: every configuration is exported, quantized, timed, and counted."""

from __future__ import annotations

import pytest

from scripts import arch_latency


def test_arch_latency_prints_each_config_in_both_precisions(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = '{"widths": [8, 16, 32], "depths": [1, 1, 1]}'
    assert arch_latency.main(["--model", tiny, "--rounds", "2", "--batch", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [(r[0], r[-4]) for r in rows] == [
        ("served", "fp32"),
        ("served", "int8"),
        ('{"widths":', "fp32"),
        ('{"widths":', "int8"),
    ]
    served_int8, tiny_int8 = rows[1], rows[3]
    assert float(served_int8[-1]) == 1.0  # the reference row
    # 3x3 convs: 32*32*27*8 + 16*16*72*16 + 8*8*144*32 multiply-adds, plus the 32x10 head: 0.81 M.
    assert float(tiny_int8[-3]) == pytest.approx(0.811328, abs=0.05)
    assert float(served_int8[-3]) == pytest.approx(115.0, abs=1)
