"""Step accounting: where a decoder's time goes, inside backbone forwards and outside them.

:class:`ForwardClock` times every backbone forward of a pass; :func:`step_accounting` runs one untimed pass per
decoder under it (the metrics built on it -- ``seconds_per_forward``, ``forward_share``, ``efficiency`` -- are
defined in :mod:`hawkspec.metrics.speed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch


class ForwardClock:
    """Times every :meth:`Backbone.forward` call of ``backbone`` while active (a context manager).

    The backbone's ``forward`` is wrapped on the instance; on CUDA each call is synchronised before and after,
    which is why step accounting runs in a pass of its own, never in the timed passes.
    """

    def __init__(self, backbone):
        self.backbone, self.seconds, self.calls = backbone, 0.0, 0

    def __enter__(self) -> "ForwardClock":
        inner = self.backbone.forward
        cuda = self.backbone.code_token_ids.is_cuda

        def timed(*args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            if cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        self.backbone.forward = timed
        return self

    def __exit__(self, *exc) -> None:
        del self.backbone.forward  # the class's method again


def step_accounting(decoders: Mapping[str, object], backbone, batches: list[list[str]],
                    generator: Callable[[int], torch.Generator],
                    compiled_forward: bool = False) -> dict[str, dict[str, float]]:
    """One untimed pass per decoder with a :class:`ForwardClock`: seconds in backbone forwards and outside them.

    A clock cannot stop inside a compiled or graph-captured step, so the pass runs each decoder's steps without
    its runner; ``compiled_forward`` (``eval.compile=step``) compiles the backbone's forwards for it, so the
    forward times are those of compiled forwards, as inside the compiled steps.

    Returns, per decoder: ``seconds`` (the pass), ``forward_seconds``, ``forwards`` (calls, prefill excluded)
    and ``seconds_per_forward``.
    """
    out = {}
    if compiled_forward:
        backbone.compile_steps("forward")
    try:
        for name, dec in decoders.items():
            runner, dec.runner = getattr(dec, "runner", None), None
            try:
                if compiled_forward and batches:  # compile outside the clock
                    dec.generate(batches[0], generator(0))
                with ForwardClock(backbone) as clock:
                    t0 = time.perf_counter()
                    for i, batch in enumerate(batches):
                        dec.generate(batch, generator(i))
                    total = time.perf_counter() - t0
            finally:
                dec.runner = runner
            out[name] = {"seconds": total, "forward_seconds": clock.seconds, "forwards": clock.calls,
                         "seconds_per_forward": clock.seconds / max(clock.calls, 1)}
    finally:
        if compiled_forward:
            backbone.compile_steps("none")
    return out
