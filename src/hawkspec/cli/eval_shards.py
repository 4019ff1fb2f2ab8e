"""Sharded evaluation: each shard decodes its share of the prompts into a shared image store; a merge step
scores the union.

Layout of the store (``eval.store``), one folder per decoder::

    <store>/<decoder>/<index>.png    the image of prompt ``index`` (its position in the full prompt set)
    <store>/<decoder>/<index>.json   its record: prompt, seed, speed counters, codes, timing, shard, device

A record is written after its image (both atomically), so a record means the image is complete. Prompts are
split into global batches of ``eval.batch_size`` (in prompt order); batch ``b`` belongs to shard
``b % count`` and is decoded with the generator ``batch_generator(seed, b)`` (hawkspec.decoding.sampling) by every decoder, exactly as an
unsharded run decodes it: a sharded run makes the same images as a one-process run. A resumed shard skips the
batches whose records all exist. Speed is measured inside each shard on its own device, decoders taking
turns per batch (:func:`hawkspec.evaluation.take_turns`, the loop a one-process run times with); the merged speedup
is total AR seconds / total decoder seconds, and each shard's own figures are kept (``results.json`` →
``speed_by_shard``). Every batch is timed once, so no spread is measured: the merged table says so, and names
the shards whose machine was busy while they timed (:func:`merged_timing`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from hawkspec.data.prompts import Prompt
from hawkspec.decoding.sampling import batch_generator
from hawkspec.evaluation import busy_warning, machine_load, take_turns, timing_warnings, warm_up
from hawkspec.metrics.speed import summarize

log = logging.getLogger("hawkspec")

SPEED_NOTE = ("Speed is measured within one process on one device: every shard times AR and each decoder on the "
              "same batches, turn by turn; speedup = total AR seconds / total decoder seconds over the shards "
              "(each shard's own in results.json -> speed_by_shard).")


def global_batches(n: int, batch_size: int) -> list[range]:
    """Positions (in the prompt list) of every global batch."""
    return [range(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]


def shard_batches(n: int, batch_size: int, index: int, count: int) -> list[int]:
    """The global batch numbers shard ``index`` of ``count`` decodes."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"eval.shard.index={index} must be in [0, eval.shard.count={count})")
    return [b for b in range(len(global_batches(n, batch_size))) if b % count == index]


def _paths(store: Path, decoder: str, index: int) -> tuple[Path, Path]:
    folder = store / decoder
    return folder / f"{index:07d}.png", folder / f"{index:07d}.json"


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def done(store: Path, decoder: str, index: int) -> bool:
    return _paths(store, decoder, index)[1].is_file()


def run_shard(store: Path, prompts: list[Prompt], decoders: dict, decode_images, *, seed: int, batch_size: int,
              index: int, count: int, device: str, warmup_batches: int = 1, max_batches: int | None = None,
              extra: dict | None = None, meta: dict | None = None) -> dict:
    """Decode this shard's batches that are not finished yet, writing every image and record once.

    Args:
        store: The shared image store.
        prompts: The full prompt set (every shard sees the same list).
        decoders: name -> decoder, timed turn by turn per batch.
        decode_images: codes (N, rows, cols) -> uint8 images (N, 3, H, W).
        extra: name -> (decoder, seed) decoded untimed with another seed (AR's noise floor).
        max_batches: Stop after this many batches (a time-boxed job; the rest is left for a resumed run).
        meta: Written into every record (backbone name and revision, AR's forwards per image).

    Returns:
        What this call did: batches decoded and skipped.
    """
    from PIL import Image

    store.mkdir(parents=True, exist_ok=True)
    batches = global_batches(len(prompts), batch_size)
    mine = shard_batches(len(prompts), batch_size, index, count)
    everything = {**decoders, **(extra or {})}
    todo = [b for b in mine if not all(done(store, name, prompts[i].index) for name in everything for i in batches[b])]
    finished = len(mine) - len(todo)
    if max_batches is not None:
        todo = todo[: int(max_batches)]
    log.info("Shard %d/%d: %d of its %d batches to decode (%d already in %s%s)", index, count, len(todo), len(mine),
             finished, store, f"; {len(mine) - finished - len(todo)} left for a later call (eval.shard.max_batches="
             f"{max_batches})" if len(mine) - finished > len(todo) else "")
    texts = [[prompts[i].text for i in batches[b]] for b in todo]
    warm_up(decoders, texts, lambda k: batch_generator(seed, todo[k], device), warmup_batches)

    def write(name, dec, b, out, sec, run_seed):
        images = decode_images(out.codes)
        for j, i in enumerate(batches[b]):
            pr = prompts[i]
            png, rec = _paths(store, name, pr.index)
            png.parent.mkdir(parents=True, exist_ok=True)
            _atomic(png, lambda p: Image.fromarray(images[j].permute(1, 2, 0).cpu().numpy()).save(p, format="PNG"))
            record = {**(meta or {}), "index": pr.index, "prompt": pr.text, "id": pr.id, "category": pr.category, "decoder": name,
                      "seed": run_seed, "batch": b, "batch_size": len(batches[b]), "shard": index, "shards": count,
                      "device": device, "seconds": sec / len(batches[b]) if sec is not None else None,
                      "lossless": bool(getattr(dec, "lossless", False)), "codes": out.codes[j].tolist(),
                      "forwards": float(out.forwards_per_image[j]),
                      **({k: float(v[j]) for k, v in (("steps", out.extras["steps"]), ("committed",
                          out.extras["committed"]), ("accepted", out.accepted_tokens))} if "steps" in out.extras else {})}
            _atomic(rec, lambda p: p.write_text(json.dumps(record)))

    before = machine_load()
    for k, b in enumerate(todo):
        for name, out, sec in take_turns(decoders, texts[k], lambda: batch_generator(seed, b, device), k):  # noqa: B023
            write(name, decoders[name], b, out, sec, seed)
        for name, (dec, s) in (extra or {}).items():
            write(name, dec, b, dec.generate(texts[k], batch_generator(s, b, device)), None, s)
    return {"shard": index, "shards": count, "batches_decoded": len(todo), "batches_total": len(mine),
            "device": device, "load_average": [before, machine_load()], "threads": torch.get_num_threads()}


def write_shard_report(store: Path, report: dict) -> None:
    """``<store>/_shards/<index>.json``: what the shard's last call did and its resources (kept per call)."""
    folder = store / "_shards"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{report['shard']}.json"
    calls = json.loads(path.read_text()) if path.is_file() else []
    _atomic(path, lambda p: p.write_text(json.dumps(calls + [report], indent=1)))


def shard_reports(store: Path) -> dict:
    folder = store / "_shards"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def load_records(store: Path, decoder: str, prompts: list[Prompt]) -> list[dict]:
    """The records of ``decoder`` for every prompt, in prompt order; an error lists what is missing."""
    recs, missing = [], []
    for pr in prompts:
        path = _paths(store, decoder, pr.index)[1]
        if not path.is_file():
            missing.append(pr.index)
            continue
        rec = json.loads(path.read_text())
        if rec["prompt"] != pr.text:
            raise ValueError(f"{path}: written for prompt {rec['prompt']!r}, but prompt {pr.index} is now {pr.text!r}: "
                             "the prompt set changed; use a new eval.store")
        recs.append(rec)
    if missing:
        raise FileNotFoundError(
            f"eval.merge: {len(missing)} of {len(prompts)} images of decoder {decoder!r} are not in {store} "
            f"(first missing prompt indices {missing[:8]}): run the shards that own them (or resume them) first")
    return recs


def load_images(store: Path, decoder: str, prompts: list[Prompt]) -> torch.Tensor:
    """uint8 (N, 3, H, W) images of ``decoder`` in prompt order."""
    from PIL import Image

    imgs = [np.asarray(Image.open(_paths(store, decoder, pr.index)[0]).convert("RGB")) for pr in prompts]
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


def merged_rows(store: Path, names: list[str], prompts: list[Prompt], ar_forwards: int) -> tuple[list[dict], dict]:
    """One row per decoder over the union of the shards, and each shard's own speed figures."""
    records = {name: load_records(store, name, prompts) for name in names}
    by_shard: dict[str, dict] = {}
    rows = []
    ar_sec = sum(r["seconds"] for r in records["ar"])
    for name in names:
        recs = records[name]
        counters = {"forwards": torch.tensor([r["forwards"] for r in recs], dtype=torch.float64)}
        if "steps" in recs[0]:
            for k in ("steps", "committed", "accepted"):
                counters[k] = torch.tensor([r[k] for r in recs], dtype=torch.float64)
        else:  # plain AR: one token per forward
            steps = torch.full((len(recs),), float(ar_forwards - 1), dtype=torch.float64)
            counters.update(steps=steps, committed=steps.clone(), accepted=torch.zeros(len(recs), dtype=torch.float64))
        sec = sum(r["seconds"] for r in recs)
        rows.append({"decoder": name, "lossless": recs[0]["lossless"], **summarize([counters], ar_forwards),
                     "seconds_per_image": sec / len(recs), "speedup": ar_sec / sec,
                     "images_per_second": len(recs) / sec, "shards": sorted({r["shard"] for r in recs})})
        for r in recs:
            s = by_shard.setdefault(str(r["shard"]), {"device": r["device"], "images": 0, "seconds": {}})
            s["seconds"][name] = s["seconds"].get(name, 0.0) + r["seconds"]
    for r in records["ar"]:
        by_shard[str(r["shard"])]["images"] += 1
    for s in by_shard.values():
        s["speedup"] = {n: s["seconds"]["ar"] / v for n, v in s["seconds"].items()}
    return rows, by_shard


def merged_timing(rows: list[dict], by_shard: dict) -> dict:
    """results.json's ``timing`` of a merge: one timed pass per batch (so no spread measured) and, per shard, the
    load averages around each call that decoded batches (``by_shard[k]["calls"]``: the shard reports), with
    :func:`hawkspec.evaluation.timing_warnings`' sentences."""
    warnings = timing_warnings({r["decoder"]: [r["seconds_per_image"]] for r in rows})
    loads = {}
    for shard, v in by_shard.items():
        for call in v.get("calls", []):
            if call.get("batches_decoded") and call.get("load_average"):
                loads.setdefault(shard, []).append(call["load_average"])
                busy = busy_warning(call["load_average"], int(call.get("threads", 1)), where=f" in shard {shard}")
                if busy and busy not in warnings:
                    warnings.append(busy)
    return {"passes": 1, "load_average_by_shard": loads, "warnings": warnings}


def codes_of(store: Path, decoder: str, prompts: list[Prompt]) -> torch.Tensor:
    return torch.tensor([r["codes"] for r in load_records(store, decoder, prompts)])
