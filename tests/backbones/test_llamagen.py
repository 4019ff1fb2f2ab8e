"""LlamaGen t2i port: logits equal a from-scratch reference of the official ``gpt.py`` math (fused wqkv, interleaved
2-D rotary with zero caption positions, caption MLP, emb-mask, learned unconditional embedding) on a tiny random state
dict with the official key names; VQ-16 key mapping; tree nodes past the last row; loading through the YAMLs; Hawk
end to end. (The shared conformance suite, tests/backbones/test_conformance.py, runs on it too.)"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from hydra import initialize_config_dir

from hawkspec.backbones.base import PromptBatch
from hawkspec.backbones.llamagen import CAPTION_TOKENS, LlamaGenBackbone, LlamaGenT2I, load_vq, vq_config
from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.testing import run_cli
from hawkspec.testing import compose, the_decoder

PROMPTS = ["a large red circle in the center", "a small blue square on the left on a plain white background"]
D, LAYERS, HEADS, FFN, K, DC, SIDE = 64, 2, 4, 96, 48, 32, 4


def official_random_state_dict(seed=0, scale=0.3) -> dict:
    """Random weights under the official gpt.py key names and shapes (t2i, n_kv_head = n_head)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * scale  # noqa: E731
    sd = {"tok_embeddings.weight": r(K, D), "norm.weight": 1 + r(D), "output.weight": r(K, D),
          "cls_embedding.cap_proj.fc1.weight": r(D, DC), "cls_embedding.cap_proj.fc2.weight": r(D, D),
          "cls_embedding.uncond_embedding": r(CAPTION_TOKENS, DC), "freqs_cis": torch.zeros(1)}
    for i in range(LAYERS):
        sd.update({f"layers.{i}.attention.wqkv.weight": r(3 * D, D), f"layers.{i}.attention.wo.weight": r(D, D),
                   f"layers.{i}.feed_forward.w1.weight": r(FFN, D), f"layers.{i}.feed_forward.w3.weight": r(FFN, D),
                   f"layers.{i}.feed_forward.w2.weight": r(D, FFN), f"layers.{i}.attention_norm.weight": 1 + r(D),
                   f"layers.{i}.ffn_norm.weight": 1 + r(D)})
    return sd


def reference_logits(sd, caption, emb_mask, idx):
    """The official t2i forward written from scratch: (B, 120, DC) captions (left-padded, zeros where masked),
    (B, 120) emb mask, (B, L) codes -> (B, 120 + L, K) logits, with sample_t2i's mask (causal, padded caption keys
    masked, diagonal kept)."""
    hd = D // HEADS
    # precompute_freqs_cis_2d (square grid, 120 zero rows for the caption)
    half = hd // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(SIDE).float(), freqs)
    grid = torch.cat([f[:, None, :].expand(-1, SIDE, -1), f[None, :, :].expand(SIDE, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)
    freqs_cis = torch.cat([torch.zeros(CAPTION_TOKENS, hd // 2, 2), cache])

    def rope(x, fc):  # apply_rotary_emb: interleaved pairs
        xs = x.float().reshape(*x.shape[:-1], -1, 2)
        fc = fc.view(1, xs.size(1), 1, xs.size(3), 2)
        out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                           xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1)
        return out.flatten(3)

    def rms(x, w):
        return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w

    cap = F.linear(F.gelu(F.linear(caption, sd["cls_embedding.cap_proj.fc1.weight"]), approximate="tanh"),
                   sd["cls_embedding.cap_proj.fc2.weight"])
    h = torch.cat([cap, sd["tok_embeddings.weight"][idx]], dim=1)
    B, T, _ = h.shape
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None].repeat(B, 1, 1)
    mask[:, :, :CAPTION_TOKENS] &= emb_mask.bool()[:, None, :]
    mask |= torch.eye(T, dtype=torch.bool)
    fc = freqs_cis[:T]
    for i in range(LAYERS):
        p = f"layers.{i}."
        x = rms(h, sd[p + "attention_norm.weight"])
        q, k, v = F.linear(x, sd[p + "attention.wqkv.weight"]).split([D, D, D], dim=-1)
        q, k, v = (t.view(B, T, HEADS, hd) for t in (q, k, v))
        q, k = rope(q, fc), rope(k, fc)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask[:, None])
        h = h + F.linear(o.transpose(1, 2).reshape(B, T, D), sd[p + "attention.wo.weight"])
        x = rms(h, sd[p + "ffn_norm.weight"])
        ff = F.linear(F.silu(F.linear(x, sd[p + "feed_forward.w1.weight"])) * F.linear(x, sd[p + "feed_forward.w3.weight"]),
                      sd[p + "feed_forward.w2.weight"])
        h = h + ff
    return F.linear(rms(h, sd["norm.weight"]), sd["output.weight"])


@pytest.fixture(scope="module")
def ported():
    sd = official_random_state_dict()
    model = LlamaGenT2I.build(dim=D, n_layer=LAYERS, n_head=HEADS, num_codes=K, caption_dim=DC, rows=SIDE, cols=SIDE,
                              intermediate_size=FFN)
    model.load_official_state_dict(sd)
    t5, tok = LlamaGenBackbone.random_t5()
    return LlamaGenBackbone(model, None, t5, tok, SIDE, SIDE, revision="ref"), sd


def test_port_logits_equal_the_official_math_with_cfg_rows(ported):
    bb, sd = ported
    g = torch.Generator().manual_seed(1)
    counts = [7, 12]
    feats = [torch.randn(n, DC, generator=g) for n in counts]
    cond = [[bb.PAD_SLOT] * (CAPTION_TOKENS - n) + [bb.CAPTION_SLOT] * n for n in counts]
    uncond = [[bb.PAD_SLOT] * (CAPTION_TOKENS - n) + [bb.NULL_SLOT] * n for n in counts]
    prompts = PromptBatch(cond, uncond, {"caption": feats})
    idx = torch.randint(0, K, (2, 9), generator=g)
    state, h0 = bb.prefill(prompts, cfg=True, reserve=idx.shape[1])
    h = bb.forward(state, idx.repeat(2, 1))
    ours = bb.code_logits(torch.cat([h0[:, None], h], dim=1))  # (4, 10, K): predictions of image tokens 0..9

    caption = torch.zeros(4, CAPTION_TOKENS, DC)
    emb_mask = torch.zeros(4, CAPTION_TOKENS)
    for b, n in enumerate(counts):
        caption[b, CAPTION_TOKENS - n:] = feats[b]
        caption[2 + b] = sd["cls_embedding.uncond_embedding"]  # official: cond_null = uncond_embedding everywhere
        emb_mask[[b, 2 + b], CAPTION_TOKENS - n:] = 1  # the prompt's mask on both rows
    ref = reference_logits(sd, caption, emb_mask, idx.repeat(2, 1))[:, CAPTION_TOKENS - 1:]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert (ours[:2] - ours[2:]).abs().max() > 1e-2  # the unconditional rows differ: a real CFG stream


def test_state_dict_round_trip_and_unknown_keys(ported):
    bb, sd = ported
    back = bb.model.official_state_dict()
    assert set(back) == set(sd) - {"freqs_cis"}
    for k, v in back.items():
        torch.testing.assert_close(v, sd[k])
    with pytest.raises(ValueError, match="unknown keys"):
        bb.model.load_official_state_dict({**sd, "layers.0.attention.extra": torch.zeros(1)})


def test_tree_nodes_past_the_last_row_stay_in_the_position_table(ported):
    bb, _ = ported
    enc = PromptBatch([[bb.PAD_SLOT] * 110 + [bb.CAPTION_SLOT] * 10], [[bb.PAD_SLOT] * 110 + [bb.NULL_SLOT] * 10],
                      {"caption": [torch.randn(10, DC)]})
    state, _ = bb.prefill(enc, cfg=True, reserve=64)
    body = torch.randint(0, K, (2, bb.grid.length - 1))
    bb.forward(state, body)  # all but the last code committed
    depth = torch.tensor([0, 1, 2, 3, 4])  # nodes 1..4 sit past the last image position
    out = bb.forward(state, torch.randint(0, K, (2, 5)), tree_mask=torch.ones(5, 5, dtype=torch.bool).tril(), depth=depth)
    assert torch.isfinite(out).all()
    assert int(state.next_pos.max() + depth.max()) >= bb.transformer.rotary_emb.num_positions


def official_vq_key(k: str) -> str:
    """JanusVQVAE key -> the official vq_model.py name, written independently of the module's mapping."""
    for side, hf in (("encoder", "down"), ("decoder", "up")):
        k = re.sub(rf"^{side}\.{hf}\.(\d+)\.block\.", rf"{side}.conv_blocks.\1.res.", k)
        k = re.sub(rf"^{side}\.{hf}\.(\d+)\.(attn|downsample|upsample)\.", rf"{side}.conv_blocks.\1.\2.", k)
        k = k.replace(f"{side}.mid.block_1.", f"{side}.mid.0.").replace(f"{side}.mid.attn_1.", f"{side}.mid.1.")
        k = k.replace(f"{side}.mid.block_2.", f"{side}.mid.2.")
    return k


def test_vq16_official_keys_load_and_decode():
    from transformers import JanusVQVAE

    cfg = vq_config(num_codes=K, base_channels=32, channel_multiplier=(1, 2), z_channels=32, num_res_blocks=1)
    src = JanusVQVAE(cfg).eval()
    sd = {official_vq_key(k): v for k, v in src.state_dict().items()}
    assert "decoder.conv_blocks.0.res.0.conv1.weight" in sd and "encoder.mid.1.q.weight" in sd
    sd["quantize.codebook_used"] = torch.zeros(65536)
    vq = load_vq(sd, cfg, SIDE, SIDE)
    codes = torch.randint(0, K, (2, SIDE * SIDE))
    src.quantize.quant_state_dims = [SIDE, SIDE]
    torch.testing.assert_close(vq.decode(codes), src.decode(codes))
    with pytest.raises(ValueError, match="backbone.vq_path"):
        load_vq({k: v for k, v in sd.items() if "conv_out" not in k}, cfg, SIDE, SIDE)


def test_captions_t5_features_and_unconditional_slots():
    bb = LlamaGenBackbone.random(rows=4, cols=4, num_codes=64)
    enc = bb.encode(["A Large red circle  ", "a small blue square"])
    n0 = len(bb.t5_tokenizer("a large red circle")["input_ids"])  # words + </s>
    assert enc.cond[0].count(bb.CAPTION_SLOT) == n0 == enc.extras["caption"][0].shape[0]
    assert all(len(c) == len(u) == CAPTION_TOKENS for c, u in zip(enc.cond, enc.uncond))
    assert enc.uncond[0].count(bb.NULL_SLOT) == n0  # the prompt's own mask on the unconditional row
    assert bb.image_start_ids == [] and bb.eol_token_id is None and bb.max_length == CAPTION_TOKENS + 16
    assert bb.encode(["red " * 130]).cond[0].count(bb.CAPTION_SLOT) == CAPTION_TOKENS  # cut, as the official code
    bb.strict_length = True
    with pytest.raises(ValueError, match="strict_length"):
        bb.encode(["red " * 130])


# ----------------------------------------------------------------------------------------------- YAML and pipeline
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    bb = LlamaGenBackbone.random(rows=4, cols=4, num_codes=64, seed=0)
    return bb, bb.save_official(tmp_path_factory.mktemp("llamagen_official"))


TINY = ["backbone.dtype=float32", "backbone.t5_dtype=float32", "+backbone.arch={dim:64,n_layer:2,n_head:2,intermediate_size:128}",
        "+backbone.vq_arch={base_channels:32,channel_multiplier:[1,2],z_channels:32,num_res_blocks:1}",
        "backbone.latent_size=4"]


def _compose(name, *overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("eval", overrides=[f"backbone={name}", *overrides])


def test_yamls_hold_the_official_defaults():
    for name, size in (("llamagen_xl_256", 256), ("llamagen_xl_512", 512)):
        cfg = _compose(name, "sampling=llamagen")
        assert cfg.backbone.image_size == size and cfg.backbone.gpt_model == "GPT-XL"
        assert cfg.sampling.cfg_scale == 7.5 and cfg.sampling.top_k == 1000 and cfg.sampling.temperature == 1.0
        assert cfg.sampling.top_p is None and cfg.sampling.cfg_off_below_one is True
        assert cfg.backbone.clean_caption is True and cfg.backbone.strict_length is False
        assert _compose(name).sampling == cfg.sampling  # the backbone brings its sampling without sampling=llamagen


def test_yaml_target_loads_official_files_and_hawk_decodes(saved, tmp_path):
    from hawkspec.decoding.build import build_decoder
    from hawkspec.decoding.sampling import SamplingConfig
    from hawkspec.heads.draft import DraftHeads, HeadsConfig

    bb, paths = saved
    cfg = _compose("llamagen_xl_256", *[f"backbone.{k}={v}" for k, v in paths.items()], *TINY, "decoder=hawk",
                   f"paths.heads_dir={tmp_path}", "decoder.tree.budget=6")
    loaded = instantiate(cfg.backbone, "backbone")
    assert isinstance(loaded, LlamaGenBackbone) and loaded.grid == bb.grid and loaded.image_size == (8, 8)
    enc = bb.encode(PROMPTS)
    torch.testing.assert_close(loaded.prefill(loaded.encode(PROMPTS), cfg=True)[1], bb.prefill(enc, cfg=True)[1])
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), loaded).save(tmp_path / "hawk")
    out = build_decoder(the_decoder(cfg), loaded, SamplingConfig(temperature=1.0, top_k=16, cfg_scale=7.5)).generate(
        PROMPTS, torch.Generator().manual_seed(0))
    assert out.codes.shape == (2, 4, 4)
    assert loaded.decode_codes(out.codes).shape == (2, 3, 8, 8)


def test_missing_paths_and_unsupported_resolution_name_the_key(saved):
    _, paths = saved
    with pytest.raises(FileNotFoundError, match="backbone.gpt_path"):
        instantiate(_compose("llamagen_xl_256").backbone, "backbone")
    with pytest.raises(FileNotFoundError, match="backbone.t5_path"):
        LlamaGenBackbone.from_pretrained(paths["gpt_path"], None)
    with pytest.raises(FileNotFoundError, match="backbone.vq_path"):
        LlamaGenBackbone.from_pretrained(paths["gpt_path"], paths["t5_path"], paths["gpt_path"] + ".missing")
    with pytest.raises(ValueError, match="backbone.image_size"):
        LlamaGenBackbone.from_pretrained(paths["gpt_path"], paths["t5_path"], image_size=384)


@pytest.mark.slow
def test_hawk_end_to_end_cache_train_eval(saved, tmp_path):
    """cache -> train a few steps -> eval, the console scripts a user runs, on the saved tiny LlamaGen."""
    _, paths = saved
    bb_args = ["backbone=llamagen_xl_256", *[f"backbone.{k}={v}" for k, v in paths.items()], *TINY]
    samp = ["sampling=llamagen", "sampling.top_k=16"]
    run_cli("hawkspec-cache", *bb_args, *samp, f"hydra.run.dir={tmp_path / 'cache'}", "cache.num_samples=8",
            "cache.val_samples=4", "cache.shard_size=4", "cache.batch_size=4")
    heads = tmp_path / "heads"
    run_cli("hawkspec-train", *bb_args, f"shards_dir={tmp_path / 'cache' / 'shards'}", "heads=hawk",
            "trainer.max_steps=3", "data.batch_size=4", "logger=csv", f"export_dir={heads / 'hawk'}",
            f"hydra.run.dir={tmp_path / 'train'}")
    run_cli("hawkspec-eval", *bb_args, *samp, f"paths.heads_dir={heads}", "eval.decoders=[ar,hawk]",
            "eval.num_prompts=2", "eval.batch_size=2", "eval.repeats=1", "eval.warmup_batches=0",
            "eval.quality.enabled=false", "decoder.tree.budget=6", f"hydra.run.dir={tmp_path / 'eval'}")
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {r["decoder"]: r for r in res["rows"]}
    assert res["backbone"] == "llamagen-t2i-xl-256" and set(rows) == {"ar", "hawk"} and rows["hawk"]["lossless"]
