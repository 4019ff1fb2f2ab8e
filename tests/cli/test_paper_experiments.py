"""The papers' experiment configs (conf/experiment/{hawk_table1,gsd_table,sjd}_*.yaml) compose into hawkspec-eval
with the backbone, prompt set, sampling, decoders and quality protocol they claim; the tiny analogues resolve
fully, and their prompt sets load."""

from pathlib import Path

import pytest
from hydra import initialize_config_dir

from hawkspec.testing import compose
from omegaconf import OmegaConf

from hawkspec.cli.eval import prompt_spec
from hawkspec.data.prompts import load_prompt_set

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY = ["hawk_table1_tiny", "gsd_table_tiny", "sjd_tiny"]
REAL = {"hawk_table1_coco": "coco", "hawk_table1_flickr30k": "flickr30k", "gsd_table_coco": "coco", "sjd_coco": "coco",
        "sjd_pac_coco": "coco", "sjd_pac_parti": "parti", "pjd_parti": "parti", "zipar_coco": "coco"}


def eval_cfg(experiment: str, *overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("eval", overrides=[f"experiment={experiment}", *overrides], return_hydra_config=True)


@pytest.mark.parametrize("name", TINY)
def test_tiny_analogues_resolve_and_load_their_prompts(name):
    cfg = eval_cfg(name)
    e = OmegaConf.to_container(cfg.eval, resolve=False)
    assert cfg.backbone._target_.endswith("TinyBackbone.from_pretrained") or "tiny" in str(cfg.backbone)
    assert "ar" in e["decoders"] and len(e["decoders"]) >= 2
    assert e["quality"]["enabled"] and e["quality"]["fid_features"] == "tiny"
    prompts = load_prompt_set(prompt_spec(cfg))
    assert len(prompts) == e["num_prompts"] == 64


@pytest.mark.parametrize("name,source", REAL.items())
def test_paper_configs_set_the_lumina_protocol(name, source):
    cfg = eval_cfg(name)
    assert cfg.backbone.resolution == 768 and "Chameleon" in cfg.backbone._target_
    assert cfg.eval.prompts.source == source and cfg.eval.quality.fid_features == "inception"
    with pytest.raises(ValueError, match="set eval.prompts.path"):  # the data paths are the user's to give
        prompt_spec(cfg)
    assert "ar" in cfg.eval.decoders and len(cfg.eval.decoders) >= 2
    if name.startswith("hawk_table1"):
        assert list(cfg.eval.decoders) == ["ar", "medusa", "hawk", "medusa_lanternpp"]
        assert cfg.eval.num_prompts == 500 and cfg.eval.decoders.medusa_lanternpp.acceptance.k == 1000
    if name == "gsd_table_coco":
        acc = cfg.eval.decoders.gsd.acceptance
        assert (acc.window, acc.embed_metric, acc.floor, acc.prob_threshold, acc.embed_threshold) == (
            "official", "squared", False, 0.15, 0.5)
        assert cfg.eval.decoders.gsd.tree.budget == 15
    if name in ("pjd_parti", "zipar_coco"):  # the rows-in-flight protocols: the official windows on Lumina-mGPT
        rows = {n: OmegaConf.to_container(d.rows, resolve=True) for n, d in cfg.eval.decoders.items() if "rows" in d}
        if name == "pjd_parti":
            assert rows == {"pjd": {"method": "pjd", "window": 8, "open_at": 9, "reuse": 0.5}}
            assert cfg.eval.num_prompts == 200 and cfg.sampling.top_k == 2000
        else:
            assert {n: r["window"] for n, r in rows.items()} == {"zipar": 16, "zipar_w8": 8, "zipar_w32": 32}
            assert cfg.seed == 3407 and cfg.sampling.cfg_scale == 3.0
        assert cfg.eval.decoders.spatial_jacobi.proposer.lane == 8
    if name.startswith("sjd_pac"):  # SJD-PAC's protocol: the code's tree, every COCO image / Parti row, seed 1
        assert OmegaConf.to_container(cfg.eval.decoders.sjd_pac.tree.pac, resolve=True) == {
            "nodes": 64, "width": 3, "depth": 3}
        assert cfg.eval.num_prompts == {"coco": 5000, "parti": 1632}[source] and cfg.seed == 1
        assert cfg.eval.batch_size == 1 and cfg.eval.prompts.caption == "longest"
