"""``benchmarks/ddpm_mini.py --quick`` end to end, in a subprocess (slow: a few minutes on one core).

The smoke run trains the small DDPM for 300 steps (in a temporary cache), compresses
it with LayerMerge and with depth at one target (the paper's importance on the
relative change of the denoising loss, the closed latency loop on onnxruntime),
fine-tunes for one epoch, merges, measures the speed-up and writes its JSON and the
sample grid to a temporary directory. Checked here: the JSON is complete and
consistent and the merge exact, not the quality of a model trained for seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "ddpm_mini.py"


@pytest.mark.slow
def test_ddpm_mini_quick(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "ddpm_mini_quick.json").read_text())
    assert (tmp_path / "ddpm_mini_quick_samples.png").stat().st_size > 5_000
    assert result["quick"] is True and result["training"]["cached"] is False
    assert sum(result["splits"].values()) == 1797
    original = result["denoise_loss"]["original"]["test"]
    assert 0.0 < original < 1.0
    cells = result["cells"]
    assert sorted(c["method"] for c in cells) == ["depth", "layermerge"]
    for cell in cells:
        if not cell["feasible"]:
            assert "cannot be met" in cell["why"], cell["why"]
            continue
        speed = cell["speed"]
        assert speed["speedup"] > 0 and speed["speedup_q1"] <= speed["speedup"] <= speed["speedup_q3"]
        assert speed["ort_vs_torch_rel_error"] < 1e-2  # ORT's own GroupNorm/attention kernels: ~1e-3 here
        assert cell["merged_vs_linearized_rel_error"] < 1e-4
        assert cell["convs"][1] <= cell["convs"][0]
        assert math.isfinite(cell["test_loss"]) and math.isfinite(cell["test_loss_before_finetune"])
    assert any(c["feasible"] for c in cells if c["method"] == "layermerge")
    assert "| layermerge |" in result["table"]
