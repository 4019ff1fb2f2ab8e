"""Every decoder preset in conf/decoder/ builds on a backbone, decodes a valid image, and says truthfully
whether it is lossless; the GPU tree composes with any tree decoder."""

import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.cli.common import CONF_DIR
from hawkspec.decoding.build import build_decoder, decoder_presets
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.testing import compose, the_decoder

LOSSLESS = {"ar": True, "medusa": True, "hawk": True, "hawk_vertical_only": True, "sjd": True,
            "medusa_typical": False, "gsd": False, "hawk_gsd": False, "lantern": False, "medusa_lanternpp": False,
            "hawk_jacobi": True, "hawk_jacobi_gsd": False, "gsd_window": False,
            "eagle": True, "eagle_spatial": True, "hawk_eagle": True, "hawk_eagle_gsd": False, "eagle_gsd": False,
            "scd_maximal": True, "scd_gumbel": True, "sjd_pac": True, "sjd_pac_released": False,
            "hawk_pac": True, "zipar": False, "spatial_jacobi": True, "hawk_spatial_jacobi": True, "pjd": False}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)
    root = tmp_path_factory.mktemp("heads")
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=4, vertical=False), bb).save(root / "medusa")
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=4, vertical=True, vsd=2), bb).save(root / "hawk")
    from hawkspec.heads.eagle import EagleConfig, EagleDrafter

    for name, spatial in (("eagle", False), ("eagle_spatial", True)):
        EagleDrafter.for_backbone(EagleConfig(spatial=spatial), bb).save(root / name)
    return bb, root


def test_every_preset_is_known():
    assert set(decoder_presets(CONF_DIR)) == set(LOSSLESS), "add new presets to LOSSLESS with their truth"


# ar and zipar (rows in flight) have no tree; the Jacobi presets decode a chain window
TREE_DECODERS = sorted(set(LOSSLESS) - {"ar", "sjd", "gsd", "gsd_window", "hawk_jacobi", "hawk_jacobi_gsd",
                                        "scd_maximal", "scd_gumbel", "sjd_pac", "sjd_pac_released", "hawk_pac",
                                        "zipar", "spatial_jacobi", "pjd"})


@pytest.mark.parametrize("name, tree", [(n, None) for n in sorted(LOSSLESS)] + [(n, "gpu") for n in TREE_DECODERS])
def test_preset_builds_decodes_and_labels_itself(setup, name, tree):
    bb, heads_dir = setup
    # the 4 x 4 test model has 5 tokens a row: a lane of at most 4 (the tiny model's 6 is refused, naming the key)
    overrides = [f"decoder={name}", f"paths.heads_dir={heads_dir}", "backbone.tuning.spatial_jacobi.lane=3"]
    if tree:
        overrides.append(f"tree={tree}")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=2.0).validate(bb.num_codes)
    dec = build_decoder(the_decoder(cfg), bb, s)
    assert dec.lossless is LOSSLESS[name]
    out = dec.generate(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert out.codes.shape == (2, 4, 4) and (out.codes >= 0).all() and (out.codes < 64).all()
    assert dec.describe()["name"] == name
