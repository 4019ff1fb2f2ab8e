"""LightningModule that trains an EAGLE draft model on the cached hidden states (the same shards as the heads).

EAGLE's loss, teacher-forced over whole bodies (row i reads ``f_{i-1}`` and the code ``x_i``, see
:mod:`hawkspec.heads.eagle`)::

    loss = feature_weight * SmoothL1(f^_i, f_i) + token_weight * CE(target_i, code_head(f^_i))

* the feature regression is against the cached next hidden state ``f_i``, averaged over rows and channels;
* the token loss is EAGLE's: the cross-entropy from the target's own next-code distribution
  ``softmax(code_head(f_i))`` (``token_loss: soft``), or against the cached code ``x_{i+1}`` (``hard``); rows
  whose next token is forced (end of line) or past the image are left out;
* uniform noise ``(U[0, 1) - 0.5) * noise`` is added to the input features while training (EAGLE's data noise;
  the regression targets stay clean).

Validation logs ``val/loss``, ``val/feature_loss``, ``val/token_loss`` and the draft's top-1 / top-5 against the
cached code as ``val/head_h1_top1`` / ``_top5`` (EAGLE's first draft has Medusa head h1's target), so the
heads' checkpoint callback and reports work unchanged. Checkpoints carry the backbone identity.
"""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from hawkspec.backbones.base import ImageGrid
from hawkspec.heads.eagle import EagleConfig, EagleDrafter
from hawkspec.training.heads import TOPK_METRICS, HeadTrainingModule

TOKEN_LOSSES = ("soft", "hard")


class EagleTrainingModule(HeadTrainingModule):
    """Trains :class:`EagleDrafter` (its fc, decoder layer and end-of-line embedding; code head and code
    embeddings stay frozen). Optimiser, scheduler, NaN guard, epoch reseeding and checkpoint checks are the
    heads' (:class:`~hawkspec.training.heads.HeadTrainingModule`).

    Args:
        drafter: Built from the backbone at startup (:meth:`for_backbone`).
        grid: The backbone's image layout.
        optimizer, scheduler, warmup_ratio: As for the heads.
        noise: Width of EAGLE's uniform noise on the input features (0: none).
        feature_weight: Weight of the smooth-L1 feature regression (EAGLE: 1.0).
        token_weight: Weight of the token loss (EAGLE: 0.1).
        token_loss: ``soft`` (CE to the target's distribution, EAGLE) or ``hard`` (CE to the cached code).
    """

    def __init__(self, drafter: EagleDrafter, grid: ImageGrid, optimizer: Callable, scheduler: Callable | None = None,
                 warmup_ratio: float = 0.05, noise: float = 0.2, feature_weight: float = 1.0,
                 token_weight: float = 0.1, token_loss: str = "soft"):
        if token_loss not in TOKEN_LOSSES:
            raise ValueError(f"heads.token_loss must be one of {TOKEN_LOSSES}, got {token_loss!r}")
        for key, value in (("noise", noise), ("feature_weight", feature_weight), ("token_weight", token_weight)):
            if value < 0:
                raise ValueError(f"heads.{key} must be >= 0, got {value}")
        if feature_weight == 0 and token_weight == 0:
            raise ValueError("heads.feature_weight and heads.token_weight are both 0: nothing to train")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        L.LightningModule.__init__(self)  # the heads' __init__ sets up per-head weights EAGLE does not have
        self.heads, self.grid = drafter, grid
        self.optimizer_factory, self.scheduler_factory, self.warmup_ratio = optimizer, scheduler, warmup_ratio
        self.offsets, self.names = drafter.offsets, drafter.names
        K = drafter.num_codes
        self.accuracy = nn.ModuleDict({
            f"h1_top{k}": MulticlassAccuracy(num_classes=K, top_k=k, average="micro", ignore_index=-100)
            for k in TOPK_METRICS if k <= K
        })
        self.noise, self.feature_weight, self.token_weight, self.token_loss = (
            noise, feature_weight, token_weight, token_loss)

    @classmethod
    def for_backbone(cls, backbone, optimizer: Callable, scheduler: Callable | None = None, warmup_ratio: float = 0.05,
                     spatial: bool = False, num_heads: int | None = None, intermediate_size: int | None = None,
                     rope_theta: float = 10000.0, **loss) -> "EagleTrainingModule":
        """The module ``hawkspec-train heads=eagle`` builds (the ``_target_`` of ``conf/heads/eagle.yaml``): the
        draft model's shape and loss settings come from the ``heads`` group."""
        config = EagleConfig(spatial=spatial, num_heads=num_heads, intermediate_size=intermediate_size,
                             rope_theta=rope_theta).validate(backbone.hidden_size)
        return cls(EagleDrafter.for_backbone(config, backbone), backbone.grid, optimizer, scheduler, warmup_ratio,
                   **loss)

    @property
    def needs_topk(self) -> bool:
        """EAGLE's soft token loss reads the target's distribution from the cached features, not the top-k."""
        return False

    @property
    def drafter(self) -> EagleDrafter:
        return self.heads

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        m = self.heads
        hidden = batch["hidden"].to(m.dtype)  # (B, L + 1, d)
        codes = batch["codes"].long()  # (B, L)
        B, S, _ = hidden.shape
        L = S - 1
        f_hat = m(hidden, codes, noise=self.noise if stage == "train" else 0.0)  # (B, L, d)
        target = hidden[:, 1:]  # f_i
        feature = F.smooth_l1_loss(f_hat.float(), target.float())
        # the token after row i: x_{i+1}; none past the image, forced ones are not drafted
        nxt = torch.cat([codes[:, 1:], codes.new_full((B, 1), -1)], dim=1)  # (B, L)
        valid = nxt >= 0
        logits = m.logits(f_hat[valid])  # (N, K)
        if self.token_loss == "soft":
            with torch.no_grad():
                p = torch.softmax(m.logits(target[valid]), -1)
            token = -(p * torch.log_softmax(logits, -1)).sum(-1).mean() if len(p) else logits.sum() * 0
        else:
            token = F.cross_entropy(logits, nxt[valid], reduction="sum") / max(int(valid.sum()), 1)
        total = self.feature_weight * feature + self.token_weight * token
        on_step = stage == "train"
        for name, value in (("feature_loss", feature), ("token_loss", token), ("loss", total)):
            self.log(f"{stage}/{name}", value, prog_bar=name == "loss", on_step=on_step, on_epoch=True,
                     batch_size=B, sync_dist=stage == "val")
        if stage == "val":
            for k in TOPK_METRICS:
                if f"h1_top{k}" in self.accuracy:
                    metric = self.accuracy[f"h1_top{k}"]
                    metric.update(logits, nxt[valid])
                    self.log(f"val/head_h1_top{k}", metric, on_step=False, on_epoch=True)
        return total
