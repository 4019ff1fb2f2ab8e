"""Lumina-mGPT on transformers' Chameleon classes: the official layout token by token, CFG's unconditional stream,
code ids from the vocabulary map, the q/k-norm shapes of the official checkpoints, loading and its errors.

The shared behaviour (tree forward, compaction, greedy speculative == AR, losslessness) is in test_conformance.py.
"""

from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.backbones.chameleon import (
    END_OF_TURN_TOKEN,
    PROMPT_TEMPLATE,
    ChameleonBackbone,
    code_index_of,
    expand_qk_norms,
    image_token_name,
    lumina_layout,
    size_token,
)
from hawkspec.cli.common import CONF_DIR
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, target_probs
from hawkspec.testing import compose

PROMPTS = ["a large red circle in the center", "a small blue square"]


def real_vocabulary(num_codes: int = 8192, seed: int = 0) -> dict[str, int]:
    """A vocabulary map with the ids of the real Chameleon / Lumina-mGPT tokenizer where it matters:
    <s> 0, <pad> 1, image tokens 4..8195 (shuffled against code order), <eoss> 8196, <racm3:break> 8197,
    <reserved0NNNN> at NNNN + 4 (so <reserved08706> = 8710, <reserved08799> = 8803, <reserved08800> = 8804)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_codes, generator=g).tolist()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": 8196, "<racm3:break>": 8197}
    vocab.update({image_token_name(k): 4 + perm[k] for k in range(num_codes)})
    vocab.update({f"<reserved{n:05d}>": n + 4 for n in range(8194, 8900)})
    return vocab


@pytest.fixture(scope="module")
def bb() -> ChameleonBackbone:
    return ChameleonBackbone.random(rows=4, cols=4, num_codes=32, seed=0)


# ------------------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("res, n", [(512, 16), (768, 24), (1024, 32)])
def test_official_ids_at_each_resolution(res, n):
    vocab = real_vocabulary()
    lay = lumina_layout(vocab, res, downsample=16)
    assert lay.image_start_ids == (8197, 8804 + n, 8804 + n)  # <racm3:break>, height grids, width grids
    assert (lay.eol_token_id, lay.image_end_id, lay.end_of_turn_id, lay.bos_id) == (8803, 8196, 8710, 0)
    assert (lay.rows, lay.cols) == (2 * n, 2 * n) and lay.grid.tokens_per_row == 2 * n + 1
    assert sorted(lay.code_token_ids) == list(range(4, 8196))  # every image token, in VQ-code order
    assert [code_index_of(name) for name in (image_token_name(k) for k in (0, 7, 10, 8191))] == [0, 7, 10, 8191]
    assert lay.code_token_ids[10] == vocab["IMGIMGBAZ"] and lay.code_token_ids != tuple(range(4, 8196))


def test_non_square_resolution_is_height_then_width():
    lay = lumina_layout(real_vocabulary(), [512, 768], downsample=16)
    assert lay.image_start_ids == (8197, 8804 + 16, 8804 + 24) and (lay.rows, lay.cols) == (32, 48)


@pytest.mark.parametrize("res", [700, [768, 100], 32 * 200, "big"])
def test_unknown_resolution_names_the_key(res):
    with pytest.raises(ValueError, match="backbone.resolution"):
        lumina_layout(real_vocabulary(), res, downsample=16)


def test_missing_special_token_is_named():
    vocab = real_vocabulary()
    del vocab["<reserved08799>"]
    with pytest.raises(ValueError, match="reserved08799"):
        lumina_layout(vocab, 768, downsample=16)


def test_prompt_is_the_official_conversation_and_uncond_is_empty(bb):
    enc = bb.encode(PROMPTS)
    tok = bb.tokenizer
    for caption, ids in zip(PROMPTS, enc.cond):
        text = PROMPT_TEMPLATE.format(width=16, height=16, caption=caption)
        assert text.startswith("Generate an image of 16x16 according to the following prompt:\n")
        assert ids == [bb.layout.bos_id] + tok.encode(text + END_OF_TURN_TOKEN, add_special_tokens=False)
        assert ids[-1] == tok.convert_tokens_to_ids(END_OF_TURN_TOKEN) and ids[0] == tok.convert_tokens_to_ids("<s>")
    assert enc.uncond == [[], []]  # CFG's stream starts at the image start: no BOS, no text


def test_sequence_token_by_token(bb):
    """prompt, <racm3:break>, size tokens, rows of 4 codes + <reserved08799>, and <eoss> after the last row."""
    vmap = bb.model.config.vocabulary_map
    assert bb.image_start_ids == [vmap["<racm3:break>"], vmap[size_token(2)], vmap[size_token(2)]]  # 16 px / 8 px
    assert bb.eol_token_id == vmap["<reserved08799>"] and bb.image_end_id == vmap["<eoss>"]
    out = ar_generate(bb, PROMPTS, SamplingConfig(temperature=1.0, top_k=8, cfg_scale=3.0), torch.Generator().manual_seed(0))
    tokens = out.tokens.view(len(PROMPTS), 4, 5)  # rows x W, W = 4 codes + end-of-line
    assert (tokens[:, :, 4] == bb.eol_token_id).all()
    names = [[bb.tokenizer.convert_ids_to_tokens(int(t)) for t in row[:4]] for row in tokens[0]]
    assert all(n.startswith("IMGIMG") and n.endswith("Z") for row in names for n in row)
    assert torch.equal(bb.code_token_ids[out.codes], tokens[:, :, :4])  # codes are VQ indices via the map
    assert [code_index_of(n) for n in names[0]] == out.codes[0, 0].tolist()
    assert bb.sequence_length(bb.encode(PROMPTS)) == max(map(len, bb.encode(PROMPTS).cond)) + 3 + 20 + 1  # + <eoss>


def test_cfg_stream_starts_at_the_image_start(bb):
    """Row B + i holds only the three image-start tokens at positions 0, 1, 2, and equals Chameleon run on them."""
    enc = bb.encode(PROMPTS)
    state, h = bb.prefill(enc, cfg=True)
    B = len(PROMPTS)
    assert state.key_mask[B:].sum(1).tolist() == [3, 3] and state.next_pos[B:].tolist() == [3, 3]
    assert state.next_pos[:B].tolist() == [len(p) + 3 for p in enc.cond]
    ref = bb.model.model(input_ids=torch.tensor([bb.image_start_ids])).last_hidden_state[0, -1]
    torch.testing.assert_close(h[B], ref, atol=1e-5, rtol=1e-4)


def test_code_logits_are_lm_head_rows_of_the_inner_model(bb):
    """HF's Chameleon forward masks image tokens; the adapter scores codes from model.model with lm_head's rows."""
    ids = torch.tensor([bb.encode(PROMPTS[:1]).cond[0] + bb.image_start_ids])
    full = bb.model(input_ids=ids).logits[0, -1]
    assert (full[bb.code_token_ids] == torch.finfo(full.dtype).min).all()
    h = bb.model.model(input_ids=ids).last_hidden_state[0, -1]
    torch.testing.assert_close(bb.code_logits(h), bb.model.lm_head(h)[bb.code_token_ids])
    ids_sorted = bb.code_token_ids.tolist()
    assert ids_sorted != list(range(ids_sorted[0], ids_sorted[0] + bb.num_codes))  # not contiguous, not sorted


def test_sampling_order_matches_the_official_processors(bb):
    """Official: CFG on the full-vocabulary logits, non-image tokens to -inf, image top-k, temperature, softmax.
    Ours: target_probs(combine_cfg(code logits)). Same distribution over codes."""
    g = torch.Generator().manual_seed(0)
    V = bb.model.config.vocab_size
    cond, uncond = torch.randn(3, V, generator=g) * 3, torch.randn(3, V, generator=g) * 3
    s = SamplingConfig(temperature=0.7, top_k=10, cfg_scale=3.0)
    scores = s.cfg_scale * (cond - uncond) + uncond  # LLMImageStartTriggered...ClassifierFreeGuidanceLogitsProcessor
    image = torch.zeros(V, dtype=torch.bool)
    image[bb.code_token_ids] = True
    scores = torch.where(image, scores, torch.tensor(float("-inf")))  # MultiModalLogitsProcessor
    kth = torch.topk(scores, s.top_k).values[..., -1:]
    scores = scores.masked_fill(scores < kth, float("-inf"))  # InterleavedTopKLogitsWarper (image_top_k)
    official = torch.softmax(scores / s.temperature, -1)[:, bb.code_token_ids]  # TemperatureLogitsWarper
    ours = target_probs(combine_cfg(torch.cat([cond, uncond])[:, bb.code_token_ids], 2, s.cfg_scale), s)
    torch.testing.assert_close(ours, official)


# ------------------------------------------------------------------------------------------------ loading
def test_expand_qk_norms_repeats_each_group_over_its_heads():
    hd = 4
    state = {
        "model.layers.0.self_attn.q_norm.weight": torch.arange(hd, dtype=torch.float)[None],  # 1 group (7B)
        "model.layers.0.self_attn.q_norm.bias": torch.ones(hd),  # 1-D: one group
        "model.layers.0.self_attn.k_norm.weight": torch.stack([torch.zeros(hd), torch.ones(hd)]),  # 2 groups
        "model.layers.0.self_attn.k_norm.bias": torch.randn(4, hd),  # already per head
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
    }
    out = expand_qk_norms(state, num_heads=4, num_kv_heads=4)
    assert out["model.layers.0.self_attn.q_norm.weight"].shape == (4, hd)
    assert (out["model.layers.0.self_attn.q_norm.weight"] == torch.arange(hd)).all()
    assert (out["model.layers.0.self_attn.q_norm.bias"] == 1).all()
    assert out["model.layers.0.self_attn.k_norm.weight"][:, 0].tolist() == [0, 0, 1, 1]  # heads 0,1 group 0
    assert out["model.layers.0.self_attn.k_norm.bias"] is state["model.layers.0.self_attn.k_norm.bias"]
    assert out["model.layers.0.self_attn.q_proj.weight"] is state["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(ValueError, match="does not divide"):
        expand_qk_norms({"model.layers.0.self_attn.q_norm.weight": torch.ones(3, hd)}, 4, 4)


@pytest.fixture(scope="module")
def lumina_checkpoint(tmp_path_factory):
    """A tiny random Chameleon saved as the official Lumina-mGPT checkpoints are: q/k norms (1, head_dim), no VQ
    encoder weights (Lumina's fine-tuning drops model.vqmodel); the VQGAN as vqgan.ckpt + vqgan.yaml."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("lumina")
    bb = ChameleonBackbone.random(rows=4, cols=4, num_codes=32, seed=3)
    with torch.no_grad():  # one group: every head shares row 0, as in the 7B model
        for layer in bb.model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(norm.weight[:1].expand_as(norm.weight))
                norm.bias.copy_(norm.bias[:1].expand_as(norm.bias))
    bb.save_pretrained(root / "model", vqgan_dir=root / "vqgan")
    f = root / "model" / "model.safetensors"
    sd = load_file(str(f))
    sd = {k: (v[:1].clone() if ".q_norm." in k or ".k_norm." in k else v) for k, v in sd.items() if ".vqmodel." not in k}
    save_file(sd, str(f), metadata={"format": "pt"})
    return bb, root


def test_official_checkpoint_loads_with_expanded_norms(lumina_checkpoint):
    bb, root = lumina_checkpoint
    loaded = ChameleonBackbone.from_pretrained(str(root / "model"), resolution=16, dtype="float32")
    assert loaded.model.model.layers[0].self_attn.q_norm.weight.shape == (2, 32)
    assert not loaded.vq_encoder and not loaded.can_decode()[0]
    enc = bb.encode(PROMPTS)
    _, want = bb.prefill(enc, cfg=True)
    _, got = loaded.prefill(loaded.encode(PROMPTS), cfg=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert loaded.revision == ChameleonBackbone.from_pretrained(str(root / "model"), resolution=16,
                                                                dtype="float32").revision
    assert loaded.name == "lumina-mgpt-16x16" and loaded.identity()["grid"] == bb.identity()["grid"]


def test_vqgan_path_gives_decoder_and_missing_encoder(lumina_checkpoint):
    bb, root = lumina_checkpoint
    loaded = ChameleonBackbone.from_pretrained(str(root / "model"), resolution=16, dtype="float32",
                                               vqgan_path=str(root / "vqgan" / "vqgan.ckpt"))
    assert loaded.can_decode() == (True, "") and loaded.vq_encoder
    codes = torch.randint(0, 32, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    images = loaded.decode_codes(codes)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images, bb.decode_codes(codes))
    assert torch.equal(loaded.encode_images(images), bb.encode_images(images))
    torch.testing.assert_close(loaded.codebook_vectors(), bb.codebook_vectors())


def test_bfloat16_load(lumina_checkpoint):
    _, root = lumina_checkpoint
    loaded = ChameleonBackbone.from_pretrained(str(root / "model"), resolution=16, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16 and loaded.model.model.layers[1].self_attn.k_norm.weight.shape == (2, 32)
    _, h = loaded.prefill(loaded.encode(PROMPTS[:1]), cfg=True)
    assert h.dtype == torch.bfloat16 and torch.isfinite(h.float()).all()


def test_missing_model_path_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="backbone.path"):
        ChameleonBackbone.from_pretrained(None)
    with pytest.raises(FileNotFoundError, match="backbone.path"):
        ChameleonBackbone.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="backbone.path"):
        ChameleonBackbone.from_pretrained(str(tmp_path))  # a folder without a checkpoint


def test_missing_vqgan_is_a_message_not_a_crash(lumina_checkpoint, tmp_path):
    _, root = lumina_checkpoint
    loaded = ChameleonBackbone.from_pretrained(str(root / "model"), resolution=16, dtype="float32")
    ok, why = loaded.can_decode()
    assert not ok and "backbone.vqgan_path" in why
    with pytest.raises(RuntimeError, match="backbone.vqgan_path"):
        loaded.decode_codes(torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="backbone.vqgan_path"):
        loaded.encode_images(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="backbone.vqgan_path"):
        ChameleonBackbone.from_pretrained(str(root / "model"), resolution=16, vqgan_path=str(tmp_path / "vqgan.ckpt"))


def test_unknown_resolution_on_load_names_the_key(lumina_checkpoint):
    _, root = lumina_checkpoint
    with pytest.raises(ValueError, match="backbone.resolution"):
        ChameleonBackbone.from_pretrained(str(root / "model"), resolution=20, dtype="float32")


def test_heads_and_shards_of_another_backbone_are_refused(bb, tmp_path):
    from hawkspec.data.manifest import ShardManifest, check_compatible
    from hawkspec.heads.draft import DraftHeads, HeadsConfig
    from hawkspec.testing import random_backbone

    tiny = random_backbone("tiny", rows=4, cols=4, num_codes=32)
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=2, vertical=True, vsd=1), tiny).save(tmp_path / "h")
    with pytest.raises(ValueError, match="backbone='tiny'") as err:
        DraftHeads.load(tmp_path / "h", bb)
    assert "chameleon-random" in str(err.value)
    ident = tiny.identity()
    manifest = ShardManifest(num_samples=1, shards=[], hidden_size=ident["hidden_size"], dtype="float16",
                             backbone=ident["backbone"], revision=ident["revision"], grid=ident["grid"],
                             tokens_per_row=5, num_codes=32, source="self", seed=0, topk=0, split="train",
                             shard_size=1, sampling={})
    with pytest.raises(ValueError, match="backbone"):
        check_compatible(manifest, bb.identity(), tmp_path)


# ------------------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("res", [512, 768, 1024])
def test_backbone_configs_carry_the_paper_sampling(res):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        for primary in ("generate", "eval", "cache"):
            cfg = compose(primary, overrides=[f"backbone=lumina_mgpt_{res}"])
            assert dict(cfg.sampling) == {"temperature": 1.0, "top_k": 2000, "cfg_scale": 3.0, "top_p": None,
                                          "cfg_off_below_one": False}
            assert cfg.backbone.resolution == res and cfg.backbone.path is None
            assert cfg.backbone._target_ == "hawkspec.backbones.chameleon.ChameleonBackbone.from_pretrained"
        assert compose("eval", overrides=[f"backbone=lumina_mgpt_{res}", "sampling.top_k=7"]).sampling.top_k == 7
        assert compose("eval").sampling.top_k == 128  # the tiny model keeps its own
    assert (Path(CONF_DIR) / "backbone" / "sampling" / f"lumina_mgpt_{res}.yaml").is_file()


def test_footprint_of_lumina_7b_from_its_config():
    from hawkspec.cli.footprint import main

    f = main(["backbone=lumina_mgpt_768", "cache.num_samples=6000", "cache.val_samples=0", "batch=2"])
    assert 7.0e9 < f["parameters"] < 7.1e9 and f["weights_bytes"] == 2 * f["parameters"]  # bf16
    assert f["grid"] == {"rows": 48, "cols": 48, "tokens_per_row": 49, "body_tokens": 2352}
    assert f["kv_bytes_per_slot"] == 32 * 2 * 32 * 128 * 2 and f["cfg_streams"] == 2
    assert f["kv_slots_per_stream"] == 64 + 3 + 2352 + 1 + 64
    assert f["kv_bytes_per_batch"] == 2 * f["kv_bytes_per_image"]
    assert f["cache_bytes"] == 6000 * (2353 * 4096 * 2 + 2352 * 2)


def test_footprint_reads_a_local_checkpoint(lumina_checkpoint):
    from hawkspec.cli.footprint import main

    bb, root = lumina_checkpoint
    f = main([f"backbone=lumina_mgpt_768", f"backbone.path={root / 'model'}", "backbone.resolution=16",
              "backbone.dtype=float32", "cache.topk=4", "--json"])
    assert f["parameters"] == sum(p.numel() for p in bb.model.parameters())
    assert f["grid"]["body_tokens"] == 20 and f["cache_bytes_per_sample"] == 21 * 64 * 2 + 20 * 2 + 21 * 4 * 4
