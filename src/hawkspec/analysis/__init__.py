"""What the analysis notebooks (``notebooks/``) draw, for any backbone the project loads.

* :mod:`.attention` — attention by spatial offset (same row vs rows above), the Hawk paper's Figure 1.
* :mod:`.heads` — per-head accuracy by distance (Figure 4) and the KL between horizontal and vertical drafts
  over the image grid (Figure 5), from validation shards or teacher-forced self-samples.
* :mod:`.acceptance` — per-position acceptance maps of several decoders over the same prompts, and where Hawk's
  accepted drafts came from a vertical head.
* :mod:`.loading` — backbones, heads, decoders and prompts from the project's configs; :mod:`.plots` — drawings.

Everything talks to a backbone through :class:`~hawkspec.backbones.base.Backbone` only.
"""

from hawkspec.analysis.acceptance import AcceptanceMaps, SourceRecorder, acceptance_maps, decode_with_sources
from hawkspec.analysis.attention import OffsetAttention, attention_by_offset, offset_attention, self_samples
from hawkspec.analysis.heads import (
    DraftKL,
    HeadAccuracy,
    analyse_heads,
    draft_kl,
    head_accuracy,
    head_rows,
    hidden_batches,
    self_sample_batches,
    shard_batches,
)
from hawkspec.analysis.loading import analysis_prompts, load_backbone, load_decoders, load_heads, sampling_config

__all__ = [
    "AcceptanceMaps", "SourceRecorder", "acceptance_maps", "decode_with_sources",
    "OffsetAttention", "attention_by_offset", "offset_attention", "self_samples",
    "DraftKL", "HeadAccuracy", "analyse_heads", "draft_kl", "head_accuracy", "head_rows", "hidden_batches",
    "self_sample_batches", "shard_batches",
    "analysis_prompts", "load_backbone", "load_decoders", "load_heads", "sampling_config",
]
