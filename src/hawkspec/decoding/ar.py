"""Plain autoregressive sampling with a KV cache: the baseline every speedup is measured against.

It is kept as lean as transformers' own ``generate`` (one forward of one token per step, code logits only),
and ``make bench`` checks that it is not slower. Its step gets every treatment the speculative decoders' steps
get (``eval.compile=forward|step``, ``eval.cuda_graphs``: :mod:`hawkspec.decoding.static`), so speedups are
always compiled vs compiled or eager vs eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, entropy, sample, target_probs
from hawkspec.decoding.static import EAGER, ExecutionMode, StepRunner


@dataclass
class _ARRun:
    """What one AR call carries from token to token (all on the device, updated in place or rebound)."""

    kv: object  # the backbone's KVState
    hidden: torch.Tensor  # (N, d) the state that predicts the next token
    tokens: torch.Tensor  # (B, L) input ids written so far
    codes: torch.Tensor  # (B, C) codes sampled so far
    eol: torch.Tensor  # (B,) the end-of-line token
    j: torch.Tensor  # (1,) the next body position
    n_code: torch.Tensor  # (1,) the next code index
    ent_sum: torch.Tensor  # () sum of the per-position mean target entropy

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors a step reads and writes (what a static runner pins; the KV state is pinned on its own)."""
        return {name: getattr(self, name) for name in ("hidden", "tokens", "codes", "eol", "j", "n_code", "ent_sum")}

    def set_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            setattr(self, name, t)


def _ar_step(runner: StepRunner, run: _ARRun, sampling: SamplingConfig, forced: bool, last: bool,
             track_entropy: bool, rng) -> None:
    """One body position: sample a code (or take the forced end-of-line token), write it, and forward it unless
    it is the last one. ``forced``/``last``/``track_entropy`` are Python constants: one compiled graph each."""
    backbone, streams = runner.backbone, run.kv.streams
    if forced:
        tok = run.eol
    else:
        probs = target_probs(combine_cfg(backbone.code_logits(run.hidden), streams, sampling.cfg_scale), sampling)
        if track_entropy:
            run.ent_sum += entropy(probs).mean()
        code = probs.argmax(-1) if sampling.greedy else sample(probs, rng)
        run.codes.index_copy_(1, run.n_code, code[:, None])
        run.n_code += 1
        tok = backbone.code_token_ids[code]
    run.tokens.index_copy_(1, run.j, tok[:, None])
    run.j += 1
    if not last:
        run.hidden = runner.forward(run.kv, tok.repeat(streams)[:, None])[:, -1]


class ARDecoder:
    """Plain AR sampling behind the decoder interface (lossless by definition), one token per forward pass.

    Args:
        backbone: The frozen model.
        sampling: CFG scale, temperature, top-k.
        name: The row name in results.
        mode: How its steps run (``eval.compile``, ``eval.cuda_graphs``), as every decoder of the run.
    """

    lossless = True

    def __init__(self, backbone: Backbone, sampling: SamplingConfig, name: str = "ar", mode: ExecutionMode = EAGER):
        self.backbone, self.sampling, self.name = backbone, sampling, name
        self.runner = StepRunner(mode, backbone)

    def describe(self) -> dict:
        return {"name": self.name, "proposer": None, "acceptance": "ar", "lossless": True}

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator | None = None, progress: bool = False,
                 track_entropy: bool = False) -> GenerationOutput:
        """Sample one image per prompt.

        Args:
            prompts: B captions.
            generator: Seeds the draws (same generator state -> same images).
            progress: Show a progress bar over image tokens.
            track_entropy: Also return the mean target entropy over sampled positions.
        """
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        backbone, sampling, runner = self.backbone, self.sampling, self.runner
        sampling.validate(backbone.num_codes)
        grid = backbone.grid
        B, L = len(prompts), grid.length
        kv, hidden = backbone.prefill(backbone.encode(prompts), cfg=sampling.use_cfg, reserve=L,
                                         round_to=runner.mode.capacity_round, generator=generator)
        device = hidden.device
        zero = torch.zeros(1, dtype=torch.long, device=device)
        run = _ARRun(
            kv=kv, hidden=hidden.contiguous(),
            eol=torch.full((B,), backbone.eol_token_id if grid.eol else 0, device=device),
            tokens=torch.zeros((B, L), dtype=torch.long, device=device),
            codes=torch.zeros((B, grid.num_codes), dtype=torch.long, device=device),
            j=zero, n_code=zero.clone(), ent_sum=torch.zeros((), device=device),
        )
        roots = {"ar": run, "kv": kv}
        runner.begin(roots)
        forced = grid.forced_mask().tolist()
        for j in tqdm(range(L), disable=not progress, desc="AR", leave=False):
            args = (runner, run, sampling, forced[j], j == L - 1, track_entropy)
            if j == L - 1:  # once per image, no forward: not worth a compiled variant of its own
                _ar_step(*args, generator)
            else:
                runner.step(("ar", forced[j], track_entropy), _ar_step, args, roots, generator)
        return GenerationOutput(
            codes=run.codes.view(B, grid.rows, grid.cols),
            tokens=run.tokens,
            forwards=L,
            forwards_per_image=torch.full((B,), L),
            mean_entropy=float(run.ent_sum) / grid.num_codes if track_entropy else None,
        )


def ar_generate(backbone: Backbone, prompts: list[str], sampling: SamplingConfig,
                generator: torch.Generator | None = None, progress: bool = False,
                track_entropy: bool = False) -> GenerationOutput:
    """Eager AR sampling of one image per prompt (:meth:`ARDecoder.generate`; for compiled or graph-captured
    steps build an :class:`ARDecoder` with its mode, which keeps what it compiled from call to call)."""
    return ARDecoder(backbone, sampling).generate(prompts, generator, progress, track_entropy)
