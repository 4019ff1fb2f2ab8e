"""The evaluation library: decoders run on the same prompts and seeds, timed against AR while taking turns,
accounted, and summed up in result rows -- what ``hawkspec-eval`` (:mod:`hawkspec.cli.eval`), sharded evaluation
(:mod:`hawkspec.cli.eval_shards`) and the measuring scripts of ``experiments/`` share.

* Batch ``b`` of a run seeded ``s`` is decoded by every decoder with
  :func:`~hawkspec.decoding.sampling.batch_generator` ``(s, b)``, everywhere (:meth:`Evaluation.generator`).
* :func:`take_turns`: one batch decoded by every decoder in turn, each call timed, the order rotating from batch to
  batch; :func:`interleaved_passes` is a warm-up (:func:`warm_up`) and ``repeats`` passes of it, and a shard
  decodes its batches with it.
* :class:`Timing`: the seconds of every pass, the machine's load around them, each decoder's spread
  (:func:`pass_spread`) and what makes the speedups doubtful (:func:`timing_warnings`: spread over
  :data:`SPREAD_WARNING`, a single pass, a busy machine).
* :class:`Evaluation`: the backbone, the decoders, the batches and the seed of one run: :meth:`~Evaluation.decode`,
  :meth:`~Evaluation.time`, :meth:`~Evaluation.account`, :meth:`~Evaluation.rows`.
* :func:`noise_floor_seed` and :func:`score_quality`: AR's noise floor, chosen and scored in one place for the
  one-process and the sharded run.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.sampling import batch_generator
from hawkspec.metrics.accounting import step_accounting
from hawkspec.metrics.speed import efficiency, image_counters, summarize

log = logging.getLogger("hawkspec")

#: A decoder whose timed passes spread more than this ((max - min) / median of its seconds per pass) makes the
#: run's speedups doubtful: the machine's speed changed while it timed.
SPREAD_WARNING = 0.10
#: A 1-minute load average above the run's own CPU threads by more than this while timing: the machine was busy
#: (other processes took turns on its cores, and no spread of a few passes need show it).
BUSY_LOAD_EXCESS = 1.0


def split_batches(prompts: Sequence[str], batch_size: int) -> list[list[str]]:
    """The prompts in batches of ``batch_size`` (in prompt order; the last may be shorter)."""
    if int(batch_size) < 1:
        raise ValueError(f"batch size must be >= 1 (eval.batch_size), got {batch_size}")
    return [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]


def warm_up(decoders: Mapping[str, object], batches: Sequence[Sequence[str]],
            generator: Callable[[int], torch.Generator], count: int) -> None:
    """Decode ``count`` untimed batches with every decoder (cycling through ``batches`` when there are fewer)."""
    for dec in decoders.values():
        for w in range(count if batches else 0):
            i = w % len(batches)
            dec.generate(list(batches[i]), generator(i))


def take_turns(decoders: Mapping[str, object], batch: Sequence[str], generator: Callable[[], torch.Generator],
               turn: int) -> Iterator[tuple[str, GenerationOutput, float]]:
    """Decode one batch with every decoder in turn, each with a fresh ``generator()``: ``(name, output, seconds)``.

    The order starts at decoder ``turn % len(decoders)`` and wraps around, so from one turn to the next no decoder
    always follows the same one; drift on the scale of seconds (shared CPUs, GPU clocks) hits all of them alike.
    """
    names = list(decoders)
    k = turn % len(names)
    for name in names[k:] + names[:k]:
        gen = generator()
        t0 = time.perf_counter()
        out = decoders[name].generate(list(batch), gen)
        yield name, out, time.perf_counter() - t0


def machine_load() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def pass_spread(seconds: Sequence[float]) -> float | None:
    """(max - min) / median of the seconds of the timed passes; None with fewer than 2 passes (none measured)."""
    if len(seconds) < 2:
        return None
    mid = statistics.median(seconds)
    return (max(seconds) - min(seconds)) / mid if mid > 0 else 0.0


def busy_warning(load: Sequence[float | None], threads: int, excess: float = BUSY_LOAD_EXCESS,
                 where: str = "") -> str | None:
    """A warning when a load average sampled around the timed passes (``load``: before, after) exceeds the run's
    own ``threads`` by more than ``excess``; None on a quiet machine or where no load was sampled."""
    seen = [x for x in load if x is not None]
    if not seen or max(seen) <= threads + excess:
        return None
    around = " / ".join("n/a" if x is None else f"{x:.1f}" for x in load)
    return (f"the machine was busy while timing{where}: load average {around} (before / after the timed passes) "
            f"for a run on {threads} thread(s); other processes took turns on its cores, so these speedups are "
            "not reliable: time them on a quiet machine")


def timing_warnings(seconds: Mapping[str, Sequence[float]], load: Sequence[float | None] = (), threads: int = 1,
                    max_spread: float = SPREAD_WARNING, load_excess: float = BUSY_LOAD_EXCESS) -> list[str]:
    """What makes the speedups of timed passes doubtful, one sentence each (empty: nothing).

    Args:
        seconds: decoder -> seconds of each timed pass.
        load: 1-minute load averages sampled before and after the timed passes (None where not known).
        threads: The CPU threads the run decodes on.
        max_spread: :data:`SPREAD_WARNING`.
        load_excess: :data:`BUSY_LOAD_EXCESS`.
    """
    out = []
    if seconds and min(len(v) for v in seconds.values()) < 2:
        out.append("only one timed pass per decoder: no spread was measured, so nothing shows whether these "
                   "speedups would come out again (time 3 or more passes)")
    wide = {name: s for name, v in seconds.items() if (s := pass_spread(v)) is not None and s > max_spread}
    if wide:
        out.append(f"timed passes spread more than {max_spread:.0%} ((max - min) / median): "
                   + ", ".join(f"{name} {s:.0%}" for name, s in wide.items())
                   + "; the machine's speed changed while timing, so these speedups are not reliable")
    busy = busy_warning(load, threads, load_excess)
    if busy:
        out.append(busy)
    return out


@dataclass
class Timing:
    """The timed passes of a run.

    Attributes:
        seconds: decoder -> seconds of each timed pass (the sum over the batches).
        outputs: decoder -> its outputs of the first timed pass, one per batch.
        load: The 1-minute load average before and after the timed passes (None where not known).
        threads: The CPU threads the run decoded on.
    """

    seconds: dict[str, list[float]]
    outputs: dict[str, list[GenerationOutput]]
    load: tuple[float | None, float | None] = (None, None)
    threads: int = 1

    def median(self, name: str) -> float:
        """Decoder ``name``'s median pass (seconds)."""
        return statistics.median(self.seconds[name])

    def spread(self, name: str) -> float | None:
        """Decoder ``name``'s :func:`pass_spread`."""
        return pass_spread(self.seconds[name])

    def warnings(self) -> list[str]:
        """:func:`timing_warnings` of these passes."""
        return timing_warnings(self.seconds, self.load, self.threads)

    def describe(self) -> dict:
        """What results files record about the timing: passes, threads, load, the spread threshold, warnings."""
        return {"passes": min((len(v) for v in self.seconds.values()), default=0), "threads": self.threads,
                "load_average": {"before": self.load[0], "after": self.load[1]},
                "spread_threshold": SPREAD_WARNING, "busy_load_excess": BUSY_LOAD_EXCESS,
                "warnings": self.warnings()}


def interleaved_passes(
    decoders: Mapping[str, object], batches: Sequence[Sequence[str]], generator: Callable[[int], torch.Generator],
    repeats: int, warmup_batches: int = 1, progress: bool = True,
) -> Timing:
    """Time every decoder over the same batches: :func:`warm_up`, then ``repeats`` timed passes.

    Within a pass the decoders take turns *per batch* (:func:`take_turns`, the order rotating from batch to
    batch): drift on the scale of seconds hits all of them alike, which per-decoder passes (minutes apart on a
    CPU) do not. Batch ``i`` is decoded with ``generator(i)`` by every decoder. The load average is sampled just
    before and just after the timed passes.

    Returns:
        The :class:`Timing`: seconds of each pass per decoder and each decoder's outputs of the first pass.
    """
    warm_up(decoders, batches, generator, warmup_batches)
    seconds = {name: [] for name in decoders}
    outputs = {name: [] for name in decoders}
    before = machine_load()
    for rep in tqdm(range(max(1, repeats)), desc="timed passes", disable=not progress):
        spent = dict.fromkeys(decoders, 0.0)
        for i, batch in enumerate(batches):
            for name, out, sec in take_turns(decoders, batch, lambda: generator(i), i):  # noqa: B023
                spent[name] += sec
                if rep == 0:
                    outputs[name].append(out)
        for name in decoders:
            seconds[name].append(spent[name])
    return Timing(seconds, outputs, (before, machine_load()), torch.get_num_threads())


def noise_floor_seed(seed: int, configured: int | None = None) -> int:
    """The seed AR samples again with for the noise floor: ``configured`` (``eval.quality.noise_floor_seed``),
    or ``seed + 1`` when it is None."""
    return int(seed) + 1 if configured is None else int(configured)


def score_quality(settings, device, rows: list[dict], images: Mapping[str, torch.Tensor], prompts: Sequence[str],
                  base_seed: int, floor_seed: int, ar_again: Callable[[], torch.Tensor]) -> dict:
    """Add the quality figures to every row and return the meter's description; with ``settings.noise_floor``,
    also the noise floor: AR's images again at ``floor_seed`` (``ar_again()``, called only then) scored the same.

    Args:
        settings: The :class:`~hawkspec.metrics.quality.QualitySettings`.
        rows: The result rows (``decoder`` names the images of each).
        images: decoder -> uint8 (N, 3, H, W) images in prompt order.
    """
    from hawkspec.metrics.quality import QualityMeter, noise_floor

    log.info("Instantiating quality meter <hawkspec.metrics.quality.QualityMeter>")
    meter = QualityMeter(settings, int(images["ar"].shape[-1]), device)
    for row in rows:
        row.update(meter.measure(images[row["decoder"]], list(prompts)))
    out = meter.describe()
    if settings.noise_floor:
        log.info("Noise floor: AR again with seed %d (untimed)", floor_seed)
        again = ar_again()
        reseed = meter.measure(again, list(prompts))
        ar_row = next(r for r in rows if r["decoder"] == "ar")
        out["noise_floor"] = {"base_seed": base_seed, "seed": floor_seed, "ar_reseed": reseed,
                              "delta": noise_floor(ar_row, reseed), "fid_ar_vs_ar": meter.fid_between(images["ar"], again)}
    return out


class Evaluation:
    """One run's decoders on the same prompts and seeds, timed against AR in the same process.

    Args:
        backbone: The backbone every decoder is bound to (its grid gives AR's forwards per image).
        decoders: name -> built decoder; the ``baseline`` (AR) among them for :meth:`time` and speedups.
        prompts: The prompt texts, decoded in batches of ``batch_size``.
        seed: The run's seed: batch ``b`` is decoded with ``batch_generator(seed, b)`` by every decoder.
        repeats: Timed passes (the seconds of a decoder are its median pass).
        warmup_batches: Untimed batches per decoder before timing.
        baseline: The decoder every speedup divides by.
    """

    def __init__(self, backbone, decoders: Mapping[str, object], prompts: Sequence[str], *, seed: int,
                 batch_size: int, device="cpu", repeats: int = 3, warmup_batches: int = 1, baseline: str = "ar",
                 progress: bool = True):
        self.backbone, self.decoders, self.prompts = backbone, dict(decoders), list(prompts)
        self.seed, self.device, self.baseline, self.progress = int(seed), device, baseline, progress
        self.repeats, self.warmup_batches = int(repeats), int(warmup_batches)
        self.batches = split_batches(self.prompts, batch_size)

    def generator(self, batch: int, seed: int | None = None) -> torch.Generator:
        """The generator of batch ``batch`` (the run's seed, or ``seed``)."""
        return batch_generator(self.seed if seed is None else seed, batch, self.device)

    def decode(self, name: str, seed: int | None = None) -> list[GenerationOutput]:
        """One untimed pass of decoder ``name`` over every batch, with the run's seed or ``seed`` (AR's noise
        floor)."""
        dec = self.decoders[name]
        return [dec.generate(batch, self.generator(i, seed)) for i, batch in enumerate(self.batches)]

    def time(self) -> Timing:
        """:func:`interleaved_passes` of every decoder; each of its :func:`timing_warnings` is logged."""
        if self.baseline not in self.decoders:
            raise ValueError(f"timing needs the baseline {self.baseline!r} among the decoders "
                             f"({list(self.decoders)}): every speedup is against it in the same run")
        timing = interleaved_passes(self.decoders, self.batches, self.generator, repeats=self.repeats,
                                    warmup_batches=self.warmup_batches, progress=self.progress)
        for warning in timing.warnings():
            log.warning("Timing: %s", warning)
        return timing

    def account(self) -> dict[str, dict[str, float]]:
        """Step accounting (:func:`~hawkspec.metrics.accounting.step_accounting`): an untimed pass per decoder in
        which its runner clocks every backbone forward."""
        return step_accounting(self.decoders, self.batches, self.generator)

    def rows(self, outputs: Mapping[str, list[GenerationOutput]], timing: Timing | None = None,
             accounting: Mapping[str, dict] | None = None) -> list[dict]:
        """One row per decoder: its counters (:func:`~hawkspec.metrics.speed.summarize`) over ``outputs``; with
        ``timing`` its seconds per image, speedup over the baseline, ``pass_spread`` and seconds of each pass;
        with ``accounting`` its seconds per forward, forward share and efficiency."""
        ar_forwards = self.backbone.grid.length
        rows = []
        for name, dec in self.decoders.items():
            row = {"decoder": name, "lossless": bool(getattr(dec, "lossless", False)),
                   **summarize([image_counters(o, ar_forwards) for o in outputs[name]], ar_forwards)}
            if timing is not None:
                row.update(self._speed(name, timing))
            if accounting is not None:
                row.update(self._accounting(name, row, accounting))
            rows.append(row)
        return rows

    def _speed(self, name: str, timing: Timing) -> dict:
        n = len(self.prompts)
        sec, base = timing.median(name) / n, timing.median(self.baseline) / n
        return {"seconds_per_image": sec, "speedup": base / sec, "pass_spread": timing.spread(name),
                "seconds_per_pass": timing.seconds[name], "images_per_second": 1.0 / sec}

    def _accounting(self, name: str, row: dict, accounting: Mapping[str, dict]) -> dict:
        acc = accounting[name]
        out = {"seconds_per_forward": acc["seconds_per_forward"], "forward_share": acc["forward_seconds"] / acc["seconds"]}
        if "speedup" in row:
            out["efficiency"] = efficiency(row["speedup"], row["step_compression"],
                                           accounting[self.baseline]["seconds_per_forward"], acc["seconds_per_forward"])
        return out
