"""Model-dependent decoder constants live with the model (``backbone.tuning``): whichever decoder of a run uses
GSD, LANTERN or SJD's window gets the official values on every real backbone and the retuned ones on the tiny model,
in a run of every preset (``decoders=all``) as in a run of one (``decoder=NAME``)."""

import pytest
from hydra import initialize_config_dir

from hawkspec.testing import compose, the_decoder
from omegaconf import OmegaConf

from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.cli.eval import decoder_config
from hawkspec.decoding.proposers import JacobiProposer

REAL = ["lumina_mgpt_512", "lumina_mgpt_768", "lumina_mgpt_1024", "llamagen_xl_256", "llamagen_xl_512",
        "janus_pro_7b", "emu3_gen"]
GSD = ["gsd", "hawk_gsd", "eagle_gsd", "hawk_eagle_gsd", "hawk_jacobi_gsd"]
LANTERN = ["lantern", "medusa_lanternpp"]


def run_config(backbone: str, study: str = "hawk"):
    """A run of ``study`` alone, and the resolved nodes of a run of every preset on ``backbone``."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=[f"backbone={backbone}", f"decoder={study}"])
        every = compose("eval", overrides=[f"backbone={backbone}", "decoders=all"])
        decoders = {name: OmegaConf.to_container(decoder_config(every, name), resolve=True)
                    for name in GSD + LANTERN + ["sjd", "gsd_window"]}
    return cfg, decoders


@pytest.mark.parametrize("backbone", REAL)
def test_real_backbones_give_every_preset_the_official_constants(backbone):
    _, decoders = run_config(backbone)
    for name in GSD:
        acc = decoders[name]["acceptance"]
        assert (acc["prob_threshold"], acc["embed_threshold"]) == (0.15, 0.5), (backbone, name, acc)
    for name in LANTERN:
        acc = decoders[name]["acceptance"]
        assert (acc["k"], acc["delta"]) == (1000, 0.1), (backbone, name, acc)
    assert decoders["medusa_lanternpp"]["acceptance"]["lam"] == 2.0
    for name in ("sjd", "gsd", "gsd_window"):  # SJD's L = 16: the last accepted token + 15 drafts
        assert decoders[name]["tree"]["budget"] == decoders[name]["tree"]["max_depth"] == 15
    edges = {"head": 0, "tail": 14 if backbone.startswith("lumina") else 0}
    assert decoders["sjd"]["proposer"]["ar_edges"] == edges == decoders["gsd"]["proposer"]["ar_edges"]
    # the fixed-window variant keeps both filters off on every backbone
    assert decoders["gsd_window"]["acceptance"]["prob_threshold"] is None
    assert decoders["gsd_window"]["acceptance"]["embed_threshold"] is None


def test_tiny_model_keeps_its_retuned_constants():
    _, decoders = run_config("tiny")
    for name in GSD:
        acc = decoders[name]["acceptance"]
        assert (acc["prob_threshold"], acc["embed_threshold"]) == (None, 2.25), (name, acc)
    for name in LANTERN:
        assert (decoders[name]["acceptance"]["k"], decoders[name]["acceptance"]["delta"]) == (64, 0.1)
    assert decoders["sjd"]["proposer"]["ar_edges"] == {"head": 0, "tail": 0}


@pytest.mark.parametrize("study", ["gsd", "lantern"])
def test_the_decoder_under_study_gets_the_same_constants(study):
    cfg, decoders = run_config("lumina_mgpt_768", study=study)
    assert OmegaConf.to_container(the_decoder(cfg), resolve=True) == decoders[study]


def test_any_proposer_with_a_relaxed_rule_reads_the_model(tmp_path):
    """SJD with LANTERN's rule (a pair with no preset: `decoder/acceptance@eval.decoders.sjd.acceptance=lantern`)
    still gets the model's k."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["backbone=llamagen_xl_512", "decoder=sjd",
                                         "decoder/acceptance@eval.decoders.sjd.acceptance=lantern"])
    assert the_decoder(cfg).acceptance.k == 1000
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["decoder=sjd", "decoder/acceptance@eval.decoders.sjd.acceptance=gsd"])
    assert the_decoder(cfg).acceptance.embed_threshold == 2.25


def test_backbone_tuning_is_not_passed_to_the_loader():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval")
    assert "tuning" in cfg.backbone
    assert instantiate(cfg.backbone, "backbone").num_codes == 512


def test_ar_edges_leave_the_edges_to_plain_ar():
    """No draft at the first `head` / last `tail` body positions: those take one forward each, and greedy Jacobi
    still equals greedy AR token for token."""
    import torch

    from hawkspec.decoding.acceptance import ExactAcceptance
    from hawkspec.decoding.ar import ar_generate
    from hawkspec.decoding.engine import SpeculativeDecoder
    from hawkspec.decoding.sampling import SamplingConfig
    from hawkspec.decoding.tree import paths_from_budget
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=4, cols=4, num_codes=32, seed=3)  # body: 4 rows x (4 codes + end of line)
    L = bb.grid.length
    prop = JacobiProposer(ar_edges={"head": 2, "tail": 6})
    prop.bind(bb, SamplingConfig())
    prop.start(1, torch.device("cpu"))
    code_pos = torch.arange(-1, L + 1).unsqueeze(0)  # every body position, and one outside on each side
    pools = prop.propose(None, None, code_pos, 1, torch.Generator().manual_seed(0))
    drafted = code_pos[0][pools.tokens[0, :, 0] >= 0].tolist()
    assert drafted == list(range(2, L - 6))
    with pytest.raises(ValueError, match="decoder.proposer.ar_edges"):
        JacobiProposer(ar_edges={"tail": -1})
    with pytest.raises(ValueError, match="decoder.proposer.ar_edges"):
        JacobiProposer(ar_edges={"head": 10, "tail": 10}).bind(bb, SamplingConfig())

    s = SamplingConfig(temperature=0.0, top_k=8, cfg_scale=2.0)
    prompts = ["a red circle", "a blue square"]
    ref = ar_generate(bb, prompts, s, torch.Generator().manual_seed(1)).codes
    for edges in ({"head": 0, "tail": 0}, {"head": 2, "tail": 6}):
        dec = SpeculativeDecoder(bb, JacobiProposer(ar_edges=edges), ExactAcceptance(), s, paths_from_budget(6, 6, 1))
        assert torch.equal(dec.generate(prompts, torch.Generator().manual_seed(2)).codes, ref)
