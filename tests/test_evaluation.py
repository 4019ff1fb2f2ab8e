"""hawkspec.evaluation: the spread of timed passes and the warnings beside the speedups (synthetic pass times and
loads), the batch seeds, the rows, and the noise-floor seed."""

import logging

import pytest
import torch

from hawkspec import evaluation
from hawkspec.cli import eval_shards
from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.sampling import batch_generator
from hawkspec.evaluation import (
    BUSY_LOAD_EXCESS,
    SPREAD_WARNING,
    Evaluation,
    Timing,
    busy_warning,
    noise_floor_seed,
    pass_spread,
    timing_warnings,
)


def test_pass_spread_is_max_minus_min_over_the_median():
    assert pass_spread([1.0, 1.1, 1.2]) == pytest.approx(0.2 / 1.1)
    assert pass_spread([2.0, 2.0]) == 0.0
    assert pass_spread([1.0]) is None and pass_spread([]) is None


def test_tight_passes_on_a_quiet_machine_warn_of_nothing():
    seconds = {"ar": [10.0, 10.2, 10.1], "hawk": [4.0, 4.1, 4.05]}
    assert timing_warnings(seconds, load=(1.9, 2.1), threads=2) == []


def test_one_pass_says_that_no_spread_was_measured():
    (warning,) = timing_warnings({"ar": [10.0], "hawk": [3.0]}, load=(0.5, 0.5), threads=2)
    assert "one timed pass" in warning and "no spread was measured" in warning


def test_a_wide_spread_names_the_decoder_and_its_spread():
    limit = 1.0 + SPREAD_WARNING
    seconds = {"ar": [10.0, 10.0 * (limit + 0.05), 10.0], "medusa": [5.0, 5.1, 5.0], "hawk": [3.0, 3.0, 3.0]}
    (warning,) = timing_warnings(seconds, threads=2)
    assert "ar 15%" in warning and "medusa" not in warning and "hawk" not in warning
    just_under = {"ar": [10.0, 10.0 * (limit - 0.01), 10.0]}
    assert timing_warnings(just_under, threads=2) == []


def test_a_busy_machine_is_said_even_when_the_passes_agree():
    seconds = {"ar": [10.0, 10.0, 10.0], "hawk": [3.0, 3.0, 3.0]}  # loaded alike: no spread shows it
    busy = 2 + BUSY_LOAD_EXCESS + 0.5
    (warning,) = timing_warnings(seconds, load=(busy, 1.0), threads=2)
    assert "busy" in warning and f"{busy:.1f} / 1.0" in warning and "2 thread" in warning
    assert timing_warnings(seconds, load=(2 + BUSY_LOAD_EXCESS, None), threads=2) == []  # at the limit: quiet
    assert timing_warnings(seconds, load=(None, None), threads=2) == []  # no load average on this platform
    assert busy_warning((9.0, 9.0), threads=16) is None  # a 16-thread run makes that load itself


def test_every_problem_is_said_once_in_a_quickstart_on_a_loaded_machine():
    """The issue's case: one pass each on a busy 2-core machine -- both the single pass and the load are said."""
    warnings = timing_warnings({"ar": [30.0], "medusa": [28.8], "hawk": [9.2]}, load=(6.3, 7.1), threads=2)
    assert len(warnings) == 2 and "no spread" in warnings[0] and "busy" in warnings[1]


class FakeBackbone:
    class grid:
        length = 5


class Counting:
    """Codes from the batch's generator, with a fixed forward count (no steps: plain AR's counters)."""

    lossless = True

    def __init__(self, forwards: int):
        self.forwards, self.generators = forwards, []

    def generate(self, prompts, generator):
        self.generators.append(generator.initial_seed())
        B = len(prompts)
        codes = torch.randint(8, (B, 2, 2), generator=generator)
        fwd = torch.full((B,), self.forwards)
        return GenerationOutput(codes=codes, tokens=codes.flatten(1), forwards=self.forwards, forwards_per_image=fwd)


def test_every_decoder_decodes_batch_b_with_the_runs_batch_generator():
    decs = {"ar": Counting(5), "fast": Counting(2)}
    ev = Evaluation(FakeBackbone(), decs, ["a", "b", "c"], seed=7, batch_size=2, repeats=1, warmup_batches=0,
                    progress=False)
    timing = ev.time()
    want = [batch_generator(7, b).initial_seed() for b in range(2)]
    assert decs["ar"].generators == want and decs["fast"].generators == want
    again = ev.decode("ar", seed=noise_floor_seed(7))
    assert decs["ar"].generators[2:] == [batch_generator(8, b).initial_seed() for b in range(2)]
    assert not torch.equal(torch.cat([o.codes for o in again]), torch.cat([o.codes for o in timing.outputs["ar"]]))


def test_rows_put_the_spread_beside_the_speedup_and_time_logs_the_warnings(caplog, monkeypatch):
    decs = {"ar": Counting(5), "fast": Counting(2)}
    ev = Evaluation(FakeBackbone(), decs, ["a", "b"], seed=0, batch_size=1, repeats=3, progress=False)
    fake = Timing({"ar": [4.0, 4.0, 4.0], "fast": [1.0, 1.5, 1.0]}, {n: [] for n in decs}, (0.2, 0.3), 2)
    monkeypatch.setattr(evaluation, "interleaved_passes", lambda *a, **k: fake)
    with caplog.at_level(logging.WARNING, logger="hawkspec"):
        timing = ev.time()
    assert "fast 50%" in caplog.text and "ar 0%" not in caplog.text  # the wide decoder only
    outputs = {n: [d.generate(["a"], torch.Generator().manual_seed(0))] for n, d in decs.items()}
    rows = {r["decoder"]: r for r in ev.rows(outputs, timing)}
    assert rows["fast"]["speedup"] == pytest.approx(4.0) and rows["fast"]["pass_spread"] == pytest.approx(0.5)
    assert rows["ar"]["pass_spread"] == 0.0 and rows["fast"]["seconds_per_pass"] == [1.0, 1.5, 1.0]
    assert rows["fast"]["step_compression"] == pytest.approx(2.5)
    described = timing.describe()
    assert described["passes"] == 3 and described["warnings"] == timing.warnings() and len(described["warnings"]) == 1


def test_timing_needs_the_baseline():
    ev = Evaluation(FakeBackbone(), {"fast": Counting(2)}, ["a"], seed=0, batch_size=1, progress=False)
    with pytest.raises(ValueError, match="baseline 'ar'"):
        ev.time()


def test_the_noise_floor_seed_is_the_next_seed_unless_configured():
    assert noise_floor_seed(0) == 1 and noise_floor_seed(5, None) == 6 and noise_floor_seed(5, 11) == 11


def test_a_merge_names_the_busy_shard_and_the_single_pass():
    rows = [{"decoder": "ar", "seconds_per_image": 1.0}, {"decoder": "hawk", "seconds_per_image": 0.4}]
    by_shard = {"0": {"calls": [{"batches_decoded": 2, "load_average": [0.5, 0.8], "threads": 2}]},
                "1": {"calls": [{"batches_decoded": 2, "load_average": [6.0, 5.0], "threads": 2},
                                {"batches_decoded": 0, "load_average": [9.0, 9.0], "threads": 2}]}}
    timing = eval_shards.merged_timing(rows, by_shard)
    assert timing["passes"] == 1 and "no spread" in timing["warnings"][0]
    (busy,) = timing["warnings"][1:]
    assert "in shard 1" in busy and "6.0 / 5.0" in busy  # the call that decoded nothing is not counted
