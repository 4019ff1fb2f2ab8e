"""The Chameleon VQGAN decoder: loads a checkpoint with the official (taming-transformers) key names and config
yaml, its blocks compute what transformers' Chameleon VQ blocks compute, pixels map like the official code."""

import pytest
import torch
import yaml

from hawkspec.vq.chameleon_vqgan import (
    AttnBlock,
    ChameleonVQGANDecoder,
    ResBlock,
    VQGANConfig,
    images_to_vq_input,
    load_vqgan_decoder,
    vq_output_to_images,
)

SMALL = dict(n_embed=64, embed_dim=32, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, resolution=16,
             attn_resolutions=(16,))


def official_decoder_keys(ch_mult, num_res_blocks, attn_levels, channels) -> set[str]:
    """The decoder-side parameter names of a taming VQModel checkpoint, written out from taming's naming rules:
    decoder.{conv_in, mid.{block_1, attn_1, block_2}, up.<level>.{block.<i>, attn.<i>, upsample.conv}, norm_out,
    conv_out}, post_quant_conv, quantize.embedding (``channels(level, i)`` says if block i changes channels)."""
    keys = {"quantize.embedding.weight", "post_quant_conv.weight", "post_quant_conv.bias"}
    conv = lambda p: {f"{p}.weight", f"{p}.bias"}  # noqa: E731
    res = lambda p, short: set().union(*(conv(f"{p}.{n}") for n in ("norm1", "conv1", "norm2", "conv2")),  # noqa: E731
                                       conv(f"{p}.nin_shortcut") if short else set())
    attn = lambda p: set().union(*(conv(f"{p}.{n}") for n in ("norm", "q", "k", "v", "proj_out")))  # noqa: E731
    keys |= conv("decoder.conv_in") | conv("decoder.norm_out") | conv("decoder.conv_out")
    keys |= res("decoder.mid.block_1", False) | attn("decoder.mid.attn_1") | res("decoder.mid.block_2", False)
    for level in range(len(ch_mult)):
        for i in range(num_res_blocks + 1):
            keys |= res(f"decoder.up.{level}.block.{i}", channels(level, i))
            if level in attn_levels:
                keys |= attn(f"decoder.up.{level}.attn.{i}")
        if level:
            keys |= conv(f"decoder.up.{level}.upsample.conv")
    return keys


def test_parameter_names_are_the_official_ones():
    model = ChameleonVQGANDecoder(VQGANConfig(**SMALL))
    # ch_mult (1, 2): level 1 (64 ch) is built first from 64 ch; level 0's first block goes 64 -> 32.
    # attention at resolution 16 = level 0 (the full resolution).
    want = official_decoder_keys((1, 2), 1, {0}, lambda level, i: level == 0 and i == 0)
    assert set(model.state_dict()) == want


def test_chameleon_architecture_shapes():
    """The real config: 8192 x 256 codebook, ch 128, ch_mult [1,1,2,2,4], 16x: 48x48 codes -> 768 px."""
    c = VQGANConfig()
    assert c.downsample == 16
    model = ChameleonVQGANDecoder(c)
    sd = model.state_dict()
    assert sd["quantize.embedding.weight"].shape == (8192, 256) and sd["decoder.conv_in.weight"].shape == (512, 256, 3, 3)
    assert sd["decoder.up.4.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.3.block.0.nin_shortcut.weight"].shape == (256, 512, 1, 1)
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert "decoder.up.0.block.0.nin_shortcut.weight" not in sd
    assert "decoder.up.0.upsample.conv.weight" not in sd and len(model.decoder.up[0].block) == 3


@pytest.fixture
def checkpoint(tmp_path):
    """A random checkpoint as Lightning saved the official one: {"state_dict": decoder + encoder + loss keys}."""
    g = torch.Generator().manual_seed(0)
    ref = ChameleonVQGANDecoder(VQGANConfig(**SMALL))
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in ref.state_dict().items()}
    state["encoder.conv_in.weight"] = torch.randn(32, 3, 3, 3, generator=g)
    state["quant_conv.weight"] = torch.randn(32, 32, 1, 1, generator=g)
    state["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4, generator=g)
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "vqgan.ckpt")
    cfg = {"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": 32, "n_embed": 64, "ddconfig": {
            "double_z": False, "z_channels": 32, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}}}
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path, state


def test_loads_the_official_layout(checkpoint):
    folder, state = checkpoint
    model, encoder = load_vqgan_decoder(folder / "vqgan.ckpt")
    assert model.config == VQGANConfig(**SMALL)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert set(encoder) == {"encoder.conv_in.weight", "quant_conv.weight", "post_quant_conv.weight",
                            "post_quant_conv.bias", "quantize.embedding.weight"}  # no loss.*, no decoder.*
    codes = torch.randint(0, 64, (3, 2, 3), generator=torch.Generator().manual_seed(1))
    images = model.decode(codes, chunk=2)
    assert images.shape == (3, 3, 4, 6) and images.dtype == torch.uint8
    assert torch.equal(images[1:2], model.decode(codes[1:2]))  # per image, whatever the chunking
    assert load_vqgan_decoder(folder)[0].config == model.config  # the folder works too


def test_missing_files_name_the_key(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="backbone.vqgan_path"):
        load_vqgan_decoder(tmp_path / "missing.ckpt")
    folder, _ = checkpoint
    (folder / "vqgan.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="vqgan.yaml"):
        load_vqgan_decoder(folder / "vqgan.ckpt")


def test_mismatched_config_is_refused(checkpoint):
    folder, _ = checkpoint
    cfg = yaml.safe_load((folder / "vqgan.yaml").read_text())
    cfg["model"]["params"]["ddconfig"]["ch_mult"] = [1, 2, 2]
    (folder / "vqgan.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="does not match"):
        load_vqgan_decoder(folder / "vqgan.ckpt")


def test_blocks_equal_transformers_chameleon_vq_blocks():
    """ResNet and attention blocks are taming's: transformers' Chameleon encoder blocks (same names) agree."""
    from transformers import ChameleonVQVAEConfig
    from transformers.models.chameleon.modeling_chameleon import (
        ChameleonVQVAEEncoderAttnBlock,
        ChameleonVQVAEEncoderResnetBlock,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 5, 6, generator=g)
    for ours, theirs in [(ResBlock(32, 64), ChameleonVQVAEEncoderResnetBlock(ChameleonVQVAEConfig(), 32, 64)),
                         (AttnBlock(32), ChameleonVQVAEEncoderAttnBlock(32))]:
        state = {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in theirs.state_dict().items()}
        theirs.load_state_dict(state)
        ours.load_state_dict(state)
        torch.testing.assert_close(ours(x), theirs.eval()(x.clone()), atol=1e-5, rtol=1e-4)


def test_pixel_mapping_is_the_official_one():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
    assert vq_output_to_images(x).tolist() == [0, 0, 127, 254, 255, 255]  # clamp, (x+1)/2*255, truncated
    img = torch.tensor([0, 255, 51], dtype=torch.uint8)
    torch.testing.assert_close(images_to_vq_input(img), torch.tensor([-1.0, 1.0, 51 / 255 * 2 - 1]))
