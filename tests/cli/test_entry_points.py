"""The console scripts, run as a user runs them (subprocesses, tiny settings)."""

import json
from pathlib import Path

import pytest

from hawkspec.testing import run_cli

ROOT = Path(__file__).resolve().parents[2]




def test_generate_writes_grid(tmp_path, random_backbone_dir):
    run_cli(
        "hawkspec-generate", f"backbone.path={random_backbone_dir}", "prompts=[a red circle,a blue square]",
        f"hydra.run.dir={tmp_path}",
    )
    assert (tmp_path / "grid.png").stat().st_size > 0
    summary = json.loads((tmp_path / "generate.json").read_text())
    assert summary["num_images"] == 2 and summary["seconds_per_image"] > 0


def test_generate_reads_a_prompts_file(tmp_path, random_backbone_dir):
    f = tmp_path / "prompts.txt"
    f.write_text("a red circle\n\na green cross\n")
    run_cli("hawkspec-generate", f"backbone.path={random_backbone_dir}", f"prompts_file={f}", f"hydra.run.dir={tmp_path}")
    assert json.loads((tmp_path / "generate.json").read_text())["num_images"] == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["backbone=nonexistent"], "backbone"),
        (["backbone.path=/does/not/exist"], "backbone.path"),
        (["prompts=[]"], "prompt list is empty"),
        (["prompts_file=/does/not/exist.txt"], "prompts_file"),
        (["sampling.cfg_scale=-1"], "cfg_scale"),
        (["sampling.top_k=100000"], "top_k"),
    ],
)
def test_generate_bad_input_names_the_key(tmp_path, random_backbone_dir, overrides, message):
    base = [] if any(o.startswith("backbone") for o in overrides) else [f"backbone.path={random_backbone_dir}"]
    proc = run_cli("hawkspec-generate", *base, *overrides, f"hydra.run.dir={tmp_path}", ok=False)
    assert message in proc.stderr + proc.stdout


def test_pretrain_end_to_end_tiny_settings(tmp_path):
    run_cli(
        "hawkspec-pretrain", f"hydra.run.dir={tmp_path}", "data.train_size=64", "data.val_size=16",
        "data.image_size=16", "data.batch_size=8", "vq.num_codes=32", "vq.fit_images=32", "vq.iters=2",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "trainer.max_steps=3", "report.num_prompts=2", "report.alignment_prompts=3", "sampling.top_k=8",
        f"export_dir={tmp_path}/export",
    )
    report = json.loads((tmp_path / "export" / "pretrain_report.json").read_text())
    assert report["val_loss"] > 0 and report["mean_entropy_nats"] > 0
    align = report["alignment"]  # 3 held-out captions scored by the shipped evaluator
    assert align["alignment_images"] == 3 and 0.0 <= align["alignment_shape"] <= 1.0
    assert align["alignment"] == pytest.approx(
        (align["alignment_color"] + align["alignment_shape"] + align["alignment_position"]) / 3)
    from hawkspec.backbones.tiny import TinyBackbone

    bb = TinyBackbone.from_pretrained(tmp_path / "export")
    assert bb.grid.rows == 4 and bb.revision == report["revision"]
    assert (tmp_path / "samples.png").is_file()
