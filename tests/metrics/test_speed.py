"""interleaved_passes (hawkspec.evaluation): the decoders take turns on every batch, with the same seeds, and drift
hits them alike; step accounting and efficiency."""

import itertools

import pytest
import torch

from hawkspec import evaluation
from hawkspec.evaluation import interleaved_passes


class Recorder:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def generate(self, batch, generator):
        self.log.append((self.name, batch[0], int(torch.randint(1000, (1,), generator=generator))))
        return (self.name, batch[0])


def test_decoders_take_turns_per_batch_with_the_same_seed_per_batch():
    log = []
    decs = {n: Recorder(n, log) for n in ("ar", "a", "b")}
    batches = [["p0"], ["p1"], ["p2"], ["p3"]]
    timing = interleaved_passes(decs, batches, lambda i: torch.Generator().manual_seed(i), repeats=2,
                                warmup_batches=1, progress=False)
    seconds, outs = timing.seconds, timing.outputs
    timed = log[3:]  # after one warm-up batch per decoder
    assert len(timed) == 2 * 4 * 3
    first = timed[:12]
    # batch by batch, every decoder once, the order rotating
    assert [n for n, _, _ in first[:3]] == ["ar", "a", "b"] and [n for n, _, _ in first[3:6]] == ["a", "b", "ar"]
    assert all(len({b for _, b, _ in first[i : i + 3]}) == 1 for i in range(0, 12, 3))
    # the same batch gets the same random stream in every decoder and every pass
    draws = {(b, r) for _, b, r in timed}
    assert len(draws) == 4
    assert {n: len(v) for n, v in seconds.items()} == {"ar": 2, "a": 2, "b": 2}
    assert outs["b"] == [("b", p[0]) for p in batches]


def test_drift_within_a_pass_hits_every_decoder_alike(monkeypatch):
    """A machine that slows down 3x halfway through a pass: equal decoders still come out equal."""
    clock = itertools.count()
    ticks = {"t": 0.0}

    class Equal:
        def generate(self, batch, generator):
            ticks["t"] += 1.0 if next(clock) < 12 else 3.0  # same work; the machine slows after 12 calls
            return None

    monkeypatch.setattr(evaluation.time, "perf_counter", lambda: ticks["t"])
    decs = {"ar": Equal(), "hawk": Equal()}
    seconds = interleaved_passes(decs, [["p"]] * 12, lambda i: None, repeats=1, warmup_batches=0,
                                 progress=False).seconds
    assert seconds["ar"] == seconds["hawk"]


def test_step_accounting_counts_every_backbone_forward_through_the_runner():
    """The clock sees every backbone forward a decoder's runner makes while accounting, and none after: nothing on
    the backbone is replaced."""
    from hawkspec.decoding.ar import ARDecoder
    from hawkspec.decoding.sampling import SamplingConfig
    from hawkspec.metrics.accounting import ForwardClock, step_accounting
    from hawkspec.metrics.speed import efficiency
    from hawkspec.testing import build_random_backbone

    bb = build_random_backbone(rows=2, cols=3, num_codes=16)
    s = SamplingConfig(temperature=1.0, top_k=0, cfg_scale=1.0)
    gen = lambda i: torch.Generator().manual_seed(i)  # noqa: E731
    ar = ARDecoder(bb, s)
    acc = step_accounting({"ar": ar}, [["a red circle"], ["a blue square"]], gen)["ar"]
    assert acc["forwards"] == 2 * (bb.grid.length - 1)  # one per body token after the first, prefill excluded
    assert 0 < acc["forward_seconds"] <= acc["seconds"]
    assert "forward" not in bb.__dict__ and ar.runner.clock is None  # nothing replaced, the clock detached
    clock = ForwardClock()
    ar.generate(["a red circle"], gen(0))
    assert clock.calls == 0
    # speedup 1.5 where the forwards allow 2 x (1 / 1.25) = 1.6
    assert efficiency(1.5, 2.0, 1.0, 1.25) == pytest.approx(1.5 / 1.6)
