"""Emu3-Gen adapter: the official prompt, size string and negative-prompt CFG, end-of-line rows, greedy AR with CFG
equal to transformers' own ``generate`` with ``negative_prompt_ids``, VQ decoding, loading through the YAML, and Hawk
end to end. (The shared conformance suite, tests/backbones/test_conformance.py, runs on it too.)"""

import json
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from transformers import LogitsProcessorList

from hawkspec.backbones.emu3 import EOF, EOL, IMAGE_START, IMAGE_WRAPPER, NEGATIVE_PROMPT, Emu3Backbone, generate_size
from hawkspec.backbones.hf_reference import ImageLayoutLogitsProcessor
from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.testing import peaky, run_cli
from hawkspec.testing import compose, the_decoder

PROMPTS = ["a large red circle in the center", "a small blue square on the left on a plain white background"]


@pytest.fixture(scope="module")
def bb():
    return Emu3Backbone.random(rows=4, cols=3, num_codes=64, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, bb):
    path = tmp_path_factory.mktemp("emu3_random")
    bb.save_pretrained(path)
    return path


def test_official_prompt_size_string_and_negative_prompt(bb):
    tok = bb.tokenizer
    enc = bb.encode(PROMPTS)
    words = tok.convert_ids_to_tokens(enc.cond[0])
    assert words[0] == "<|extra_203|>" and words[1:8] == ["a", "large", "red", "circle", "in", "the", "center"]
    assert words[8:] == ["masterpiece", ",", "film", "grained", ",", "best", "quality", "."]
    neg = [bb.bos_token_id] + tok(NEGATIVE_PROMPT, add_special_tokens=False)["input_ids"]
    assert enc.uncond == [neg, neg]
    assert tok.convert_ids_to_tokens(bb.image_start_ids) == [IMAGE_START, "4", "*", "3", IMAGE_WRAPPER]
    assert bb.eol_token_id == tok.convert_tokens_to_ids(EOL) and bb.image_end_id == tok.convert_tokens_to_ids(EOF)
    assert bb.grid.eol and bb.grid.tokens_per_row == 4 and not bb.model.training


def test_codes_are_the_visual_tokens_of_the_vocabulary(bb):
    vocab = bb.tokenizer.get_vocab()
    assert bb.code_token_ids.tolist() == [vocab[f"<|visual token{k:06d}|>"] for k in range(bb.num_codes)]
    h = torch.randn(2, bb.hidden_size)
    torch.testing.assert_close(bb.code_logits(h), bb.model.lm_head(h)[:, bb.code_token_ids])


def test_grid_from_ratio_and_area_as_the_processor():
    assert generate_size("1:1", 518400, 8) == (90, 90)
    assert generate_size("16:9", 518400, 8) == (68, 120)
    with pytest.raises(ValueError, match="backbone.ratio"):
        generate_size("wide", 518400, 8)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_greedy_ar_with_cfg_equals_generate_with_negative_prompt(scale):
    """Our greedy AR (batched, left-padded, CFG 3) == ``Emu3ForConditionalGeneration.generate`` with
    ``negative_prompt_ids`` (the official unbatched CFG) and the layout constraint, token for token."""
    bb = Emu3Backbone.random(rows=4, cols=4, num_codes=64, seed=1)
    if scale:
        peaky(bb, scale=scale, seed=2)
    ours = ar_generate(bb, PROMPTS, SamplingConfig(temperature=0.0, top_k=0, cfg_scale=3.0))
    enc = bb.encode(PROMPTS)
    for i in range(len(PROMPTS)):
        ids = torch.tensor([enc.cond[i] + bb.image_start_ids])
        neg = torch.tensor([enc.uncond[i] + bb.image_start_ids])  # official: the negative prompt in mode "G"
        ref = bb.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, guidance_scale=3.0, negative_prompt_ids=neg,
            negative_prompt_attention_mask=torch.ones_like(neg), max_new_tokens=bb.grid.length,
            min_new_tokens=bb.grid.length, pad_token_id=bb.pad_token_id, eos_token_id=None,
            logits_processor=LogitsProcessorList([ImageLayoutLogitsProcessor(bb, ids.shape[1])]))
        assert ref[0, ids.shape[1]:].tolist() == ours.tokens[i].tolist()
    if scale:
        assert len(set(ours.codes.flatten().tolist())) > 3


def test_decode_codes_through_the_model_vq(bb):
    codes = torch.randint(0, bb.num_codes, (2, 4, 3), generator=torch.Generator().manual_seed(0))
    img = bb.decode_codes(codes)
    assert img.dtype == torch.uint8 and img.shape == (2, 3, *bb.image_size)
    ref = bb.model.model.vqmodel.decode(codes)
    assert torch.equal(img, ((ref + 1) / 2 * 255).clamp(0, 255).to(torch.uint8))
    assert bb.encode_images(img).shape == (2, 4, 3)


def _compose(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("eval", overrides=["backbone=emu3_gen", *overrides])


def test_yaml_holds_the_official_defaults():
    cfg = _compose("sampling=emu3_gen")
    assert cfg.backbone.image_area == 518400 and cfg.backbone.ratio == "1:1"
    assert cfg.backbone.negative_prompt == NEGATIVE_PROMPT
    assert cfg.sampling.cfg_scale == 3.0 and cfg.sampling.top_k == 2048


def test_yaml_target_loads_a_saved_model_and_hawk_decodes(bb, saved, tmp_path):
    from hawkspec.decoding.build import build_decoder
    from hawkspec.heads.draft import DraftHeads, HeadsConfig

    # the saved tiny model's VQ halves the resolution: 4 x 3 codes = 8 x 6 px
    cfg = _compose(f"backbone.path={saved}", "backbone.dtype=float32", "backbone.ratio=3:4", "backbone.image_area=48",
                   "decoder=hawk", f"paths.heads_dir={tmp_path}", "decoder.tree.budget=6")
    loaded = instantiate(cfg.backbone, "backbone")
    assert isinstance(loaded, Emu3Backbone) and loaded.name == "emu3-gen" and loaded.grid == bb.grid
    assert loaded.encode(PROMPTS).cond == bb.encode(PROMPTS).cond and loaded.image_start_ids == bb.image_start_ids
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), loaded).save(tmp_path / "hawk")
    s = SamplingConfig(temperature=1.0, top_k=16, cfg_scale=3.0)
    out = build_decoder(the_decoder(cfg), loaded, s).generate(PROMPTS, torch.Generator().manual_seed(0))
    assert out.codes.shape == (2, 4, 3) and (out.tokens[:, loaded.grid.forced_mask()] == loaded.eol_token_id).all()


def test_missing_path_and_unsupported_resolution_name_the_key(saved):
    with pytest.raises(FileNotFoundError, match="backbone.path"):
        instantiate(_compose().backbone, "backbone")
    with pytest.raises(FileNotFoundError, match="backbone.path"):
        Emu3Backbone.from_pretrained(Path(saved) / "nope")
    with pytest.raises(ValueError, match="backbone.image_area"):  # 90 x 90 does not fit the tiny context
        Emu3Backbone.from_pretrained(saved, dtype="float32")


@pytest.mark.slow
def test_hawk_end_to_end_cache_train_eval(saved, tmp_path):
    """cache -> train a few steps -> eval, the console scripts a user runs, on the saved tiny Emu3."""
    bb_args = ["backbone=emu3_gen", f"backbone.path={saved}", "backbone.dtype=float32", "backbone.ratio=3:4",
               "backbone.image_area=48", "sampling=emu3_gen", "sampling.top_k=16"]
    run_cli("hawkspec-cache", *bb_args, f"hydra.run.dir={tmp_path / 'cache'}", "cache.num_samples=8",
            "cache.val_samples=4", "cache.shard_size=4", "cache.batch_size=4")
    heads = tmp_path / "heads"
    run_cli("hawkspec-train", *bb_args[:-2], f"shards_dir={tmp_path / 'cache' / 'shards'}", "heads=hawk",
            "trainer.max_steps=3", "data.batch_size=4", "logger=csv", f"export_dir={heads / 'hawk'}",
            f"hydra.run.dir={tmp_path / 'train'}")
    run_cli("hawkspec-eval", *bb_args, f"paths.heads_dir={heads}", "eval.decoders=[ar,hawk]", "eval.num_prompts=2",
            "eval.batch_size=2", "eval.repeats=1", "eval.warmup_batches=0", "eval.quality.enabled=false",
            "decoder.tree.budget=6", f"hydra.run.dir={tmp_path / 'eval'}")
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {r["decoder"]: r for r in res["rows"]}
    assert res["backbone"] == "emu3-gen" and set(rows) == {"ar", "hawk"} and rows["hawk"]["lossless"]
