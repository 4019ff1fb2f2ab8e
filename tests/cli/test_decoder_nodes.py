"""Every decoder of a run is a node of its config (``eval.decoders.<name>``): the README's comparison commands give
every tree decoder of a run the same tree, each backbone gives each preset its own constants, a per-decoder override
reaches that decoder only, the short spellings expand (or are refused naming the key to use), and the results carry
each decoder's settings."""

from pathlib import Path

import pytest
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from hawkspec.cli.common import CONF_DIR
from hawkspec.cli.eval import differing_settings, settings_note
from hawkspec.cli.overrides import OverrideError, expand
from hawkspec.decoding.build import build_decoder, decoder_presets
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.testing import compose, run_cli

ROOT = Path(__file__).resolve().parents[2]
#: Presets that own their tree (a Jacobi chain, SJD-PAC's tree) rather than reading the run's.
OWN_TREE = {"ar", "sjd", "gsd", "gsd_window", "hawk_jacobi", "hawk_jacobi_gsd", "scd_maximal", "scd_gumbel", "sjd_pac",
            "sjd_pac_released", "hawk_pac", "zipar", "spatial_jacobi", "pjd"}  # zipar, pjd: no tree
REAL = ["lumina_mgpt", "lumina_mgpt_512", "lumina_mgpt_768", "lumina_mgpt_1024", "llamagen_xl_256",
        "llamagen_xl_512", "janus_pro_7b", "emu3_gen"]


def run(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("eval", overrides=["paths.root_dir=/r", *overrides])


def nodes(cfg) -> dict:
    return OmegaConf.to_container(cfg.eval.decoders, resolve=True)


def test_the_set_all_names_every_preset():
    cfg = run("decoders=all")
    assert sorted(cfg.eval.decoders) == decoder_presets(CONF_DIR)
    assert cfg.eval.missing_drafter == "skip"  # `all` skips a preset whose drafter is not trained here


@pytest.mark.parametrize("command", [
    ["eval.decoders=[ar,medusa,hawk]", "decoder/tree=gpu"],  # the README's GPU command, old spelling
    ["eval.decoders=[ar,medusa,hawk]", "tree=gpu"],
    ["decoders=all", "tree=gpu"],
])
def test_every_tree_decoder_of_a_run_gets_the_same_tree(command):
    """The old `decoder/tree=gpu` used to give Hawk a 32-node tree and Medusa the default 8-node one."""
    d = nodes(run(*command))
    trees = {name: n["tree"] for name, n in d.items() if name not in OWN_TREE}
    assert len(trees) >= 2
    assert all(t == trees["hawk"] for t in trees.values()), trees
    assert trees["hawk"]["budget"] == 32 and trees["hawk"]["max_depth"] == 6


def test_a_per_decoder_override_reaches_that_decoder_only():
    d = nodes(run("eval.decoders=[ar,medusa,hawk,sjd]", "eval.decoders.hawk.tree.budget=16"))
    assert d["hawk"]["tree"]["budget"] == 16
    assert d["medusa"]["tree"]["budget"] == 8 and d["sjd"]["tree"]["budget"] == 15
    d = nodes(run("eval.decoders=[ar,gsd,hawk_gsd]", "eval.decoders.gsd.acceptance.group=2"))
    assert d["gsd"]["acceptance"]["group"] == 2 and d["hawk_gsd"]["acceptance"]["group"] != 2


def test_a_shared_setting_is_set_once_for_all():
    d = nodes(run("decoders=all", "tree.budget=12"))
    assert {n["tree"]["budget"] for name, n in d.items() if name not in OWN_TREE} == {12}
    cfg = run("decoders=all", "sampling.top_k=7")
    assert cfg.sampling.top_k == 7  # one target for every decoder: build_decoder takes the run's sampling


@pytest.mark.parametrize("backbone", REAL + ["tiny"])
def test_each_backbone_gives_each_preset_its_own_constants(backbone):
    cfg = run(f"backbone={backbone}", "decoders=all")
    t, d = OmegaConf.to_container(cfg.backbone.tuning, resolve=True), nodes(cfg)
    for name in ("gsd", "hawk_gsd", "eagle_gsd", "hawk_eagle_gsd", "hawk_jacobi_gsd"):
        acc = d[name]["acceptance"]
        assert (acc["prob_threshold"], acc["embed_threshold"]) == (t["gsd"]["prob_threshold"],
                                                                  t["gsd"]["embed_threshold"]), name
    for name in ("lantern", "medusa_lanternpp"):
        assert d[name]["acceptance"]["k"] == t["lantern"]["k"]
    for name in ("sjd", "gsd", "gsd_window"):
        assert d[name]["tree"]["budget"] == t["sjd"]["window"]
        assert d[name]["proposer"]["ar_edges"] == t["sjd"]["ar_edges"]
    for name in ("scd_maximal", "scd_gumbel"):
        assert d[name]["tree"]["budget"] == t["scd"]["window"]
    assert d["sjd_pac"]["tree"]["pac"] == t["pac"]
    if backbone != "tiny":  # the official constants
        assert d["lantern"]["acceptance"]["k"] == 1000 and d["gsd"]["acceptance"]["prob_threshold"] == 0.15


def test_lumina_mgpt_is_one_file_with_a_resolution():
    one = run("backbone=lumina_mgpt", "backbone.resolution=512")
    old = run("backbone=lumina_mgpt_512")
    assert OmegaConf.to_container(one.backbone, resolve=True) == OmegaConf.to_container(old.backbone, resolve=True)
    assert one.backbone.name == "lumina-mgpt-7b-512" and run("backbone=lumina_mgpt").backbone.resolution == 768
    assert OmegaConf.to_container(one.sampling) == OmegaConf.to_container(old.sampling)


def test_one_preset_twice_in_a_run_under_two_names():
    from hawkspec.testing import build_random_backbone

    cfg = run("eval.decoders=[ar,sjd]", "+decoder@eval.decoders.sjd8=sjd", "eval.decoders.sjd8.tree.budget=8",
              "eval.decoders.sjd8.tree.max_depth=8")
    bb = build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=2.0).validate(bb.num_codes)
    a, b = (build_decoder(cfg.eval.decoders[n], bb, s) for n in ("sjd", "sjd8"))
    assert (a.name, b.name) == ("sjd", "sjd8")
    assert a.describe()["tree_nodes"] > b.describe()["tree_nodes"]


# ------------------------------------------------------------------------------------------ the short spellings
def test_the_short_spellings_expand_into_hydras():
    assert expand(["eval.decoders=[ar,sjd]", "decoder/tree=gpu"]) == [
        "decoders=none", "+decoder@eval.decoders.ar=ar", "+decoder@eval.decoders.sjd=sjd", "tree=gpu"]
    assert expand(["eval.decoders=all"]) == ["decoders=all"]
    assert expand(["-m", "decoder=gsd", "decoder.acceptance.group=1,3,7"]) == [
        "-m", "decoders=none", "+decoder@eval.decoders.gsd=gsd", "eval.decoders.gsd.acceptance.group=1,3,7"]
    assert expand(["decoder.proposer.vsd=1"]) == ["eval.decoders.hawk.proposer.vsd=1"]  # Hawk, as always
    assert expand(["eval.decoders=[ar,sjd]", "decoder=gsd"])[-1] == "+decoder@eval.decoders.gsd=gsd"
    assert expand(["--cfg", "job", "seed=1"]) == ["--cfg", "job", "seed=1"]
    assert expand(["eval.decoders=[ar]", "eval.decoders=[ar,sjd]"]) == [  # the last list wins, as in Hydra
        "decoders=none", "+decoder@eval.decoders.ar=ar", "+decoder@eval.decoders.sjd=sjd"]


@pytest.mark.parametrize("args, says", [
    (["decoder=gsd,sjd"], "eval.decoders=[ar,gsd,sjd]"),
    (["eval.decoders=[ar],[ar,sjd]"], "decoders=SET1,SET2"),
    (["decoder/acceptance=gsd"], "decoder/acceptance@eval.decoders.<name>.acceptance=gsd"),
    (["eval.decoders=[ar,sjd]", "decoder.tree.budget=4"], "eval.decoders.<name>.tree.budget=4"),
    (["eval.decoders=[ar,nope]"], "choose from"),
])
def test_what_cannot_be_expanded_is_refused_with_the_spelling_to_use(args, says):
    with pytest.raises(OverrideError) as err:
        expand(args, CONF_DIR)
    assert says in str(err.value)


def test_the_cli_refuses_a_decoder_sweep_before_hydra():
    proc = run_cli("hawkspec-eval", "-m", "decoder=gsd,sjd", ok=False, timeout=120)
    assert proc.returncode == 2 and "eval.decoders=[ar,gsd,sjd]" in proc.stderr


def test_cfg_job_prints_every_decoders_resolved_settings():
    proc = run_cli("hawkspec-eval", "eval.decoders=[ar,medusa,sjd]", "tree=gpu", "eval.decoders.sjd.tree.budget=7",
                   "--cfg", "job", "--resolve", timeout=120)
    printed = OmegaConf.create(proc.stdout)
    assert list(printed.eval.decoders) == ["ar", "medusa", "sjd"]
    assert printed.eval.decoders.medusa.tree.budget == 32 and printed.eval.decoders.sjd.tree.budget == 7
    assert "${" not in proc.stdout  # resolved: the model's constants and the run's tree as numbers


# -------------------------------------------------------------------------------------------------- the results
def test_results_list_the_settings_in_which_rows_differ():
    rows = [{"decoder": "ar", "config": {"proposer": None}},
            {"decoder": "medusa", "config": {"proposer": {"_target_": "M", "draft": "topk"},
                                              "tree": {"budget": 8, "max_depth": 4}, "heads_path": "h/medusa"}},
            {"decoder": "hawk", "config": {"proposer": {"_target_": "H", "draft": "topk"},
                                            "tree": {"budget": 32, "max_depth": 4}, "heads_path": "h/hawk"}}]
    diff = dict(differing_settings(rows))
    assert diff["tree.budget"] == {"medusa": 8, "hawk": 32}
    assert "tree.max_depth" not in diff and "proposer.draft" not in diff and "proposer._target_" not in diff
    assert "- `tree.budget`: medusa 8, hawk 32" in settings_note(rows)
    assert settings_note(rows[:2]) == ""


@pytest.mark.parametrize("name", decoder_presets(CONF_DIR))
def test_every_preset_says_where_it_comes_from(name):
    """Item 4: a paper, the official code, or ours -- in the preset's opening comment."""
    head = []
    for line in (Path(CONF_DIR) / "decoder" / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        head.append(line)
    text = " ".join(head)
    assert any(w in text for w in ("arXiv", "official", "ours", "paper", "Source", "released", "CVPR")), (name, text[:200])


def test_recorded_commands_read_as_typed():
    """What Hydra records (the expanded overrides) contracts back to the short list spelling."""
    from hawkspec.cli.overrides import contract

    typed = ["eval.decoders=[ar,medusa]", "eval.num_prompts=2", "tree.budget=4"]
    assert contract(expand(typed)) == typed
    two_names = ["decoders=none", "+decoder@eval.decoders.ar=ar", "+decoder@eval.decoders.h16=hawk"]
    assert contract(two_names) == ["eval.decoders=[ar]", "+decoder@eval.decoders.h16=hawk"]


def test_the_batch_seed_formula_exists_once():
    """Issue 29: every decoder of every harness decodes batch b of a run seeded s with batch_generator(s, b)."""
    import re

    hits = [p for p in list((ROOT / "src").rglob("*.py")) + list((ROOT / "experiments").rglob("*.py"))
            if re.search(r"100_?003", p.read_text())]
    assert [p.name for p in hits] == ["sampling.py"], hits
