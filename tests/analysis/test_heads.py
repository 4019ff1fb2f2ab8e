"""Heads by distance: heads whose predictions are known by construction give the expected accuracy and KL;
shards and self-samples feed the same batches."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hawkspec.analysis.heads import (
    analyse_heads,
    draft_kl,
    head_accuracy,
    head_rows,
    hidden_batches,
    shard_batches,
)
from hawkspec.backbones.base import ImageGrid
from hawkspec.cache.sources import procedural_captions
from hawkspec.cache.teacher import body_codes, teacher_forced_states
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.heads.draft import DraftHeads, HeadsConfig

GRID = ImageGrid(rows=4, cols=5, eol=True)  # W = 6
K = 8


def identity_heads(n=3, vsd=2):
    """Heads whose logits are their input (zero-initialised ResBlocks, identity code head): hidden = one-hot of a
    code makes every head predict that code."""
    return DraftHeads(HeadsConfig(num_horizontal=n, vertical=True, vsd=vsd), K, GRID.tokens_per_row, nn.Identity())


def random_codes(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(K, (B, GRID.rows, GRID.cols), generator=g)
    return body_codes(GRID, codes)  # (B, L), -1 at eol


def test_head_rows_give_the_displacements():
    rows = head_rows(identity_heads())
    assert [r["name"] for r in rows] == ["h1", "h2", "h3", "v1", "v2"]
    assert [(r["offset"], r["rows"], r["cols"]) for r in rows] == [(2, 0, 2), (3, 0, 3), (4, 0, 4), (6, 1, 0), (12, 2, 0)]


def test_known_heads_give_known_accuracy():
    heads = identity_heads()
    codes = random_codes(3)
    B, L = codes.shape
    # every source s states the code two ahead (h1's target): h1 is always right, the others by coincidence
    hidden = torch.zeros(B, L + 1, K)
    hidden[..., 0] = 0.5  # where h1 has no target: code 0
    for s in range(-1, L):
        t = s + 2
        if t < L and codes[0, t] >= 0:
            for b in range(B):
                hidden[b, s + 1, codes[b, t]] = 1.0
    acc = head_accuracy(heads, hidden, codes, GRID)
    rows = {r["name"]: r for r in acc.rows()}
    assert rows["h1"]["top1"] == 1.0
    for r in acc.rows():  # brute force: a head is right where its target equals h1's
        hits = total = 0
        for b in range(B):
            for s in range(-1, L):
                t = s + r["offset"]
                if 0 <= t < L and codes[b, t] >= 0:
                    total += 1
                    t1 = s + 2  # where h1 has no target: code 0
                    pred = codes[b, t1] if t1 < L and codes[b, t1] >= 0 else 0
                    hits += int(pred == codes[b, t])
        assert r["targets"] == total
        assert r["top1"] == pytest.approx(hits / total)
        assert r["top5"] >= r["top1"]
    maps = acc.maps()
    assert maps.shape == (5, GRID.rows, GRID.cols)
    assert torch.isnan(maps[0, 0, 0]) and (maps[0][~torch.isnan(maps[0])] == 1).all()  # h1 never targets (0, 0)
    assert torch.isnan(maps[3, 0]).all() and torch.isnan(maps[4, :2]).all()  # nothing above the first rows
    assert (acc + acc).top(1).tolist() == acc.top(1).tolist()


def test_kl_is_zero_for_agreeing_heads_and_matches_brute_force():
    heads = identity_heads()
    B, L = 2, GRID.length
    same = torch.randn(1, 1, K).expand(B, L + 1, K)  # one state everywhere: every head says the same
    kl = draft_kl(heads, same, GRID, 1, 1)
    assert torch.isnan(kl.map[0]).all()  # the first row has nothing above it
    assert torch.allclose(kl.map[1:], torch.zeros(GRID.rows - 1, GRID.cols), atol=1e-6)
    assert (kl.counts[1:] == B).all()

    hidden = torch.randn(B, L + 1, K, generator=torch.Generator().manual_seed(1))
    kl = draft_kl(heads, hidden, GRID, 2, 1)
    W = GRID.tokens_per_row
    r, c = 2, 3
    t = r * W + c
    p = hidden[:, t - 2].log_softmax(-1)  # h2 predicts t from s = t - 3, row s + 1
    q = hidden[:, t - W + 1].log_softmax(-1)  # v1 predicts t from s = t - W
    ref = (p.exp() * (p - q)).sum(-1).mean()
    assert kl.map[r, c] == pytest.approx(float(ref), rel=1e-5)
    rev = (q.exp() * (q - p)).sum(-1).mean()
    assert kl.reverse_map[r, c] == pytest.approx(float(rev), rel=1e-5)
    with pytest.raises(ValueError, match="vertical head 3"):
        draft_kl(heads, hidden, GRID, 1, 3)


def test_shards_and_self_samples_feed_the_same_states(random_backbone, tiny_cache):
    batches = list(shard_batches(tiny_cache, random_backbone, num_images=3, batch_size=2))
    assert [b["hidden"].shape[0] for b in batches] == [2, 1]
    b = batches[0]
    grid = random_backbone.grid
    assert b["hidden"].shape == (2, grid.length + 1, random_backbone.hidden_size)
    # the val split's states are the teacher-forced states of its codes
    pos = grid.code_positions()
    codes = b["codes"].long()[:, pos].view(2, grid.rows, grid.cols)
    manifest = json.loads((Path(tiny_cache) / "val" / "manifest.json").read_text())
    assert manifest["num_samples"] == 4
    captions = procedural_captions(1, 0, 2)  # the val split's seed
    hidden, _, _ = teacher_forced_states(random_backbone, captions, codes, SamplingConfig(top_k=32), 0)
    assert torch.allclose(hidden, b["hidden"].float(), atol=2e-2)
    heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=2, vsd=1), random_backbone)
    acc, kls = analyse_heads(heads, batches, grid)
    assert acc.images == 3 and set(kls) == {(1, 1)}
    # self-samples: the same structure, computed on the spot
    own = list(hidden_batches(random_backbone, None, num_images=2, prompts=["a red circle", "a blue square"],
                              sampling=SamplingConfig(top_k=32), batch_size=2))
    assert own[0]["hidden"].shape == b["hidden"].shape and (own[0]["codes"] < 0).sum() == (b["codes"] < 0).sum()
    with pytest.raises(FileNotFoundError, match="no hawkspec-cache split"):
        next(shard_batches(Path(tiny_cache) / "nowhere", random_backbone))


def test_head_accuracy_script_plots_through_the_package(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("head_accuracy", root / "experiments" / "head_accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.load_report(root / "src" / "hawkspec" / "assets" / "heads" / "hawk")
    mod.plot(report, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000
