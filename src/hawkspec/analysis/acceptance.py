"""Where over the image drafts are accepted, per decoder, and where Hawk's accepted drafts came from a
vertical head.

Every speculative decoder returns ``accept_map`` (B, rows, cols): 1 where the committed code was a draft the
target accepted, 0 where it was the bonus (or first) token. :func:`acceptance_maps` runs several decoders over
the same prompts and seeds and averages those maps.

For a proposer with Hawk's speculation cache (a :class:`~hawkspec.decoding.proposers.SpatialProposer` with a
:class:`~hawkspec.decoding.proposers.sources.VerticalSource`: ``hawk``, ``hawk_jacobi``, ``hawk_eagle``, ...),
:class:`SourceRecorder` also records, for
every position, the vertical drafts and the horizontal heads' top-P candidates of the step that committed
it: a position is proposed at every step until it is committed and never after, so the last proposal of a
position is the one its accepted draft came from. An accepted code that one of the vertical drafts equals
is *vertical*; one that none of the horizontal heads' top-P candidates equals as well is *vertical only*
(a draft a Medusa pool of the same size would not have held). With sampled drafts (``draft: sample``) a
token equal to a vertical draft may also have been drawn by a horizontal head; the attribution is by value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.sampling import batch_generator
from hawkspec.decoding.proposers.sources import HorizontalSource, VerticalSource


def vertical_source(proposer) -> VerticalSource | None:
    """The proposer's speculation cache (its :class:`VerticalSource`), or None."""
    find = getattr(proposer, "source_of", None)
    return find(VerticalSource) if find is not None else None


class SourceRecorder:
    """Observes a decoder (:meth:`~hawkspec.decoding.engine.SpeculativeDecoder.observed`) and records, per body
    position, the candidates of the last step that proposed it (see the module docstring). It reads the proposer's
    cache and heads and draws nothing from the decoding generator, so the images are the same as without it."""

    def __init__(self, proposer):
        self.vertical_source = vertical_source(proposer)
        if self.vertical_source is None:
            raise TypeError(f"{type(proposer).__name__} keeps no vertical drafts (only proposers with a vertical "
                            "source do: hawk, hawk_eagle, ...)")
        self.horizontal_source = proposer.source_of(HorizontalSource)
        self.inner = proposer

    def start(self, batch_size: int, device: torch.device) -> None:
        L = self.inner.backbone.grid.length
        self.vertical = None
        self.horizontal = None
        self._shape = (batch_size, L + 1)  # one spare column absorbs positions past the image (-1)

    def _store(self, attr: str, code_pos: torch.Tensor, tokens: torch.Tensor) -> None:
        B, L1 = self._shape
        table = getattr(self, attr)
        if table is None or table.shape[-1] != tokens.shape[-1]:
            table = torch.full((B, L1, tokens.shape[-1]), -1, dtype=torch.long, device=tokens.device)
            setattr(self, attr, table)
        where = torch.where(code_pos >= 0, code_pos, L1 - 1)
        table[torch.arange(B, device=tokens.device)[:, None], where] = tokens

    def before_propose(self, src_hidden: torch.Tensor, at, pool_size: int) -> None:
        """The vertical drafts of every position this step proposes, and the horizontal heads' top-P there."""
        h, code_pos = self.horizontal_source, at.code_pos
        self._store("vertical", code_pos, self.vertical_source.vertical_drafts(code_pos))
        if h is not None and h.draft == "topk":
            h_tok, _ = h.pool(src_hidden, at.root_pos, code_pos, pool_size, None)
            self._store("horizontal", code_pos, h_tok)

    def sources(self, out: GenerationOutput) -> dict[str, torch.Tensor]:
        """(B, rows, cols) bool maps of the last batch: ``vertical`` (accepted and equal to a vertical draft),
        ``vertical_only`` (and to none of the horizontal heads' candidates) and ``vertical_offered`` (the cache
        held a vertical draft when the position was committed, accepted or not)."""
        grid = self.inner.backbone.grid
        pos = grid.code_positions()
        codes = out.codes.flatten(1).to(self.vertical.device)  # (B, rows*cols) codes in raster order
        accepted = out.accept_map.flatten(1).to(self.vertical.device) > 0
        v = self.vertical[:, pos.to(self.vertical.device)]  # (B, N, V)
        in_v = (v == codes.unsqueeze(-1)).any(-1) & accepted
        if self.horizontal is not None:
            h = self.horizontal[:, pos.to(self.horizontal.device)]
            in_h = (h == codes.unsqueeze(-1)).any(-1)
        else:
            in_h = torch.zeros_like(in_v)
        shape = out.codes.shape
        return {"vertical": in_v.view(shape).cpu(), "vertical_only": (in_v & ~in_h).view(shape).cpu(),
                "vertical_offered": (v >= 0).any(-1).view(shape).cpu()}


@dataclass
class AcceptanceMaps:
    """One decoder's maps over a set of prompts.

    Attributes:
        name: The decoder.
        accepted: (N, rows, cols) 1 where the code was an accepted draft (``GenerationOutput.accept_map``).
        sources: For Hawk proposers, {``vertical``, ``vertical_only``, ``vertical_offered``: (N, rows, cols) bool}
            (:meth:`SourceRecorder.sources`); empty otherwise.
        forwards: (N,) target forwards per image (prefill included).
        lossless: Whether the decoder's acceptance rule is lossless.
    """

    name: str
    accepted: torch.Tensor
    sources: dict
    forwards: torch.Tensor
    lossless: bool = True

    @property
    def map(self) -> torch.Tensor:
        """(rows, cols) fraction of images whose code there was an accepted draft."""
        return self.accepted.float().mean(0)

    def source_map(self, kind: str = "vertical") -> torch.Tensor | None:
        """(rows, cols) fraction of images whose code there was an accepted draft from ``kind``; None when not
        recorded."""
        return self.sources[kind].float().mean(0) if kind in self.sources else None

    @property
    def acceptance_rate(self) -> float:
        """Share of image codes that were accepted drafts."""
        return float(self.accepted.float().mean())

    @property
    def vertical_share(self) -> float | None:
        """Share of the accepted drafts that a vertical draft equals (None when not recorded)."""
        if "vertical" not in self.sources:
            return None
        return float(self.sources["vertical"].sum() / self.accepted.sum().clamp(min=1))

    def step_compression(self, grid) -> float:
        """AR forwards (rows * W body tokens) over this decoder's mean forwards per image."""
        return grid.length / float(self.forwards.float().mean())


@torch.no_grad()
def decode_with_sources(decoder, prompts: Sequence[str], generator: torch.Generator | None = None
                        ) -> tuple[GenerationOutput, dict]:
    """``decoder.generate(prompts)`` and, when its proposer keeps vertical drafts, the source maps
    (:meth:`SourceRecorder.sources`; else ``{}``), recorded by an observer of the decoder."""
    proposer = getattr(decoder, "proposer", None)
    if proposer is None or vertical_source(proposer) is None:
        return decoder.generate(list(prompts), generator), {}
    with decoder.observed(SourceRecorder(proposer)) as recorder:
        out = decoder.generate(list(prompts), generator)
    return out, recorder.sources(out)


def acceptance_maps(decoders: dict, prompts: Sequence[str], batch_size: int = 8, seed: int = 0
                    ) -> dict[str, AcceptanceMaps]:
    """Run every decoder over the same prompts with the same seeds (``hawkspec-eval``'s: batch ``i`` gets
    ``batch_generator(seed, i)``) and collect its maps. Plain AR has no acceptance map and is skipped."""
    out = {}
    for name, dec in decoders.items():
        acc, src, fwd = [], {}, []
        for bi, i in enumerate(range(0, len(prompts), batch_size)):
            dev = dec.backbone.code_token_ids.device
            g = batch_generator(seed, bi, dev)
            o, s = decode_with_sources(dec, prompts[i : i + batch_size], g)
            if o.accept_map is None:
                break
            acc.append(o.accept_map.cpu())
            fwd.append(o.forwards_per_image.cpu())
            for k, v in s.items():
                src.setdefault(k, []).append(v)
        if acc:
            out[name] = AcceptanceMaps(name, torch.cat(acc), {k: torch.cat(v) for k, v in src.items()},
                                       torch.cat(fwd), bool(getattr(dec, "lossless", True)))
    return out
