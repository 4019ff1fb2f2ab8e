"""The backbone conformance suite: every adapter, built from a tiny random config of its real transformers classes
(``hawkspec.testing.RANDOM_BACKBONES``, no downloads), must pass all of it.

What decoders, heads, the cache and the metrics rely on, checked against a from-scratch recompute:

* a tree block's hidden states equal a fresh teacher-forced run of each node's root-to-node path (and two
  negative controls -- wrong positions, a causal mask instead of the tree mask -- are caught);
* compaction (gathering and prefix) leaves a cache whose next forward equals a recompute of the accepted path;
* a block spanning two image rows at non-contiguous raster positions (rows in flight) equals an uncached run in
  which each token sees what was written no later than it at positions up to its own (a negative control that
  reads the whole cache is caught);
* CFG streams: row ``B + i`` is prompt ``i``'s own unconditional stream, padding changes nothing;
* the code head a draft head ends in equals :meth:`Backbone.code_logits`;
* greedy speculative decoding equals greedy AR token for token, for every tree preset and the chain;
* the exact rule is lossless through the adapter (chi-square against the enumerated distribution);
* heads made for another grid are refused with every differing field named; over-long prompts are errors.
"""

import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.backbones.base import PromptBatch
from hawkspec.cli.common import CONF_DIR
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.testing import available_random_backbones, compose, peaky, random_backbone, the_decoder

ADAPTERS = available_random_backbones()
PROMPTS = ["a large red circle in the center", "a small blue square on the left on a plain white background"]
TOL = dict(atol=2e-4, rtol=1e-3)


@pytest.fixture(scope="module", params=ADAPTERS)
def adapter(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def bb(adapter):
    return random_backbone(adapter, rows=3, cols=3, num_codes=32, seed=0)


def _random_body(bb, n: int, seed: int) -> torch.Tensor:
    """(B, n) body ids of a random image's first n positions (end-of-line tokens where the grid forces them)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, bb.num_codes, (len(PROMPTS), bb.grid.rows, bb.grid.cols), generator=g)
    return bb.body_ids(codes.to(bb.code_token_ids.device))[:, :n]


# A tree of 6 nodes under the last committed token: node 0 is a child of the root; parents below.
PARENT = [-1, 0, 0, 1, 1, 3]  # node i's parent among the block's nodes (-1: the committed root)


def _tree():
    T = len(PARENT)
    mask = torch.eye(T, dtype=torch.bool)
    depth = torch.zeros(T, dtype=torch.long)
    for i, p in enumerate(PARENT):
        if p >= 0:
            mask[i] |= mask[p]
            depth[i] = depth[p] + 1
    return mask, depth


def _path(i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = PARENT[i]
    return out[::-1]


def _tree_error(bb, mask, depth) -> float:
    """Max |tree forward - recompute| over the nodes, with the given (possibly broken) mask and depths."""
    enc = bb.encode(PROMPTS)
    prefix = _random_body(bb, 2, seed=1)  # two committed body tokens before the tree
    nodes = _random_body(bb, 8, seed=2)[:, 2 : 2 + len(PARENT)]  # (B, T) node tokens
    state, _ = bb.prefill(enc, cfg=True, reserve=16)
    bb.forward(state, prefix.repeat(2, 1))
    tree = bb.forward(state, nodes.repeat(2, 1), tree_mask=mask, depth=depth)  # (2B, T, d)
    err = 0.0
    for i in range(len(PARENT)):
        body = torch.cat([prefix, nodes[:, _path(i)]], dim=1)
        ref = bb.teacher_forced(enc, body, cfg=True)[:, -1]  # (2B, d) the state after node i
        err = max(err, (tree[:, i] - ref).abs().max().item())
    return err


def test_tree_forward_equals_recompute(bb):
    mask, depth = _tree()
    assert _tree_error(bb, mask, depth) < 1e-3


def test_tree_negative_controls_are_caught(bb):
    """A broken forward must fail the recompute check: positions ignored, or a causal mask over the block."""
    mask, depth = _tree()
    assert _tree_error(bb, mask, torch.zeros_like(depth)) > 1e-2
    assert _tree_error(bb, torch.ones_like(mask).tril(), depth) > 1e-2


@pytest.mark.parametrize("chain", [False, True])
def test_compaction_equals_recompute(bb, chain):
    """Rows keep different accepted paths; the next forward must equal a recompute of prefix + path + next."""
    enc = bb.encode(PROMPTS)
    B = len(PROMPTS)
    nodes = _random_body(bb, 5, seed=3)[:, :4]  # (B, 4)
    nxt = _random_body(bb, 6, seed=4)[:, 5:6]  # (B, 1)
    if chain:
        mask, depth = torch.ones(4, 4, dtype=torch.bool).tril(), torch.arange(4)
        keep, count = torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([3, 1])
    else:  # node 0 root child; 1, 2 siblings under 0; 3 under 2
        mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
        depth = torch.tensor([0, 1, 1, 2])
        keep, count = torch.tensor([[0, 2, 3], [0, 1, 0]]), torch.tensor([3, 2])
    state, _ = bb.prefill(enc, cfg=True, reserve=8)
    bb.forward(state, nodes.repeat(2, 1), tree_mask=mask, depth=depth)
    bb.compact(state, keep.repeat(2, 1), count.repeat(2), prefix=chain)
    assert state.pending == 0
    out = bb.forward(state, nxt.repeat(2, 1))[:, -1]  # (2B, d)
    for b in range(B):
        body = torch.cat([nodes[b, keep[b, : count[b]]], nxt[b]])[None]
        ref = bb.teacher_forced(enc.select([b]), body, cfg=True)[:, -1]  # (2, d): cond, uncond
        torch.testing.assert_close(out[[b, B + b]], ref, **TOL)


def _written_order_reference(bb, enc, ids: torch.Tensor, where: torch.Tensor, when: torch.Tensor) -> torch.Tensor:
    """Hidden states of body tokens written over several forwards, from one uncached run of the whole sequence.

    ``ids`` (B, n) are the tokens in the order they were written, ``where`` (n,) their body positions, ``when`` (n,)
    the forward that wrote each. Token t sees the prompt and every token s with ``when[s] <= when[t]`` and
    ``where[s] <= where[t]``: what it saw when it was written, the keys it attended to then being the same tokens
    under the same rule. Returns (2B, n, d), conditional rows then unconditional.
    """
    embeds, mask, pos = bb.prefill_inputs(enc, cfg=True)
    N, P = mask.shape
    n = ids.shape[1]
    body = ids.repeat(2, 1).to(bb.device)
    embeds = torch.cat([embeds, bb.embed(body)], dim=1)
    pos = torch.cat([pos, pos[:, -1:] + 1 + where.to(bb.device)[None]], dim=1)
    sees = (when[None, :] <= when[:, None]) & (where[None, :] <= where[:, None])  # (n, n) t sees s
    allowed = torch.zeros(N, P + n, P + n, dtype=torch.bool, device=bb.device)
    allowed[:, :, :P] = mask.bool()[:, None, :]
    allowed[:, :P, :P] &= torch.ones(P, P, dtype=torch.bool, device=bb.device).tril()
    allowed[:, P:, P:] = sees.to(bb.device)
    return bb._run(embeds, bb._additive(allowed), pos).last_hidden_state[:, P:]


def _rows_in_flight_error(bb, explicit: bool) -> float:
    """Max |forward - recompute| over a block spanning two image rows at non-contiguous raster positions.

    Body positions 0, 1 are committed by a plain block, then 2 and W + 1 by a rows-in-flight block (row 0 and row 1
    at once); the block under test holds W, W + 2 and 2W. Each node must equal an uncached run of the whole
    sequence in which a token sees exactly the tokens written no later than it at positions up to its own
    (:func:`_written_order_reference`): W must not see W + 1, written ahead of it. ``explicit=False`` is the
    negative control: the same block placed by ``depth`` from the frontier, which reads the whole cache.
    """
    enc = bb.encode(PROMPTS)
    W = bb.grid.tokens_per_row
    body = _random_body(bb, bb.grid.length, seed=5)  # (B, L) the image the tokens come from
    state, _ = bb.prefill(enc, cfg=True, reserve=16)
    base = state.next_pos.clone()  # (2B,) position id of body position 0 in each row
    bb.forward(state, body[:, :2].repeat(2, 1))
    first = torch.tensor([2, W + 1])
    bb.forward(state, body[:, first].repeat(2, 1), positions=base[:, None] + first)
    block = torch.tensor([W, W + 2, 2 * W])
    ids = body[:, block].repeat(2, 1)
    if explicit:
        out = bb.forward(state, ids, positions=base[:, None] + block)
    else:
        out = bb.forward(state, ids, depth=block - 2)
    where = torch.cat([torch.tensor([0, 1]), first, block])
    when = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    ref = _written_order_reference(bb, enc, body[:, where], where, when)[:, -len(block):]
    return (out - ref).abs().max().item()


def test_rows_in_flight_block_equals_recompute(bb):
    """Several rows in one forward (ZipAR, PJD, spatial Jacobi): raster-causal over the committed slots."""
    assert _rows_in_flight_error(bb, explicit=True) < 1e-3


def test_rows_in_flight_negative_control_is_caught(bb):
    """Read by offsets from the frontier, the block sees W + 1 from W: the recompute check must fail."""
    assert _rows_in_flight_error(bb, explicit=False) > 1e-2


def test_cfg_streams_are_per_prompt_and_padding_free(bb):
    enc = bb.encode(PROMPTS)
    assert len(enc) == len(PROMPTS) and len(enc.uncond) == len(PROMPTS)
    state, h = bb.prefill(enc, cfg=True)
    assert state.streams == 2 and h.shape == (2 * len(PROMPTS), bb.hidden_size)
    for i in range(len(PROMPTS)):
        _, alone = bb.prefill(enc.select([i]), cfg=True)  # no padding: the prompt alone
        torch.testing.assert_close(h[[i, len(PROMPTS) + i]], alone, **TOL)
        uncond_only = PromptBatch([enc.uncond[i]], [enc.uncond[i]], {k: [v[i]] for k, v in enc.extras.items()})
        _, u = bb.prefill(uncond_only, cfg=False)
        torch.testing.assert_close(h[len(PROMPTS) + i], u[0], **TOL)


def test_code_head_equals_code_logits(bb):
    _, h = bb.prefill(bb.encode(PROMPTS), cfg=False)
    head = bb.code_head()
    assert not any(p.requires_grad for p in head.parameters())
    torch.testing.assert_close(head(h), bb.code_logits(h), **TOL)
    assert bb.code_logits(h).shape == (len(PROMPTS), bb.num_codes)
    assert len(set(bb.code_token_ids.tolist())) == bb.num_codes


def test_layout_is_consistent(bb):
    g = bb.grid
    assert (bb.eol_token_id is not None) == g.eol
    assert bb.image_size[0] > 0 and bb.image_size[1] > 0
    ids = bb.body_ids(torch.zeros(1, g.rows, g.cols, dtype=torch.long, device=bb.code_token_ids.device))
    assert ids.shape == (1, g.length)
    if g.eol:
        assert (ids[0, g.forced_mask()] == bb.eol_token_id).all()


def test_prompt_longer_than_the_context_is_an_error(bb, monkeypatch):
    monkeypatch.setattr(bb, "strict_length", True, raising=False)  # LlamaGen cuts over-long captions by default
    with pytest.raises(ValueError, match="max_position_embeddings"):
        bb.prefill(bb.encode(["red " * (bb.max_length + 10)]), cfg=False)


def _decoder(bb, preset: str, tree: str | None, heads_dir):
    overrides = [f"decoder={preset}", f"decoder/acceptance@eval.decoders.{preset}.acceptance=greedy",
                 f"paths.heads_dir={heads_dir}"]
    if tree == "chain":  # a decoder's own tree (conf/decoder/tree/)
        overrides.append(f"decoder/tree@eval.decoders.{preset}.tree=chain")
    elif tree:  # the run's tree, every decoder alike (conf/tree/)
        overrides.append(f"tree={tree}")
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    return build_decoder(the_decoder(cfg), bb, SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0))


@pytest.fixture(scope="module")
def heads_dir(bb, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"heads_{bb.name}")
    g = torch.Generator().manual_seed(7)
    for name, cfg in [("medusa", HeadsConfig(num_horizontal=4, vertical=False)),
                      ("hawk", HeadsConfig(num_horizontal=4, vertical=True, vsd=2))]:
        heads = DraftHeads.for_backbone(cfg, bb)
        with torch.no_grad():  # drafts that are sometimes right, sometimes wrong
            for p in heads.blocks.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        heads.save(root / name)
    return root


@pytest.mark.parametrize("preset, tree", [("hawk", None), ("hawk", "gpu"), ("sjd", None),  # tree, big tree, chain
                                          pytest.param("medusa", None, marks=pytest.mark.slow),
                                          pytest.param("medusa", "chain", marks=pytest.mark.slow),
                                          pytest.param("hawk_jacobi", None, marks=pytest.mark.slow)])
def test_greedy_speculative_equals_greedy_ar(bb, heads_dir, preset, tree):
    s = SamplingConfig(temperature=0.0, top_k=0, cfg_scale=2.0)
    want = ar_generate(bb, PROMPTS, s)
    got = _decoder(bb, preset, tree, heads_dir).generate(PROMPTS, torch.Generator().manual_seed(0))
    assert torch.equal(got.tokens, want.tokens)
    assert got.forwards <= want.forwards


def test_heads_for_another_grid_are_refused(adapter, heads_dir):
    other = random_backbone(adapter, rows=4, cols=4, num_codes=32, seed=0)
    with pytest.raises(ValueError, match="grid") as err:
        DraftHeads.load(heads_dir / "hawk", other)
    assert "hawkspec-train" in str(err.value)


# every adapter in `make test-slow`; the embedded one in `make test` too (an enumeration + 3,000 decodes each)
@pytest.mark.parametrize("name", [pytest.param(a, marks=() if a == "tiny" else pytest.mark.slow) for a in ADAPTERS])
def test_exact_rule_is_lossless_through_the_adapter(name):
    """Hawk (sampled drafts, each with its own q, tried in turn) with the exact rule vs the enumerated target: 2x3 grid, 4 codes."""
    from hawkspec.decoding.engine import SpeculativeDecoder
    from hawkspec.decoding.proposers.config import proposer_from_config
    from hawkspec.decoding.tree import paths_from_budget
    from hawkspec.metrics.lossless import chi_square, image_distribution

    from hawkspec.testing import ExactByTries, random_heads  # ExactByTries: no point-mass shortcut

    bb = peaky(random_backbone(name, rows=2, cols=3, num_codes=4, seed=1), seed=0)
    s = SamplingConfig(temperature=1.0, top_k=3, cfg_scale=2.0)
    heads = random_heads(bb, scale=0.3)
    grids, probs = image_distribution(bb, PROMPTS[0], s)
    hawk = proposer_from_config("hawk", {"horizontal": heads, "vertical": heads}, sources__horizontal__draft="sample",
                                sources__vertical__draft="sample", sources__vertical__vsd=1)
    dec = SpeculativeDecoder(bb, hawk, ExactByTries(), s, paths_from_budget(6, 3, 3))
    samples = dec.generate([PROMPTS[0]] * 3000, torch.Generator().manual_seed(123)).codes.flatten(1)
    assert chi_square(samples, grids, probs) > 1e-3
