"""experiments/verify_cost.py: the curve is measured through the backbone interface and the projection is the
stated formula (step compression x t_AR / t_verify, t_verify linear between measured sizes)."""

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "verify_cost.py"


@pytest.fixture(scope="module")
def vc():
    return runpy.run_path(str(SCRIPT))


def test_interpolation_and_projection(vc, tmp_path):
    curve = {1: 1.0, 8: 2.0, 16: 4.0}
    assert vc["interpolate"](curve, 8) == 2.0 and vc["interpolate"](curve, 12) == 3.0
    assert vc["interpolate"](curve, 64) == 4.0  # clamped
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": [
        {"decoder": "ar", "step_compression": 1.0, "speedup": 1.0, "config": {}},
        {"decoder": "hawk", "step_compression": 3.0, "speedup": 1.2, "config": {"tree_nodes": 12}}]}))
    proj = vc["project"]({"ar_step": 0.5, "verify": curve}, str(results))
    assert proj[0]["projected_speedup"] == 1.0
    assert proj[1]["projected_speedup"] == pytest.approx(3.0 * 0.5 / 3.0)


def test_tiny_curve_runs(tmp_path, monkeypatch):
    out = tmp_path / "vc"
    monkeypatch.setattr(sys, "argv", ["verify_cost.py", "sizes=[1,4]", "repeats=1", "warmup=0", f"out={out}"])
    report = runpy.run_path(str(SCRIPT), run_name="__main__")
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["ar_step"] > 0 and set(data["verify"]) == {"1", "4"}
    assert "| 4 |" in out.with_suffix(".md").read_text()
    assert report  # the script's namespace
