"""ZipAR (rows in flight): the official schedules on hand-worked grids, and its decisions against an uncached recompute.

The schedules are worked out by hand from the official code (``modeling_chameleon.py`` L1906-2070 for grids with an
end-of-line token, ``generate_zipar.py`` L124-273 without): which rows are open at each forward, which positions it
feeds (and from which token), and which position each output samples. The decisions are checked on tiny random
models of two adapters (one per schedule) with CFG: every greedy code equals the argmax of the target computed by
one uncached run of the whole written sequence in which each token sees the tokens written no later than it at
positions up to its own (the stand-in that a real token replaced no longer seen).
"""

import pytest
import torch
from hydra import initialize_config_dir

from hawkspec.backbones.base import ImageGrid
from hawkspec.cli.common import CONF_DIR
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.rows import RowsDecoder, RowsForward, zipar_schedule
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg
from hawkspec.decoding.static import ExecutionMode
from hawkspec.testing import compose, random_backbone, the_decoder

PROMPTS = ["a large red circle in the center", "a small blue square on the left on a plain white background"]
GREEDY = SamplingConfig(temperature=0, top_k=None, cfg_scale=3.0)


def test_lumina_schedule_by_hand():
    """3 x 3 codes, end-of-line tokens at 3, 7, 11 (W = 4), window 3 (counting the row's leading token)."""
    F = RowsForward
    assert zipar_schedule(ImageGrid(3, 3, eol=True), 3) == [
        F((-1,), (-1,), (0,)),  # the prefill: the image start predicts code 0; row 0 counts 2
        F((0,), (0,), (1,)),  # row 0 counts 3 = window: row 1 opens with row 0's end-of-line token (3)
        F((1, 3), (1, 3), (2, 4)),  # row 0 done (4 tokens): its last code is fed once more next
        F((2, 4), (2, 4), (None, 5)),  # 2: keys and values only; row 1 counts 3: row 2 opens with 7
        F((5, 7), (5, 7), (6, 8)),
        F((6, 8), (6, 8), (None, 9)),
        F((9,), (9,), (10,)),  # the last row's last code ends the image (its end-of-line token is forced)
    ]


def test_llamagen_schedule_by_hand():
    """3 x 4 codes, no end-of-line token (W = 4), window 2 (codes)."""
    F = RowsForward
    assert zipar_schedule(ImageGrid(3, 4, eol=False), 2) == [
        F((-1,), (-1,), (0,)), F((0,), (0,), (1,)), F((1,), (1,), (2,)), F((2,), (2,), (3,)),  # row 0: plain AR
        F((3,), (3,), (4,)),  # row 1 opens at once, fed by row 0's last code
        F((4,), (4,), (5,)),  # row 1 holds 2 codes: row 2 opens
        F((5, 7), (5, 3), (6, 8)),  # row 2's stand-in: row 0's latest code (3) at row 1's last column (7)
        F((6, 8), (6, 8), (7, 9)),  # row 1 done
        F((7, 9), (7, 9), (None, 10)),  # row 1's last code replaces the stand-in at 7 (keys and values only)
        F((10,), (10,), (11,)),
    ]


@pytest.mark.parametrize("rows, cols, eol", [(3, 3, True), (4, 6, True), (5, 4, False), (6, 6, False)])
def test_every_code_once_and_every_input_written_before(rows, cols, eol):
    grid = ImageGrid(rows, cols, eol)
    W = grid.tokens_per_row
    for window in range(2 if eol else 1, W + 1 if eol else W):
        sched = zipar_schedule(grid, window)
        emitted = [e for f in sched for e in f.emit if e is not None]
        assert sorted(emitted) == grid.code_positions().tolist(), window
        ready = {-1} | set(torch.nonzero(grid.forced_mask()).flatten().tolist())
        for f in sched:
            assert all(s in ready for s in f.source), (window, f)  # fed tokens exist when they are fed
            assert list(f.feed) == sorted(f.feed)  # raster order
            ready |= {e for e in f.emit if e is not None}


@pytest.mark.parametrize("rows, cols, window, expected", [
    (48, 48, 16, 15 * 47 + 48),  # Lumina-mGPT 768 px at its official window: 753 forwards against AR's 2,352
    (12, 12, 5, 4 * 11 + 12),  # the tiny model at its default
])
def test_lumina_forward_count(rows, cols, window, expected):
    """Row r's first code comes window - 1 forwards after row r - 1's: (window - 1)(rows - 1) + cols forwards."""
    assert len(zipar_schedule(ImageGrid(rows, cols, True), window)) == expected


def test_llamagen_forward_count():
    """Row 0 plain AR (W forwards), then a row every ``window`` forwards: 2W + (rows - 2) window."""
    assert len(zipar_schedule(ImageGrid(16, 16, False), 8)) == 2 * 16 + 14 * 8


def test_windows_out_of_range_are_refused():
    with pytest.raises(ValueError, match="window=1"):
        zipar_schedule(ImageGrid(3, 3, True), 1)
    with pytest.raises(ValueError, match="window=4"):
        zipar_schedule(ImageGrid(3, 4, False), 4)
    with pytest.raises(ValueError, match="end-of-line"):
        zipar_schedule(ImageGrid(3, 4, False), 2, "lumina")


def test_full_window_is_plain_ar():
    """Lumina's schedule with the window a whole row opens a row only when the one above is done: greedy AR."""
    bb = random_backbone("tiny", rows=3, cols=3, num_codes=32, seed=0)
    dec = RowsDecoder(bb, GREEDY, window=bb.grid.tokens_per_row)
    assert torch.equal(dec.generate(PROMPTS).tokens, ar_generate(bb, PROMPTS, GREEDY).tokens)


def _recompute_codes(bb, schedule, tokens: torch.Tensor) -> torch.Tensor:
    """Greedy codes of every emitted position from one uncached run of everything the schedule wrote, in order.

    Token t (fed at forward ``when[t]`` at body position ``where[t]``) sees the prompt and each token s with
    ``when[s] <= when[t]`` and ``where[s] <= where[t]``, unless a later write at s's position (no later than t's
    forward) replaced s. Returns (B, num_codes) codes in raster order.
    """
    enc = bb.encode(PROMPTS)
    embeds, mask, pos = bb.prefill_inputs(enc, cfg=True)
    N, P = mask.shape
    where, when, src = [], [], []
    for k, f in enumerate(schedule[1:], start=1):
        where += list(f.feed)
        src += list(f.source)
        when += [k] * len(f.feed)
    where, when = torch.tensor(where), torch.tensor(when)
    n = len(where)
    sees = (when[None, :] <= when[:, None]) & (where[None, :] <= where[:, None])
    for s in range(n):
        for t in range(n):
            later = (where == where[s]) & (when > when[s]) & (when <= when[t])
            if later.any():
                sees[t, s] = False
    embeds = torch.cat([embeds, bb.embed(tokens[:, src].repeat(2, 1))], dim=1)
    pos = torch.cat([pos, pos[:, -1:] + 1 + where[None]], dim=1)
    allowed = torch.zeros(N, P + n, P + n, dtype=torch.bool)
    allowed[:, :, :P] = mask.bool()[:, None, :]
    allowed[:, :P, :P] &= torch.ones(P, P, dtype=torch.bool).tril()
    allowed[:, P:, P:] = sees
    h = bb._run(embeds, bb._additive(allowed), pos).last_hidden_state  # (2B, P + n, d)
    codes = {}
    t = P - 1  # the prefill's last token predicts code 0
    offset = P
    for f in schedule:
        for i, e in enumerate(f.emit):
            row = t if f.feed == (-1,) else offset + i
            if e is not None:
                codes[e] = combine_cfg(bb.code_logits(h[:, row]), 2, GREEDY.cfg_scale).argmax(-1)
        if f.feed != (-1,):
            offset += len(f.feed)
    return torch.stack([codes[p] for p in sorted(codes)], dim=1)


@pytest.mark.parametrize("adapter, window", [("tiny", 3), ("tiny", 2), ("llamagen", 2), ("llamagen", 1)])
def test_decisions_equal_an_uncached_recompute(adapter, window):
    bb = random_backbone(adapter, rows=4, cols=4, num_codes=32, seed=0)
    dec = RowsDecoder(bb, GREEDY, window=window)
    out = dec.generate(PROMPTS)
    assert out.forwards == len(dec.schedule) < bb.grid.length  # rows in flight: fewer forwards than AR
    ref = _recompute_codes(bb, dec.schedule, out.tokens)
    assert torch.equal(out.codes.flatten(1), ref)
    assert not torch.equal(out.tokens, ar_generate(bb, PROMPTS, GREEDY).tokens)  # lossy: not AR's image


def test_sampling_is_seeded_and_every_code_is_drawn():
    bb = random_backbone("tiny", rows=4, cols=4, num_codes=32, seed=0)
    s = SamplingConfig(temperature=1.0, top_k=None, cfg_scale=3.0)
    dec = RowsDecoder(bb, s, window=3)
    a = dec.generate(PROMPTS, torch.Generator().manual_seed(1))
    b = dec.generate(PROMPTS, torch.Generator().manual_seed(1))
    c = dec.generate(PROMPTS, torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    forced = bb.grid.forced_mask()
    assert (a.tokens[:, forced] == bb.eol_token_id).all()
    assert (a.tokens[:, ~forced] == bb.code_token_ids[a.codes.flatten(1)]).all()


def test_preset_takes_the_backbones_window_and_refuses_whole_step_compiling():
    bb = random_backbone("tiny", rows=12, cols=12, num_codes=32, seed=0)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", ["eval.decoders=[ar,zipar]"])
        bad = compose("eval", ["eval.decoders=[zipar]", "eval.decoders.zipar.rows.window=1"])
    node = the_decoder(cfg, "zipar")
    dec = build_decoder(node, bb, GREEDY)
    assert dec.window == cfg.backbone.tuning.zipar.window == 5 and not dec.lossless and dec.name == "zipar"
    assert dec.describe()["rows_in_flight"] == {"method": "zipar", "schedule": "lumina", "window": 5,
                                                "forwards": 4 * 11 + 12}
    with pytest.raises(ValueError, match=r"eval.decoders.zipar.rows: window=1"):
        build_decoder(the_decoder(bad, "zipar"), bb, GREEDY)
    with pytest.raises(ValueError, match="eval.compile=step"):
        build_decoder(node, bb, GREEDY, mode=ExecutionMode("step"))


# --------------------------------------------------------------------------------------------------------- PJD
def _record_forwards(bb):
    """Wrap bb.forward: every call's body positions (relative to body position 0) and block mask."""
    calls, forward = [], bb.forward

    def recorded(state, input_ids, tree_mask=None, depth=None, positions=None):
        if positions is not None:
            calls.append(((positions[0] - recorded.base[0]).tolist(), tree_mask.clone()))
        return forward(state, input_ids, tree_mask=tree_mask, depth=depth, positions=positions)

    return calls, recorded


def _pjd_run(bb, dec, prompts, generator=None):
    calls, recorded = _record_forwards(bb)
    prefill = bb.prefill

    def prefill_and_base(*a, **k):
        state, h = prefill(*a, **k)
        recorded.base = state.next_pos.clone()
        return state, h

    bb.forward, bb.prefill = recorded, prefill_and_base
    try:
        out = dec.generate(prompts, generator)
    finally:
        del bb.forward, bb.prefill
    return out, calls


def test_pjd_with_rows_opening_only_when_the_row_above_is_done_is_greedy_ar():
    from hawkspec.decoding.rows import PJDDecoder

    bb = random_backbone("tiny", rows=4, cols=5, num_codes=32, seed=0)
    dec = PJDDecoder(bb, GREEDY, window=3, open_at=bb.grid.tokens_per_row)
    out = dec.generate(PROMPTS)
    assert torch.equal(out.tokens, ar_generate(bb, PROMPTS, GREEDY).tokens)


@pytest.mark.parametrize("window, open_at", [(3, 3), (4, 5), (8, 9)])
def test_pjd_schedule(window, open_at):
    """What every forward holds: the first forward row 0's window from code 0; row r + 1 joins (with row r's end-of-line
    token) only once row r holds open_at tokens; a lower row sees the upper rows' committed tokens, never their drafts,
    and never drafts past the column the row above has committed; windows at most `window` nodes."""
    from hawkspec.decoding.rows import PJDDecoder

    bb = random_backbone("tiny", rows=5, cols=8, num_codes=32, seed=0)
    W = bb.grid.tokens_per_row  # 9
    dec = PJDDecoder(bb, SamplingConfig(temperature=1.0, top_k=None, cfg_scale=2.0), window=window,
                     open_at=min(open_at, W))
    out, calls = _pjd_run(bb, dec, PROMPTS, torch.Generator().manual_seed(0))
    assert out.forwards == 1 + len(calls) < bb.grid.length and not dec.lossless
    assert calls[0][0] == list(range(min(window, W - 2)))
    seen_rows = {0}
    for pos, mask in calls:
        rows = [p // W if p % W != W - 1 else p // W + 1 for p in pos]  # an end-of-line token leads the next row
        groups = {}
        for i, r in enumerate(rows):
            groups.setdefault(r, []).append(i)
        for r, idx in groups.items():
            if r not in seen_rows:  # a new row: led by the end-of-line token of the row above, which holds open_at
                assert pos[idx[0]] == r * W - 1 and r - 1 in groups
                assert pos[groups[r - 1][0]] - (r - 1) * W >= open_at - 2 or r * W - 1 in pos[:1]
                seen_rows.add(r)
            assert len(idx) <= window + (1 if len(idx) == 1 else 0)
            assert [pos[i] for i in idx] == list(range(pos[idx[0]], pos[idx[0]] + len(idx)))  # contiguous
            if r - 1 in groups and len(groups[r - 1]) > 1:  # below an open row
                upper = groups[r - 1]
                assert not mask[idx][:, upper[1:]].any()  # never the drafts above
                assert mask[idx[-1], upper[0]]  # the last committed token above (before it in raster order)
                assert pos[idx[-1]] + 1 - r * W <= pos[upper[0]] - (r - 1) * W  # not past the column above
    assert seen_rows == set(range(bb.grid.rows))


def test_pjd_preset_takes_the_backbones_values():
    bb = random_backbone("tiny", rows=6, cols=6, num_codes=32, seed=0)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("eval", ["eval.decoders=[ar,pjd]"])
        lumina = compose("eval", ["backbone=lumina_mgpt", "eval.decoders=[ar,pjd]"])
    dec = build_decoder(the_decoder(cfg, "pjd"), bb, GREEDY)
    assert (dec.window, dec.open_at, dec.reuse) == (4, 5, 0.5) and not dec.lossless
    assert dict(lumina.eval.decoders.pjd.rows) == {"method": "pjd", "window": 8, "open_at": 9, "reuse": 0.5}
    out = dec.generate(PROMPTS, torch.Generator().manual_seed(0))
    assert out.forwards < bb.grid.length and (out.codes >= 0).all()


def _case():
    """Two drafts (codes 0, 1, one-hot q) and three nodes' targets over K = 3 codes, worked out by hand below."""
    pt = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]])
    c = torch.tensor([[0, 1]])
    q = torch.nn.functional.one_hot(c, 3).float()
    return pt, c, q


def _argmax(probs):
    return probs.argmax(-1)


def test_pjd_top_row_commits_the_residual_after_the_first_rejection():
    from hawkspec.decoding.rows import pjd_row

    pt, c, q = _case()
    # draft 0: min(1, 0.5 / 1) = 0.5 > u 0.4, accepted; draft 1: 0.6 < u 0.9, rejected; the residual at it is
    # max(p - q, 0) = (0.1, 0, 0.3): its draw (argmax here) 2. The last node drafts the next position from p = pt[2].
    out, carried = pjd_row(pt, c, q, torch.tensor([[0.4, 0.9]]), True, 0.5, True, _argmax)
    assert [int(x) for x in out] == [0, 2]
    assert len(carried) == 1 and int(carried[0][0]) == 2 and torch.equal(carried[0][1], pt[:, 2])
    out, carried = pjd_row(pt, c, q, torch.tensor([[0.1, 0.1]]), True, 0.5, True, _argmax)  # both pass
    assert [int(x) for x in out] == [0, 1, 2] and carried == []  # the last node's draw is committed, not carried


def test_pjd_lower_row_commits_no_residual_and_reuses_by_the_threshold():
    from hawkspec.decoding.rows import pjd_row

    pt, c, q = _case()
    out, carried = pjd_row(pt, c, q, torch.tensor([[0.4, 0.9]]), False, 0.5, True, _argmax)
    assert [int(x) for x in out] == [0]  # the accepted draft only
    # the rejected draft 1 stays: min(1, p/q) = 0.6 > 0.5, with its old (one-hot) q; then the next position from pt[2]
    assert int(carried[0][0]) == 1 and torch.equal(carried[0][1], q[:, 1])
    assert int(carried[1][0]) == 2 and torch.equal(carried[1][1], pt[:, 2])
    pt2 = pt.clone()
    pt2[0, 1] = torch.tensor([0.5, 0.4, 0.1])  # min(1, p/q) = 0.4 <= 0.5: replaced by y ~ p (argmax 0), q = p
    _, carried = pjd_row(pt2, c, q, torch.tensor([[0.4, 0.9]]), False, 0.5, False, _argmax)
    assert len(carried) == 1 and int(carried[0][0]) == 0 and torch.equal(carried[0][1], pt2[:, 1])


def test_pjd_batch_commits_its_smallest_count():
    from hawkspec.decoding.rows import pjd_row

    pt, c, q = _case()
    pt, c, q = pt.repeat(2, 1, 1), c.repeat(2, 1), q.repeat(2, 1, 1)
    # image 0 passes both drafts, image 1 only the first: the batch commits one draft, then the top row's extra
    # token -- image 0 its own accepted draft 1, image 1 the residual's draw 2
    out, _ = pjd_row(pt, c, q, torch.tensor([[0.1, 0.1], [0.1, 0.9]]), True, 0.5, True, _argmax)
    assert torch.stack(out, 1).tolist() == [[0, 1], [0, 2]]
