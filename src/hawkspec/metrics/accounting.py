"""Step accounting: where a decoder's time goes, inside backbone forwards and outside them.

:class:`ForwardClock` times the backbone forwards a decoder's runner makes while it is accounting
(:meth:`hawkspec.decoding.static.StepRunner.accounting`); :func:`step_accounting` runs one untimed pass per decoder
under it (the metrics built on it -- ``seconds_per_forward``, ``forward_share``, ``efficiency`` -- are defined in
:mod:`hawkspec.metrics.speed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch


class ForwardClock:
    """Seconds spent in, and calls of, the backbone forwards it is handed (:meth:`time`).

    On CUDA each call is synchronised before and after, which is why step accounting runs in a pass of its own,
    never in the timed passes.
    """

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    def time(self, forward: Callable, *args, **kwargs):
        """``forward(*args, **kwargs)``, timed."""
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = forward(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def step_accounting(decoders: Mapping[str, object], batches: list[list[str]],
                    generator: Callable[[int], torch.Generator]) -> dict[str, dict[str, float]]:
    """One untimed pass per decoder with a :class:`ForwardClock` on its runner: seconds in backbone forwards and
    outside them.

    A clock cannot stop inside a compiled or graph-captured step, so while accounting a runner runs its steps
    eagerly; under ``eval.compile=step`` with compiled forwards, so the forward times are those of compiled
    forwards, as inside the compiled steps (a first batch compiles them outside the clock).

    Returns, per decoder: ``seconds`` (the pass), ``forward_seconds``, ``forwards`` (calls, prefill excluded)
    and ``seconds_per_forward``.
    """
    out = {}
    for name, dec in decoders.items():
        clock = ForwardClock()
        with dec.runner.accounting(clock):
            if dec.runner.mode.compile == "step" and batches:  # compile the forwards first, uncounted
                dec.generate(batches[0], generator(0))
                clock.reset()
            t0 = time.perf_counter()
            for i, batch in enumerate(batches):
                dec.generate(batch, generator(i))
            total = time.perf_counter() - t0
        out[name] = {"seconds": total, "forward_seconds": clock.seconds, "forwards": clock.calls,
                     "seconds_per_forward": clock.seconds / max(clock.calls, 1)}
    return out
