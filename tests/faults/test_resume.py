"""Interrupted training resumes from its last Lightning checkpoint and ends with the heads of an uninterrupted run;
the exported heads are the best by validation and are not replaced by worse ones."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from hawkspec.cli.common import CONF_DIR

EXACT = ["data.resampled=false", "data.num_workers=0", "data.batch_size=4", "logger=none",
         "+trainer.enable_progress_bar=false"]


def train_cfg(run_dir: Path, backbone_dir: str, shards: str, *overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={run_dir}", f"paths.root_dir={run_dir}",
                                           f"backbone.path={backbone_dir}", f"shards_dir={shards}", *EXACT,
                                           *overrides])


def final_weights(run_dir: Path) -> dict:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in state["state_dict"].items() if k.startswith("heads.")}, state


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


class InterruptAfterFirstEpoch(ModelCheckpoint):
    """Saves like the real one, then presses Ctrl-C right after the first epoch's checkpoint."""

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.current_epoch == 0:
            raise KeyboardInterrupt


@pytest.mark.slow  # ~50 s on 2 shared cores
def test_interrupted_and_resumed_training_equals_an_uninterrupted_run(tmp_path, monkeypatch, random_backbone_dir,
                                                                      disk_cache):
    """Expect: Ctrl-C after epoch 1 of 3, rerun into the same folder (ckpt_path=last, the default) -> the same
    final weights and the same best heads as 3 epochs in one go (float tolerance)."""
    import hawkspec.cli.train as train

    train.run(train_cfg(tmp_path / "straight", random_backbone_dir, disk_cache, "trainer.max_epochs=3"))
    real = train.checkpoint_callback
    monkeypatch.setattr(train, "checkpoint_callback", lambda cfg, d: InterruptAfterFirstEpoch(
        dirpath=d, filename="last", monitor=None, save_top_k=1, save_on_train_epoch_end=True,
        enable_version_counter=False))
    cfg = train_cfg(tmp_path / "resumed", random_backbone_dir, disk_cache, "trainer.max_epochs=3")
    with pytest.raises(SystemExit):
        train.run(cfg)
    assert final_weights(tmp_path / "resumed")[1]["epoch"] == 0
    monkeypatch.setattr(train, "checkpoint_callback", real)
    summary = train.run(cfg)
    assert summary["global_step"] == 9
    (a, sa), (b, sb) = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert sa["global_step"] == sb["global_step"] == 9
    assert_same(a, b)
    ha = load_file(tmp_path / "straight" / "heads" / "heads.safetensors")
    hb = load_file(tmp_path / "resumed" / "heads" / "heads.safetensors")
    assert_same(ha, hb)
    best = json.loads((tmp_path / "resumed" / "heads" / "val_metrics.json").read_text())["best"]
    assert best["monitor"] == "val/loss" and best["epoch"] in (0, 1, 2)


@pytest.mark.slow  # ~50 s on 2 shared cores
def test_export_keeps_better_heads_unless_overwrite(tmp_path, random_backbone_dir, disk_cache):
    """Expect: a run whose best val/loss is worse than the exported heads' leaves them (exported=False); the
    export records the epoch of its heads; overwrite=true replaces them."""
    import hawkspec.cli.train as train

    export = tmp_path / "export"
    good = train.run(train_cfg(tmp_path / "good", random_backbone_dir, disk_cache, "trainer.max_epochs=3",
                               f"export_dir={export}"))
    record = json.loads((export / "val_metrics.json").read_text())["best"]
    assert good["exported"] and record["epoch"] == good["best"]["epoch"]
    worse = train.run(train_cfg(tmp_path / "worse", random_backbone_dir, disk_cache, "trainer.max_epochs=1",
                                "optimizer.lr=1e-6", f"export_dir={export}"))
    assert worse["exported"] is False and worse["best"]["score"] > record["score"]
    assert json.loads((export / "val_metrics.json").read_text())["best"] == record
    forced = train.run(train_cfg(tmp_path / "forced", random_backbone_dir, disk_cache, "trainer.max_epochs=1",
                                 "optimizer.lr=1e-6", f"export_dir={export}", "overwrite=true"))
    assert forced["exported"] and json.loads((export / "val_metrics.json").read_text())["best"] == forced["best"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signalled_training_loses_at_most_the_work_since_its_last_checkpoint(tmp_path, random_backbone_dir,
                                                                               disk_cache, sig):
    """A real signal to `hawkspec-train`. Expect: a non-zero exit, an intact last.ckpt, and a rerun into the same
    folder that resumes from it and ends with the weights of an uninterrupted run."""
    exe = Path(sys.executable).parent / "hawkspec-train"
    args = [f"backbone.path={random_backbone_dir}", f"shards_dir={disk_cache}", *EXACT, "trainer.max_epochs=25"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = lambda d: subprocess.run([str(exe), *args, f"hydra.run.dir={d}"], capture_output=True, text=True, env=env,
                                   timeout=900)
    proc = subprocess.Popen([str(exe), *args, f"hydra.run.dir={tmp_path / 'sig'}"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    last = tmp_path / "sig" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig or proc.returncode == 1, out[-2000:]  # 143 (SIGTERM) or 1 (Ctrl-C)
    _, state = final_weights(tmp_path / "sig")  # loadable: never half written
    assert state["epoch"] < 24
    resumed = run(tmp_path / "sig")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    straight = run(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same(final_weights(tmp_path / "straight")[0], final_weights(tmp_path / "sig")[0])
