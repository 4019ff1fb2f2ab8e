"""experiments/tables.py and plots.py: the papers' tables (markdown + LaTeX) with the papers' numbers and the
commands beside ours, and the plots."""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tables, plots = load("tables"), load("plots")


def run_dir(folder: Path, overrides: list[str], rows: list[dict], feats="hawkspec-tiny-extractor", floor=0.5) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    res = {"backbone": "tiny", "revision": "abc", "num_prompts": 8, "device": "cpu (1 threads)", "batch_size": 1,
           "repeats": 1, "sampling": {"temperature": 1.0, "top_k": 128, "cfg_scale": 3.0}, "seed": 0, "rows": rows,
           "quality": {"fid_features": feats, "reference": {},
                       "noise_floor": {"base_seed": 0, "seed": 1, "delta": {"fid": floor, "alignment": 0.01},
                                       "fid_ar_vs_ar": 1.0}}}
    (folder / "results.json").write_text(json.dumps(res))
    return folder


def row(decoder, speedup, fid, lossless=True, acc=2.0, **config):
    return {"decoder": decoder, "lossless": lossless, "acceptance_length": acc, "forwards_per_image": 70.0,
            "step_compression": 2.2 if decoder != "ar" else 1.0, "seconds_per_image": 0.5, "speedup": speedup,
            "fid": fid, "alignment": 0.6, "diversity": 0.9, "config": config}


def test_hawk_table_puts_the_papers_numbers_beside_ours(tmp_path):
    rows = [row("ar", 1.0, 10.0, acc=1.0), row("medusa", 1.3, 10.2), row("hawk_vertical_only", 1.1, 10.1),
            row("medusa_lanternpp", 1.4, 13.0, lossless=False), row("hawk", 1.5, 10.3)]
    src = run_dir(tmp_path / "hawk", ["eval.decoders=[ar,medusa,hawk_vertical_only,medusa_lanternpp,hawk]",
                                      "eval.num_prompts=8"], rows)
    tables.main(["hawk", str(src), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "hawk_table1.md").read_text()
    lines = {l.split(" | ")[0].lstrip("| "): l for l in md.splitlines() if l.startswith("| ")}
    assert "1.50×" in lines["Hawk"] and "1.71×" in lines["Hawk"] and "90.71" in lines["Hawk"]
    assert "90.68" in lines["Vanilla AR"] and "1.58×" in lines["Medusa"] and "1.69×" in lines["LANTERN++ in Medusa"]
    assert "FID (hawkspec-tiny-extractor)" in md and "fid ±0.500" in md
    assert "hawkspec-eval 'eval.decoders=[ar,medusa,hawk_vertical_only,medusa_lanternpp,hawk]' eval.num_prompts=8" in md
    assert f"python experiments/tables.py hawk {src}" in md
    tex = (tmp_path / "out" / "hawk_table1.tex").read_text()
    assert r"\begin{tabular}{lrrrrrrrrrrr}" in tex and "FID (hawkspec-tiny-extractor)" in tex
    header = next(l for l in tex.splitlines() if l.startswith("method"))
    body = [l for l in tex.splitlines() if l.endswith(r"\\") and not l.startswith("method")]
    assert len(body) == 5 and all(l.count("&") == header.count("&") for l in body)
    assert r"1.71$\times$" in tex and "_" not in tex.replace(r"\_", "")
    data = json.loads((tmp_path / "out" / "hawk_table1.json").read_text())
    assert [r["decoder"] for r in data["rows"]] == ["ar", "medusa", "hawk_vertical_only", "medusa_lanternpp", "hawk"]
    assert data["noise_floor"] == {"fid": 0.5, "alignment": 0.01} and data["rows"][-1]["fid"] == 10.3


def test_seeds_are_averaged_and_missing_decoders_named(tmp_path):
    a = run_dir(tmp_path / "0", ["seed=1"], [row("ar", 1.0, 10.0), row("hawk", 1.4, 12.0)])
    b = run_dir(tmp_path / "1", ["seed=2"], [row("ar", 1.0, 14.0), row("hawk", 1.6, 16.0)])
    md, _ = tables.hawk_table(tables.load_jobs([a, b]), "cmd")
    hawk = next(l for l in md.splitlines() if l.startswith("| Hawk |"))
    assert "1.50× ± 0.14" in hawk and "14.00 ± 2.83" in hawk
    assert "Not in these runs: medusa, hawk_vertical_only, medusa_lanternpp" in md


def test_gsd_table_has_a_row_per_group_size(tmp_path):
    for n, g in enumerate([1, 3, 7]):
        run_dir(tmp_path / "sweep" / str(n), ["decoder=gsd", "eval.decoders=[ar,sjd,gsd]", f"decoder.acceptance.group={g}"],
                [row("ar", 1.0, 10.0, acc=1.0), row("sjd", 1.2, 10.1, acc=1.3),
                 row("gsd", 1.0 + g / 10, 10.0 + g, lossless=False, acceptance={"name": "gsd", "group": g})])
    tables.main(["gsd", str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "gsd_table.md").read_text()
    names = [l.split(" | ")[0].lstrip("| ") for l in md.splitlines() if l.startswith("| ") and "---" not in l][1:]
    assert names == ["Vanilla AR", "SJD (L = 16)", "GSD, ±1 ranks (G ≤ 2)", "GSD, ±3 ranks (G ≤ 6)",
                     "GSD, ±7 ranks (G ≤ 14)"]
    g7 = next(l for l in md.splitlines() if "±7 ranks" in l)
    g1 = next(l for l in md.splitlines() if "±1 ranks" in l)
    assert "3.4–3.8×" in g7 and "33.1–33.6" in g7 and "1.70×" in g7 and "3.4–3.8×" not in g1
    assert "2.05×" in md and "30.79" in md
    assert "decoder.acceptance.group=7" in md and (tmp_path / "out" / "gsd_table.tex").is_file()


def test_gsd_table_takes_ar_and_sjd_once_per_seed(tmp_path):
    """A seed x group sweep: AR and SJD are the mean of one job per seed (the jobs of a seed decode them alike),
    so their rows carry the seeds' spread like the GSD rows."""
    n = 0
    for seed, sjd_speed in ((0, 1.2), (1, 1.6)):
        for g in (1, 7):
            d = run_dir(tmp_path / "sweep" / str(n), ["decoder=gsd", f"decoder.acceptance.group={g}", f"seed={seed}"],
                        [row("ar", 1.0, 10.0, acc=1.0), row("sjd", sjd_speed + g / 100, 10.1, acc=1.3),
                         row("gsd", 2.0, 11.0, lossless=False, acceptance={"name": "gsd", "group": g})])
            res = json.loads((d / "results.json").read_text())
            res["seed"] = seed
            (d / "results.json").write_text(json.dumps(res))
            n += 1
    md, _ = tables.gsd_table(tables.load_jobs([tmp_path / "sweep" / str(i) for i in range(n)]), "cmd")
    sjd = next(l for l in md.splitlines() if l.startswith("| SJD"))
    assert "1.41× ± 0.28" in sjd  # the g = 1 job of seed 0 (1.21) and of seed 1 (1.61)


def test_tables_refuse_mixed_feature_spaces(tmp_path):
    a = run_dir(tmp_path / "0", [], [row("ar", 1.0, 10.0)], feats="inception")
    b = run_dir(tmp_path / "1", [], [row("ar", 1.0, 10.0)])
    with pytest.raises(ValueError, match="different FID feature spaces"):
        tables.main(["hawk", str(a), str(b), "--out", str(tmp_path / "out")])


def test_sweep_table_and_plots(tmp_path):
    for n, vsd in enumerate([1, 2, 3]):
        run_dir(tmp_path / "vsd" / str(n), ["eval.decoders=[ar,hawk]", f"decoder.proposer.vsd={vsd}"],
                [row("ar", 1.0, 10.0, acc=1.0), row("hawk", 1.2 + vsd / 10, 10.5, acc=2 + vsd / 4, proposer={"vsd": vsd})])
    tables.main(["sweep", str(tmp_path / "vsd"), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "sweep_table.md").read_text()
    assert "| job | decoder.proposer.vsd | decoder |" in md
    plots.main(["acceptance-vsd", str(tmp_path / "vsd"), "--out", str(tmp_path / "out")])
    plots.main(["speed-quality", str(tmp_path / "vsd"), "--out", str(tmp_path / "out")])
    for name in ("acceptance_vs_vsd.png", "speed_quality.png"):
        assert (tmp_path / "out" / name).stat().st_size > 10_000
    with pytest.raises(ValueError, match="vertical speculation depth"):
        plots.main(["acceptance-vsd", str(tmp_path / "vsd"), "--decoder", "medusa", "--out", str(tmp_path / "x")])


def test_sweep_title_heads_the_file_and_other_tables_refuse_it(tmp_path):
    src = run_dir(tmp_path / "run", ["decoder.acceptance.lam=2.0"], [row("ar", 1.0, 10.0, acc=1.0),
                                                                     row("medusa_lanternpp", 1.1, 11.0, False)])
    tables.main(["sweep", str(src), "--out", str(tmp_path / "out"), "--name", "t", "--title", "LANTERN++ sweep"])
    md = (tmp_path / "out" / "t.md").read_text()
    assert md.startswith("# LANTERN++ sweep\n") and "--title 'LANTERN++ sweep'" in md
    tables.main(["sweep", str(src), "--out", str(tmp_path / "out"), "--name", "u"])
    assert (tmp_path / "out" / "u.md").read_text().startswith("# Sweep\n")
    with pytest.raises(SystemExit):
        tables.main(["hawk", str(src), "--out", str(tmp_path / "out"), "--title", "x"])
    assert not (tmp_path / "out" / "hawk_table1.md").exists()


def test_a_per_decoder_sweep_labels_only_that_decoders_rows(tmp_path):
    """Sweeps made with decoders as config nodes record `eval.decoders.<name>.KEY`: the setting labels that
    decoder's rows only; a run-level key (`tree.budget`) labels every decoder's."""
    jobs = []
    for n, (g, budget) in enumerate(((1, 8), (7, 16))):
        jobs.append(run_dir(tmp_path / str(n), ["decoders=none", "+decoder@eval.decoders.gsd=gsd",
                                                f"eval.decoders.gsd.acceptance.group={g}", f"tree.budget={budget}"],
                            [row("ar", 1.0, 10.0, acc=1.0), row("medusa", 1.5, 10.0), row("gsd", 2.0, 11.0)]))
    loaded = tables.load_jobs(jobs)
    assert plots.setting("gsd", loaded[0], loaded) == "group=1, budget=8"
    assert plots.setting("medusa", loaded[1], loaded) == "budget=16"


def test_leaderboard_has_every_method_run_with_the_papers_figures_beside(tmp_path):
    jobs = []
    for seed in (0, 1, 2):
        d = run_dir(tmp_path / str(seed), ["experiment=leaderboard_tiny", f"seed={seed}"],
                    [row("ar", 1.0, 10.0, acc=1.0), row("sjd", 1.9 + seed / 10, 10.1),
                     row("sjd_pac", 2.6, 10.2), row("gsd", 2.9, 12.0, lossless=False)])
        res = json.loads((d / "results.json").read_text())
        res["seed"] = seed
        for r in res["rows"]:
            r["efficiency"] = 0.8
        (d / "results.json").write_text(json.dumps(res))
        jobs.append(d)
    out = tmp_path / "out"
    assert tables.main(["leaderboard", *map(str, jobs), "--out", str(out)]) == 0
    md = (out / "leaderboard_tiny.md").read_text()
    lines = [l for l in md.splitlines() if l.startswith("| ")]
    assert [l.split("|")[1].strip() for l in lines[1:]] == ["AR", "SJD", "SJD-PAC (exact, ours)", "GSD (lossy)"]
    pac = next(l for l in lines if l.startswith("| SJD-PAC"))
    assert "| 4.51 | 3.80 | 30.69 | 31.21 | SJD-PAC Tab. |" in pac  # the paper's COCO figures beside ours
    sjd = next(l for l in lines if l.startswith("| SJD |"))
    assert "2.00× ± 0.10" in sjd  # speedup: mean ± std over the 3 seeds
    assert (out / "leaderboard_tiny.tex").is_file() and json.loads((out / "leaderboard_tiny.json").read_text())["rows"]


def test_spatial_table_orders_the_methods_and_names_the_papers_claims(tmp_path):
    jobs = []
    for seed in (0, 1):
        d = run_dir(tmp_path / str(seed), ["experiment=spatial_tiny", f"seed={seed}"],
                    [row("ar", 1.0, 10.0, acc=1.0), row("hawk_spatial_jacobi", 1.8, 10.1), row("pjd", 2.5, 11.0, False),
                     row("zipar_w3", 3.0 + seed, 14.0, lossless=False), row("hawk", 1.3, 10.2)])
        res = json.loads((d / "results.json").read_text())
        res["seed"] = seed
        (d / "results.json").write_text(json.dumps(res))
        jobs.append(d)
    out = tmp_path / "out"
    assert tables.main(["spatial", *map(str, jobs), "--out", str(out)]) == 0
    lines = [l for l in (out / "spatial_tiny.md").read_text().splitlines() if l.startswith("| ")]
    assert [l.split("|")[1].strip() for l in lines[1:]] == [
        "AR", "ZipAR, window 3 (lossy)", "PJD (lossy)", "Hawk", "Hawk + spatial Jacobi (ours)"]
    z = next(l for l in lines if l.startswith("| ZipAR"))
    assert "3.50× ± 0.71" in z  # speedup: mean ± std over the seeds
    assert "PJD: 4.8× latency" in next(l for l in lines if l.startswith("| PJD"))
