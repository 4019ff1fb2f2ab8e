"""The project's evaluator: the shipped weights read held-out images correctly, persistence, and its CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hawkspec.backbones.tiny import TinyBackbone
from hawkspec.metrics.evaluator import ATTRIBUTES, DEFAULT_EVALUATOR, EXTRACTOR_NAME, TinyEvaluator
from hawkspec.metrics.evaluator_training import accuracy, render_split

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shipped() -> TinyEvaluator:
    return TinyEvaluator.load(None)


def test_shipped_evaluator_reads_unseen_vq_images(shipped):
    """Held-out renders (a seed neither training nor its validation used), through the shipped tiny model's VQ."""
    torch.set_num_threads(1)
    split = render_split(400, seed=987, image_size=48, vq=TinyBackbone.from_pretrained(None).vq)
    acc = accuracy(shipped, split.vq, split.labels)
    floors = {"shape": 0.85, "color": 0.93, "size": 0.95, "position": 0.95, "background": 0.95, "bg_color": 0.95}
    assert all(acc[k] >= v for k, v in floors.items()), acc


def test_shipped_evaluator_documents_itself(shipped):
    meta = json.loads((DEFAULT_EVALUATOR / "evaluator.json").read_text())
    assert meta["name"] == EXTRACTOR_NAME and meta["revision"] == shipped.revision()
    assert meta["command"].startswith("hawkspec-quality")
    assert set(meta["val_accuracy"]["vq"]) == set(ATTRIBUTES)
    assert meta["vq_backbone"]["revision"] == TinyBackbone.from_pretrained(None).revision


def test_features_are_of_unit_scale_on_real_images(shipped):
    split = render_split(64, seed=3, image_size=48, vq=TinyBackbone.from_pretrained(None).vq)
    f = shipped.features(split.raw)
    assert f.shape == (64, shipped.feature_dim) and (f >= 0).all()
    assert 0.5 < f.pow(2).mean().sqrt().item() < 2.0


def test_save_load_round_trip(tmp_path):
    model = TinyEvaluator(feature_dim=8).eval()
    model.feature_scale.fill_(3.0)
    model.save(tmp_path, {"note": "x"})
    back = TinyEvaluator.load(tmp_path)
    assert back.revision() == model.revision() and back.meta["note"] == "x"
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)  # any size: resized to 48
    assert torch.allclose(back.features(x), model.features(x))


def test_missing_evaluator_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval\.quality\.evaluator"):
        TinyEvaluator.load(tmp_path / "none")


def test_bad_images_are_refused(shipped):
    with pytest.raises(ValueError, match="uint8"):
        shipped.features(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        shipped.features(torch.zeros(3, 48, 48, dtype=torch.uint8))


def test_code_noise_changes_only_the_vq_view():
    vq = TinyBackbone.from_pretrained(None).vq
    clean, noisy = render_split(16, 5, 48, vq, 0.0), render_split(16, 5, 48, vq, 0.5)
    assert torch.equal(clean.raw, noisy.raw) and torch.equal(clean.labels, noisy.labels)
    assert not torch.equal(clean.vq, noisy.vq)


def test_quality_cli_trains_and_exports(tmp_path, random_backbone_dir):
    exe = Path(sys.executable).parent / "hawkspec-quality"
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(exe), f"backbone.path={random_backbone_dir}", "data.train_size=64", "data.val_size=32",
         "trainer.max_epochs=1", f"export_dir={tmp_path / 'export'}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = TinyEvaluator.load(tmp_path / "export")
    meta = model.meta
    assert meta["train"]["data"]["train_size"] == 64 and meta["train"]["steps"] == 1  # 128 samples / batch 128
    assert set(meta["val_accuracy"]) == {"rendered", "vq", "vq_code_noise"} and meta["feature_scale"] > 0
    assert (tmp_path / "run" / "evaluator.md").read_text().startswith("| attribute |")


@pytest.mark.parametrize("key", ["data.train_size", "data.val_size", "data.batch_size"])
def test_quality_bad_size_names_the_key(key):
    from hydra import compose, initialize_config_dir

    from hawkspec.cli.quality import run

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("quality", overrides=[f"{key}=0"])
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        run(cfg)
