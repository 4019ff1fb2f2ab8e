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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.acceptance.base import AcceptanceRule
from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.proposers.base import Proposer
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, entropy, target_probs
from hawkspec.decoding.tree import TopologyTable
from hawkspec.decoding.walks import walk_longest


@dataclass
class StepStats:
    """Per-step counters kept while decoding (for metrics)."""

    steps: torch.Tensor  # (B,) tree forwards each row took part in while active
    accepted: torch.Tensor  # (B,) draft tokens accepted (forced excluded)
    committed: torch.Tensor  # (B,) body tokens committed by tree steps (forced and bonus included)


class SpeculativeDecoder:
    """Any proposer x any acceptance rule over one backbone.

    Args:
        backbone: The frozen target model.
        proposer: Where candidates come from.
        acceptance: How they are judged.
        sampling: AR's target distribution (CFG, temperature, top-k).
        paths: The tree's rank paths (:func:`hawkspec.decoding.tree.paths_from_budget` or explicit).
        max_tree_nodes: Refuse trees with more nodes than this (``decoder.tree.max_nodes``).
    """

    def __init__(
        self, backbone: Backbone, proposer: Proposer, acceptance: AcceptanceRule, sampling: SamplingConfig,
        paths: list[tuple[int, ...]], max_tree_nodes: int = 256,
    ):
        sampling.validate(backbone.num_codes)
        self.backbone, self.proposer, self.acceptance, self.sampling = backbone, proposer, acceptance, sampling
        self.table = TopologyTable(paths, backbone.grid)
        if self.table.num_nodes > max_tree_nodes:
            raise ValueError(
                f"the candidate tree has {self.table.num_nodes} nodes (forced tokens included), more than "
                f"decoder.tree.max_nodes={max_tree_nodes}: lower decoder.tree.budget or shorten decoder.tree.paths"
            )
        T = self.table.num_nodes
        # a chain (every node's parent is the node before it): verified without a loop over levels
        self.is_chain = T > 1 and bool(
            ((self.table.parent[:, 1:] == torch.arange(T - 1)) | ~self.table.valid[:, 1:]).all()
        ) and self.table.max_depth == T - 1
        device = backbone.code_token_ids.device
        self.table.to(device)
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

    def _walk_draw(self, y, cand, forced, node_ok, topo, active, anc, arT):
        """Point-mass trees (:meth:`AcceptanceRule.draw`): y (B, T) is the target's draw at every node. A node
        is accepted iff its token equals its parent's draw (forced nodes always) and so is every ancestor; the
        deepest accepted node ends the path and its draw is the bonus token. No loop over levels.
        ``anc`` (B, T, T) is the ancestor-or-self mask of each row's topology, ``arT`` = arange(T)."""
        tab = self.table
        T = y.shape[1]
        match = node_ok & (forced | (cand == y.gather(1, tab.parent[topo].clamp(min=0))))
        match[:, 0] = True
        on_path = ~(anc & ~match.unsqueeze(1)).any(-1)  # every ancestor-or-self matches
        on_path &= active.unsqueeze(1) | (arT == 0)
        key = torch.where(on_path, tab.depth[topo], T + tab.max_depth + 1)  # siblings never both match
        path = torch.argsort(key, dim=1)[:, : tab.max_depth + 1]
        n_path = on_path.sum(1)
        cur = path.gather(1, (n_path - 1).unsqueeze(1)).squeeze(1)
        return cur, path, n_path, y.gather(1, cur.unsqueeze(1)).squeeze(1)

    def _walk_tries(self, p, cand, pools, code_depth, rank, forced, node_ok, children, active, generator):
        """General trees: try the children of the current node in order with the acceptance rule against the
        residual; descend into the first accepted one. Returns the final residuals for the bonus draw."""
        tab = self.table
        B, dev = p.shape[0], p.device
        ar = torch.arange(B, device=dev)
        cur = torch.zeros(B, dtype=torch.long, device=dev)
        path = torch.zeros((B, tab.max_depth + 1), dtype=torch.long, device=dev)
        n_path = torch.ones(B, dtype=torch.long, device=dev)
        alive = active.clone()
        r = p[ar, cur]
        u = torch.rand((B, tab.max_depth, tab.num_children), generator=generator, device=dev)
        for level in range(tab.max_depth):
            moved = torch.zeros(B, dtype=torch.bool, device=dev)
            for i in range(tab.num_children):
                child = children[ar, cur, i]
                trying = alive & ~moved & (child >= 0)
                if not trying.any():
                    break
                child_c = child.clamp(min=0)
                trying &= node_ok[ar, child_c]
                acc = trying & forced[ar, child_c]  # forced tokens are accepted without a test
                test = trying & ~acc
                if test.any():
                    rows = test.nonzero().squeeze(1)
                    c = child_c[rows]
                    q = None if pools.q is None else pools.q[rows, code_depth[rows, c], rank[rows, c]]
                    ok, r_new = self.acceptance.try_candidate(r[rows], cand[rows, c], q, u[rows, level, i])
                    acc[rows] = ok
                    r[rows[~ok]] = r_new[~ok]
                cur = torch.where(acc, child_c, cur)
                moved |= acc
            if not moved.any():
                break
            path[moved, n_path[moved]] = cur[moved]
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
        u = torch.rand((B, T - 1), generator=generator, device=p.device)
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

    @torch.no_grad()
    def generate(
        self, prompts: list[str], generator: torch.Generator | None = None, progress: bool = False,
        track_entropy: bool = False,
    ) -> GenerationOutput:
        """Sample one image per prompt. Same arguments and output as :func:`hawkspec.decoding.ar.ar_generate`."""
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        bb, tab, s = self.backbone, self.table, self.sampling
        grid = bb.grid
        B, L, K = len(prompts), grid.length, bb.num_codes
        state, hidden = bb.prefill(bb.encode(prompts), cfg=s.use_cfg, reserve=L + tab.num_nodes)
        S = state.streams
        dev = hidden.device
        ar = torch.arange(B, device=dev)
        forced_body = grid.forced_mask().to(dev)
        eol = bb.eol_token_id if grid.eol else 0  # forced nodes exist only with an end-of-line token
        code_ids = bb.code_token_ids

        # one spare column (index L) takes the writes of rows/nodes that commit nothing: no nonzero() per step
        tokens = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
        codes = torch.full((B, L + 1), -1, dtype=torch.long, device=dev)
        accept_map = torch.zeros((B, L + 1), device=dev)
        forced_body = torch.cat([forced_body, forced_body.new_zeros(1)])
        stats = StepStats(*(torch.zeros(B, dtype=torch.long, device=dev) for _ in range(3)))
        ent_sum, ent_n = 0.0, 0

        # first token: exact sample from the prefill distribution, as in AR
        p0 = self.acceptance.target(target_probs(combine_cfg(bb.code_logits(hidden), S, s.cfg_scale), s))
        first = self.acceptance.bonus(p0, generator)
        codes[:, 0], tokens[:, 0] = first, code_ids[first]
        n = torch.ones(B, dtype=torch.long, device=dev)
        src_hidden = hidden[:B]  # conditional stream at the image-start token
        self.proposer.start(B, dev)
        observes = self.proposer.wants_accepted_hidden
        bar = tqdm(total=L * B, disable=not progress, desc=self.proposer.name, leave=False)
        bar.update(B)
        arT = torch.arange(tab.num_nodes, device=dev)
        eye = torch.eye(tab.num_nodes, dtype=torch.bool, device=dev)
        arA = torch.arange(tab.max_depth + 1, device=dev)

        while True:
            active = n < L
            if not active.any():
                break
            root_pos = (n - 1).clamp(max=L - 1)
            topo = tab.lookup(root_pos)  # (B,)
            depth, code_depth, rank = tab.depth[topo], tab.code_depth[topo], tab.rank[topo]  # (B, T)
            forced, valid = tab.forced[topo], tab.valid[topo]
            offset = self.code_offset[topo]
            code_pos = torch.where(offset >= 0, root_pos[:, None] + offset, -1)
            pools = self.proposer.propose(src_hidden, root_pos, code_pos, max(tab.pool_sizes), generator)
            slot = code_depth * pools.tokens.shape[-1] + rank  # (B, T) each node's flat index into the (J, P) pool
            cand = pools.tokens.flatten(1).gather(1, slot)  # (B, T) code of each node, -1 none
            cand[:, 0] = codes[ar, root_pos]
            node_ok = valid & (forced | (cand >= 0)) & active[:, None]
            node_ok[:, 0] = True
            node_tok = torch.where(forced, eol, code_ids[cand.clamp(min=0)])
            node_tok[:, 0] = tokens[ar, root_pos]
            anc = tab.mask[topo]  # (B, T, T) ancestors-or-self
            mask = (anc & node_ok.unsqueeze(1)) | eye

            h = bb.forward(state, node_tok.repeat(S, 1), tree_mask=mask.repeat(S, 1, 1), depth=depth.repeat(S, 1))
            p = target_probs(combine_cfg(bb.code_logits(h), S, s.cfg_scale), s)  # (B, T, K)
            if track_entropy:
                ent_sum += entropy(p[:, 0][active]).sum().item()
                ent_n += int(active.sum())
            p = self.acceptance.target(p)

            # ---- verification: walk every row's tree from the root
            y = self.acceptance.draw(p, generator) if pools.q is None else None
            if self.acceptance.independent:  # each candidate judged on its own; the longest accepted path wins
                cur, path, n_path, bonus = walk_longest(self.acceptance, p, cand, forced, node_ok, tab.parent[topo],
                                                        anc, depth, active, tab.max_depth, generator)
            elif y is not None:
                cur, path, n_path, bonus = self._walk_draw(y, cand, forced, node_ok, topo, active, anc, arT)
            else:
                if self.is_chain:
                    walk = self._walk_chain(p, cand, pools, slot, forced, node_ok, active, ar, arA, generator)
                else:
                    walk = self._walk_tries(p, cand, pools, code_depth, rank, forced, node_ok, tab.children[topo],
                                            active, generator)
                cur, path, n_path, r = walk
                bonus = self.acceptance.bonus(r, generator)

            # ---- commit the accepted path (root excluded: committed last step) and the bonus token
            path_ok = arA < n_path[:, None]  # (B, A)
            pos = root_pos[:, None] + depth.gather(1, path)  # (B, A) body positions
            commit = path_ok & active[:, None]
            commit[:, 0] = False
            path_forced = forced.gather(1, path)
            last_pos = root_pos + depth.gather(1, cur[:, None]).squeeze(1)
            bonus_pos = last_pos + 1
            need = active & (bonus_pos < L)
            bonus_forced = forced_body[bonus_pos]
            where_to = torch.cat([torch.where(commit, pos, L), torch.where(need, bonus_pos, L)[:, None]], dim=1)
            tokens.scatter_(1, where_to, torch.cat(
                [node_tok.gather(1, path), torch.where(bonus_forced, eol, code_ids[bonus])[:, None]], dim=1))
            codes.scatter_(1, where_to, torch.cat(
                [torch.where(path_forced, -1, cand.gather(1, path)), torch.where(bonus_forced, -1, bonus)[:, None]],
                dim=1))
            accept_map.scatter_(1, where_to[:, :-1], 1.0)

            n_new = torch.where(need, bonus_pos + 1, torch.where(active, last_pos + 1, n))
            stats.steps += active.long()
            stats.committed += n_new - n
            stats.accepted += (commit & ~path_forced).sum(1)
            if progress:  # reading the count waits for the device; skip it when nobody watches
                bar.update(int((n_new - n).sum()))
            n = n_new

            if self.proposer.wants_tree_outputs:
                node_pos = torch.where(node_ok & active[:, None], root_pos[:, None] + depth, -1)
                self.proposer.observe_tree(p, node_pos, codes[:, :L], generator, chain=self.is_chain)
            count = torch.where(active, n_path, 0)
            bb.compact(state, path.repeat(S, 1), count.repeat(S), prefix=self.is_chain)
            h_cond = h[:B]
            if observes:
                acc_hidden = h_cond.gather(1, path.unsqueeze(-1).expand(-1, -1, h_cond.shape[-1]))  # (B, A, d)
                self.proposer.observe(acc_hidden, torch.where(path_ok & active[:, None], pos, -1), count)
            src_hidden = torch.where(active[:, None], h_cond[ar, cur], src_hidden)
        bar.close()

        code_positions = grid.code_positions().to(dev)
        forwards = 1 + stats.steps
        return GenerationOutput(
            codes=codes[:, code_positions].view(B, grid.rows, grid.cols),
            tokens=tokens[:, :L],
            forwards=int(forwards.max()),
            forwards_per_image=forwards.cpu(),
            accepted_tokens=stats.accepted.cpu(),
            accept_map=accept_map[:, code_positions].view(B, grid.rows, grid.cols).cpu(),
            mean_entropy=ent_sum / max(ent_n, 1) if track_entropy else None,
            extras={"committed": stats.committed.cpu(), "steps": stats.steps.cpu()},
        )
