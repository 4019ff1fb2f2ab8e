"""The speculative decoding engine: locate -> propose -> tree -> one forward -> walk -> commit. Method-agnostic.

One step, for a batch of images at different body positions (each row ``b`` has committed ``n[b]`` body
tokens; the last one, the *root*, is committed but not yet forwarded), reads as :meth:`SpeculativeDecoder.step`:

1. :meth:`~SpeculativeDecoder.locate`: each row's root and tree topology (a :class:`~hawkspec.decoding.state.Step`).
2. :meth:`~SpeculativeDecoder.propose`: the proposer fills candidate pools for the next codes from the hidden
   state at the last forwarded token.
3. :meth:`~SpeculativeDecoder.build_tree`: each row's tree topology (rank paths with forced end-of-line tokens
   spliced in, :mod:`.tree`) is gathered and its nodes take their tokens from the pools (a
   :class:`~hawkspec.decoding.state.Tree`; EAGLE-2's dynamic trees keep a subtree, :meth:`Tree.select`).
4. :meth:`~SpeculativeDecoder.forward_tree`: one backbone forward over every row's tree (both CFG streams, 4-D
   tree mask, depth position ids).
5. The walk chosen at construction (:func:`hawkspec.decoding.walks.choose_walk`): each tree is walked from the
   root; children are tried with the acceptance rule against the residual target; an accepted child is descended
   into. The bonus token is drawn from the last residual (a :class:`~hawkspec.decoding.state.Verdict`).
6. Commit, in three stages: :meth:`~SpeculativeDecoder.write_tokens` (the accepted path and the bonus, counters),
   :meth:`~SpeculativeDecoder.notify_proposer` (what it observes), :meth:`~SpeculativeDecoder.advance_cache`
   (the KV cache compacted to root + accepted path; the next drafts come from the hidden state at the last
   accepted node -- no extra forward).

The first token of every image is sampled exactly from the prefill's distribution, like AR. Per-call constants
live in a frozen :class:`~hawkspec.decoding.state.Batch`, the tensors a step updates in a
:class:`~hawkspec.decoding.state.DecodeState`; every step runs through the decoder's
:class:`~hawkspec.decoding.static.StepRunner` (eager, compiled or replayed: one loop, the mode given at build time).

Rows in flight (spatial Jacobi): a proposer with a lane (``Proposer.lane_width``) gets ``M`` more nodes in step 4's
forward, one row below the root, that see the committed tokens and each other but no tree node; their targets go
to the proposer with the tree's (step 6) and never to the walk.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.acceptance.base import AcceptanceRule
from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.proposers.base import Pools, Proposer
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, entropy, target_probs
from hawkspec.decoding.state import Batch, DecodeState, Forward, Outcome, Step, StepStats, Tree, Verdict
from hawkspec.decoding.static import EAGER, ExecutionMode, StepRunner
from hawkspec.decoding.tree import TopologyTable, select_subtree
from hawkspec.decoding.walks import choose_walk


class SpeculativeDecoder:
    """Any proposer x any acceptance rule over one backbone (a :class:`~hawkspec.decoding.output.Decoder`).

    Args:
        backbone: The frozen target model.
        proposer: Where candidates come from: one :class:`~hawkspec.decoding.proposers.Proposer`, a composed
            :class:`~hawkspec.decoding.proposers.SpatialProposer` or a proposer that drafts alone.
        acceptance: How they are judged.
        sampling: AR's target distribution (CFG, temperature, top-k).
        paths: The tree's rank paths (:func:`hawkspec.decoding.tree.paths_from_budget` or explicit).
        max_tree_nodes: Refuse trees with more nodes than this (``decoder.tree.max_nodes``).
        dynamic_nodes: EAGLE-2's dynamic tree (``decoder.tree.dynamic``): every step each row forwards only the
            ``dynamic_nodes`` nodes of the ``paths`` tree with the highest cumulative draft probability
            (:func:`~hawkspec.decoding.tree.select_subtree`; needs a proposer that fills ``Pools.logp`` with
            top-k drafts). The choice depends on the deterministic drafts only, so the exact rule stays lossless
            (sampled drafts are refused: picking siblings by their value would bias them). None: the whole tree.
        mode: How steps run (``eval.compile``, ``eval.cuda_graphs``): the decoder's :attr:`runner` is made from it.
    """

    def __init__(
        self, backbone: Backbone, proposer: Proposer, acceptance: AcceptanceRule, sampling: SamplingConfig,
        paths: list[tuple[int, ...]], max_tree_nodes: int = 256, dynamic_nodes: int | None = None,
        mode: ExecutionMode = EAGER,
    ):
        sampling.validate(backbone.num_codes)
        self.backbone, self.proposer, self.acceptance, self.sampling = backbone, proposer, acceptance, sampling
        self.name = proposer.name  # the row name (build_decoder: the preset's)
        self.table = TopologyTable(paths, backbone.grid)
        if self.table.num_nodes > max_tree_nodes:
            raise ValueError(
                f"the candidate tree has {self.table.num_nodes} nodes (forced tokens included), more than "
                f"decoder.tree.max_nodes={max_tree_nodes}: lower decoder.tree.budget or shorten decoder.tree.paths"
            )
        T = self.table.num_nodes
        if dynamic_nodes is not None and not 2 <= dynamic_nodes <= T:
            raise ValueError(f"decoder.tree.dynamic={dynamic_nodes} must be between 2 and the tree's {T} nodes "
                             "(raise decoder.tree.budget for a larger superset tree)")
        self.dynamic_nodes = dynamic_nodes
        self.runner = StepRunner(mode, backbone)
        self.observers: list = []  # instrumentation (:meth:`observed`): told where each step proposes, change nothing
        self.forward_nodes = dynamic_nodes or T  # nodes per row in every tree forward
        self.lane = int(getattr(proposer, "lane_width", 0))  # rows in flight: lane nodes after the tree
        self.pool_size = max(self.table.pool_sizes)  # candidates per code depth every proposal asks for
        self.path_width = min(self.forward_nodes, self.table.max_depth + 1)  # the longest accepted path, root included
        # a chain (every node's parent is the node before it): verified without a loop over levels
        self.is_chain = T > 1 and bool(
            ((self.table.parent[:, 1:] == torch.arange(T - 1)) | ~self.table.valid[:, 1:]).all()
        ) and self.table.max_depth == T - 1
        device = backbone.code_token_ids.device
        self.table.to(device)
        self.walk = choose_walk(acceptance, self.table, self.path_width, self.is_chain, mode.static)
        # constants of every step, made once (their memory never moves: recorded graphs read them)
        self._eye = {n: torch.eye(n, dtype=torch.bool, device=device) for n in {T, self.forward_nodes, self.lane}}
        self._arA = torch.arange(self.path_width, device=device)
        self._aranges: dict[int, torch.Tensor] = {}  # arange(B) per batch size
        self._forced_body = torch.cat([backbone.grid.forced_mask().to(device),
                                       torch.zeros(1, dtype=torch.bool, device=device)])
        if self.lane:  # the lane's causal block (each step masks it by the nodes that exist)
            self._lane_tril = torch.ones(self.lane, self.lane, dtype=torch.bool, device=device).tril()
        proposer.scores = dynamic_nodes is not None  # only a dynamic tree reads the drafts' scores
        proposer.bind(backbone, sampling)
        acceptance.bind(backbone)
        # body offset of each code depth j in each topology (-1 if absent): (n_topos, J)
        J = self.table.max_code_depth
        self.code_offset = torch.full((len(self.table.topologies), J), -1, dtype=torch.long, device=device)
        for i, t in enumerate(self.table.topologies):
            for j in range(J):
                sel = (t.code_depth == j) & ~t.forced & (t.depth > 0)
                if sel.any():
                    self.code_offset[i, j] = t.depth[sel][0]

    @property
    def lossless(self) -> bool:
        return self.acceptance.lossless

    def describe(self) -> dict:
        return {
            "name": self.name, "proposer": self.proposer.describe(), "acceptance": self.acceptance.describe(),
            "lossless": self.lossless, "tree_nodes": self.table.num_nodes, "tree_paths": len(self.table.paths),
        }

    @contextlib.contextmanager
    def observed(self, observer):
        """Instrument the decoder while inside: ``observer.start(B, device)`` at every batch's start and
        ``observer.before_propose(hidden, at, pool_size)`` before every proposal (the acceptance maps' source
        attribution, :class:`hawkspec.analysis.acceptance.SourceRecorder`). An observer draws nothing from the
        decoding generator, so the images are the same."""
        self.observers.append(observer)
        try:
            yield observer
        finally:
            self.observers.remove(observer)

    # ------------------------------------------------------------------------------------------- the loop
    @torch.no_grad()
    def generate(
        self, prompts: list[str], generator: torch.Generator | None = None, progress: bool = False,
        track_entropy: bool = False,
    ) -> GenerationOutput:
        """Sample one image per prompt. Same arguments and output as :func:`hawkspec.decoding.ar.ar_generate`.

        Steps (:meth:`step`) run through :attr:`runner` until every row is done; the state a static runner
        keeps in place is the :class:`~hawkspec.decoding.state.DecodeState`, its KV state and the proposer's
        declared :meth:`~hawkspec.decoding.proposers.Proposer.state`."""
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        batch, state = self.start(prompts, generator, track_entropy)
        bar = tqdm(total=batch.L * batch.B, disable=not progress, desc=self.proposer.name, leave=False)
        bar.update(batch.B)
        roots = {"state": state, "kv": state.kv, "proposer": self.proposer}
        self.runner.loop(self.step, (batch, state), roots, lambda: (batch.L - state.n).clamp(min=0),
                         self.path_width, generator, bar)
        bar.close()
        return self.finish(batch, state)

    def step(self, batch: Batch, state: DecodeState, rng) -> torch.Tensor:
        """One step over every row (rows already done take part without committing anything). Returns (B,) the
        body tokens committed per row; ``state.active`` says which rows still decode."""
        at = self.locate(batch, state)
        for observer in self.observers:
            observer.before_propose(state.hidden, at, self.pool_size)
        pools = self.propose(state, at, rng)
        tree = self.build_tree(batch, state, at, pools)
        fwd = self.forward_tree(batch, state, tree)
        out = self.outcome(at, tree, fwd, self.walk(tree, fwd.p, at.active, rng))
        committed = self.write_tokens(batch, state, out)
        self.notify_proposer(batch, state, out, rng)
        self.advance_cache(batch, state, out)
        return committed

    # ------------------------------------------------------------------------------------------- stages
    def start(self, prompts: list[str], generator, track_entropy: bool = False) -> tuple[Batch, DecodeState]:
        """Prefill both CFG streams (KV reserved once for the body and the largest tree) and sample the first
        code exactly from the prefill's distribution, as AR does."""
        bb, s, grid = self.backbone, self.sampling, self.backbone.grid
        B, L = len(prompts), grid.length
        kv, hidden = bb.prefill(bb.encode(prompts), cfg=s.use_cfg, reserve=L + self.forward_nodes + self.lane,
                                round_to=self.runner.mode.capacity_round, generator=generator)
        dev = hidden.device
        if B not in self._aranges:
            self._aranges[B] = torch.arange(B, device=dev)
        batch = Batch(B=B, L=L, S=kv.streams, device=dev, eol=bb.eol_token_id if grid.eol else 0,
                      forced_body=self._forced_body, ar=self._aranges[B], track_entropy=track_entropy)
        p0 = self.acceptance.target(target_probs(combine_cfg(bb.code_logits(hidden), batch.S, s.cfg_scale), s))
        first = self.acceptance.bonus(p0, generator)
        tokens = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
        codes = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
        codes[:, 0], tokens[:, 0] = first, bb.code_token_ids[first]
        n = torch.ones(B, dtype=torch.long, device=dev)
        state = DecodeState(
            kv=kv, tokens=tokens, codes=codes, accept_map=torch.zeros((B, L + 1), device=dev), n=n, active=n < L,
            # conditional stream after the image-start sequence; contiguous, so every batch has the same strides
            hidden=hidden[:B].clone(memory_format=torch.contiguous_format),
            stats=StepStats(*(torch.zeros(B, dtype=torch.long, device=dev) for _ in range(3))),
            ent_sum=torch.zeros((), device=dev), ent_n=torch.zeros((), dtype=torch.long, device=dev))
        self.proposer.start(B, dev)
        for observer in self.observers:
            observer.start(B, dev)
        return batch, state

    def locate(self, batch: Batch, state: DecodeState) -> Step:
        """Stage 1: each row's root (the last committed body position), its tree topology (forced tokens spliced
        in) and the body position of every speculated code depth."""
        root_pos = (state.n - 1).clamp(max=batch.L - 1)
        topo = self.table.lookup(root_pos)
        offset = self.code_offset[topo]  # (B, J)
        code_pos = torch.where(offset >= 0, root_pos[:, None] + offset, -1)
        return Step(root_pos=root_pos, topo=topo, code_pos=code_pos, active=state.active)

    def propose(self, state: DecodeState, at: Step, rng) -> Pools:
        """Stage 2: the proposer's candidate pools for the next code depths of every row, (B, J, P), from the
        hidden state at each row's last forwarded token (``state.hidden``, (B, d))."""
        return self.proposer.propose(state.hidden, at.root_pos, at.code_pos, self.pool_size, rng)

    def build_tree(self, batch: Batch, state: DecodeState, at: Step, pools: Pools) -> Tree:
        """Stage 3: every row's tree -- node tokens from the pools (forced end-of-line tokens in place), the
        4-D mask of ancestors among the valid nodes, depth position offsets. All (B, T) or (B, T, T)."""
        tab, topo, ar = self.table, at.topo, batch.ar
        code_depth, rank, forced = tab.code_depth[topo], tab.rank[topo], tab.forced[topo]
        slot = code_depth * pools.tokens.shape[-1] + rank  # each node's flat index into the (J, P) pool
        cand = pools.tokens.flatten(1).gather(1, slot)  # code of each node, -1 none
        cand[:, 0] = state.codes[ar, at.root_pos]
        node_ok = tab.valid[topo] & (forced | (cand >= 0)) & at.active[:, None]
        node_ok[:, 0] = True
        node_tok = torch.where(forced, batch.eol, self.backbone.code_token_ids[cand.clamp(min=0)])
        node_tok[:, 0] = state.tokens[ar, at.root_pos]
        anc = tab.mask[topo]
        tree = Tree(pools=pools, depth=tab.depth[topo], code_depth=code_depth, rank=rank, forced=forced, anc=anc,
                    parent=tab.parent[topo], children=tab.children[topo], slot=slot, cand=cand, node_ok=node_ok,
                    node_tok=node_tok, mask=(anc & node_ok.unsqueeze(1)) | self._eye[tab.num_nodes])
        if self.dynamic_nodes:
            tree = tree.select(self._dynamic_selection(tree), self._eye[self.forward_nodes])
        if self.lane:
            tree = self._add_lane(batch, state, at, tree)
        return tree

    def _add_lane(self, batch: Batch, state: DecodeState, at: Step, tree: Tree) -> Tree:
        """Rows in flight (spatial Jacobi): append the proposer's lane -- nodes one row below the root -- to the
        block. A lane node sees the root and the lane nodes before it, never the tree's drafts (row-causal); no tree
        node sees the lane, so the tree's targets are those of the tree alone. (B, T + M) tokens and depths."""
        B, T, M, dev = batch.B, tree.node_tok.shape[1], self.lane, batch.device
        pos, code = self.proposer.lane(at.root_pos, state.codes[:, : batch.L])  # (B, M) each
        ok = (pos >= 0) & at.active[:, None]
        tok = torch.where(code >= 0, self.backbone.code_token_ids[code.clamp(min=0)], batch.eol)
        block_tok = torch.cat([tree.node_tok, tok], dim=1)
        block_depth = torch.cat([tree.depth, torch.where(ok, pos - at.root_pos[:, None], 0)], dim=1)
        mask = torch.zeros((B, T + M, T + M), dtype=torch.bool, device=dev)
        mask[:, :T, :T] = tree.mask
        mask[:, T:, T:] = (self._lane_tril & ok[:, None, :]) | self._eye[M]
        mask[:, T:, 0] = ok  # the root: committed, forwarded in this block
        return tree.with_lane((block_tok, mask, block_depth), torch.where(ok, pos, -1))

    def _dynamic_selection(self, tree: Tree) -> torch.Tensor:
        """Each row's ``dynamic_nodes`` best nodes (by cumulative draft log-probability) of the superset tree,
        (B, n) in increasing order (:func:`~hawkspec.decoding.tree.select_subtree`)."""
        logp = tree.pools.logp
        if tree.pools.q is not None:  # choosing among i.i.d. sampled siblings by their value would bias them
            raise ValueError(f"decoder.tree.dynamic ranks deterministic (top-k) drafts, but the {self.proposer.name!r} "
                             "proposer's are sampled; sampled drafts chosen by their own probability would no longer "
                             "be draws from q, and the exact rule would stop being lossless: draft top-k "
                             f"(`draft: topk` on {self.proposer.where()} or its sources; Jacobi drafts are always "
                             "sampled) or set the decoder's tree.dynamic=null")
        if logp is None:
            raise ValueError(f"decoder.tree.dynamic needs drafts with scores (Pools.logp); the "
                             f"{self.proposer.name!r} proposer gives none: set decoder.tree.dynamic=null")
        node_lp = torch.where(tree.forced, 0.0, logp.flatten(1).gather(1, tree.slot).float())
        node_lp[:, 0] = 0.0
        return select_subtree(node_lp, tree.node_ok, tree.anc, self.dynamic_nodes)

    def forward_tree(self, batch: Batch, state: DecodeState, tree: Tree) -> Forward:
        """Stage 4: one backbone forward over every row's tree, both CFG streams: the hidden states (S*B, T, d)
        and the verification target at every node (B, T, K): AR's target (CFG, top-k, temperature), then the
        acceptance rule's view of it. The lane's targets (its drafts' q) are kept apart."""
        bb, s, S = self.backbone, self.sampling, batch.S
        tok, mask, depth = tree.forwarded
        h = self.runner.forward(state.kv, tok.repeat(S, 1), tree_mask=mask.repeat(S, 1, 1), depth=depth.repeat(S, 1))
        p = target_probs(combine_cfg(bb.code_logits(h), S, s.cfg_scale), s)  # (B, T, K)
        lane_p = None
        if self.lane:
            T = h.shape[1] - self.lane
            h, p, lane_p = h[:, :T], p[:, :T], p[:, T:]
        if batch.track_entropy:  # on the device: no read-back in the step
            state.ent_sum += torch.where(state.active, entropy(p[:, 0]), 0.0).sum()
            state.ent_n += state.active.sum()
        return Forward(h=h, p=self.acceptance.target(p), lane_p=lane_p)

    def outcome(self, at: Step, tree: Tree, fwd: Forward, verdict: Verdict) -> Outcome:
        """What the step decided, with the accepted path's body positions, made once for the commit stages."""
        path_pos = at.root_pos[:, None] + tree.depth.gather(1, verdict.path)  # (B, A)
        on_path = self._arA < verdict.n_path[:, None]
        return Outcome(at, tree, fwd, verdict, path_pos, on_path, torch.where(at.active, verdict.n_path, 0))

    def write_tokens(self, batch: Batch, state: DecodeState, out: Outcome) -> torch.Tensor:
        """Stage 6a: write the accepted path (the root was committed last step) and the bonus token, count, and
        advance the lengths and the active rows. Returns (B,) the body tokens committed per row."""
        t, v, active, L = out.tree, out.verdict, out.at.active, batch.L
        root_pos, pos = out.at.root_pos, out.path_pos
        commit = out.on_path & active[:, None]
        commit[:, 0] = False
        path_forced = t.forced.gather(1, v.path)
        last_pos = root_pos + t.depth.gather(1, v.cur[:, None]).squeeze(1)
        bonus_pos = last_pos + 1
        need = active & (bonus_pos < L)
        bonus_forced = batch.forced_body[bonus_pos]
        where_to = torch.cat([torch.where(commit, pos, L), torch.where(need, bonus_pos, L)[:, None]], dim=1)
        state.tokens.scatter_(1, where_to, torch.cat(
            [t.node_tok.gather(1, v.path),
             torch.where(bonus_forced, batch.eol, self.backbone.code_token_ids[v.bonus])[:, None]], dim=1))
        state.codes.scatter_(1, where_to, torch.cat(
            [torch.where(path_forced, -1, t.cand.gather(1, v.path)), torch.where(bonus_forced, -1, v.bonus)[:, None]],
            dim=1))
        state.accept_map.scatter_(1, where_to[:, :-1], 1.0)
        n_new = torch.where(need, bonus_pos + 1, torch.where(active, last_pos + 1, state.n))
        committed = n_new - state.n
        state.stats.steps += active.long()
        state.stats.committed += committed
        state.stats.accepted += (commit & ~path_forced).sum(1)
        state.n = n_new
        state.active = n_new < L  # the next step's rows (this step's stay in out.at.active)
        return committed

    def notify_proposer(self, batch: Batch, state: DecodeState, out: Outcome, rng) -> None:
        """Stage 6b: hand the proposer what it observes -- the target at every node (and the lane's) with the
        committed codes, and the hidden states along the accepted path."""
        t, v, active, root_pos = out.tree, out.verdict, out.at.active, out.at.root_pos
        if self.proposer.wants_tree_outputs:
            p = out.fwd.p
            node_pos = torch.where(t.node_ok & active[:, None], root_pos[:, None] + t.depth, -1)
            if self.lane:  # the tree's nodes first: where both predict a position, the tree's draft is kept
                p, node_pos = torch.cat([p, out.fwd.lane_p], dim=1), torch.cat([node_pos, t.lane_pos], dim=1)
            self.proposer.observe_tree(p, node_pos, state.codes[:, : batch.L], rng,
                                       chain=self.is_chain and not self.lane)
        if self.proposer.wants_accepted_hidden:
            acc_hidden = out.fwd.h[batch.ar[:, None], v.path]  # (B, A, d) the conditional stream's
            self.proposer.observe(acc_hidden, torch.where(out.on_path & active[:, None], out.path_pos, -1), out.count)

    def advance_cache(self, batch: Batch, state: DecodeState, out: Outcome) -> None:
        """Stage 6c: compact the KV cache to root + accepted path (a chain's path is already in place) and carry
        the hidden state at the last accepted node to the next step's drafts."""
        v, active, S = out.verdict, out.at.active, batch.S
        self.backbone.compact(state.kv, v.path.repeat(S, 1), out.count.repeat(S), prefix=self.is_chain)
        h_cond = out.fwd.h[: batch.B]
        state.hidden = torch.where(active[:, None], h_cond[batch.ar, v.cur], state.hidden)

    def finish(self, batch: Batch, state: DecodeState) -> GenerationOutput:
        """The codes, tokens and counters of the batch."""
        grid, B = self.backbone.grid, batch.B
        code_positions = grid.code_positions().to(batch.device)
        stats = state.stats
        forwards = 1 + stats.steps
        return GenerationOutput(
            codes=state.codes[:, code_positions].view(B, grid.rows, grid.cols),
            tokens=state.tokens[:, : batch.L],
            forwards=int(forwards.max()),
            forwards_per_image=forwards.cpu(),
            accepted_tokens=stats.accepted.cpu(),
            accept_map=state.accept_map[:, code_positions].view(B, grid.rows, grid.cols).cpu(),
            mean_entropy=float(state.ent_sum) / max(int(state.ent_n), 1) if batch.track_entropy else None,
            extras={"committed": stats.committed.cpu(), "steps": stats.steps.cpu()},
        )
