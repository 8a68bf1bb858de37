"""``benchmarks/paper_mini.py --quick`` end to end, in a subprocess (slow: a few minutes on one core).

The smoke run renders a small version of the generated data, trains the ResNet
for two short epochs, compresses it with all three methods at one target (the
paper's importance on holdout splits, the closed latency loop on onnxruntime),
fine-tunes one seed, merges, measures the speed-up and writes its JSON and plot to
a temporary directory. Checked here: the JSON is complete and consistent, not the
accuracy of a model trained for seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "paper_mini.py"


def _check_cell(cell: dict) -> None:
    assert cell["method"] in ("layermerge", "depth", "layer")
    if not cell["feasible"]:
        assert "cannot be met" in cell["why"] or "smallest" in cell["why"], cell["why"]
        return
    speed = cell["speed"]
    assert speed["original_ms"] > 0 and speed["merged_ms"] > 0 and speed["speedup"] > 0
    assert speed["speedup_q1"] <= speed["speedup"] <= speed["speedup_q3"]
    assert speed["ort_vs_torch_rel_error"] < 1e-3
    accuracy = cell["test_accuracy"]
    assert len(accuracy["seeds"]) == 1 and accuracy["std"] == 0.0
    assert 0.0 <= accuracy["mean"] <= 1.0 and 0.0 <= cell["test_accuracy_before_finetune"] <= 1.0
    assert cell["merged_vs_linearized_rel_error"] < 1e-3  # the merged model is the fine-tuned one, exactly
    assert cell["convs_after"] <= 15 and cell["plan"]


@pytest.mark.slow
def test_paper_mini_quick(tmp_path):
    out = tmp_path / "paper_mini.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "QUICK SMOKE RUN" in proc.stdout and "| resnet | original |" in proc.stdout
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert (tmp_path / "models").is_dir()  # trained model and data stay in the temporary directory

    env = result["environment"]
    assert env["quick"] is True and env["threads"] == 1 and env["input_shape"] == [1, 3, 32, 32]
    assert result["settings"]["importance"] in ("paper", "finetune")
    ranges = sorted(tuple(r) for r in result["data"]["ranges"].values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), "the splits overlap"

    assert list(result["models"]) == ["resnet"]
    model = result["models"]["resnet"]
    facts = model["facts"]
    assert 0.0 <= facts["val_accuracy"] <= 1.0 and facts["activations"] == 13
    # at most half (rounded up) of the 13 ReLUs; --quick's kernel bound (5) allows fewer
    assert facts["half_activations_probes"] and all(
        0 < p["activations_removed"] <= 7 for p in facts["half_activations_probes"]
    )
    assert model["original"]["latency_ms"] > 0 and model["original"]["convs"] == 15
    cells = model["cells"]
    assert sorted(c["method"] for c in cells) == ["depth", "layer", "layermerge"]
    assert len({c["target"] for c in cells}) == 1
    for cell in cells:
        _check_cell(cell)
    assert any(c["feasible"] for c in cells if c["method"] == "layermerge")
    assert len(result["orderings"]) == 1 and result["wall_s"] > 0 and result["data_seconds"] >= 0
    assert model["phases_s"]["train"] > 0 and model["phases_s"]["fine-tune and test"] > 0
