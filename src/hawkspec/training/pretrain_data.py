"""Tokenized text-image pairs for pretraining the tiny backbone (images -> VQ codes -> sequences): what
``hawkspec-pretrain`` feeds :class:`~hawkspec.training.pretrain.TinyPretrainModule`."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from hawkspec.backbones.tiny import BOS, PAD, TinyLayout
from hawkspec.data.procedural import ProceduralDataset
from hawkspec.vq.patch_vq import PatchVQ


def render_images(size: int, seed: int, image_size: int, progress: bool = True) -> tuple[torch.Tensor, list[str]]:
    """(size, 3, H, W) uint8 images and their captions from the procedural dataset."""
    ds = ProceduralDataset(size, seed=seed, image_size=image_size)
    images, captions = [], []
    for i in tqdm(range(size), desc=f"render seed={seed}", disable=not progress, leave=False):
        item = ds[i]
        images.append(item["image"])
        captions.append(item["caption"])
    return torch.stack(images), captions


class TokenSequenceDataset(Dataset):
    """Pre-tokenized sequences ``<bos> caption <image_start> body <image_end>``.

    Prompt dropout (CFG training) replaces the caption by nothing, leaving ``<bos> <image_start> ...``, with
    probability ``prompt_dropout``; labels cover the image body and the image-end token only.
    """

    def __init__(self, layout: TinyLayout, captions: list[str], codes: torch.Tensor, prompt_dropout: float = 0.0):
        self.prompts = [layout.encode_words(c)[0] for c in captions]
        self.images = layout.image_sequence(codes)  # (N, 1 + rows*W + 1)
        self.prompt_dropout = prompt_dropout

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        prompt = [] if torch.rand(()) < self.prompt_dropout else self.prompts[i]
        ids = torch.cat([torch.tensor([BOS] + prompt, dtype=torch.long), self.images[i]])
        labels = ids.clone()
        labels[: len(prompt) + 2] = -100  # no loss on the prompt; image start predicts the first code
        return {"input_ids": ids, "labels": labels}

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Right-pad a batch; positions then start at 0 for every row, as at inference."""
        T = max(len(it["input_ids"]) for it in items)
        ids = torch.full((len(items), T), PAD, dtype=torch.long)
        labels = torch.full((len(items), T), -100, dtype=torch.long)
        mask = torch.zeros((len(items), T), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = it["input_ids"], it["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PretrainDataModule(L.LightningDataModule):
    """Renders the procedural data once, tokenizes it with a fitted VQ and serves sequences.

    Args:
        vq: A fitted tokenizer.
        layout: The tiny model's vocabulary and grid.
        train_size, val_size: Number of images; validation uses a different seed (``seed + 1``).
        seed: Data seed.
        image_size: Pixels per side (``rows * patch_size``).
        batch_size: Sequences per step.
        prompt_dropout: Probability of an unconditional training sequence (CFG).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        vq: PatchVQ,
        layout: TinyLayout,
        train_size: int = 20000,
        val_size: int = 512,
        seed: int = 0,
        image_size: int = 48,
        batch_size: int = 32,
        prompt_dropout: float = 0.1,
        num_workers: int = 0,
        train_images: tuple[torch.Tensor, list[str]] | None = None,
    ):
        super().__init__()
        self.vq, self.layout = vq, layout
        self.train_size, self.val_size, self.seed = train_size, val_size, seed
        self.image_size, self.batch_size = image_size, batch_size
        self.prompt_dropout, self.num_workers = prompt_dropout, num_workers
        self._train_images = train_images

    def _tokenize(self, images: torch.Tensor, captions: list[str], dropout: float) -> TokenSequenceDataset:
        codes = torch.cat([self.vq.encode(chunk) for chunk in images.split(1024)])
        return TokenSequenceDataset(self.layout, captions, codes, dropout)

    def setup(self, stage: str | None = None) -> None:
        if not hasattr(self, "train_ds"):
            images, captions = self._train_images or render_images(self.train_size, self.seed, self.image_size)
            self.train_ds = self._tokenize(images, captions, self.prompt_dropout)
            self.val_ds = self._tokenize(*render_images(self.val_size, self.seed + 1, self.image_size), 0.0)
            self.val_captions = render_images(min(self.val_size, 64), self.seed + 1, self.image_size, False)[1]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_ds, self.batch_size, shuffle=True, collate_fn=TokenSequenceDataset.collate,
            num_workers=self.num_workers, drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_ds, self.batch_size, collate_fn=TokenSequenceDataset.collate, num_workers=self.num_workers)
