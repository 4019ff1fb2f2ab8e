"""`hawkspec-eval`: the results.json contract, the table and grids, and its errors."""

import json
from pathlib import Path

import pytest

from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.testing import build_random_backbone, run_cli

ROOT = Path(__file__).resolve().parents[2]


def eval_cli(*overrides, ok=True):
    return run_cli("hawkspec-eval", *overrides, ok=ok)


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory, random_backbone_dir):
    from hawkspec.backbones.tiny import TinyBackbone

    bb = TinyBackbone.from_pretrained(random_backbone_dir)
    root = tmp_path_factory.mktemp("heads")
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=False), bb).save(root / "medusa")
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=3, vertical=True, vsd=2), bb).save(root / "hawk")
    return root


def test_eval_writes_the_results_contract(tmp_path, random_backbone_dir, heads_dir):
    eval_cli(
        f"backbone.path={random_backbone_dir}", f"paths.heads_dir={heads_dir}", "eval.decoders=[ar,medusa,hawk]",
        "eval.num_prompts=3", "eval.batch_size=2", "eval.repeats=1", "eval.decoders.hawk.tree.budget=6",
        f"hydra.run.dir={tmp_path}",
    )
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["backbone"] == "tiny" and res["num_prompts"] == 3 and isinstance(res["device"], str)
    rows = {r["decoder"]: r for r in res["rows"]}
    assert set(rows) == {"ar", "medusa", "hawk"}
    for r in rows.values():
        for key, typ in [("lossless", bool), ("acceptance_length", float), ("forwards_per_image", float),
                         ("step_compression", float), ("seconds_per_image", float), ("speedup", float)]:
            assert isinstance(r[key], typ), (key, r[key])
        assert Path(r["grid"]).is_file()
    assert rows["ar"]["acceptance_length"] == pytest.approx(1.0)
    assert rows["ar"]["step_compression"] == pytest.approx(1.0) and rows["ar"]["speedup"] == pytest.approx(1.0)
    assert rows["hawk"]["lossless"] and rows["medusa"]["lossless"]
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("| decoder |")
    assert (tmp_path / "accept_map_hawk.png").is_file()
    # every row carries its resolved settings; the per-decoder override reached Hawk only, and the table says so
    assert rows["hawk"]["config"]["tree"]["budget"] == 6 and rows["medusa"]["config"]["tree"]["budget"] == 8
    assert rows["ar"]["config"] == {"proposer": None} and rows["hawk"]["built"]["tree_nodes"] > 1
    assert "Settings in which the decoders differ" in md and "- `tree.budget`: medusa 8, hawk 6" in md
    # one timed pass: no spread measured, said in results.json and right under the table
    assert all(r["pass_spread"] is None and len(r["seconds_per_pass"]) == 1 for r in rows.values())
    assert any("no spread was measured" in w for w in res["timing"]["warnings"])
    assert "| speedup | pass_spread |" in md and "**Timing warning**: only one timed pass" in md


def test_the_table_puts_the_spread_beside_the_speedup_and_the_warnings_under_it():
    from hawkspec.cli.eval import markdown_table, timing_note

    rows = [{"decoder": "ar", "lossless": True, "speedup": 1.0, "pass_spread": 0.02},
            {"decoder": "hawk", "lossless": True, "speedup": 3.27, "pass_spread": 0.31}]
    table = markdown_table(rows)
    assert "| speedup | pass_spread |" in table.splitlines()[0] and "| 3.270 | 31.0% |" in table
    assert "pass_spread" not in markdown_table([{k: v for k, v in r.items() if k != "pass_spread"} for r in rows])
    note = timing_note({"timing": {"warnings": ["timed passes spread more than 10%: hawk 31%", "the machine was busy"]}})
    assert note.count("**Timing warning**") == 2 and "hawk 31%" in note
    assert timing_note({"timing": {"warnings": []}}) == "" and timing_note({}) == ""


def test_unknown_decoder_is_named(tmp_path, random_backbone_dir, heads_dir):
    proc = eval_cli(f"backbone.path={random_backbone_dir}", f"paths.heads_dir={heads_dir}",
                    "eval.decoders=[ar,medusa,nope]", f"hydra.run.dir={tmp_path}", ok=False)
    assert "unknown decoder(s) ['nope']" in proc.stderr and "hawk_gsd" in proc.stderr  # with the list to choose from


def test_heads_of_another_backbone_are_refused(tmp_path, random_backbone_dir):
    other = build_random_backbone(rows=3, cols=3)
    DraftHeads.for_backbone(HeadsConfig(num_horizontal=2, vertical=False), other).save(tmp_path / "h" / "medusa")
    proc = eval_cli(f"backbone.path={random_backbone_dir}", f"paths.heads_dir={tmp_path / 'h'}",
                    "eval.decoders=[medusa]", "decoder=medusa", f"hydra.run.dir={tmp_path}", ok=False)
    assert "another backbone" in proc.stderr and "grid=" in proc.stderr


def test_missing_heads_name_the_key(tmp_path, random_backbone_dir):
    proc = eval_cli(f"backbone.path={random_backbone_dir}", f"paths.heads_dir={tmp_path}/none",
                    "eval.decoders=[hawk]", f"hydra.run.dir={tmp_path}", ok=False)
    assert "eval.decoders.hawk.heads_path" in proc.stderr
