"""`hawkspec-eval` with quality: per-row figures with their feature space, the AR noise floor, results.{json,md,csv},
and the errors of `eval.quality` keys."""

import csv
import json
from pathlib import Path

import pytest
from hydra import initialize_config_dir

from hawkspec.cli.eval import quality_settings
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.metrics.evaluator import EXTRACTOR_NAME
from hawkspec.testing import compose, run_cli

ROOT = Path(__file__).resolve().parents[2]


def eval_cli(*overrides, ok=True, env=None):
    return run_cli("hawkspec-eval", *overrides, ok=ok, env={"OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, random_backbone_dir):
    from hawkspec.backbones.tiny import TinyBackbone

    bb = TinyBackbone.from_pretrained(random_backbone_dir)
    root = tmp_path_factory.mktemp("heads")
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=False), bb).save(root / "medusa")
    return root


def small_quality(cache_dir) -> list[str]:
    return ["eval.quality.fid_features=tiny", "eval.quality.reference.num_images=64",
            f"eval.quality.reference.cache_dir={cache_dir}"]


def test_eval_scores_quality_with_its_noise_floor(tmp_path, random_backbone_dir, heads_dir):
    run_dir = tmp_path / "run"
    eval_cli(f"backbone.path={random_backbone_dir}", f"paths.heads_dir={heads_dir}", "eval.decoders=[ar,medusa]",
             "eval.num_prompts=4", "eval.batch_size=2", "eval.repeats=1", "tree.budget=4",
             *small_quality(tmp_path / "ref"), f"hydra.run.dir={run_dir}")
    res = json.loads((run_dir / "results.json").read_text())
    rows = {r["decoder"]: r for r in res["rows"]}
    for r in rows.values():  # the speed contract is untouched, the quality figures are added
        for key in ("lossless", "acceptance_length", "forwards_per_image", "step_compression", "seconds_per_image",
                    "speedup"):
            assert key in r
        assert r["fid_features"] == EXTRACTOR_NAME and r["fid"] >= 0 and r["diversity"] > 0
        assert 0 <= r["alignment"] <= 1 and r["quality_images"] == 4 and "clip_score" not in r
    q = res["quality"]
    assert q["fid_features"] == EXTRACTOR_NAME and q["reference"]["num_images"] == 64
    floor = q["noise_floor"]
    assert floor["base_seed"] == 0 and floor["seed"] == 1 and floor["fid_ar_vs_ar"] >= 0
    assert floor["delta"]["fid"] == pytest.approx(abs(floor["ar_reseed"]["fid"] - rows["ar"]["fid"]))
    assert floor["ar_reseed"]["fid"] != rows["ar"]["fid"]  # really another sample
    assert list(Path(q["reference"]["cache"]).parent.glob("*.pt")) == [Path(q["reference"]["cache"])]
    md = (run_dir / "results.md").read_text()
    assert md.startswith("| decoder |") and f"fid ({EXTRACTOR_NAME})" in md and "Noise floor" in md
    with open(run_dir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["decoder"] for r in table] == ["ar", "medusa"] and table[0]["fid_features"] == EXTRACTOR_NAME


def test_eval_without_quality_keeps_the_speed_table(tmp_path, random_backbone_dir):
    eval_cli(f"backbone.path={random_backbone_dir}", "eval.decoders=[ar]", "eval.num_prompts=1", "eval.repeats=1",
             "eval.quality.enabled=false", f"hydra.run.dir={tmp_path}")
    res = json.loads((tmp_path / "results.json").read_text())
    assert "quality" not in res and "fid" not in res["rows"][0]
    assert "fid" not in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.csv").is_file()


def test_a_missing_inception_file_stops_eval_before_decoding(tmp_path, random_backbone_dir):
    proc = eval_cli(f"backbone.path={random_backbone_dir}", "eval.decoders=[ar]", "eval.num_prompts=2",
                    "eval.quality.inception_weights=/no/such/pt_inception.pth", f"hydra.run.dir={tmp_path}", ok=False)
    assert "eval.quality.inception_weights" in proc.stderr and "/no/such/pt_inception.pth" in proc.stderr
    assert not (tmp_path / "codes_ar.pt").exists()


@pytest.mark.parametrize("overrides, key", [
    (["eval.quality.fid_features=fancy"], "eval.quality.fid_features"),
    (["eval.num_prompts=1"], "eval.num_prompts"),
    (["eval.quality.clip_model=/no/such/clip"], "eval.quality.clip_model"),
    (["+eval.quality.bogus=1"], "eval.quality"),
    (["eval.quality.reference.num_images=1"], "eval.quality.reference.num_images"),
    (["eval.quality.noise_floor_seed=0"], "eval.quality.noise_floor_seed"),
])
def test_eval_quality_keys_are_checked_up_front(overrides, key):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=[*overrides, "paths.root_dir=/r"])
    with pytest.raises((ValueError, FileNotFoundError), match=key.replace(".", r"\.")):
        quality_settings(cfg, cfg.eval.num_prompts)


def test_quality_defaults_compose():
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("eval", overrides=["paths.root_dir=/r"])
    s = quality_settings(cfg, cfg.eval.num_prompts)
    assert s.fid_features == "auto" and s.noise_floor and s.reference["cache_dir"] == "/r/outputs/cache/reference"
