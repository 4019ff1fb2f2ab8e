"""Sharded evaluation (hawkspec.cli.eval_shards): every prompt decoded exactly once across shards, a resumed
shard skips finished images, and 2 shards (2 processes) give the same table as 1."""

import json
import multiprocessing as mp
from pathlib import Path

import pytest
import torch

from hawkspec.cli import eval_shards
from hawkspec.data.prompts import Prompt
from hawkspec.decoding.output import GenerationOutput

ROWS = COLS = 2
K = 16
TIMING = {"seconds_per_image", "speedup", "images_per_second", "shards"}


class FakeDecoder:
    """Codes drawn from the batch's generator, so a batch decodes the same wherever it runs."""

    def __init__(self, name: str, lossless: bool = True, steps: bool = False):
        self.name, self.lossless, self.steps = name, lossless, steps
        self.calls = 0

    def generate(self, prompts, generator):
        self.calls += 1
        B = len(prompts)
        codes = torch.randint(K, (B, ROWS, COLS), generator=generator)
        fwd = torch.full((B,), 3 if self.steps else 5)
        extras = {"steps": fwd - 1, "committed": torch.full((B,), 4)} if self.steps else {}
        return GenerationOutput(codes=codes, tokens=codes.flatten(1), forwards=int(fwd.max()), forwards_per_image=fwd,
                                accepted_tokens=torch.full((B,), 2) if self.steps else None, extras=extras)


def decode_images(codes):
    return (codes * 15).to(torch.uint8).repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).repeat(1, 3, 1, 1)


def prompt_set(n=7):
    return [Prompt(i, f"prompt {i}", str(i)) for i in range(n)]


def decode(store: Path, index: int, count: int, max_batches=None) -> dict:
    decs = {"ar": FakeDecoder("ar"), "spec": FakeDecoder("spec", steps=True)}
    eval_shards.run_shard(store, prompt_set(), decs, decode_images, seed=3, batch_size=2, index=index, count=count,
                          device="cpu", warmup_batches=0, max_batches=max_batches, meta={"ar_forwards": 5})
    return decs


def table(store: Path) -> list[dict]:
    rows, _ = eval_shards.merged_rows(store, ["ar", "spec"], prompt_set(), ar_forwards=5)
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def codes(store: Path, name: str) -> torch.Tensor:
    return eval_shards.codes_of(store, name, prompt_set())


def test_batches_are_split_round_robin_and_cover_every_prompt_once():
    n, bs = 7, 2  # batches [0,1] [2,3] [4,5] [6]
    owned = [eval_shards.shard_batches(n, bs, i, 3) for i in range(3)]
    assert owned == [[0, 3], [1], [2]]
    prompts = sorted(i for o in owned for b in o for i in eval_shards.global_batches(n, bs)[b])
    assert prompts == list(range(n))
    with pytest.raises(ValueError, match="eval.shard.index"):
        eval_shards.shard_batches(n, bs, 3, 3)


def test_two_shards_equal_one_and_each_image_is_written_once(tmp_path):
    decode(tmp_path / "one", 0, 1)
    for i in range(2):
        decode(tmp_path / "two", i, 2)
    for name in ("ar", "spec"):
        assert torch.equal(codes(tmp_path / "one", name), codes(tmp_path / "two", name))
        recs = sorted((tmp_path / "two" / name).glob("*.json"))
        assert [json.loads(p.read_text())["index"] for p in recs] == list(range(7))  # every prompt exactly once
        assert {json.loads(p.read_text())["shard"] for p in recs} == {0, 1}
    assert table(tmp_path / "one") == table(tmp_path / "two")
    row = {r["decoder"]: r for r in table(tmp_path / "one")}
    assert row["spec"]["step_compression"] == pytest.approx(5 / 3) and row["ar"]["acceptance_length"] == 1.0


def test_an_interrupted_shard_resumes_where_it_stopped(tmp_path):
    decode(tmp_path / "ref", 0, 1)
    first = decode(tmp_path / "cut", 0, 1, max_batches=1)  # "interrupted" after one batch
    assert first["ar"].calls == 1
    with pytest.raises(FileNotFoundError, match="not in"):
        table(tmp_path / "cut")  # the merge names what is missing
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "cut" / "ar").glob("*.json")}
    again = decode(tmp_path / "cut", 0, 1)
    assert again["ar"].calls == 3  # the 3 unfinished batches only
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())  # finished images are not rewritten
    assert table(tmp_path / "cut") == table(tmp_path / "ref")
    assert torch.equal(codes(tmp_path / "cut", "spec"), codes(tmp_path / "ref", "spec"))
    decode(tmp_path / "cut", 0, 1)  # nothing left: a no-op


def _shard_process(store, index):
    decode(Path(store), index, 2)


def test_two_processes_write_disjoint_shares(tmp_path):
    ctx = mp.get_context("fork")  # the test module is not importable by a spawned child
    procs = [ctx.Process(target=_shard_process, args=(str(tmp_path / "mp"), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    decode(tmp_path / "one", 0, 1)
    assert table(tmp_path / "mp") == table(tmp_path / "one")
    for name in ("ar", "spec"):
        assert torch.equal(codes(tmp_path / "mp", name), codes(tmp_path / "one", name))


def test_a_changed_prompt_set_is_refused(tmp_path):
    decode(tmp_path / "s", 0, 1)
    other = [Prompt(i, f"other {i}", str(i)) for i in range(7)]
    with pytest.raises(ValueError, match="prompt set changed"):
        eval_shards.load_records(tmp_path / "s", "ar", other)
