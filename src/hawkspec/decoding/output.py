"""What every decoder is (:class:`Decoder`) and returns (:class:`GenerationOutput`), and the definitions of the
speed metrics it carries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@dataclass
class GenerationOutput:
    """Images of one batch and how they were made.

    Attributes:
        codes: (B, rows, cols) image codes.
        tokens: (B, rows*W) image-body token ids (end-of-line tokens included).
        forwards: Target-model forward passes for the batch (the prefill counts as one). The whole batch
            shares each forward; speculative decoders keep stepping until the slowest image is done.
        forwards_per_image: (B,) forwards each image needed on its own: the step at which it finished.
        accepted_tokens: (B,) image tokens each image committed from verification, bonus tokens included
            and forced tokens excluded.
        accept_map: (B, rows, cols) float, per code position: 1 where the token was accepted from a draft,
            0 where it was the bonus/AR sample. None for plain AR.
        mean_entropy: Mean entropy (nats) of the target distribution over sampled positions, when tracked.
    """

    codes: torch.Tensor
    tokens: torch.Tensor
    forwards: int
    forwards_per_image: torch.Tensor
    accepted_tokens: torch.Tensor | None = None
    accept_map: torch.Tensor | None = None
    mean_entropy: float | None = None
    extras: dict = field(default_factory=dict)


@runtime_checkable
class Decoder(Protocol):
    """What a run decodes with: plain AR (``hawkspec.decoding.build.ARDecoder``), every speculative decoder
    (:class:`~hawkspec.decoding.engine.SpeculativeDecoder`, ``build.NamedDecoder``) and the rows-in-flight decoders
    (:mod:`hawkspec.decoding.rows`: ZipAR, PJD) alike.

    Attributes:
        name: The row name in results (the preset's, or its key in ``eval.decoders``).
        lossless: Whether its images are distributed exactly as AR's.
        runner: Runs its steps in the execution mode it was built with (:class:`hawkspec.decoding.static.StepRunner`,
            eager, compiled or graph-captured); every backbone forward goes through ``runner.forward``.
    """

    name: str
    runner: object

    @property
    def lossless(self) -> bool: ...

    def generate(self, prompts: list[str], generator: torch.Generator | None = None, progress: bool = False,
                 track_entropy: bool = False) -> GenerationOutput:
        """One image per prompt."""
        ...

    def describe(self) -> dict:
        """What it is, for results (name, proposer, acceptance, lossless, ...)."""
        ...
