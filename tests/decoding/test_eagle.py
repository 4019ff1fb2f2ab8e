"""EAGLE: the draft layer's KV cache equals a full causal pass; the proposer feeds it the target's features and
codes at the right rows (plain and spatial); greedy EAGLE equals greedy AR; checkpoints refuse other backbones;
EAGLE-2's dynamic-tree selection."""

import math

import pytest
import torch

from hawkspec.decoding.acceptance import ExactAcceptance, GreedyAcceptance
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers import EagleProposer
from hawkspec.decoding.proposers.eagle import dynamic_tree_paths, pool_logp
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import normalize_paths, paths_from_budget
from hawkspec.heads.eagle import EagleConfig, EagleDrafter

PROMPTS = ["a red circle", "a blue square on the left"]


@pytest.fixture(scope="module")
def bb():
    from hawkspec.testing import build_random_backbone

    return build_random_backbone(rows=4, cols=4, num_codes=64, seed=5)


def drafter(bb, spatial: bool, seed: int = 0, scale: float = 0.05) -> EagleDrafter:
    m = EagleDrafter.for_backbone(EagleConfig(spatial=spatial), bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return m.eval()


@pytest.mark.parametrize("spatial", [False, True])
def test_cached_steps_equal_the_full_causal_pass(bb, spatial):
    """Rows fed in uneven chunks (with padded rows in the trash slot) give the training forward's outputs."""
    m = drafter(bb, spatial)
    L, d = bb.grid.length, bb.hidden_size
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn((2, L + 1, d), generator=g)
    codes = torch.randint(0, bb.num_codes, (2, L), generator=g)
    codes[:, m.is_forced(torch.arange(L))] = -1
    with torch.no_grad():
        full = m(hidden, codes)
        x = m.inputs(*m.sequence_inputs(hidden, codes))
        kv = m.new_cache(2, L)
        out = torch.zeros_like(full)
        start = torch.tensor([0, 0])
        for chunk in ([3, 1], [1, 4], [5, 2], [L, L]):
            stop = (start + torch.tensor(chunk)).clamp(max=L)
            M = int((stop - start).max())
            pos = start[:, None] + torch.arange(M)
            real = pos < stop[:, None]
            pos = torch.where(real, pos, L)
            y = m.step(x[torch.arange(2)[:, None], pos.clamp(max=L - 1)], pos, kv)
            out[torch.arange(2)[:, None].expand_as(pos)[real], pos[real]] = y[real]
            start = stop
    assert torch.allclose(out, full, atol=1e-5)


class Recording(EagleProposer):
    """Keeps every catch-up output f^_root with its root position."""

    def start(self, batch_size, device):
        super().start(batch_size, device)
        self.seen = []

    def catch_up(self, root_pos):
        f_hat = super().catch_up(root_pos)
        self.seen.append((root_pos.clone(), f_hat.clone()))
        return f_hat


@pytest.mark.parametrize("spatial", [False, True])
def test_proposer_reads_the_targets_features_and_codes(bb, spatial):
    """Greedy decoding: each step's f^_root equals the draft model run teacher-forced on the final image's
    target states, so the proposer put every accepted hidden state, code and above-row state at its row."""
    m = drafter(bb, spatial)
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=1.0)
    prop = Recording(drafter=m)
    out = SpeculativeDecoder(bb, prop, GreedyAcceptance(), s, paths_from_budget(6, 3, 2)).generate(PROMPTS)
    body = out.tokens  # (B, L) input ids
    hidden = bb.teacher_forced(bb.encode(PROMPTS), body)  # (B, L + 1, d)
    from hawkspec.cache.teacher import body_codes

    codes = body_codes(bb.grid, out.codes)
    with torch.no_grad():
        ref = m(hidden, codes)  # (B, L, d): row i = f^_i
    assert len(prop.seen) > 3
    L = bb.grid.length
    for root, f_hat in prop.seen:
        live = root < L - 1
        assert torch.allclose(f_hat[live], ref[live.nonzero().squeeze(1), root[live]], atol=1e-4)


@pytest.mark.parametrize("spatial, draft, cfg_scale", [
    (False, "topk", 3.0), (True, "topk", 3.0), (False, "sample", 3.0), (True, "sample", 1.0)])
def test_greedy_eagle_equals_greedy_ar(bb, spatial, draft, cfg_scale):
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=cfg_scale)
    dec = SpeculativeDecoder(bb, EagleProposer(drafter=drafter(bb, spatial), draft=draft), GreedyAcceptance(), s,
                             paths_from_budget(12, 4, 3))
    out, ref = dec.generate(PROMPTS), ar_generate(bb, PROMPTS, s)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.codes, ref.codes)


def test_save_load_round_trip_and_refusals(bb, tmp_path):
    from hawkspec.heads.draft import DraftHeads, HeadsConfig
    from hawkspec.testing import build_random_backbone

    m = drafter(bb, spatial=True)
    m.save(tmp_path / "eagle")
    back = EagleDrafter.load(tmp_path / "eagle", bb)
    assert back.config == m.config
    for k, v in m.trained_state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    other = build_random_backbone(rows=4, cols=4, num_codes=32, seed=5)
    with pytest.raises(ValueError, match="num_codes"):
        EagleDrafter.load(tmp_path / "eagle", other)
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=2, vertical=False), bb).save(tmp_path / "medusa")
    with pytest.raises(ValueError, match="kind"):
        EagleDrafter.load(tmp_path / "medusa", bb)
    with pytest.raises(FileNotFoundError, match="heads.safetensors"):
        EagleDrafter.load(tmp_path / "nothing", bb)
    with pytest.raises(ValueError, match="num_codes"):  # a drafter handed in directly is checked at bind
        SpeculativeDecoder(other, EagleProposer(drafter=m), ExactAcceptance(),
                           SamplingConfig(top_k=None).validate(other.num_codes), [(0,)])


# ------------------------------------------------------------------------------------------------- dynamic trees
def test_dynamic_tree_keeps_the_most_probable_prefix_closed_nodes():
    logp = torch.tensor([[0.6, 0.3, 0.1], [0.9, 0.05, 0.05], [0.6, 0.4, 0.0]]).log()
    paths, scores = dynamic_tree_paths(pool_logp(logp), budget=5, max_depth=3, expand=2, top_k=3)
    assert paths == normalize_paths(paths)  # prefix-closed and sorted like the engine's trees
    # cumulative probabilities: (0) .6, (0,0) .54, (0,0,0) .324, (1) .3, (1,0) .27; (0,0,2) has none
    assert paths == [(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]
    assert [round(math.exp(s), 4) for s in scores] == [0.6, 0.3, 0.54, 0.27, 0.324]


def test_dynamic_tree_expands_only_the_best_nodes_per_depth():
    """expand=1: only the best node of each depth gets children, so the tree is a chain with side leaves."""
    logp = torch.full((4, 3), 1 / 3).log()
    paths, _ = dynamic_tree_paths(pool_logp(logp), budget=100, max_depth=4, expand=1, top_k=3)
    assert len(paths) == 12
    assert all(p[:-1] == (0,) * (len(p) - 1) for p in paths)


def test_dynamic_tree_with_per_parent_children():
    """EAGLE-2 proper: each parent has its own children (here: rank 1 under (1,) is very likely)."""

    def child_logp(depth, parents):
        rows = []
        for p in parents:
            rows.append([0.5, 0.3, 0.2] if p != (1,) else [0.05, 0.9, 0.05])
        return torch.tensor(rows).log()

    paths, _ = dynamic_tree_paths(child_logp, budget=4, max_depth=2, expand=2, top_k=3)
    assert (1, 1) in paths and (0, 0) in paths and paths == normalize_paths(paths)


def test_dynamic_tree_bad_arguments():
    with pytest.raises(ValueError, match="budget"):
        dynamic_tree_paths(pool_logp(torch.zeros(2, 2)), budget=0, max_depth=2)


@pytest.mark.parametrize("spatial", [False, True])
def test_eagle_with_a_dynamic_tree_equals_greedy_ar(bb, spatial):
    """EAGLE-2: the 5 best nodes of a 12-path superset tree per row and step, ranked by the drafter's scores."""
    s = SamplingConfig(temperature=0, top_k=None, cfg_scale=3.0)
    dec = SpeculativeDecoder(bb, EagleProposer(drafter=drafter(bb, spatial)), GreedyAcceptance(), s,
                             paths_from_budget(12, 4, 3), dynamic_nodes=5)
    assert torch.equal(dec.generate(PROMPTS).tokens, ar_generate(bb, PROMPTS, s).tokens)
