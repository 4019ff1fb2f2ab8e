"""A table records the command that made it; rerunning that command reproduces the table within its noise floor
(`experiments/tables.py check`), and a table that moved beyond the floor is caught."""

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from hawkspec.testing import run_cli

from hawkspec.heads.draft import DraftHeads, HeadsConfig

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("exp_tables", ROOT / "experiments" / "tables.py")
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)


def run(cmd: list[str]) -> None:
    run_cli(cmd[0], *cmd[1:], env={"OMP_NUM_THREADS": "1"})


def test_rerunning_the_recorded_command_reproduces_the_table(tmp_path, random_backbone_dir):
    from hawkspec.backbones.tiny import TinyBackbone

    heads = tmp_path / "heads"
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=2, vertical=False),
                            TinyBackbone.from_pretrained(random_backbone_dir)).save(heads / "medusa")
    first = tmp_path / "first"
    run(["hawkspec-eval", f"backbone.path={random_backbone_dir}", f"paths.heads_dir={heads}",
         "eval.decoders=[ar,medusa]", "eval.num_prompts=6", "eval.batch_size=3", "eval.repeats=1",
         "tree.budget=4", "eval.quality.fid_features=tiny", "eval.quality.reference.num_images=64",
         f"eval.quality.reference.cache_dir={tmp_path / 'ref'}", f"hydra.run.dir={first}"])
    assert tables.main(["hawk", str(first), "--out", str(tmp_path / "committed")]) == 0
    committed = json.loads((tmp_path / "committed" / "hawk_table1.json").read_text())
    (command,) = committed["commands"]
    assert f"hydra.run.dir={first}" in command
    assert command in (tmp_path / "committed" / "hawk_table1.md").read_text()

    # "a fresh clone": the recorded command, its output elsewhere
    again = tmp_path / "again"
    run([a.replace(str(first), str(again)) for a in shlex.split(command)])
    assert tables.main(["check", str(tmp_path / "committed" / "hawk_table1.json"), str(again)]) == 0

    # a table whose FID moved beyond the noise floor is not reproduced
    moved = dict(committed)
    moved["rows"] = [{**r, "fid": r["fid"] + 10 * committed["noise_floor"]["fid"] + 1} if r["fid"] is not None else r
                     for r in committed["rows"]]
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    assert tables.main(["check", str(tmp_path / "moved.json"), str(again)]) == 1


def test_check_refuses_another_feature_space():
    ok, report = tables.check({"fid_features": "inception", "rows": [], "noise_floor": {}},
                              {"fid_features": "hawkspec-tiny-extractor", "rows": []})
    assert not ok and "feature spaces differ" in report


@pytest.mark.parametrize("delta, ok", [(0.4, True), (0.6, False)])
def test_check_uses_the_committed_noise_floor(delta, ok):
    committed = {"fid_features": "x", "noise_floor": {"fid": 0.5, "alignment": 0.1},
                 "rows": [{"method": "Hawk", "fid": 10.0, "alignment": 0.5, "speedup": 1.5}]}
    fresh = {"fid_features": "x", "rows": [{"method": "Hawk", "fid": 10.0 + delta, "alignment": 0.55, "speedup": 0.9}]}
    got, report = tables.check(committed, fresh)
    assert got is ok and "(machine-dependent)" in report
