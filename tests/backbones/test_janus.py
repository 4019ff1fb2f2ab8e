"""Janus-Pro adapter: the official prompt and CFG row, codes in their own id space, greedy AR with CFG equal to
transformers' own ``generate(generation_mode="image")``, VQ decoding, loading through the YAML, and Hawk end to end.
(The shared conformance suite, tests/backbones/test_conformance.py, runs on it too.)"""

import json
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.backbones.janus import BEGIN_OF_IMAGE, BOS, PAD, JanusBackbone
from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.testing import peaky, run_cli
from hawkspec.testing import compose, the_decoder

PROMPTS = ["a large red circle in the center", "a small blue square on the left on a plain white background"]


@pytest.fixture(scope="module")
def bb():
    return JanusBackbone.random(rows=4, cols=4, num_codes=64, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, bb):
    path = tmp_path_factory.mktemp("janus_random")
    bb.save_pretrained(path)
    return path


def test_prompt_template_and_unconditional_row(bb):
    enc = bb.encode(PROMPTS)
    tok = bb.tokenizer
    words = tok.convert_ids_to_tokens(enc.cond[0])
    assert words == [BOS, "<|User|>", ":", "a", "large", "red", "circle", "in", "the", "center", "<|Assistant|>", ":"]
    assert bb.image_start_ids == [tok.convert_tokens_to_ids(BEGIN_OF_IMAGE)]
    pad = tok.convert_tokens_to_ids(PAD)
    for c, u in zip(enc.cond, enc.uncond):  # official: tokens[1:-1] = pad over prompt + <begin_of_image>
        assert len(u) == len(c) and u[0] == c[0] == bb.bos_token_id and set(u[1:]) == {pad}
    assert bb.grid.rows == bb.grid.cols == 4 and not bb.grid.eol
    assert bb.eol_token_id is None and bb.image_end_id is None


def test_codes_have_their_own_ids_embedding_and_head(bb):
    V = bb.model.config.text_config.vocab_size
    assert bb.code_token_ids.tolist() == list(range(V, V + bb.num_codes))
    inner = bb.model.model
    k = torch.tensor([[0, 5, 63]])
    torch.testing.assert_close(bb.embed(k + V), inner.generation_aligner(inner.generation_embeddings(k)))
    mixed = torch.tensor([[bb.bos_token_id, V + 3]])
    emb = bb.embed(mixed)
    torch.testing.assert_close(emb[0, 0], inner.language_model.embed_tokens.weight[bb.bos_token_id])
    torch.testing.assert_close(emb[0, 1], inner.generation_aligner(inner.generation_embeddings.weight[3]))
    h = torch.randn(3, bb.hidden_size)
    head = bb.code_head()
    torch.testing.assert_close(head(h), inner.generation_head(h))
    assert head is not inner.generation_head and not any(p.requires_grad for p in head.parameters())
    assert bb.codebook_vectors().shape == (bb.num_codes, bb.model.config.vq_config.embed_dim)


@pytest.mark.parametrize("scale", [None, 0.3])
def test_greedy_ar_with_cfg_equals_janus_generate(scale):
    """Our greedy AR (batched, left-padded, CFG 5) == ``JanusForConditionalGeneration.generate(generation_mode="image")``
    per prompt, token for token."""
    bb = JanusBackbone.random(rows=4, cols=4, num_codes=64, seed=1)
    if scale:
        peaky(bb, scale=scale, seed=2)
    s = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=5.0)
    ours = ar_generate(bb, PROMPTS, s)
    enc = bb.encode(PROMPTS)
    for i in range(len(PROMPTS)):
        ids = torch.tensor([enc.cond[i] + bb.image_start_ids])
        ref = bb.model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", do_sample=False,
                                guidance_scale=5.0)
        assert ref.tolist() == [ours.codes[i].flatten().tolist()]
    if scale:
        assert len(set(ours.codes.flatten().tolist())) > 3  # a real comparison, not one repeated code


def test_decode_codes_through_the_model_vq(bb):
    codes = torch.randint(0, bb.num_codes, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    img = bb.decode_codes(codes)
    assert img.dtype == torch.uint8 and img.shape == (2, 3, *bb.image_size)
    ref = bb.model.decode_image_tokens(codes.flatten(1)).permute(0, 3, 1, 2)
    assert torch.equal(img, ((ref + 1) / 2 * 255).clamp(0, 255).to(torch.uint8))
    assert bb.encode_images(img).shape == (2, 4, 4)


def _compose(*overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("eval", overrides=["backbone=janus_pro_7b", *overrides])


def test_yaml_holds_the_official_defaults():
    cfg = _compose("sampling=janus_pro")
    assert cfg.backbone.image_size == 384 and cfg.backbone.dtype == "bfloat16"
    assert cfg.sampling.cfg_scale == 5.0 and cfg.sampling.temperature == 1.0 and not cfg.sampling.top_k


def test_yaml_target_loads_a_saved_model_and_hawk_decodes(bb, saved, tmp_path):
    from hawkspec.decoding.build import build_decoder
    from hawkspec.heads.draft import DraftHeads, HeadsConfig

    cfg = _compose(f"backbone.path={saved}", "backbone.dtype=float32", "backbone.image_size=8", "decoder=hawk",
                   f"paths.heads_dir={tmp_path}", "decoder.tree.budget=6")
    loaded = instantiate(cfg.backbone, "backbone")
    assert isinstance(loaded, JanusBackbone) and loaded.name == "janus-pro-7b"
    assert loaded.grid == bb.grid and loaded.encode(PROMPTS).cond == bb.encode(PROMPTS).cond
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), loaded).save(tmp_path / "hawk")
    s = SamplingConfig(temperature=1.0, top_k=0, cfg_scale=5.0)
    out = build_decoder(the_decoder(cfg), loaded, s).generate(PROMPTS, torch.Generator().manual_seed(0))
    assert out.codes.shape == (2, 4, 4) and out.forwards <= loaded.grid.length


def test_missing_path_and_wrong_resolution_name_the_key(saved):
    with pytest.raises(FileNotFoundError, match="backbone.path"):
        instantiate(_compose().backbone, "backbone")
    with pytest.raises(FileNotFoundError, match="backbone.path"):
        JanusBackbone.from_pretrained(Path(saved) / "nope")
    with pytest.raises(ValueError, match="backbone.image_size"):
        JanusBackbone.from_pretrained(saved, dtype="float32", image_size=384)


@pytest.mark.slow
def test_hawk_end_to_end_cache_train_eval(saved, tmp_path):
    """cache -> train a few steps -> eval, the console scripts a user runs, on the saved tiny Janus."""
    bb_args = ["backbone=janus_pro_7b", f"backbone.path={saved}", "backbone.dtype=float32", "backbone.image_size=null",
               "sampling=janus_pro"]
    run_cli("hawkspec-cache", *bb_args, f"hydra.run.dir={tmp_path / 'cache'}", "cache.num_samples=8",
            "cache.val_samples=4", "cache.shard_size=4", "cache.batch_size=4")
    heads = tmp_path / "heads"
    run_cli("hawkspec-train", *bb_args[:-1], f"shards_dir={tmp_path / 'cache' / 'shards'}", "heads=hawk",
            "trainer.max_steps=3", "data.batch_size=4", "logger=csv", f"export_dir={heads / 'hawk'}",
            f"hydra.run.dir={tmp_path / 'train'}")
    run_cli("hawkspec-eval", *bb_args, f"paths.heads_dir={heads}", "eval.decoders=[ar,hawk]", "eval.num_prompts=2",
            "eval.batch_size=2", "eval.repeats=1", "eval.warmup_batches=0", "eval.quality.enabled=false",
            "decoder.tree.budget=6", f"hydra.run.dir={tmp_path / 'eval'}")
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {r["decoder"]: r for r in res["rows"]}
    assert res["backbone"] == "janus-pro-7b" and set(rows) == {"ar", "hawk"} and rows["hawk"]["lossless"]
