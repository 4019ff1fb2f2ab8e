"""No silent wrongs in prompts and in training (issue 27): a prompt the tiny vocabulary cannot spell says what it
lost; a resume that trains nothing says so and still leaves heads; a resume with other `heads` settings is refused
before fitting, naming the checkpoint and the setting."""

import json
import logging
import random
import re
import shutil
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hawkspec.backbones.tiny import DEFAULT_ASSET, TinyLayout, ascii_caption
from hawkspec.testing import build_random_backbone, run_cli

EXACT = ["data.resampled=false", "data.num_workers=0", "data.batch_size=4", "logger=none",
         "+trainer.enable_progress_bar=false"]

# The shipped tiny model's word ids of ASCII prompts, as they were before non-ASCII text was normalised: they
# must never change (the shipped weights and every recorded result depend on them).
PINNED = {
    "a large red circle in the center": [6, 18, 25, 13, 17, 31, 12],
    "A small BLUE square, on the left; on a plain white background!": [6, 28, 10, 29, 21, 31, 19, 21, 6, 23, 34, 8],
    "a  tiny\tgreen-cross at top_left 3 times\n(noisy) gradient...": [6, 2, 16, 14, 7, 32, 19, 2, 2, 20, 15],
    "purple triangle: bottom-right, orange/black stripes 42x": [24, 33, 11, 26, 22, 9, 2, 2],
    "": [],
    "   ": [],
}


def shipped_layout() -> TinyLayout:
    return TinyLayout(**json.loads((DEFAULT_ASSET / "hawkspec.json").read_text()))


# ------------------------------------------------------------------------------------------------ 5. prompts
def test_ascii_prompts_tokenize_exactly_as_before():
    """Expect: the pinned ids; and for random ASCII text, the ids of the original rule (lower-case, split on
    anything but [a-z0-9])."""
    layout = shipped_layout()
    for prompt, ids in PINNED.items():
        assert layout.encode_words(prompt)[0] == ids, prompt
    index = {w: i + layout.word_offset for i, w in enumerate(layout.words)}
    rng = random.Random(0)
    alphabet = string.printable + " " * 20 + "".join(layout.words)
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        ref = [index.get(t, 2) for t in re.split(r"[^a-z0-9]+", text.lower()) if t]
        assert layout.encode_words(text)[0] == ref, repr(text)
        assert ascii_caption(text) == (text, [])


def test_non_ascii_prompts_are_normalised_and_what_is_dropped_is_warned_once(caplog):
    """Expect: accents are removed ("ünïcödé" -> "unicode", "réd" -> "red"), dashes are word breaks, and CJK words
    and emoji are dropped with one warning per prompt naming the prompt and each dropped piece."""
    assert ascii_caption("ünïcödé")[0] == "unicode"
    assert ascii_caption("a—b")[0] == "a-b"
    bb = build_random_backbone()
    plain = bb.encode(["a large red circle on the left"]).cond[0]
    accented = "a lärge réd cïrclé — on the left"
    odd = "a large 猫 red circle 🙂 on the left"
    with caplog.at_level(logging.WARNING):
        batch = bb.encode([accented, odd, odd])
        bb.encode([odd])
    assert batch.cond == [plain, plain, plain]
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per prompt, none for the accented one (nothing lost)
    assert odd in warnings[0] and "'猫'" in warnings[0] and "'🙂'" in warnings[0]


def test_generate_warns_about_a_prompt_it_cannot_spell(tmp_path, random_backbone_dir):
    """`hawkspec-generate` with a prompts file holding a CJK word and an emoji. Expect: exit 0 and a warning that
    names the prompt and the dropped pieces."""
    prompt = "a réd 猫 circle 🙂 on the left"
    (tmp_path / "prompts.txt").write_text(prompt + "\n", encoding="utf-8")
    proc = run_cli("hawkspec-generate", f"backbone.path={random_backbone_dir}", f"prompts_file={tmp_path / 'prompts.txt'}",
                   "batch_size=1", f"hydra.run.dir={tmp_path / 'run'}", env={"PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0
    out = proc.stdout + proc.stderr
    assert "dropped" in out and repr(prompt) in out and "'猫'" in out and "'🙂'" in out, out[-3000:]


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def medusa_run(tmp_path_factory, random_backbone_dir, disk_cache) -> Path:
    """A `hawkspec-train heads=medusa` run folder that finished trainer.max_epochs=1 (3 steps)."""
    run_dir = tmp_path_factory.mktemp("medusa_run")
    run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={disk_cache}", *EXACT,
            "heads=medusa", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "heads" / "heads.safetensors").is_file()
    return run_dir


def test_a_resume_that_trains_nothing_says_so_and_exports_the_checkpoints_heads(tmp_path, medusa_run,
                                                                              random_backbone_dir, disk_cache):
    """`ckpt_path=<a checkpoint at trainer.max_epochs>` into a fresh run folder. Expect: exit 0, a message that
    nothing was trained naming `trainer.max_epochs` and the checkpoint, and the checkpoint's heads in the run
    folder and in export_dir (which had none)."""
    ckpt = medusa_run / "checkpoints" / "last.ckpt"
    export = tmp_path / "export"
    proc = run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={disk_cache}", *EXACT,
                   "heads=medusa", "trainer.max_epochs=1", f"ckpt_path={ckpt}", f"export_dir={export}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0
    out = proc.stdout + proc.stderr
    assert "nothing was trained" in out and "trainer.max_epochs=1" in out and str(ckpt) in out, out[-3000:]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for folder in (tmp_path / "run" / "heads", export):
        heads = load_file(folder / "heads.safetensors")
        for k, v in heads.items():
            torch.testing.assert_close(v, state[f"heads.{k}"], msg=k)
        report = json.loads((folder / "val_metrics.json").read_text())
        assert report["global_step"] == 3 and report["best"]["monitor"] == "val/loss"


def test_a_rerun_of_a_finished_run_says_nothing_was_trained(tmp_path, medusa_run, random_backbone_dir, disk_cache):
    """The same run folder again (ckpt_path=last), trainer.max_steps=3 reached. Expect: exit 0, the message names
    `trainer.max_steps`, the run's heads are left as they were."""
    run_dir = tmp_path / "run"
    shutil.copytree(medusa_run, run_dir)
    before = (run_dir / "heads" / "heads.safetensors").read_bytes()
    proc = run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={disk_cache}", *EXACT,
                   "heads=medusa", "trainer.max_epochs=5", "trainer.max_steps=3", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0
    out = proc.stdout + proc.stderr
    assert "nothing was trained" in out and "trainer.max_steps=3" in out, out[-3000:]
    assert (run_dir / "heads" / "heads.safetensors").read_bytes() == before


def test_resuming_with_other_heads_is_refused_before_fitting(tmp_path, medusa_run, random_backbone_dir, disk_cache):
    """A heads=medusa run folder rerun with heads=hawk. Expect: a non-zero exit before fitting, a message naming
    the checkpoint, heads=hawk / heads=medusa, the differing keys and ckpt_path=null; the checkpoint untouched."""
    run_dir = tmp_path / "run"
    shutil.copytree(medusa_run, run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    proc = run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={disk_cache}", *EXACT,
                   "heads=hawk", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}", ok=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for needle in (str(ckpt), "heads=hawk now, heads=medusa in the checkpoint", "heads.vertical", "heads.vsd",
                   "ckpt_path=null"):
        assert needle in out, (needle, out[-3000:])
    assert "Error(s) in loading state_dict" not in out
    assert ckpt.read_bytes() == before


def test_a_checkpoint_without_a_record_is_refused_by_its_weights(tmp_path, medusa_run, random_backbone, disk_cache):
    """A checkpoint written before the settings were recorded. Expect: the error still names the checkpoint, the
    `heads` settings and the first differing weights."""
    from hawkspec.cli.train import check_resume
    from hawkspec.training.checkpoint import RUN_RECORD
    from hawkspec.training.heads import HeadTrainingModule

    state = torch.load(medusa_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state[RUN_RECORD]["heads"] == "medusa" and state[RUN_RECORD]["heads_config"]["vertical"] is False
    del state[RUN_RECORD]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    hawk = HeadTrainingModule.for_backbone(random_backbone, optimizer=None, vertical=True, vsd=2)
    with pytest.raises(ValueError) as err:
        check_resume(str(old), hawk, {"heads": "hawk", "heads_config": {}})
    msg = str(err.value)
    assert str(old) in msg and "heads=..." in msg and "missing: heads." in msg and "ckpt_path=null" in msg
    medusa = HeadTrainingModule.for_backbone(random_backbone, optimizer=None, vertical=False, vsd=0)
    assert check_resume(str(old), medusa, {"heads": "medusa", "heads_config": {}})["global_step"] == 3
    with pytest.raises(FileNotFoundError, match="ckpt_path="):
        check_resume(str(tmp_path / "nope.ckpt"), medusa, {})
