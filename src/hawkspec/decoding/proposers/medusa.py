"""Medusa: horizontal draft heads on the last accepted hidden state; head k drafts the k-th token after next."""

from __future__ import annotations

import torch

from hawkspec.backbones.base import check_identity
from hawkspec.decoding.proposers.base import Pools, Proposer
from hawkspec.decoding.sampling import sample, target_probs
from hawkspec.heads.draft import DraftHeads


class MedusaProposer(Proposer):
    """Candidates for the code at body position p are head ``p - root``'s top-k (or samples from it).

    Args:
        heads: Trained draft heads (only the horizontal ones are used).
        draft: ``topk`` (deterministic candidates, point masses) or ``sample`` (i.i.d. draws from the head's
            distribution under the target's top-k/temperature).
    """

    name = "medusa"

    def __init__(self, heads: DraftHeads, draft: str = "topk"):
        if draft not in ("topk", "sample"):
            raise ValueError(f"decoder.proposer.draft must be 'topk' or 'sample', got {draft!r}")
        self.heads, self.draft = heads, draft

    def bind(self, backbone, sampling) -> None:
        super().bind(backbone, sampling)
        check_identity(self.heads.identity, backbone, "the draft heads",
                       "Train heads for this backbone or set `decoder.heads_path` to matching heads.")
        self.heads.to(next(iter(backbone.buffers())).device)

    def _draft_dists(self, logits: torch.Tensor) -> torch.Tensor:
        return target_probs(logits, self.sampling)

    def _candidates(self, logits: torch.Tensor, ok: torch.Tensor, size: int, generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, J, K), ok (B, J) -> tokens (B, J, size) and q (B, J, size, K) or None."""
        if self.draft == "topk":
            tokens = logits.topk(size, dim=-1).indices
            return torch.where(ok.unsqueeze(-1), tokens, -1), None
        q = self._draft_dists(logits)  # (B, J, K)
        tokens = sample(q.unsqueeze(-2).expand(*q.shape[:-1], size, q.shape[-1]), generator)  # (B, J, size)
        return torch.where(ok.unsqueeze(-1), tokens, -1), q.unsqueeze(-2).expand(*tokens.shape, q.shape[-1])

    def horizontal_candidates(self, src_hidden, root_pos, code_pos, size, generator, logits=None):
        """Pools of the horizontal heads at ``src_hidden`` (B, d), or from their ``logits`` (B, n, K) when the
        caller already has them."""
        n = self.heads.config.num_horizontal
        if logits is None:
            logits = self.heads.horizontal(src_hidden)  # (B, n, K)
        k = code_pos - root_pos[:, None]  # (B, J) head index (1-based) drafting each position
        ok = (code_pos >= 0) & (k >= 1) & (k <= n)
        per_pos = logits.gather(1, (k.clamp(1, n) - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1]))  # (B, J, K)
        return self._candidates(per_pos, ok, size, generator)

    def propose(self, src_hidden, root_pos, code_pos, pool_size, generator) -> Pools:
        logits = self.heads.horizontal(src_hidden)  # (B, n, K)
        tokens, q = self.horizontal_candidates(src_hidden, root_pos, code_pos, pool_size, generator, logits)
        n = logits.shape[1]
        k = (code_pos - root_pos[:, None]).clamp(1, n) - 1  # (B, J) the head of each position
        logq = torch.log_softmax(logits.float(), -1).gather(1, k.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        logp = logq.gather(-1, tokens.clamp(min=0))  # (B, J, P) what a dynamic tree ranks by
        return Pools(tokens, q, logp)

    def describe(self) -> dict:
        return {"name": self.name, "draft": self.draft, "num_horizontal": self.heads.config.num_horizontal}
