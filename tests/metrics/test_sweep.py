"""One table over the jobs of a sweep: job order, varying vs common overrides, the mean ± std over seeds."""

import json
from pathlib import Path

import pytest
import yaml

from hawkspec.metrics.sweep import commands, find_results, load_jobs, seed_summary, split_overrides, write_sweep_table


def fake_job(folder: Path, overrides: list[str], rows: list[dict], floor: float | None = 1.0) -> Path:
    folder.mkdir(parents=True)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    res = {"backbone": "tiny", "num_prompts": 4, "device": "cpu (1 threads)", "rows": rows}
    if floor is not None:
        res["quality"] = {"fid_features": "hawkspec-tiny-extractor", "reference": {},
                          "noise_floor": {"base_seed": 0, "seed": 1, "delta": {"fid": floor}, "fid_ar_vs_ar": 2 * floor}}
    (folder / "results.json").write_text(json.dumps(res))
    return folder / "results.json"


def row(decoder: str, fid: float, speedup: float = 1.0) -> dict:
    return {"decoder": decoder, "lossless": True, "acceptance_length": 1.0, "step_compression": 1.0,
            "speedup": speedup, "seconds_per_image": 0.1, "fid": fid}


@pytest.fixture
def sweep(tmp_path) -> Path:
    for n, seed in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]):
        fake_job(tmp_path / str(n), ["eval.decoders=[ar]", f"seed={seed}", "eval.num_prompts=4"],
                 [row("ar", float(seed)), row("hawk", 2.0 * seed, 1.5)])
    return tmp_path


def test_jobs_come_in_natural_order_with_their_overrides(sweep):
    paths = find_results([sweep])
    assert [p.parent.name for p in paths] == [str(i) for i in range(11)]  # 2 before 10
    jobs = load_jobs([sweep])
    assert split_overrides(jobs) == (["seed"], {"eval.decoders": "[ar]", "eval.num_prompts": "4"})
    assert jobs[10].command() == "hawkspec-eval 'eval.decoders=[ar]' seed=11 eval.num_prompts=4"


def test_seed_summary_is_mean_and_std_per_decoder(sweep):
    cols, rows = seed_summary(load_jobs([sweep]))
    assert cols[:2] == ["decoder", "seeds"]
    by = {r["decoder"]: r for r in rows}
    assert by["ar"]["seeds"] == 11 and by["ar"]["fid"] == "6.000 ± 3.317"  # mean and sample std of 1..11
    assert by["hawk"]["fid"] == "12.000 ± 6.633"


def test_write_sweep_table(sweep):
    out = write_sweep_table(sweep)
    md = out.read_text()
    assert "| job | seed | decoder |" in md and "Mean ± standard deviation over seeds" in md and "Noise floor" in md
    data = json.loads((sweep / "sweep_results.json").read_text())
    assert len(data["rows"]) == 22 and data["columns"][:3] == ["job", "seed", "decoder"]


def test_no_results_is_reported(tmp_path):
    assert write_sweep_table(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no results.json"):
        find_results([tmp_path])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_results([tmp_path / "nope"])


def test_the_sweep_command_is_rebuilt_from_its_jobs(tmp_path):
    for n, (vsd, budget) in enumerate([(1, 8), (1, 16), (2, 8), (2, 16)]):
        fake_job(tmp_path / "s" / str(n), ["eval.decoders=[ar,hawk]", f"decoder.proposer.vsd={vsd}",
                                            f"decoder.tree.budget={budget}"], [row("ar", 1.0)])
        hydra = {"hydra": {"overrides": {"hydra": [f"hydra.sweep.dir={tmp_path / 's'}", "hydra.mode=MULTIRUN"]}}}
        (tmp_path / "s" / str(n) / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    fake_job(tmp_path / "single", ["eval.num_prompts=4"], [row("ar", 1.0)])
    (tmp_path / "single" / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(
        {"hydra": {"overrides": {"hydra": [f"hydra.run.dir={tmp_path / 'single'}", "hydra.mode=RUN"]}}}))
    jobs = load_jobs([tmp_path / "s", tmp_path / "single"])
    assert commands(jobs) == [
        f"hawkspec-eval eval.num_prompts=4 hydra.run.dir={tmp_path / 'single'}",
        f"hawkspec-eval -m 'eval.decoders=[ar,hawk]' decoder.proposer.vsd=1,2 decoder.tree.budget=8,16 "
        f"hydra.sweep.dir={tmp_path / 's'}",
    ]
