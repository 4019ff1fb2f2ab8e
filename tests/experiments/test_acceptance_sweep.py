"""experiments/acceptance_sweep.py: variants named by overrides, untimed and as a benchmark against AR."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("exp_acceptance_sweep", ROOT / "experiments" / "acceptance_sweep.py")
sweep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sweep)

VARIANTS = ["--variant", "decoder=medusa", "--variant", "decoder=hawk decoder.tree.budget=4"]


def test_timed_sweep_measures_every_variant_against_ar_in_the_same_run(tmp_path):
    untimed = sweep.main(["--prompts", "2", "--batch-size", "1", *VARIANTS])
    out = tmp_path / "sweep.md"
    rows = sweep.main(["--prompts", "2", "--batch-size", "1", "--timed", "2", "--out", str(out), *VARIANTS])

    assert [r["variant"] for r in rows] == ["decoder=ar", "decoder=medusa", "decoder=hawk decoder.tree.budget=4"]
    ar = rows[0]
    assert ar["step_compression"] == 1.0 and ar["speedup"] == 1.0
    for r in rows:
        assert len(r["seconds_per_pass"]) == 2 and r["seconds_per_image"] > 0
        assert r["speedup"] == pytest.approx(ar["seconds_per_image"] / r["seconds_per_image"])
    # timing does not change what is decoded: same seeds, same forwards as the untimed sweep
    for timed, plain in zip(rows[1:], untimed):
        assert timed["variant"] == plain["variant"]
        assert timed["forwards_per_image"] == plain["forwards_per_image"]
        assert timed["step_compression"] > 1.0
    table = out.read_text()
    assert "| speedup |" in table and "median pass" in table and "`decoder=hawk decoder.tree.budget=4`" in table
    assert json.loads(out.with_suffix(".json").read_text())[2]["variant"] == "decoder=hawk decoder.tree.budget=4"


def test_variants_are_decoder_nodes_of_one_run_config():
    """Each variant is one node eval.decoders.v<i> of a single composed config (hawkspec-eval's mechanism)."""
    assert sweep.variant_overrides("decoder=hawk decoder.tree.budget=4 decoder/tree=gpu", "v1") == [
        "+decoder@eval.decoders.v1=hawk", "eval.decoders.v1.tree.budget=4", "+tree@eval.decoders.v1.tree=gpu"]
    with pytest.raises(SystemExit, match="--common"):
        sweep.variant_overrides("decoder=hawk sampling.top_k=3", "v0")  # the target is the run's, shared
    rows = sweep.main(["--prompts", "1", "--batch-size", "1", "--variant", "decoder=hawk decoder/tree=gpu",
                       "--variant", "decoder=hawk"])
    assert rows[0]["config"]["tree"]["budget"] == 32 and rows[1]["config"]["tree"]["budget"] == 8
