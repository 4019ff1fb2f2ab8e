"""The target distribution: what plain AR sampling draws each image code from.

Every decoder — AR and all speculative ones — gets its target probabilities from :func:`target_probs`, so
"lossless" has one meaning: the output distribution equals the one defined here. Order of operations
(Lumina-mGPT's): CFG on logits, then top-k, then temperature, then (optional) top-p, then softmax. Top-k and a
positive temperature commute, so this is also LlamaGen's ``sample()`` (temperature, top-k, top-p) and HF's
warper order; top-p always reads the tempered, top-k-truncated distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How AR samples an image code.

    Attributes:
        temperature: Softmax temperature; 0 means greedy (argmax).
        top_k: Keep the k most likely codes (ties at the k-th value kept); None or 0 keeps all.
        cfg_scale: Classifier-free guidance scale; 1.0 disables the unconditional stream.
        top_p: Nucleus sampling after top-k and temperature (LlamaGen's ``top_k_top_p_filtering``): keep the most
            likely codes up to and including the first whose cumulative probability exceeds ``top_p``. None or
            1.0 keeps all (off: the target is bit-for-bit the one without the key).
        cfg_off_below_one: LlamaGen's rule (``generate.py``: ``if cfg_scale > 1.0``): a scale below 1 runs the
            conditional stream alone. False (Lumina-mGPT, Emu3, Janus): guidance unless the scale is exactly 1,
            so a scale below 1 mixes the streams.
    """

    temperature: float = 1.0
    top_k: int | None = 128
    cfg_scale: float = 3.0
    top_p: float | None = None
    cfg_off_below_one: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def use_cfg(self) -> bool:
        return self.cfg_scale > 1.0 if self.cfg_off_below_one else self.cfg_scale != 1.0

    @property
    def use_top_p(self) -> bool:
        return self.top_p is not None and self.top_p < 1.0

    def validate(self, num_codes: int) -> "SamplingConfig":
        """Raise a ValueError naming the config key when a value is out of range."""
        if self.cfg_scale < 0:
            raise ValueError(f"sampling.cfg_scale must be >= 0 (1.0 disables guidance), got {self.cfg_scale}")
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and not 0 <= self.top_k <= num_codes:
            raise ValueError(
                f"sampling.top_k={self.top_k} must be between 0 (off) and the codebook size {num_codes}"
            )
        if self.top_p is not None and (isinstance(self.top_p, bool) or not 0 < self.top_p <= 1):
            raise ValueError(f"sampling.top_p={self.top_p} must be in (0, 1] (1.0 or null is off)")
        return self


def combine_cfg(logits: torch.Tensor, streams: int, cfg_scale: float) -> torch.Tensor:
    """Merge CFG streams in float32. logits: (streams*B, ..., K), conditional rows first -> (B, ..., K) float32.

    The official Lumina-mGPT, SJD and GSD code casts the logits to float32 before mixing the streams; mixing in
    a bf16 model's own dtype moves the target by a mean total variation of 0.005-0.016 per token. Every decoder
    and AR get their target here, so all mix in float32 (``results.json``: ``decision_semantics.cfg_precision``).
    """
    if logits.dtype != torch.float32:
        logits = logits.float()
    if streams == 1:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + cfg_scale * (cond - uncond)


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Target probabilities from guided logits. (..., K) -> (..., K), float32.

    Greedy (temperature 0) gives the one-hot of the argmax, so every exact acceptance rule reduces to
    "accept iff the draft equals the argmax".
    """
    if logits.dtype != torch.float32:
        logits = logits.float()
    if cfg.greedy:
        return one_hot(logits.argmax(-1), logits.shape[-1], logits.dtype)
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.temperature != 1:
        logits = logits / cfg.temperature
    if cfg.use_top_p:
        logits = top_p_filter(logits, cfg.top_p)
    return torch.softmax(logits, dim=-1)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as LlamaGen's ``top_k_top_p_filtering`` (HF's v3 ``generation_utils``) decides it:
    sort descending, drop a code when the probability mass of the codes *before* it already exceeds ``top_p``
    (so the first code to cross the threshold is kept, and so is the most likely code). (..., K) -> (..., K),
    dropped codes at -inf. Codes already at -inf (top-k) carry no mass and stay dropped. Ties are ordered by code
    index (a stable sort), so equal logits are cut reproducibly."""
    ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    mass_before = torch.softmax(ordered, dim=-1).cumsum(-1)
    drop = torch.zeros_like(mass_before, dtype=torch.bool)
    drop[..., 1:] = mass_before[..., :-1] > top_p
    return logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))


class Uniforms:
    """A stand-in for a ``torch.Generator`` inside a compiled or graph-captured decoding step: the step's uniforms
    are drawn from the real generator before the step, into one buffer (one kernel), and handed out in order.
    The step's shapes are static, so it takes the same number every time (:attr:`taken` after a first step).

    Args:
        buffer: (n,) float32 uniforms in [0, 1), or None to count: draw from ``generator`` and record how many.
        generator: The real generator (counting mode).
    """

    def __init__(self, buffer: torch.Tensor | None = None, generator: torch.Generator | None = None):
        self.buffer, self.generator, self.taken = buffer, generator, 0

    def take(self, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= int(s)
        start, self.taken = self.taken, self.taken + n
        if self.buffer is None:  # counting
            return torch.rand(shape, generator=self.generator, device=device, dtype=dtype)
        if self.taken > self.buffer.numel():
            raise RuntimeError(f"the step took {self.taken} uniforms, more than the {self.buffer.numel()} its first "
                               "step took: its random draws are not static (eval.compile=step needs them to be)")
        return self.buffer[start : self.taken].view(shape).to(dtype)


def uniform(shape: tuple[int, ...], generator: "torch.Generator | Uniforms | None", device,
            dtype=torch.float32) -> torch.Tensor:
    """Uniforms in [0, 1) of ``shape``: from ``generator``, or the next ones of a :class:`Uniforms` buffer. Every
    random draw of decoding goes through here."""
    if isinstance(generator, Uniforms):
        return generator.take(shape, device, dtype)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)


def one_hot(index: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
    """(...) long -> (..., num_classes) one-hot. Unlike ``F.one_hot`` it does not read the indices back to check
    them, so it can sit inside a compiled or graph-captured step."""
    out = torch.zeros((*index.shape, num_classes), dtype=dtype, device=index.device)
    return out.scatter_(-1, index.unsqueeze(-1), 1)


def sample(probs: torch.Tensor, generator: "torch.Generator | Uniforms | None" = None) -> torch.Tensor:
    """One draw per row by inverting the CDF with one uniform per row. probs: (..., K), non-negative, rows
    not all zero (need not sum to one) -> (...) long.

    ``torch.multinomial`` draws one exponential per *entry* (K of them per row): on a CPU that is 4x slower
    for a tree's rows (17 x 512: 310 vs 85 us) and as fast for AR's single row; every decoder, AR included,
    samples here. A zero-probability code is never drawn: ``searchsorted(right=True)`` skips the flat steps
    of the CDF, and the rare ``u * total`` that rounds up to the total is clamped to the last code with mass
    (the first index where the CDF reaches its maximum).
    """
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    u = uniform((flat.shape[0], 1), generator, flat.device, cdf.dtype)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    return torch.minimum(idx, cdf.argmax(-1)).reshape(probs.shape[:-1])


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in nats. (..., K) -> (...)."""
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


#: The stride between the seeds of consecutive batches: batch ``b`` of a run with seed ``s`` is decoded with a
#: generator seeded ``s * BATCH_SEED_STRIDE + b``, by every decoder alike (so AR and each decoder see the same
#: randomness per batch), in one process, in a shard, in a sweep, in the analysis notebooks.
BATCH_SEED_STRIDE = 100_003


def batch_generator(seed: int, batch: int, device="cpu") -> torch.Generator:
    """The generator batch ``batch`` of a run seeded ``seed`` is decoded with (:data:`BATCH_SEED_STRIDE`)."""
    return torch.Generator(device=device).manual_seed(int(seed) * BATCH_SEED_STRIDE + int(batch))
