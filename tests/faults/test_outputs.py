"""Destination collisions: an output never destroys what hawkspec did not write, and replaces its own atomically."""

import os
from pathlib import Path

import pytest

from hawkspec.io import MARKER, OutputExistsError, atomic_write_text, check_destination, copy_dir, publish_dir, staged_dir
from hawkspec.testing import run_cli


def make_folder(path, files=("a.txt",)):
    path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (path / name).write_text(name)
    return path


def test_a_foreign_folder_is_refused_naming_the_key_and_kept(tmp_path):
    """Expect: OutputExistsError naming `export_dir`; the folder and its file untouched."""
    dest = make_folder(tmp_path / "user_stuff")
    src = make_folder(tmp_path / "new", ("heads.json",))
    with pytest.raises(OutputExistsError, match="export_dir"):
        copy_dir(src, dest, "export_dir")
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt"]


def test_a_file_as_destination_is_refused(tmp_path):
    """Expect: OutputExistsError naming the key; the file untouched."""
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputExistsError, match="export_dir"):
        check_destination(tmp_path / "f", "export_dir")
    assert (tmp_path / "f").read_text() == "x"


def test_our_folder_is_replaced_and_overwrite_forces_a_foreign_one(tmp_path):
    """Expect: ours replaced entirely (old files gone, marker present); a foreign one only with overwrite."""
    src = make_folder(tmp_path / "src", ("new.txt",))
    dest = copy_dir(src, tmp_path / "dest", "export_dir")  # new: fine
    assert (dest / MARKER).is_file() and (dest / "new.txt").is_file()
    make_folder(tmp_path / "src2", ("newer.txt",))
    copy_dir(tmp_path / "src2", dest, "export_dir")  # ours: replaced
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER, "newer.txt"])
    foreign = make_folder(tmp_path / "foreign")
    copy_dir(src, foreign, "export_dir", overwrite=True)
    assert (foreign / "new.txt").is_file() and not (foreign / "a.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary sibling left behind"


def test_a_failure_while_staging_leaves_the_destination_untouched(tmp_path):
    """Expect: the exception propagates, the old folder is intact, no temporary sibling is left."""
    dest = copy_dir(make_folder(tmp_path / "src"), tmp_path / "dest", "export_dir")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(dest, "export_dir") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER, "a.txt"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    """Expect: a write that fails midway leaves the previous contents."""
    target = atomic_write_text(tmp_path / "r.json", "old")
    from hawkspec.io import atomic_path

    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_publish_dir_into_an_unwritable_parent_names_the_key(tmp_path, monkeypatch):
    """Expect: PermissionError naming the key (checked before anything is moved). The parent is read-only by mode
    and, since root ignores modes (CI runs as root), by what ``os.access`` reports for it too."""
    parent = make_folder(tmp_path / "ro", ())
    parent.chmod(0o500)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if Path(path) == parent
                        else real_access(path, mode, *a, **k))
    source = make_folder(tmp_path / "s")
    try:
        with pytest.raises(PermissionError, match="export_dir"):
            publish_dir(source, parent / "x", "export_dir")
    finally:
        parent.chmod(0o700)
    assert source.is_dir() and not (parent / "x").exists()  # nothing was moved


def test_train_cli_refuses_a_foreign_export_dir_before_loading_anything(tmp_path, random_backbone_dir, disk_cache):
    """`hawkspec-train export_dir=<existing folder>` used to delete it. Expect: exit 1 naming `export_dir`, before
    the backbone is loaded; the folder intact."""
    dest = make_folder(tmp_path / "precious", ("thesis.tex",))
    proc = run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={disk_cache}",
                   f"hydra.run.dir={tmp_path / 'run'}", f"export_dir={dest}", "logger=none", ok=False)
    assert "export_dir" in proc.stderr and "Instantiating backbone" not in proc.stdout + proc.stderr
    assert (dest / "thesis.tex").read_text() == "thesis.tex"


def test_a_published_folder_gets_a_plain_folders_mode(tmp_path):
    """The staging folder is private while it is filled (mkdtemp: 0700); the published one is not."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    copy_dir(tmp_path / "src", tmp_path / "out", "export_dir")
    assert (tmp_path / "out").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777


@pytest.mark.parametrize("where", ["run", "run/evaluator", "run/evaluator/sub", "."])
def test_an_export_dir_that_collides_with_the_run_folder_is_refused_at_start_up(tmp_path, where):
    """`hawkspec-quality hydra.run.dir=X export_dir=X/evaluator` used to train, then refuse its own folder as "a
    folder hawkspec did not write". Expect: a ValueError naming `export_dir` and the collision, before any work;
    an export elsewhere inside the run folder stays allowed."""
    from omegaconf import OmegaConf

    from hawkspec.cli.validate import validate_pretrain

    run = tmp_path / "run"
    cfg = OmegaConf.create({"export_dir": str(tmp_path / where), "paths": {"output_dir": str(run)}})
    with pytest.raises(ValueError, match="export_dir=.*(its own copy|this run's folder)"):
        validate_pretrain(cfg, "evaluator")
    assert not run.exists()
    validate_pretrain(OmegaConf.create({"export_dir": str(run / "export"), "paths": {"output_dir": str(run)}}),
                      "evaluator")


def test_quality_cli_refuses_its_own_evaluator_folder_as_export_dir(tmp_path):
    proc = run_cli("hawkspec-quality", f"hydra.run.dir={tmp_path}", f"export_dir={tmp_path}/evaluator",
                   "logger=none", ok=False)
    assert "export_dir" in proc.stderr and "own copy" in proc.stderr
    assert not (tmp_path / "evaluator").exists()
