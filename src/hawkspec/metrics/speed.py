"""Speed metrics, each defined once.

* ``forwards_per_image``: target-model forward passes an image needed (the prefill counts as one). Plain AR
  needs ``rows * W`` (one per body token, end-of-line tokens included).
* ``step_compression``: AR forwards per image / the decoder's forwards per image — hardware-independent.
* ``acceptance_length``: body tokens committed per verification forward, *bonus token included* and forced
  end-of-line tokens included (they ride along the accepted path for free); AR scores exactly 1.0. The first
  body token, sampled from the prefill, is not part of any verification step.
* ``accepted_drafts_per_step``: draft tokens accepted per verification forward (bonus and forced excluded).
* ``seconds_per_image`` and ``speedup`` = AR seconds per image / the decoder's, measured in the same run by
  :func:`hawkspec.evaluation.interleaved_passes`: every batch is decoded by every decoder in turn before the next
  batch, so a machine whose speed drifts (shared CPUs, GPU clocks) slows every decoder alike. Beside each speedup,
  ``pass_spread`` = (max - min) / median of the decoder's timed passes (:func:`hawkspec.evaluation.pass_spread`).
* Step accounting (:class:`~hawkspec.metrics.accounting.ForwardClock`, an untimed pass of its own): ``seconds_per_forward`` (the mean
  backbone forward of the decoder: one token for AR, one tree for the others), ``forward_share`` (the part of
  the decoder's time spent in backbone forwards) and ``efficiency`` = measured speedup / (step_compression x
  t_AR-forward / t_tree-forward): how close the engine comes to what its forwards allow (1.0: every second
  outside the forward is as cheap, relative to it, as AR's).
"""

from __future__ import annotations

import torch

from hawkspec.decoding.output import GenerationOutput


def image_counters(out: GenerationOutput, ar_forwards: int) -> dict[str, torch.Tensor]:
    """Per-image counters of one batch: forwards, committed tokens and steps (AR gets steps = forwards - 1)."""
    B = out.codes.shape[0]
    fwd = out.forwards_per_image.double()
    if "steps" in out.extras:
        steps, committed = out.extras["steps"].double(), out.extras["committed"].double()
        accepted = out.accepted_tokens.double()
    else:  # plain AR: one token per forward
        steps = torch.full((B,), float(ar_forwards - 1), dtype=torch.float64)
        committed, accepted = steps.clone(), torch.zeros(B, dtype=torch.float64)
    return {"forwards": fwd, "steps": steps, "committed": committed, "accepted": accepted}


def summarize(counters: list[dict[str, torch.Tensor]], ar_forwards: int) -> dict[str, float]:
    """Aggregate per-image counters of all batches into the metrics above (means over images)."""
    cat = {k: torch.cat([c[k] for c in counters]) for k in counters[0]}
    steps = cat["steps"].clamp_min(1)
    fwd = cat["forwards"].mean().item()
    return {
        "acceptance_length": (cat["committed"] / steps).mean().item(),
        "accepted_drafts_per_step": (cat["accepted"] / steps).mean().item(),
        "forwards_per_image": fwd,
        "step_compression": ar_forwards / fwd,
    }


def efficiency(speedup: float, step_compression: float, ar_forward_seconds: float,
               tree_forward_seconds: float) -> float:
    """Measured speedup / the speedup the forwards allow (step compression x t_AR-forward / t_tree-forward)."""
    allowed = step_compression * ar_forward_seconds / tree_forward_seconds
    return speedup / allowed
