"""LightningModule that trains the tiny backbone (next-token cross-entropy on image tokens)."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch

from hawkspec.backbones.tiny import TinyBackbone


class TinyPretrainModule(L.LightningModule):
    """Next-token training of the tiny model's transformer; the VQ is fitted before and stays fixed.

    Args:
        backbone: A freshly built :class:`TinyBackbone`.
        optimizer: Factory ``params -> Optimizer`` (Hydra ``_partial_``).
        scheduler: Optional factory ``optimizer -> LR scheduler`` stepped every optimizer step.
    """

    def __init__(self, backbone: TinyBackbone, optimizer: Callable, scheduler: Callable | None = None):
        super().__init__()
        self.backbone = backbone
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler

    def _loss(self, batch: dict) -> torch.Tensor:
        return self.backbone.lm_loss(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        params = list(self.backbone.lm_parameters())
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.scheduler_factory is None:
            return opt
        sched = self.scheduler_factory(opt, num_training_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
