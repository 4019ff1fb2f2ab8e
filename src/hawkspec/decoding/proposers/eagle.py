"""EAGLE: candidates drafted autoregressively by a one-layer draft model on the target's features.

Per step, with root ``r`` (committed, not yet forwarded; ``src_hidden`` = f_{r-1}):

1. *Catch-up*: the draft rows ``(f_{i-1}, x_i)`` of every body position committed since the last step, up to
   ``r``, run through the draft layer with the *target's* features (EAGLE's "stable" KV cache); its output at
   row ``r`` is the predicted feature f^_r, whose code-head distribution drafts ``x_{r+1}``.
2. *Drafting*: for the body positions ``r+1, r+2, ...`` up to the deepest code the tree speculates, the pool of
   that position is filled from the current draft distribution (its top-k, point masses; or i.i.d. samples,
   each carrying that distribution as q), the rank-0 candidate is fed back (a forced end-of-line token is fed
   as itself), and the draft layer predicts the next feature from its own previous one, extending its KV cache
   by one row (these rows are overwritten by the next catch-up: rewinds are free).

So the depth-j pool is drafted along the chain of the previous rank-0 drafts: exact for the chain of top
candidates and an approximation for the side branches of a static rank-path tree. Every candidate keeps the
distribution it came from, so the exact rule stays lossless whatever the tree.

The first step of an image drafts nothing: the engine does not tell proposers the root token, and EAGLE's first
draft row needs it (it learns the committed codes from :meth:`observe_tree` afterwards). That costs one forward
per image (see :func:`dynamic_tree_paths` and the engine hooks noted there).

*Spatial EAGLE* (``EagleConfig.spatial``): every draft row also reads f_{i+1-W}, the target state at the token
one row above the drafted one, from the accepted hidden states the proposer observes (or, past the committed
text, the draft's own predicted feature there).
"""

from __future__ import annotations

import heapq
from pathlib import Path

import torch

from hawkspec.backbones.base import check_identity
from hawkspec.decoding.proposers.base import DRAFTS, Pools, Proposer, check_choice
from hawkspec.decoding.sampling import sample, target_probs
from hawkspec.heads.eagle import EagleDrafter


class EagleProposer(Proposer):
    """Candidate pools from an EAGLE draft model: the ``eagle`` proposer alone, or a source of a composed one
    (``hawk_eagle``; :data:`~hawkspec.decoding.proposers.sources.EagleSource` is this class).

    Args:
        path: Folder of a saved :class:`EagleDrafter` (loaded at :meth:`bind`, checked against the backbone);
            ignored when ``drafter`` is given.
        drafter: A draft model (tests, notebooks).
        draft: One of :data:`~hawkspec.decoding.proposers.base.DRAFTS`: ``topk`` (deterministic candidates, point
            masses) or ``sample`` (i.i.d. draws from the draft distribution under the target's top-k/temperature,
            each with its q).
        spatial: When set, refuse a draft model whose ``spatial`` flag differs (a sweep over the flag must not
            silently decode with the other model); None takes the model as it is.
        key, path_key: Its config node and the config key of its checkpoint, named by every error
            (:class:`~hawkspec.decoding.proposers.Proposer`; ``build_decoder`` sets both, e.g.
            ``eval.decoders.eagle.proposer`` and ``eval.decoders.eagle.heads_path``).
    """

    name = kind = "eagle"
    wants_accepted_hidden = True
    wants_tree_outputs = True  # only for the committed codes (the draft rows need x_i)
    ready_pool = True
    state_names = ("kv.k", "kv.v", "feat", "tokens", "done", "codes")

    def __init__(self, path: str | None = None, drafter: EagleDrafter | None = None, draft: str = "topk",
                 spatial: bool | None = None, key: str | None = None, path_key: str | None = None):
        self.key, self.path_key = key, path_key
        self.draft = check_choice(draft, DRAFTS, self.where("draft"))
        self.path, self.drafter, self.spatial = path, drafter, spatial

    def bind(self, backbone, sampling, owner=None) -> None:
        super().bind(backbone, sampling, owner)
        if self.drafter is None:
            if not self.path:
                raise ValueError(f"`{self.checkpoint_key}` (the EAGLE draft model of `{self.where()}`) is not set: "
                                 "point it at a folder written by `hawkspec-train heads=eagle`")
            self.drafter = EagleDrafter.load(Path(self.path), backbone, self.checkpoint_key)
        check_identity(self.drafter.identity, backbone, "the EAGLE draft model",
                       f"Train it for this backbone or set `{self.checkpoint_key}` to a matching one.")
        if self.spatial is not None and self.drafter.config.spatial != self.spatial:
            raise ValueError(f"{self.where('spatial')}={self.spatial} but the draft model in {self.path} was trained "
                             f"with spatial={self.drafter.config.spatial}: point `{self.checkpoint_key}` at one "
                             f"trained with `heads.spatial={str(self.spatial).lower()}`")
        self.drafter.to(next(iter(backbone.buffers())).device).eval()
        self.grid = backbone.grid

    def start(self, batch_size: int, device: torch.device) -> None:
        m, L = self.drafter, self.grid.length
        self.kv = m.new_cache(batch_size, L)
        self.feat = torch.zeros((batch_size, L + 1, m.hidden_size), device=device, dtype=m.dtype)  # row i: f_{i-1}
        self.tokens = torch.zeros((batch_size, L + 1), dtype=torch.long, device=device)  # row L: trash
        self.done = torch.zeros(batch_size, dtype=torch.long, device=device)  # draft rows < done are in the cache
        self.codes = None  # the engine's committed codes, from observe_tree

    # ----------------------------------------------------------------------------------------- observations
    def observe(self, hidden, positions, count) -> None:
        B, A, d = hidden.shape
        # f_s lives at row s + 1; padding (-1) goes to row L, which no draft row reads (f_{L-1} is never an input)
        rows = torch.where(positions >= 0, positions + 1, self.grid.length)
        self.feat.scatter_(1, rows[..., None].expand(B, A, d), hidden.to(self.feat.dtype))

    def observe_tree(self, probs, node_pos, codes, generator, chain=False) -> None:
        self.codes = codes  # a live view of the engine's committed codes (B, L), -1 where forced / not yet

    # ----------------------------------------------------------------------------------------- drafting
    def _rows(self, pos: torch.Tensor) -> torch.Tensor:
        """Draft-layer inputs of rows ``pos`` (B, M) from the feature and token buffers."""
        m, W, L = self.drafter, self.grid.tokens_per_row, self.grid.length
        B = pos.shape[0]
        ar = torch.arange(B, device=pos.device)[:, None]
        feat = self.feat[ar, pos.clamp(max=L)]
        tok = m.token_embedding(self.tokens[ar, pos], m.is_forced(pos))
        above = None
        if m.config.spatial:
            src = pos + 2 - W
            above = torch.where((src >= 0).unsqueeze(-1), self.feat[ar, src.clamp(0, L)], 0.0)
        return m.inputs(feat, tok, above)

    @torch.no_grad()
    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        m, L = self.drafter, self.grid.length
        B, J = code_pos.shape
        dev = code_pos.device
        ar = torch.arange(B, device=dev)
        empty = torch.full((B, J, pool_size), -1, dtype=torch.long, device=dev)
        self.feat[ar, root_pos] = src_hidden.to(self.feat.dtype)  # f_{root-1}
        if self.codes is None:  # first step: the root code is not known here yet
            return Pools(empty, None, torch.zeros(empty.shape, device=dev))  # no drafts (scored 0)
        committed = self.codes[:, :L]
        self.tokens[:, :L] = torch.where(committed >= 0, committed, 0)
        live = code_pos >= 0
        n_steps = int((torch.where(live, code_pos, 0).amax(1) - root_pos).clamp(min=0).max())
        if n_steps == 0:
            return Pools(empty, None, torch.zeros(empty.shape, device=dev))  # no drafts (scored 0)

        f_hat = self.catch_up(root_pos)

        # 2. draft positions root+1 .. root+n_steps along the rank-0 chain
        K = m.num_codes
        tokens = empty.clone()
        q_pool = torch.zeros((B, J, pool_size, K), device=dev) if self.draft == "sample" else None
        logp = torch.zeros((B, J, pool_size), device=dev)  # the drafter's log-probabilities (dynamic trees)
        for t in range(n_steps):
            p = root_pos + 1 + t  # (B,) the drafted body position
            logits = m.logits(f_hat)  # (B, K)
            cand, q = self._candidates(logits, pool_size, generator)  # (B, P), (B, K) | None
            hit = live & (code_pos == p[:, None])  # (B, J): the code depth this position is, if any
            tokens = torch.where(hit[..., None], cand[:, None, :], tokens)
            lp = torch.log_softmax(logits.float(), -1).gather(-1, cand.clamp(min=0))  # (B, P)
            logp = torch.where(hit[..., None], lp[:, None, :], logp)
            if q_pool is not None:
                q_pool = torch.where(hit[..., None, None], q[:, None, None, :], q_pool)
            if t + 1 == n_steps:
                break
            # the next row (f^_p, x_p) at position p; x_p: the rank-0 draft (a forced position embeds itself)
            inside = p < L
            row = torch.where(inside, p, L)
            self.feat[ar, row] = f_hat.to(self.feat.dtype)
            self.tokens[ar, row] = cand[:, 0].clamp(min=0)
            f_hat = m.step(self._rows(row[:, None]), row[:, None], self.kv)[:, 0]
        if q_pool is not None:
            q_pool = torch.where((tokens >= 0)[..., None], q_pool, 1.0 / K)  # unused slots: any valid q
        return Pools(tokens, q_pool, logp)

    def catch_up(self, root_pos: torch.Tensor) -> torch.Tensor:
        """Step 1: the draft rows ``done .. root`` with the target's features into the KV cache; returns
        f^_root (B, d), the predicted feature whose code-head distribution drafts ``x_{root+1}``."""
        L = self.grid.length
        ar = torch.arange(root_pos.shape[0], device=root_pos.device)
        M = int((root_pos - self.done + 1).clamp(min=1).max())
        pos = self.done[:, None] + torch.arange(M, device=root_pos.device)
        pos = torch.where(pos <= root_pos[:, None], pos, L)  # padding -> the trash slot
        out = self.drafter.step(self._rows(pos), pos, self.kv)
        f_hat = out[ar, (root_pos - self.done).clamp(0, M - 1)]
        self.done = torch.maximum(self.done, root_pos + 1)
        return f_hat

    def _candidates(self, logits: torch.Tensor, size: int, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, K) -> candidates (B, size), best (or first drawn) first, and their q (B, K) or None."""
        if self.draft == "topk":
            K = logits.shape[-1]
            top = logits.topk(min(size, K), dim=-1).indices
            if size > K:  # more slots than codes: the rest stay empty
                top = torch.cat([top, top.new_full((top.shape[0], size - K), -1)], -1)
            return top, None
        q = target_probs(logits, self.sampling)  # (B, K)
        return sample(q.unsqueeze(1).expand(-1, size, -1), generator), q

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "draft": self.draft,
                "spatial": self.drafter.config.spatial if self.drafter is not None else self.spatial}


# ------------------------------------------------------------------------------------------------- dynamic trees
def dynamic_tree_paths(child_logp, budget: int, max_depth: int, expand: int = 4, top_k: int = 4
                       ) -> tuple[list[tuple[int, ...]], list[float]]:
    """EAGLE-2's dynamic draft tree as rank paths: expand, then rerank by cumulative draft probability.

    *Expansion*: the root's ``top_k`` best children form depth 1; at every depth, the ``expand`` nodes of that
    depth with the highest cumulative log-probability (the product of the draft probabilities along their
    path, EAGLE-2's estimate of the chance the path is accepted) get their ``top_k`` best children. *Rerank*:
    of all expanded nodes, the ``budget`` with the highest cumulative log-probability are kept. A child never
    scores above its parent (ties go to the shallower node), so the selection is prefix-closed: a valid tree.

    Args:
        child_logp: ``child_logp(depth, parents) -> (len(parents), >= top_k)`` log-probabilities of the children
            of each parent rank path (tuples of length ``depth``), sorted descending: child rank ``c`` is column
            ``c``. With the engine's per-depth pools, ``pool_logp`` gives it from a (J, P) table.
        budget: Nodes to keep (the root excluded).
        max_depth: Deepest code depth.
        expand: Nodes expanded per depth (EAGLE-2's ``top_k`` of the expansion phase).
        top_k: Children drafted per expanded node.

    Returns:
        The rank paths, sorted like :func:`hawkspec.decoding.tree.normalize_paths` (by depth, then ranks), and
        their cumulative log-probabilities.
    """
    if budget < 1 or max_depth < 1 or expand < 1 or top_k < 1:
        raise ValueError(f"budget, max_depth, expand and top_k must be >= 1, got {budget}, {max_depth}, {expand}, {top_k}")
    scores: dict[tuple[int, ...], float] = {}
    frontier: list[tuple[int, ...]] = [()]
    base = {(): 0.0}
    for depth in range(max_depth):
        lp = torch.as_tensor(child_logp(depth, frontier), dtype=torch.float64)[:, :top_k]
        layer: dict[tuple[int, ...], float] = {}
        for i, parent in enumerate(frontier):
            for c in range(lp.shape[1]):
                s = base[parent] + float(lp[i, c])
                if s > float("-inf"):
                    layer[parent + (c,)] = s
        if not layer:
            break
        scores.update(layer)
        frontier = heapq.nsmallest(expand, layer, key=lambda p: (-layer[p], p))
        base = {p: layer[p] for p in frontier}
    # rerank: highest cumulative score first; ties by depth then ranks (parents before their children)
    kept = heapq.nsmallest(budget, scores, key=lambda p: (-scores[p], len(p), p))
    kept.sort(key=lambda p: (len(p), p))
    return kept, [scores[p] for p in kept]


def pool_logp(logp: torch.Tensor):
    """``child_logp`` for :func:`dynamic_tree_paths` from per-depth pool log-probabilities (J, P), sorted
    descending per depth: every node of depth j has the pool of code depth j as its children (the engine's
    pools are per depth, not per parent)."""

    def child_logp(depth: int, parents: list[tuple[int, ...]]) -> torch.Tensor:
        return logp[depth].unsqueeze(0).expand(len(parents), -1)

    return child_logp
