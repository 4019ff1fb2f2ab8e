"""The speculative decoding engine: propose -> tree -> one forward -> verify -> commit. Method-agnostic.

One step, for a batch of images at different body positions (each row ``b`` has committed ``n[b]`` body
tokens; the last one, the *root*, is committed but not yet forwarded):

1. The proposer fills candidate pools for the next codes from the hidden state at the last forwarded token.
2. Each row's tree topology (rank paths with forced end-of-line tokens spliced in, :mod:`.tree`) is gathered
   and its nodes take their tokens from the pools.
3. One backbone forward over every row's tree (both CFG streams, 4-D tree mask, depth position ids).
4. Walk each tree from the root: children are tried in order with the acceptance rule against the residual
   target; an accepted child is descended into. The bonus token is drawn from the last residual.
5. Commit the accepted path and the bonus; compact the KV cache to root + accepted path; the next drafts
   come from the hidden state at the last accepted node — no extra forward.

The first token of every image is sampled exactly from the prefill's distribution, like AR.

Rows in flight (spatial Jacobi): a proposer with a lane (``Proposer.lane_width``) gets ``M`` more nodes in step 3's
forward, one row below the root, that see the committed tokens and each other but no tree node; their targets go
to the proposer with the tree's (step 5) and never to the walk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.acceptance.base import AcceptanceRule
from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.proposers.base import Pools, Proposer
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, entropy, target_probs, uniform
from hawkspec.decoding.static import ROUND_CAPACITY
from hawkspec.decoding.tree import TopologyTable, select_subtree
from hawkspec.decoding.walks import walk_longest, walk_longest_row


@dataclass
class StepStats:
    """Per-step counters kept while decoding (for metrics)."""

    steps: torch.Tensor  # (B,) tree forwards each row took part in while active
    accepted: torch.Tensor  # (B,) draft tokens accepted (forced excluded)
    committed: torch.Tensor  # (B,) body tokens committed by tree steps (forced and bonus included)


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
    """

    def __init__(
        self, backbone: Backbone, proposer: Proposer, acceptance: AcceptanceRule, sampling: SamplingConfig,
        paths: list[tuple[int, ...]], max_tree_nodes: int = 256, dynamic_nodes: int | None = None,
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
        self.runner = None  # a hawkspec.decoding.static.StepRunner: compiled / graph-captured steps
        self.forward_nodes = dynamic_nodes or T  # nodes per row in every tree forward
        self.lane = int(getattr(proposer, "lane_width", 0))  # rows in flight: lane nodes after the tree
        self.path_width = min(self.forward_nodes, self.table.max_depth + 1)  # the longest accepted path, root included
        # a chain (every node's parent is the node before it): verified without a loop over levels
        self.is_chain = T > 1 and bool(
            ((self.table.parent[:, 1:] == torch.arange(T - 1)) | ~self.table.valid[:, 1:]).all()
        ) and self.table.max_depth == T - 1
        device = backbone.code_token_ids.device
        self.table.to(device)
        if self.lane:  # the lane's causal block, made once (each step masks it by the nodes that exist)
            self._lane_tril = torch.ones(self.lane, self.lane, dtype=torch.bool, device=device).tril()
            self._lane_eye = torch.eye(self.lane, dtype=torch.bool, device=device)
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

    def _walk_draw(self, y, t: "_Tree", active, arT):
        """Point-mass trees (:meth:`AcceptanceRule.draw`): y (B, T) is the target's draw at every node. A node
        is accepted iff its token equals its parent's draw (forced nodes always) and so is every ancestor; the
        deepest accepted node ends the path and its draw is the bonus token. No loop over levels.
        ``t.anc`` (B, T, T) is each row's ancestor-or-self mask, ``arT`` = arange(T)."""
        tab = self.table
        T = y.shape[1]
        match = t.node_ok & (t.forced | (t.cand == y.gather(1, t.parent.clamp(min=0))))
        match[:, 0] = True
        on_path = ~(t.anc & ~match.unsqueeze(1)).any(-1)  # every ancestor-or-self matches
        on_path &= active.unsqueeze(1) | (arT == 0)
        key = torch.where(on_path, t.depth, T + tab.max_depth + 1)  # siblings never both match
        path = torch.argsort(key, dim=1)[:, : self.path_width]
        n_path = on_path.sum(1)
        cur = path.gather(1, (n_path - 1).unsqueeze(1)).squeeze(1)
        return cur, path, n_path, y.gather(1, cur.unsqueeze(1)).squeeze(1)

    def _walk_tries(self, p, cand, pools, code_depth, rank, forced, node_ok, children, active, generator):
        """General trees: try the children of the current node in order with the acceptance rule against the
        residual; descend into the first accepted one. Returns the final residuals for the bonus draw.

        Every (level, child) slot is tried for every row at once and the rows that were not really trying it are
        masked out (each row's uniform for a slot is drawn up front, so masking changes no decision). Eager, the
        loops stop as soon as no row is left trying (one read-back per slot); under a compiled or graph-captured
        step they run their bounded length and read nothing back."""
        tab = self.table
        B, dev = p.shape[0], p.device
        ar = torch.arange(B, device=dev)
        cur = torch.zeros(B, dtype=torch.long, device=dev)
        path = torch.zeros((B, self.path_width), dtype=torch.long, device=dev)
        n_path = torch.ones(B, dtype=torch.long, device=dev)
        alive = active.clone()
        r = p[ar, cur]
        u = uniform((B, tab.max_depth, tab.num_children), generator, dev)
        eager = self.runner is None
        for level in range(tab.max_depth):
            moved = torch.zeros(B, dtype=torch.bool, device=dev)
            for i in range(tab.num_children):
                child = children[ar, cur, i]
                child_c = child.clamp(min=0)
                trying = alive & ~moved & (child >= 0) & node_ok[ar, child_c]
                if eager and not trying.any():  # children are packed first: nobody tries a later one either
                    break
                acc = trying & forced[ar, child_c]  # forced tokens are accepted without a test
                test = trying & ~acc
                q = None if pools.q is None else pools.q[ar, code_depth[ar, child_c], rank[ar, child_c]]
                ok, r_new = self.acceptance.try_candidate(r, cand[ar, child_c].clamp(min=0), q, u[:, level, i])
                acc |= test & ok
                r = torch.where((test & ~ok).unsqueeze(-1), r_new, r)
                cur = torch.where(acc, child_c, cur)
                moved |= acc
            if eager and not moved.any():
                break
            slot = n_path.clamp(max=self.path_width - 1).unsqueeze(1)
            path.scatter_(1, slot, torch.where(moved, cur, path.gather(1, slot).squeeze(1)).unsqueeze(1))
            n_path += moved.long()
            r = torch.where(moved.unsqueeze(-1), p[ar, cur], r)
            alive &= moved
        return cur, path, n_path, r

    def _walk_chain(self, p, cand, pools, slot, forced, node_ok, active, ar, arA, generator):
        """Chains (SJD's window: every node has at most one child, node i + 1 under node i): each node is tried
        against its parent's untouched target, so every test runs at once and the path is the run of leading
        acceptances. Same decisions and residuals as :meth:`_walk_tries`, without a loop over levels.
        ``slot`` (B, T) is each node's flat index into the (J, P) pool; ``ar``, ``arA`` = arange(B), arange(A)."""
        B, T, K = p.shape
        x = cand[:, 1:]  # (B, T-1) node i+1 judged by node i's target
        r = p[:, :-1]
        q = None
        if pools.q is not None:
            q = pools.q.flatten(1, 2).gather(1, slot[:, 1:, None].expand(-1, -1, K)).reshape(-1, K)
        u = uniform((B, T - 1), generator, p.device)
        ok, r_new = self.acceptance.try_candidate(r.reshape(-1, K), x.clamp(min=0).reshape(-1), q, u.reshape(-1))
        tried = node_ok[:, 1:] & active[:, None]
        acc = tried & (forced[:, 1:] | ok.view(B, T - 1))
        n_acc = acc.long().cumprod(1).sum(1)  # (B,) leading acceptances
        n_path = n_acc + 1
        path = torch.where(arA < n_path[:, None], arA, 0)
        cur = n_acc
        # the bonus comes from the residual of the rejected child, or from the target where nothing was tried
        nxt = cur.clamp(max=T - 2)
        rejected = (cur < T - 1) & tried.gather(1, nxt[:, None]).squeeze(1)
        r_final = torch.where(rejected[:, None], r_new.view(B, T - 1, K)[ar, nxt], p[ar, cur])
        return cur, path, n_path, r_final

    @property
    def lossless(self) -> bool:
        return self.acceptance.lossless

    def describe(self) -> dict:
        return {
            "name": self.name, "proposer": self.proposer.describe(), "acceptance": self.acceptance.describe(),
            "lossless": self.lossless, "tree_nodes": self.table.num_nodes, "tree_paths": len(self.table.paths),
        }

    # ------------------------------------------------------------------------------------------- the loop
    @torch.no_grad()
    def generate(
        self, prompts: list[str], generator: torch.Generator | None = None, progress: bool = False,
        track_entropy: bool = False,
    ) -> GenerationOutput:
        """Sample one image per prompt. Same arguments and output as :func:`hawkspec.decoding.ar.ar_generate`.

        Each step is five named stages: :meth:`propose`, :meth:`build_tree`, :meth:`forward_tree`,
        :meth:`verify`, :meth:`commit`."""
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        run = self.start(prompts, generator, track_entropy)
        bar = tqdm(total=run.L * run.B, disable=not progress, desc=self.proposer.name, leave=False)
        bar.update(run.B)
        if self.runner is not None:
            self._static_loop(run, generator, bar)
        else:
            while run.active.any():  # the one host sync of a step
                committed = self.step(run, generator)
                if progress:  # reading the count waits for the device; skip it when nobody watches
                    bar.update(int(committed.sum()))
        bar.close()
        return self.finish(run)

    def step(self, run: "_Run", generator) -> torch.Tensor:
        """One step over every row (rows already done take part without committing anything): the five stages.
        Returns (B,) the body tokens committed per row; ``run.active`` (set by :meth:`start` and :meth:`commit`)
        says which rows still decode."""
        pools = self.propose(run, generator)
        tree = self.build_tree(run, pools)
        h, p = self.forward_tree(run, tree)  # the tree's nodes (the lane's targets wait in tree.lane_p)
        verdict = self.verify(run, tree, p, generator)
        run.committed = self.commit(run, tree, verdict, h, p, generator)
        return run.committed

    def _static_loop(self, run: "_Run", generator, bar) -> None:
        """Steps through :attr:`runner` (compiled and/or replayed from a CUDA graph). The host reads the
        committed counts only between stretches of steps: a step commits at most ``path_width`` tokens per row,
        so ``ceil(remaining / path_width)`` steps never overshoot the last row's end. The state a step keeps:
        the run and the proposer's declared :meth:`~hawkspec.decoding.proposers.Proposer.state`."""
        roots = {"run": run, "proposer": self.proposer}
        self.runner.begin(roots)
        done = int(run.B)
        while True:
            left = (run.L - run.n).clamp(min=0)
            remaining, total = torch.stack([left.max(), left.sum()]).tolist()  # one read-back per stretch
            bar.update(run.L * run.B - total - done)
            done = run.L * run.B - total
            if remaining == 0:
                return
            for _ in range(-(-remaining // self.path_width)):
                self.runner.step("tree", self.step, (run,), roots, generator)

    # ------------------------------------------------------------------------------------------- stages
    def start(self, prompts: list[str], generator, track_entropy: bool = False) -> "_Run":
        """Prefill both CFG streams (KV reserved once for the body and the largest tree) and sample the first
        code exactly from the prefill's distribution, as AR does."""
        bb, s, grid = self.backbone, self.sampling, self.backbone.grid
        B, L = len(prompts), grid.length
        state, hidden = bb.prefill(bb.encode(prompts), cfg=s.use_cfg, reserve=L + self.forward_nodes + self.lane,
                                   round_to=1 if self.runner is None else ROUND_CAPACITY, generator=generator)
        dev = hidden.device
        run = _Run(B=B, L=L, S=state.streams, state=state, device=dev, track_entropy=track_entropy,
                   eol=bb.eol_token_id if grid.eol else 0, num_nodes=self.forward_nodes,
                   max_depth=self.path_width - 1)
        # one spare column (index L) takes the writes of rows/nodes that commit nothing: no nonzero() per step
        run.tokens = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
        run.codes = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
        run.accept_map = torch.zeros((B, L + 1), device=dev)
        run.forced_body = torch.cat([grid.forced_mask().to(dev), torch.zeros(1, dtype=torch.bool, device=dev)])
        run.stats = StepStats(*(torch.zeros(B, dtype=torch.long, device=dev) for _ in range(3)))
        p0 = self.acceptance.target(target_probs(combine_cfg(bb.code_logits(hidden), run.S, s.cfg_scale), s))
        first = self.acceptance.bonus(p0, generator)
        run.codes[:, 0], run.tokens[:, 0] = first, bb.code_token_ids[first]
        run.n = torch.ones(B, dtype=torch.long, device=dev)
        run.active = run.n < L
        # conditional stream after the image-start sequence; contiguous, so every batch has the same strides
        run.src_hidden = hidden[:B].clone(memory_format=torch.contiguous_format)
        run.ent_sum = torch.zeros((), device=dev)
        run.ent_n = torch.zeros((), dtype=torch.long, device=dev)
        self.proposer.start(B, dev)
        return run

    def propose(self, run: "_Run", generator) -> Pools:
        """Stage 1: the proposer's candidate pools for the next code depths of every row, (B, J, P), from the
        hidden state at each row's last forwarded token (``run.src_hidden``, (B, d))."""
        tab = self.table
        run.root_pos = (run.n - 1).clamp(max=run.L - 1)  # (B,) the last committed body position
        run.topo = tab.lookup(run.root_pos)  # (B,) each row's tree topology (forced tokens spliced in)
        offset = self.code_offset[run.topo]  # (B, J)
        code_pos = torch.where(offset >= 0, run.root_pos[:, None] + offset, -1)
        return self.proposer.propose(run.src_hidden, run.root_pos, code_pos, max(tab.pool_sizes), generator)

    def build_tree(self, run: "_Run", pools: Pools) -> "_Tree":
        """Stage 2: every row's tree -- node tokens from the pools (forced end-of-line tokens in place), the
        4-D mask of ancestors among the valid nodes, depth position offsets. All (B, T) or (B, T, T)."""
        tab, topo, ar = self.table, run.topo, run.ar
        t = _Tree(pools=pools, depth=tab.depth[topo], code_depth=tab.code_depth[topo], rank=tab.rank[topo],
                  forced=tab.forced[topo], anc=tab.mask[topo], parent=tab.parent[topo], children=tab.children[topo])
        t.slot = t.code_depth * pools.tokens.shape[-1] + t.rank  # each node's flat index into the (J, P) pool
        t.cand = pools.tokens.flatten(1).gather(1, t.slot)  # code of each node, -1 none
        t.cand[:, 0] = run.codes[ar, run.root_pos]
        t.node_ok = tab.valid[topo] & (t.forced | (t.cand >= 0)) & run.active[:, None]
        t.node_ok[:, 0] = True
        if self.dynamic_nodes:
            t = self._dynamic_subtree(t)
        t.node_tok = torch.where(t.forced, run.eol, self.backbone.code_token_ids[t.cand.clamp(min=0)])
        t.node_tok[:, 0] = run.tokens[ar, run.root_pos]
        t.mask = (t.anc & t.node_ok.unsqueeze(1)) | run.eye
        if self.lane:
            self._add_lane(run, t)
        return t

    def _add_lane(self, run: "_Run", t: "_Tree") -> None:
        """Rows in flight (spatial Jacobi): append the proposer's lane -- nodes one row below the root -- to the
        block. A lane node sees the root and the lane nodes before it, never the tree's drafts (row-causal); no tree
        node sees the lane, so the tree's targets are those of the tree alone. (B, T + M) tokens and depths."""
        B, T, M, dev = run.B, t.node_tok.shape[1], self.lane, run.device
        pos, code = self.proposer.lane(run.root_pos, run.codes[:, : run.L])  # (B, M) each
        ok = (pos >= 0) & run.active[:, None]
        t.lane_pos = torch.where(ok, pos, -1)
        tok = torch.where(code >= 0, self.backbone.code_token_ids[code.clamp(min=0)], run.eol)
        block_tok = torch.cat([t.node_tok, tok], dim=1)
        block_depth = torch.cat([t.depth, torch.where(ok, pos - run.root_pos[:, None], 0)], dim=1)
        mask = torch.zeros((B, T + M, T + M), dtype=torch.bool, device=dev)
        mask[:, :T, :T] = t.mask
        mask[:, T:, T:] = (self._lane_tril & ok[:, None, :]) | self._lane_eye
        mask[:, T:, 0] = ok  # the root: committed, forwarded in this block
        t.block = (block_tok, mask, block_depth)

    def _dynamic_subtree(self, t: "_Tree") -> "_Tree":
        """Keep each row's ``dynamic_nodes`` best nodes (by cumulative draft log-probability) of the superset tree,
        renumbered in order; parents, children and ancestor masks follow. (B, T) -> (B, n)."""
        logp = t.pools.logp
        if t.pools.q is not None:  # choosing among i.i.d. sampled siblings by their value would bias them
            raise ValueError(f"decoder.tree.dynamic ranks deterministic (top-k) drafts, but the {self.proposer.name!r} "
                             "proposer's are sampled; sampled drafts chosen by their own probability would no longer "
                             "be draws from q, and the exact rule would stop being lossless: draft top-k "
                             f"(`draft: topk` on {self.proposer.where()} or its sources; Jacobi drafts are always "
                             "sampled) or set the decoder's tree.dynamic=null")
        if logp is None:
            raise ValueError(f"decoder.tree.dynamic needs drafts with scores (Pools.logp); the "
                             f"{self.proposer.name!r} proposer gives none: set decoder.tree.dynamic=null")
        node_lp = torch.where(t.forced, 0.0, logp.flatten(1).gather(1, t.slot).float())
        node_lp[:, 0] = 0.0
        sel = select_subtree(node_lp, t.node_ok, t.anc, self.dynamic_nodes)  # (B, n)
        B, n, T = sel.shape[0], sel.shape[1], t.cand.shape[1]
        inv = torch.full((B, T), -1, dtype=torch.long, device=sel.device)
        inv.scatter_(1, sel, torch.arange(n, device=sel.device).expand(B, n))
        renum = lambda old: torch.where(old >= 0, inv.gather(1, old.clamp(min=0).flatten(1)).view(old.shape), -1)  # noqa: E731
        pick = lambda x: x.gather(1, sel)  # noqa: E731
        children = renum(t.children.gather(1, sel.unsqueeze(-1).expand(-1, -1, t.children.shape[-1])))
        children = children.gather(-1, torch.argsort((children < 0).to(torch.int8), dim=-1, stable=True))
        anc = t.anc.gather(1, sel.unsqueeze(-1).expand(-1, -1, T)).gather(2, sel.unsqueeze(1).expand(-1, n, -1))
        sub = _Tree(pools=t.pools, depth=pick(t.depth), code_depth=pick(t.code_depth), rank=pick(t.rank),
                    forced=pick(t.forced), anc=anc, parent=renum(pick(t.parent)), children=children)
        sub.slot, sub.cand, sub.node_ok = pick(t.slot), pick(t.cand), pick(t.node_ok)
        return sub

    def forward_tree(self, run: "_Run", tree: "_Tree") -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 3: one backbone forward over every row's tree, both CFG streams. Returns the hidden states
        (S*B, T, d) and the verification target at every node (B, T, K): AR's target (CFG, top-k,
        temperature), then the acceptance rule's view of it."""
        bb, s, S = self.backbone, self.sampling, run.S
        tok, mask, depth = tree.block if tree.block is not None else (tree.node_tok, tree.mask, tree.depth)
        h = bb.forward(run.state, tok.repeat(S, 1), tree_mask=mask.repeat(S, 1, 1), depth=depth.repeat(S, 1))
        p = target_probs(combine_cfg(bb.code_logits(h), S, s.cfg_scale), s)  # (B, T, K)
        if self.lane:  # the lane's targets are its drafts' q, the tree's verify
            T = h.shape[1] - self.lane
            h, p, tree.lane_p = h[:, :T], p[:, :T], p[:, T:]
        if run.track_entropy:  # on the device: no read-back in the step
            run.ent_sum += torch.where(run.active, entropy(p[:, 0]), 0.0).sum()
            run.ent_n += run.active.sum()
        return h, self.acceptance.target(p)

    def verify(self, run: "_Run", tree: "_Tree", p: torch.Tensor, generator) -> "_Verdict":
        """Stage 4: walk every row's tree from the root with the acceptance rule; the accepted path and the
        bonus token. The walk is chosen by what the rule and tree allow (same decisions either way):

        * independent rules (Medusa's typical): every node judged on its own, the longest accepted path;
        * ``longest_row`` rules (SJD-PAC as released): every node tried against its sibling-reduced residual,
          the longest accepted row (:func:`~hawkspec.decoding.walks.walk_longest_row`; lossy);
        * point-mass trees under a rule with the shortcut: one draw per node (:meth:`_walk_draw`);
        * chains: every node against its parent's untouched target at once (:meth:`_walk_chain`);
        * otherwise children tried in order against the residual (:meth:`_walk_tries`).
        """
        t, tab, rule, active = tree, self.table, self.acceptance, run.active
        shortcut = not rule.independent and t.pools.q is None and rule.point_mass_shortcut
        shortcut = shortcut and not rule.longest_row
        y = rule.draw(p, generator) if shortcut else None  # None: the rule declines the shortcut
        if rule.independent:
            cur, path, n_path, bonus = walk_longest(rule, p, t.cand, t.forced, t.node_ok, t.parent,
                                                    t.anc, t.depth, active, tab.max_depth, generator)
        elif rule.longest_row:
            q = None
            if t.pools.q is not None:
                K = p.shape[-1]
                q = t.pools.q.flatten(1, 2).gather(1, t.slot[..., None].expand(-1, -1, K))  # (B, T, K)
            full = tab.max_code_depth if getattr(rule, "full_row_bonus", "target") == "uniform" else None
            cur, path, n_path, r = walk_longest_row(rule, p, t.cand, q, t.forced, t.node_ok, t.children, t.anc,
                                                    t.depth, active, self.path_width, full, generator)
            bonus = rule.bonus(r, generator)
        elif y is not None:
            cur, path, n_path, bonus = self._walk_draw(y, t, active, run.arT)
        else:
            if self.is_chain:
                walk = self._walk_chain(p, t.cand, t.pools, t.slot, t.forced, t.node_ok, active, run.ar, run.arA,
                                        generator)
            else:
                walk = self._walk_tries(p, t.cand, t.pools, t.code_depth, t.rank, t.forced, t.node_ok,
                                        t.children, active, generator)
            cur, path, n_path, r = walk
            bonus = rule.bonus(r, generator)
        return _Verdict(cur=cur, path=path, n_path=n_path, bonus=bonus)

    def commit(self, run: "_Run", tree: "_Tree", v: "_Verdict", h: torch.Tensor, p: torch.Tensor,
               generator) -> torch.Tensor:
        """Stage 5: write the accepted path (the root was committed last step) and the bonus token, count,
        compact the KV cache to root + accepted path, and hand the proposer what it observes. The next drafts
        come from the hidden state at the last accepted node -- no extra forward. Returns (B,) the body tokens
        committed per row."""
        t, bb, active, L, B, S = tree, self.backbone, run.active, run.L, run.B, run.S
        path_ok = run.arA < v.n_path[:, None]  # (B, A)
        pos = run.root_pos[:, None] + t.depth.gather(1, v.path)  # (B, A) body positions
        commit = path_ok & active[:, None]
        commit[:, 0] = False
        path_forced = t.forced.gather(1, v.path)
        last_pos = run.root_pos + t.depth.gather(1, v.cur[:, None]).squeeze(1)
        bonus_pos = last_pos + 1
        need = active & (bonus_pos < L)
        bonus_forced = run.forced_body[bonus_pos]
        where_to = torch.cat([torch.where(commit, pos, L), torch.where(need, bonus_pos, L)[:, None]], dim=1)
        run.tokens.scatter_(1, where_to, torch.cat(
            [t.node_tok.gather(1, v.path), torch.where(bonus_forced, run.eol, bb.code_token_ids[v.bonus])[:, None]],
            dim=1))
        run.codes.scatter_(1, where_to, torch.cat(
            [torch.where(path_forced, -1, t.cand.gather(1, v.path)), torch.where(bonus_forced, -1, v.bonus)[:, None]],
            dim=1))
        run.accept_map.scatter_(1, where_to[:, :-1], 1.0)

        n_new = torch.where(need, bonus_pos + 1, torch.where(active, last_pos + 1, run.n))
        committed = n_new - run.n
        run.stats.steps += active.long()
        run.stats.committed += committed
        run.stats.accepted += (commit & ~path_forced).sum(1)
        run.n = n_new
        run.active = n_new < L  # the next step's rows (the commit's own writes above used this step's)

        if self.proposer.wants_tree_outputs:
            node_pos = torch.where(t.node_ok & active[:, None], run.root_pos[:, None] + t.depth, -1)
            if self.lane:  # the tree's nodes first: where both predict a position, the tree's draft is kept
                p, node_pos = torch.cat([p, t.lane_p], dim=1), torch.cat([node_pos, t.lane_pos], dim=1)
            self.proposer.observe_tree(p, node_pos, run.codes[:, :L], generator, chain=self.is_chain and not self.lane)
        count = torch.where(active, v.n_path, 0)
        bb.compact(run.state, v.path.repeat(S, 1), count.repeat(S), prefix=self.is_chain)
        h_cond = h[:B]
        if self.proposer.wants_accepted_hidden:
            acc_hidden = h_cond.gather(1, v.path.unsqueeze(-1).expand(-1, -1, h_cond.shape[-1]))  # (B, A, d)
            self.proposer.observe(acc_hidden, torch.where(path_ok & active[:, None], pos, -1), count)
        run.src_hidden = torch.where(active[:, None], h_cond[run.ar, v.cur], run.src_hidden)
        return committed

    def finish(self, run: "_Run") -> GenerationOutput:
        """The codes, tokens and counters of the batch."""
        grid, B = self.backbone.grid, run.B
        code_positions = grid.code_positions().to(run.device)
        stats = run.stats
        forwards = 1 + stats.steps
        return GenerationOutput(
            codes=run.codes[:, code_positions].view(B, grid.rows, grid.cols),
            tokens=run.tokens[:, : run.L],
            forwards=int(forwards.max()),
            forwards_per_image=forwards.cpu(),
            accepted_tokens=stats.accepted.cpu(),
            accept_map=run.accept_map[:, code_positions].view(B, grid.rows, grid.cols).cpu(),
            mean_entropy=float(run.ent_sum) / max(int(run.ent_n), 1) if run.track_entropy else None,
            extras={"committed": stats.committed.cpu(), "steps": stats.steps.cpu()},
        )


@dataclass
class _Run:
    """What one :meth:`SpeculativeDecoder.generate` call carries from step to step (B rows, body length L)."""

    B: int
    L: int
    S: int  # CFG streams
    state: object  # the backbone's KVState
    device: torch.device
    eol: int
    num_nodes: int
    max_depth: int
    track_entropy: bool = False
    tokens: torch.Tensor | None = None  # (B, L+1) committed input ids, -1 not yet
    codes: torch.Tensor | None = None  # (B, L+1) committed codes, -1 forced / not yet
    accept_map: torch.Tensor | None = None  # (B, L+1) 1.0 where a draft was accepted
    forced_body: torch.Tensor | None = None  # (L+1,) forced positions
    stats: StepStats | None = None
    n: torch.Tensor | None = None  # (B,) committed body tokens
    src_hidden: torch.Tensor | None = None  # (B, d) hidden state at each row's last forwarded token
    active: torch.Tensor | None = None  # (B,) rows still decoding
    root_pos: torch.Tensor | None = None  # (B,) this step's root body position
    topo: torch.Tensor | None = None  # (B,) this step's topology index
    ent_sum: torch.Tensor | None = None  # () target entropy summed over the roots of active rows
    ent_n: torch.Tensor | None = None
    committed: torch.Tensor | None = None  # (B,) tokens the last step committed

    def __post_init__(self):
        dev = self.device
        self.ar = torch.arange(self.B, device=dev)
        self.arT = torch.arange(self.num_nodes, device=dev)
        self.arA = torch.arange(self.max_depth + 1, device=dev)
        self.eye = torch.eye(self.num_nodes, dtype=torch.bool, device=dev)


@dataclass
class _Tree:
    """One step's trees, (B, T) per node unless noted."""

    pools: Pools
    depth: torch.Tensor  # position offset from the root
    code_depth: torch.Tensor  # which pool depth the node draws from
    rank: torch.Tensor  # which pool entry
    forced: torch.Tensor  # forced end-of-line node
    anc: torch.Tensor  # (B, T, T) ancestors-or-self in the topology
    parent: torch.Tensor  # parent node, -1 for the root
    children: torch.Tensor  # (B, T, C) child nodes in verification order, -1 padded
    slot: torch.Tensor | None = None  # flat index into the (J, P) pool
    cand: torch.Tensor | None = None  # the node's code, -1 none
    node_ok: torch.Tensor | None = None  # node takes part (valid, has a candidate, row active)
    node_tok: torch.Tensor | None = None  # the node's input id
    mask: torch.Tensor | None = None  # (B, T, T) the tree attention mask
    block: tuple | None = None  # with a lane: what is forwarded, tokens (B, T + M), mask and depths
    lane_pos: torch.Tensor | None = None  # (B, M) body positions of the lane nodes, -1 none (rows in flight)
    lane_p: torch.Tensor | None = None  # (B, M, K) the target at each lane node (its prediction's q)


@dataclass
class _Verdict:
    """The outcome of :meth:`SpeculativeDecoder.verify`, per row."""

    cur: torch.Tensor  # (B,) the last accepted node
    path: torch.Tensor  # (B, A) accepted nodes from the root, padded
    n_path: torch.Tensor  # (B,) nodes on the path, root included
    bonus: torch.Tensor  # (B,) the bonus code drawn at ``cur``
