"""`hawkspec-eval` never goes wrong silently (issue 27): fewer prompts than asked are said, a reference folder of
non-images, a device this torch cannot use, a binary prompts file and a dynamic tree over sampled drafts are refused
at start-up naming the key (and file), speed results survive a late quality failure, and SIGTERM exits 143 saying
what is kept and how to resume."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import initialize_config_dir
from PIL import Image

from hawkspec.cli.common import CONF_DIR
from hawkspec.cli.validate import validate_cache, validate_eval, validate_generate
from hawkspec.testing import compose, run_cli

LOADED = "Instantiating backbone"  # logged when the model starts loading: a start-up refusal never gets there


def cfg_of(name, tmp_path, *overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(name, overrides=[f"paths.output_dir={tmp_path}/run", f"paths.root_dir={tmp_path}", *overrides])


def fast(backbone_dir, run_dir, *overrides):
    """A seconds-long evaluation of plain AR on the random test backbone, speed only."""
    return [f"backbone.path={backbone_dir}", "eval.decoders=[ar]", "eval.repeats=1", "eval.warmup_batches=0",
            "eval.grid_images=0", "eval.quality.enabled=false", "logger=none", f"hydra.run.dir={run_dir}", *overrides]


def eval_cli(*overrides, ok=True):
    return run_cli("hawkspec-eval", *overrides, ok=ok, env={"OMP_NUM_THREADS": "1"})


@pytest.fixture
def binary_file(tmp_path):
    path = tmp_path / "prompts.bin"
    path.write_bytes(bytes(range(128, 256)) * 4)  # not UTF-8 from its first byte
    return path


def save_png(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


# -------------------------------------------------------------------------------- 4. fewer prompts than asked
def test_fewer_prompts_than_asked_are_said_in_the_log_the_table_and_results_json(tmp_path, random_backbone_dir):
    """eval.num_prompts=5 on a 3-line file. Expect: exit 0, a warning naming eval.num_prompts, the file and the
    count; the shortfall at the head of results.md and in results.json."""
    prompts = tmp_path / "three.txt"
    prompts.write_text("a red circle\na blue square\na green ring\n")
    run_dir = tmp_path / "run"
    proc = eval_cli(*fast(random_backbone_dir, run_dir, f"eval.prompts_file={prompts}", "eval.num_prompts=5"))
    out = proc.stdout + proc.stderr
    warning = next(line for line in out.splitlines() if "WARNING" in line and "eval.num_prompts=5" in line)
    assert str(prompts) in warning and "holds only 3" in warning
    res = json.loads((run_dir / "results.json").read_text())
    assert res["num_prompts"] == 3 and res["prompts"]["requested"] == 5
    short = res["prompt_shortfall"]
    assert (short["requested"], short["evaluated"], short["key"], short["path"]) == (5, 3, "eval.prompts_file",
                                                                                     str(prompts))
    head = (run_dir / "results.md").read_text().splitlines()[0]
    assert "eval.num_prompts=5" in head and str(prompts) in head and "3 prompts evaluated" in head


def test_no_shortfall_no_note(tmp_path):
    """A file with enough prompts: the prompts are a subset, nothing is said."""
    from hawkspec.cli.eval import eval_prompt_set, prompt_shortfall

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i}\n" for i in range(6)))
    cfg = cfg_of("eval", tmp_path, f"eval.prompts_file={prompts}", "eval.num_prompts=4")
    assert prompt_shortfall(cfg, eval_prompt_set(cfg)) is None
    cfg = cfg_of("eval", tmp_path, "eval.prompts.source=txt", f"eval.prompts.path={prompts}", "eval.num_prompts=9")
    assert prompt_shortfall(cfg, eval_prompt_set(cfg))["key"] == "eval.prompts.path"


# -------------------------------------------------------------------------------- 7. reference images
def test_a_reference_folder_holding_a_non_image_is_refused_at_start_up(tmp_path, random_backbone_dir):
    """A .png that is not an image in eval.quality.reference.image_dir. Expect: exit 1 before the model loads,
    naming the key and the file (it used to end the run with UnidentifiedImageError after every decoder was timed,
    and no results.json)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    save_png(ref / "a.png", 0)
    save_png(ref / "b.png", 1)
    (ref / "c.png").write_text("not an image")
    proc = eval_cli(*fast(random_backbone_dir, tmp_path / "run", "eval.quality.enabled=true",
                          f"eval.quality.reference.image_dir={ref}", "eval.num_prompts=1"), ok=False)
    assert proc.returncode == 1
    assert "eval.quality.reference.image_dir" in proc.stderr and "c.png" in proc.stderr
    assert LOADED not in proc.stdout + proc.stderr


def test_speed_results_survive_a_late_quality_failure(tmp_path, random_backbone_dir):
    """A truncated JPEG passes the start-up check (its header is fine) and fails when FID reads it. Expect: exit 1
    naming the key and file, and results.json / results.md already hold every decoder's speed row, with
    quality_error saying what failed."""
    ref = tmp_path / "ref"
    ref.mkdir()
    save_png(ref / "a.png", 0)
    save_png(ref / "b.png", 1)
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(ref / "c.jpg", quality=95)
    data = (ref / "c.jpg").read_bytes()
    (ref / "c.jpg").write_bytes(data[: len(data) // 2])
    run_dir = tmp_path / "run"
    proc = eval_cli(*fast(random_backbone_dir, run_dir, "eval.quality.enabled=true", "eval.num_prompts=2",
                          f"eval.quality.reference.image_dir={ref}", "eval.quality.fid_features=tiny",
                          "eval.quality.noise_floor=false", f"eval.quality.reference.cache_dir={tmp_path / 'cache'}"),
                    ok=False)
    assert proc.returncode == 1
    assert "eval.quality.reference.image_dir" in proc.stderr and "c.jpg" in proc.stderr
    res = json.loads((run_dir / "results.json").read_text())
    assert [r["decoder"] for r in res["rows"]] == ["ar"] and res["rows"][0]["seconds_per_image"] > 0
    assert "c.jpg" in res["quality_error"] and "quality_pending" not in res and "quality" not in res
    assert "quality_error" in (run_dir / "results.md").read_text()


# -------------------------------------------------------------------------------- 10. device
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA device")
def test_device_cuda_without_cuda_is_refused_at_start_up(tmp_path, random_backbone_dir):
    """device=cuda on a CPU-only torch. Expect: exit 1 naming `device`, before the model loads (it used to be a raw
    AssertionError from torch once the model was loaded)."""
    proc = eval_cli(*fast(random_backbone_dir, tmp_path / "run", "device=cuda", "eval.num_prompts=1"), ok=False)
    assert proc.returncode == 1 and "`device`=cuda" in proc.stderr and LOADED not in proc.stdout + proc.stderr


@pytest.mark.parametrize("name, override, key", [
    ("eval", "device=cuda", "device"), ("eval", "device=cuda:1", "device"), ("generate", "device=cuda", "device"),
    ("eval", "device=gpu0", "device"), ("cache", "trainer.accelerator=gpu", "trainer.accelerator"),
    ("cache", "trainer=gpu", "trainer.accelerator"),
])
def test_every_entry_point_refuses_a_device_it_cannot_use(tmp_path, monkeypatch, name, override, key):
    """Whatever this machine has: torch told there is no CUDA device. Expect: an error naming the key."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check = {"eval": validate_eval, "generate": validate_generate, "cache": validate_cache}[name]
    extra = [f"cache.out_dir={tmp_path}/c"] if name == "cache" else []
    with pytest.raises(ValueError, match=f"`{key}`"):
        check(cfg_of(name, tmp_path, override, *extra))


# -------------------------------------------------------------------------------- 11. binary prompts file
def test_a_binary_prompts_file_is_named_with_its_key(tmp_path, random_backbone_dir, binary_file):
    """Expect: exit 1 naming the key and the file, before the model loads (it used to be a raw UnicodeDecodeError
    without the file name)."""
    proc = eval_cli(*fast(random_backbone_dir, tmp_path / "run", f"eval.prompts_file={binary_file}"), ok=False)
    assert proc.returncode == 1 and f"`eval.prompts_file`={binary_file}" in proc.stderr and "UTF-8" in proc.stderr
    assert "UnicodeDecodeError" not in proc.stderr and LOADED not in proc.stdout + proc.stderr


@pytest.mark.parametrize("source", ["txt", "jsonl", "parti", "coco", "flickr30k"])
def test_every_prompt_source_checks_its_file_at_start_up(tmp_path, binary_file, source):
    cfg = cfg_of("eval", tmp_path, f"eval.prompts.source={source}", f"eval.prompts.path={binary_file}")
    with pytest.raises(ValueError, match=f"`eval.prompts.path`={binary_file}"):
        validate_eval(cfg)


def test_binary_prompt_files_are_named_by_the_loaders_too(binary_file):
    """The library readers (no start-up check in front of them) name the file as well."""
    from hawkspec.cli.common import load_prompts
    from hawkspec.data.prompts import load_prompt_set

    for source in ("txt", "jsonl", "parti", "coco", "flickr30k"):
        with pytest.raises(ValueError, match=str(binary_file)):
            load_prompt_set({"source": source, "path": str(binary_file), "num": 2})
    with pytest.raises(ValueError, match="prompts_file"):
        load_prompts(None, str(binary_file))


def test_generate_names_a_binary_prompts_file(tmp_path, binary_file):
    with pytest.raises(ValueError, match="`prompts_file`"):
        validate_generate(cfg_of("generate", tmp_path, f"prompts_file={binary_file}"))


# -------------------------------------------------------------------------------- 12. dynamic tree, sampled drafts
def test_sjd_with_a_dynamic_tree_is_refused_at_start_up_with_a_fitting_fix(tmp_path, random_backbone_dir):
    """decoder=sjd decoder.tree.dynamic=4. Expect: exit 1 before the model loads, naming the key
    (eval.decoders.sjd.tree.dynamic) and
    a fix SJD's proposer has (not `draft=topk`: the Jacobi proposer has no such key)."""
    proc = eval_cli(*fast(random_backbone_dir, tmp_path / "run", "decoder=sjd", "decoder.tree.dynamic=4",
                          "eval.decoders=[ar,sjd]", "eval.num_prompts=1"), ok=False)
    assert proc.returncode == 1 and "`eval.decoders.sjd.tree.dynamic`=4" in proc.stderr
    assert "eval.decoders.sjd.tree.dynamic=null" in proc.stderr and "draft=topk" not in proc.stderr
    assert LOADED not in proc.stdout + proc.stderr


@pytest.mark.parametrize("overrides, fix", [
    (["decoder=medusa", "decoder.proposer.sources.horizontal.draft=sample"],
     "eval.decoders.medusa.proposer.sources.horizontal.draft=topk"),
    (["decoder=hawk", "decoder.proposer.sources.vertical.draft=sample"],
     "eval.decoders.hawk.proposer.sources.vertical.draft=topk"),
    (["decoder=eagle", "decoder.proposer.draft=sample"], "eval.decoders.eagle.proposer.draft=topk"),
    (["decoder=hawk_jacobi"], "source `jacobi` (eval.decoders.hawk_jacobi.proposer.sources.jacobi) drafts random"),
    (["decoder=hawk_eagle", "decoder.proposer.sources.eagle.draft=sample"],
     "eval.decoders.hawk_eagle.proposer.sources.eagle.draft=topk"),
    (["decoder=gsd"], "eval.decoders.gsd.tree.dynamic=null"),
    (["decoder=hawk", "decoder.tree.dynamic=1"], "must be >= 2"),
])
def test_dynamic_tree_fixes_fit_the_configured_proposer(tmp_path, overrides, fix):
    cfg = cfg_of("eval", tmp_path, *overrides[:1], "decoder.tree.dynamic=4", *overrides[1:])
    with pytest.raises(ValueError, match=r"eval\.decoders\.\w+\.tree\.dynamic") as err:
        validate_eval(cfg)
    assert fix in str(err.value)


@pytest.mark.parametrize("decoder", ["medusa", "hawk", "eagle", "hawk_eagle"])
def test_dynamic_tree_over_top_k_drafts_passes(tmp_path, decoder):
    validate_eval(cfg_of("eval", tmp_path, f"decoder={decoder}", "decoder.tree.dynamic=4", "eval.decoders=[ar]"))


# -------------------------------------------------------------------------------- 13. SIGTERM
def start_eval(*overrides) -> tuple[subprocess.Popen, list[str]]:
    """`hawkspec-eval` in the background; its output lines are collected as they come."""
    exe = Path(sys.executable).parent / "hawkspec-eval"
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(exe), *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=Path(__file__).resolve().parents[2])
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def wait_for(what, proc, timeout=300):
    deadline = time.time() + timeout
    while not what() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, "the evaluation ended before it could be signalled"


def terminate(proc, lines) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    time.sleep(0.2)  # the reader thread drains the pipe
    return "".join(lines)


def test_sigterm_exits_143_saying_nothing_is_kept_unsharded(tmp_path, random_backbone_dir):
    """SIGTERM during timing. Expect: exit 143 (not -15) and a SIGTERM line saying that an unsharded evaluation
    keeps nothing and that eval.store makes it resumable."""
    proc, lines = start_eval(*fast(random_backbone_dir, tmp_path / "run", "eval.num_prompts=400", "eval.batch_size=1",
                                   "eval.repeats=5"))
    wait_for(lambda: any("Instantiating decoder" in line for line in lines), proc)
    out = terminate(proc, lines)
    assert proc.returncode == 143, out[-3000:]
    line = next(line for line in out.splitlines() if "SIGTERM:" in line)
    assert "nothing is kept" in line and "eval.store" in line


def test_sigterm_of_a_sharded_evaluation_exits_143_and_the_rerun_resumes(tmp_path, random_backbone_dir):
    """SIGTERM once a batch is in eval.store. Expect: exit 143 with a line naming eval.store and how to resume;
    the finished batches are kept, and a rerun of the same command skips them."""
    store = tmp_path / "store"
    args = fast(random_backbone_dir, tmp_path / "run", f"eval.store={store}", "eval.num_prompts=400",
                "eval.batch_size=1")
    proc, lines = start_eval(*args)
    wait_for(lambda: any((store / "ar").glob("*.json")), proc)
    out = terminate(proc, lines)
    assert proc.returncode == 143, out[-3000:]
    line = next(line for line in out.splitlines() if "SIGTERM:" in line)
    assert f"eval.store={store}" in line and "resume" in line
    kept = len(list((store / "ar").glob("*.json")))
    assert kept >= 1
    again = eval_cli(*args, "eval.shard.max_batches=1", "eval.merge=false")  # time-boxed: one new batch, no merge
    assert f"({kept} already in {store}; " in again.stdout + again.stderr
