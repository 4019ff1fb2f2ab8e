"""LightningModule that trains draft heads (Medusa / Hawk) on cached hidden states; the backbone stays frozen.

Loss, per batch (all heads read the same cached states, see :mod:`hawkspec.heads.offsets` for the targets)::

    loss = sum_h  w_h * [(1 - a) * CE_h + a * KL_h]

* ``CE_h``: cross-entropy of head h's code logits against the code at its target position, averaged over the
  valid targets (inside the image, not forced).
* ``w_h``: ``decay**(k-1)`` for horizontal head k (so head 1 has weight 1, Medusa's ``decay**i`` with 0-based
  i), ``vertical_weight * decay**(d-1)`` for vertical head d.
* ``KL_h`` (when ``a = distill_weight > 0``): ``KL(p || q_h)`` from the cached top-k target ``p`` (renormalised
  over its k codes) to the head's distribution. A head with offset o at source s predicts position s + o, whose
  target distribution the base model gives at source ``s + o - 1``: that is the cached row it is taught by.

Validation logs per-head top-1 / top-5 accuracy against the cached codes as ``val/head_h{k}_top1``,
``val/head_h{k}_top5``, ``val/head_v{d}_top1``, ``val/head_v{d}_top5`` (micro-averaged over valid targets).
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from hawkspec.backbones.base import ImageGrid
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.heads.offsets import head_targets
from hawkspec.io import NonFiniteError, check_finite_state

TOPK_METRICS = (1, 5)
log = logging.getLogger("hawkspec")


def head_loss_weights(num_horizontal: int, vsd: int, decay: float, vertical_weight: float) -> list[float]:
    """Per-head loss weights in :class:`DraftHeads` output order (horizontal 1..n, then vertical 1..vsd)."""
    return [decay ** (k - 1) for k in range(1, num_horizontal + 1)] + [
        vertical_weight * decay ** (d - 1) for d in range(1, vsd + 1)
    ]


def teacher_rows(seq_len: int, offset: int, device=None) -> torch.Tensor:
    """(S,) long: the cached row whose target distribution teaches a head with ``offset``, per source row.

    Row ``i`` of the cache is source ``s = i - 1``; the head predicts position ``s + offset``, and the base
    model's distribution for that position is the one at source ``s + offset - 1``, i.e. row ``i + offset - 1``.
    Rows past the end are clamped (their targets are masked anyway).
    """
    return (torch.arange(seq_len, device=device) + offset - 1).clamp(0, seq_len - 1)


def distill_kl(logits: torch.Tensor, probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(p || softmax(logits))`` with p given by its top-k.

    Args:
        logits: (N, K) head logits.
        probs: (N, k) cached target probabilities of the k most likely codes (renormalised here).
        idx: (N, k) their code indices.
    """
    p = probs.float()
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-8)  # (N, k)
    log_q = torch.log_softmax(logits.float(), -1).gather(-1, idx.long())  # (N, k)
    kl = (p * (p.clamp_min(1e-8).log() - log_q)).sum(-1)  # (N,)
    return kl.sum() / max(kl.numel(), 1)


class HeadTrainingModule(L.LightningModule):
    """Trains :class:`DraftHeads`; only their ResBlocks are trained (the backbone's code head is frozen).

    Args:
        heads: Built from the backbone at startup (``DraftHeads.for_backbone``).
        grid: The backbone's image layout (targets and masks).
        optimizer: Factory ``param_groups -> Optimizer`` (Hydra ``_partial_``); weight decay applies to the
            ResBlock weights, not biases.
        scheduler: Optional factory ``(optimizer, num_warmup_steps, num_training_steps) -> LR scheduler``,
            stepped every optimizer step.
        warmup_ratio: Warmup steps as a fraction of all training steps.
        decay: Per-distance loss decay (see the module docstring).
        vertical_weight: Extra factor on the vertical heads' loss.
        distill_weight: a in [0, 1]: weight of the KL to the cached top-k target (0: pure cross-entropy).
    """

    def __init__(
        self,
        heads: DraftHeads,
        grid: ImageGrid,
        optimizer: Callable,
        scheduler: Callable | None = None,
        warmup_ratio: float = 0.05,
        decay: float = 0.8,
        vertical_weight: float = 1.0,
        distill_weight: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"loss.distill_weight must be in [0, 1], got {distill_weight}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"loss.decay must be in (0, 1], got {decay}")
        if vertical_weight < 0:
            raise ValueError(f"loss.vertical_weight must be >= 0, got {vertical_weight}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self.heads = heads
        self.grid = grid
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.warmup_ratio, self.distill_weight = warmup_ratio, distill_weight
        self.offsets, self.names = heads.offsets, heads.names
        self.weights = head_loss_weights(heads.config.num_horizontal, heads.config.num_vertical, decay, vertical_weight)
        K = heads.num_codes
        self.accuracy = nn.ModuleDict({
            f"{name}_top{k}": MulticlassAccuracy(num_classes=K, top_k=k, average="micro", ignore_index=-100)
            for name in self.names for k in TOPK_METRICS if k <= K
        })

    @classmethod
    def for_backbone(cls, backbone, optimizer: Callable, scheduler: Callable | None = None, warmup_ratio: float = 0.05,
                     num_horizontal: int = 4, vertical: bool = True, vsd: int = 2, num_layers: int = 1,
                     loss: Mapping | None = None) -> "HeadTrainingModule":
        """The module ``hawkspec-train heads=medusa|hawk`` builds (the ``_target_`` of ``conf/heads/{medusa,hawk}.yaml``):
        the heads' shape from the ``heads`` group, their loss settings from the shared ``loss`` group
        (``heads.loss: ${loss}``)."""
        config = HeadsConfig(num_horizontal=num_horizontal, vertical=vertical, vsd=vsd,
                             num_layers=num_layers).validate(backbone.grid.rows)
        log.info("Building %s draft heads %s for backbone %s", "Hawk" if vertical else "Medusa", config, backbone.name)
        return cls(DraftHeads.for_backbone(config, backbone), backbone.grid, optimizer=optimizer, scheduler=scheduler,
                   warmup_ratio=warmup_ratio, **(loss or {}))

    @property
    def needs_topk(self) -> bool:
        """Whether the training data must carry the cached top-k target (the KL distillation term)."""
        return self.distill_weight > 0

    # ----------------------------------------------------------------------------------------- the loss
    def head_logits(self, h: int, x: torch.Tensor) -> torch.Tensor:
        """Head ``h``'s code logits. x: (N, d) -> (N, K)."""
        return self.heads.code_head(self.heads.blocks[h](x))

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        hidden = batch["hidden"].float()  # (B, S, d), S = rows*W + 1
        targets = head_targets(batch["codes"].long(), self.grid, self.offsets)  # (B, S, H), -100 = ignore
        B, S, _ = hidden.shape
        total = hidden.new_zeros(())
        for h, (name, offset, weight) in enumerate(zip(self.names, self.offsets, self.weights)):
            valid = targets[..., h] >= 0  # (B, S)
            tgt = targets[..., h][valid]  # (N,)
            logits = self.head_logits(h, hidden[valid])  # (N, K)
            loss = F.cross_entropy(logits, tgt, reduction="sum") / max(tgt.numel(), 1)
            self.log(f"{stage}/ce_{name}", loss, on_step=stage == "train", on_epoch=True, batch_size=B,
                     sync_dist=stage == "val")
            if self.distill_weight:
                teacher = teacher_rows(S, offset, hidden.device)  # (S,) cached rows
                kl = distill_kl(logits, batch["topk_probs"][:, teacher][valid], batch["topk_idx"][:, teacher][valid])
                self.log(f"{stage}/kl_{name}", kl, on_step=stage == "train", on_epoch=True, batch_size=B,
                         sync_dist=stage == "val")
                loss = (1 - self.distill_weight) * loss + self.distill_weight * kl
            total = total + weight * loss
            if stage == "val":
                for k in TOPK_METRICS:
                    if f"{name}_top{k}" in self.accuracy:
                        metric = self.accuracy[f"{name}_top{k}"]
                        metric.update(logits, tgt)
                        self.log(f"val/head_{name}_top{k}", metric, on_step=False, on_epoch=True)
        self.log(f"{stage}/loss", total, prog_bar=True, on_step=stage == "train", on_epoch=True, batch_size=B,
                 sync_dist=stage == "val")
        return total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self.check_finite_loss(loss, batch)
        return loss

    def check_finite_loss(self, loss: torch.Tensor, batch: dict) -> None:
        """Stop training on a NaN / Inf loss, naming the step, the shards and the samples of the batch."""
        if torch.isfinite(loss):
            return
        keys = batch.get("keys", [])
        bad = [k for k, h in zip(keys, batch["hidden"]) if not torch.isfinite(h).all()]
        shards = sorted(set(batch.get("shards", [])))
        raise NonFiniteError(
            f"non-finite training loss ({loss.item()}) at step {self.global_step} (epoch {self.current_epoch}), "
            f"batch from shard(s) {shards or '?'}"
            + (f"; non-finite hidden states in samples {bad[:5]}" if bad else
               "; the inputs are finite: lower `optimizer.lr` or check `loss.*`")
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_train_epoch_start(self) -> None:
        """Reseed the data shuffle with the epoch (see :class:`hawkspec.data.shards.ShardDataModule`)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Never write a Lightning checkpoint with non-finite weights."""
        check_finite_state(checkpoint["state_dict"], f"the weights of step {self.global_step} (checkpoint not written)")

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Never resume from a checkpoint with non-finite weights."""
        check_finite_state(checkpoint["state_dict"], "the checkpoint to resume from")

    # ----------------------------------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        named = [(n, p) for n, p in self.heads.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if p.ndim >= 2]},
            {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        sched = self.scheduler_factory(opt, num_warmup_steps=int(self.warmup_ratio * total), num_training_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
