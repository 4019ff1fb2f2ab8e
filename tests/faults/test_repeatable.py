"""The same evaluation twice gives the same bits (issue 27, item 3: "the same command, different images").

AR, Hawk and SJD (a Jacobi decoder) decode the same prompts with the same seeds in two fresh processes at the same
batch size and thread count; the second shares the CPU with busy processes and starts with OpenMP's and MKL's
dynamic thread adjustment on (``OMP_DYNAMIC=TRUE MKL_DYNAMIC=TRUE``: libgomp then sizes every parallel region by the
machine's load average, and a loaded machine decodes on fewer threads than it reports). Every code must match, and
so must each batch's mean target entropy -- a float sum over every target distribution, which moves with any last
bit of any logit, so a rounding difference that has not (yet) flipped a sampled code still fails the test.
``hawkspec.determinism`` pins the teams: importing ``hawkspec.decoding`` turns both adjustments off.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

THREADS = 2  # the same in both runs; > 1, so that a shrunk team would show
DECODERS = "ar,hawk,sjd"

# What `hawkspec-eval eval.num_prompts=4 eval.batch_size=2 eval.threads=2` decodes, for its second batch only (the
# one whose AR steps round differently on a team of 1 thread and of 2, with the shipped tiny model): the eval
# config, the presets' decoders, the procedural prompts, batch i decoded with batch_generator(seed, i).
# Without hawkspec.cli.eval's imports (Lightning: seconds of CPU per run on a loaded machine).
DRIVER = r"""
import json, sys
import torch
from hydra import initialize_config_dir

from hawkspec.testing import compose, the_decoder
from hawkspec.cli.common import CONF_DIR, instantiate
from hawkspec.data.prompts import PromptSpec, load_prompt_set
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig, batch_generator
from hawkspec.determinism import thread_settings

out, threads, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
torch.set_num_threads(threads)  # eval.threads
run = ["eval.num_prompts=4", "eval.batch_size=2", "logger=none"]
with initialize_config_dir(CONF_DIR, version_base="1.3"):
    cfg = compose("eval", overrides=run)
    backbone = instantiate(cfg.backbone, "backbone").eval()
    sampling = SamplingConfig(**cfg.sampling).validate(backbone.num_codes)
    decoders = {n: build_decoder(the_decoder(compose("eval", overrides=[*run, f"decoder={n}"])), backbone, sampling)
                for n in names}
prompts = [p.text for p in load_prompt_set(PromptSpec(num=4, seed=cfg.eval.prompt_seed))]  # eval's procedural set
bi = 1
res = {"settings": thread_settings(), "codes": {}, "entropy": {}}
for name, dec in decoders.items():
    o = dec.generate(prompts[2:4], batch_generator(cfg.seed, bi), track_entropy=True)
    res["codes"][name], res["entropy"][name] = o.codes, o.mean_entropy
torch.save(res, out)
print(json.dumps({"settings": res["settings"], "entropy": res["entropy"]}))
"""


def decode(out, env: dict) -> dict:
    # A passive OpenMP wait: idle threads sleep instead of spinning, so 2 threads on a loaded machine are not 10x
    # slower. It changes when a thread waits, never how work is split or summed.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))} | {
        "OMP_WAIT_POLICY": "PASSIVE", "WANDB_MODE": "disabled", **env}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(out), str(THREADS), DECODERS], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out)


def busy_loops(n: int, seconds: int = 150) -> list[subprocess.Popen]:
    """``n`` processes each burning one CPU, each ending by itself after ``seconds`` at the latest."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


@pytest.mark.timeout(600)
def test_the_same_evaluation_twice_decodes_the_same_bits_on_a_loaded_machine(tmp_path):
    """Expect: identical codes and identical mean entropies for AR, Hawk and SJD, run 2 (busy CPU, dynamic thread
    adjustment requested) against run 1; run 2 reports 2 threads and no dynamic adjustment."""
    quiet = decode(tmp_path / "quiet.pt", {})
    loops = busy_loops(1)
    try:
        time.sleep(1.0)  # the loops are running before the second run's first parallel region
        loaded = decode(tmp_path / "loaded.pt", {"OMP_DYNAMIC": "TRUE", "MKL_DYNAMIC": "TRUE"})
    finally:
        for p in loops:
            p.kill()
            p.wait()
    for run in (quiet, loaded):
        s = run["settings"]
        assert s["threads"] == THREADS, s
        assert s["omp_dynamic"] and not any(s["omp_dynamic"].values()), s  # every OpenMP runtime: off
        assert s["mkl_dynamic"] in (False, None), s
    for name in DECODERS.split(","):
        a, b = quiet["codes"][name], loaded["codes"][name]
        assert torch.equal(a, b), f"{name}: {(a != b).sum().item()} codes differ"
        assert quiet["entropy"][name] == loaded["entropy"][name], (
            f"{name}: mean target entropy {quiet['entropy'][name]!r} vs {loaded['entropy'][name]!r} under load: "
            "the logits differ in their last bits; settings " + json.dumps(loaded["settings"]))
