"""Turn ``hawkspec-eval`` outputs into the papers' tables (markdown + LaTeX), with the papers' numbers beside ours.

    python experiments/tables.py hawk  RESULTS...   # Hawk Table 1 analogue -> hawk_table1.{md,tex}
    python experiments/tables.py gsd   RESULTS...   # GSD table analogue    -> gsd_table.{md,tex}
    python experiments/tables.py sweep RESULTS...   # any sweep, one row per job x decoder -> sweep_table.{md,tex}
    python experiments/tables.py leaderboard RESULTS...   # every method in one harness -> leaderboard_tiny.{md,tex}
    python experiments/tables.py spatial RESULTS...       # rows in flight and the row below -> spatial_tiny.{md,tex}
    python experiments/tables.py check experiments/results/hawk_table1.json FRESH_RUN...   # reproduced?

RESULTS are ``results.json`` files or folders holding them (a multirun folder: every job). Tables go to
``--out`` (default ``experiments/results``) as ``<stem>.md``, ``<stem>.tex`` and ``<stem>.json`` (the numbers); each
markdown file names the ``hawkspec-eval`` command(s) that made its inputs and the command that made the table.
``check`` reruns nothing: give it the committed ``<stem>.json`` and a fresh run of the commands it lists; it exits 1
unless every quality figure (FID, diversity, alignment, CLIP) is within the committed noise floor. Several runs of the same decoder (e.g. a seed sweep) are averaged
and shown as mean ± standard deviation.

The committed tables come from (see experiments/README.md)::

    hawkspec-eval 'eval.decoders=[ar,medusa,hawk_vertical_only,medusa_lanternpp,hawk]' eval.quality.fid_features=tiny \\
        eval.num_prompts=500 eval.batch_size=1 eval.repeats=1 eval.threads=1 hydra.run.dir=outputs/tables/hawk
    python experiments/tables.py hawk outputs/tables/hawk

    hawkspec-eval -m 'eval.decoders=[ar,sjd,gsd]' eval.decoders.gsd.acceptance.group=1,3,7 \\
        eval.quality.fid_features=tiny eval.num_prompts=500 eval.batch_size=1 eval.repeats=1 eval.threads=1 \\
        hydra.sweep.dir=outputs/tables/gsd
    python experiments/tables.py gsd outputs/tables/gsd
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from hawkspec.metrics.sweep import Job, built_of, commands, load_jobs, seed_summary, split_overrides, sweep_rows

# The papers' numbers (shared/BRIEF.md §3; Hawk: arXiv 2510.25739, Lumina-mGPT 7B at 768 px, COCO, 500 prompts;
# GSD: arXiv 2508.07747, Lumina-mGPT, COCO, 5k prompts). None: the brief does not give it.
HAWK_PAPER = {
    "ar": {"speedup": "1.00×", "acceptance_length": "1.00", "fid": "90.68", "clip": "33.43"},
    "medusa": {"speedup": "1.58×", "acceptance_length": None, "fid": "≈ AR", "clip": "≈ AR"},
    "hawk_vertical_only": {"speedup": None, "acceptance_length": None, "fid": None, "clip": None},
    "medusa_lanternpp": {"speedup": "1.69×", "acceptance_length": None, "fid": "worse", "clip": "worse"},
    "hawk": {"speedup": "1.71×", "acceptance_length": None, "fid": "90.71", "clip": "33.39"},
    # the paper's open question (a stronger drafter), answered on our model: not in the paper
    "eagle": {"speedup": None, "acceptance_length": None, "fid": None, "clip": None},
    "hawk_eagle": {"speedup": None, "acceptance_length": None, "fid": None, "clip": None},
}
HAWK_ROWS = {"ar": "Vanilla AR", "medusa": "Medusa", "hawk_vertical_only": "Hawk, vertical heads only",
             "medusa_lanternpp": "LANTERN++ in Medusa", "hawk": "Hawk",
             "eagle": "EAGLE (ours, not in the paper)", "hawk_eagle": "Hawk + EAGLE (ours, not in the paper)"}
HAWK_OURS = ("eagle", "hawk_eagle")  # rows beyond the paper's: shown when run, never reported missing
GSD_PAPER = {
    "ar": {"step_compression": "1.00×", "speedup": "1.00×", "fid": "30.79", "clip": "31.31"},
    "sjd": {"step_compression": "2.2×", "speedup": "2.05×", "fid": "31.13", "clip": None},
    "gsd": {"step_compression": "3.4–3.8×", "speedup": "3.7×", "fid": "33.1–33.6", "clip": "31.24"},
}
GSD_PAPER_GROUP = range(5, 8)  # the paper's G ≈ 10–14 is ±5..±7 ranks


# ------------------------------------------------------------------------------------------------ formatting
def fmt(v, digits: int = 3, suffix: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, (str, bool, int)):
        return str(v)
    if isinstance(v, tuple):  # (mean, sd, n)
        mean, sd, n = v
        return f"{mean:.{digits}f}{suffix}" + (f" ± {sd:.{digits}f}" if n > 1 else "")
    return f"{v:.{digits}f}{suffix}"


def markdown_table(cols: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def latex_escape(s: str) -> str:
    out = s
    for a, b in [("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("×", r"$\times$"), ("≈", r"$\approx$"), ("—", "--"), ("–", "--"),
                 ("|", r"$|$"), ("'", "'")]:
        out = out.replace(a, b)
    return out


def latex_table(cols: list[str], rows: list[list[str]], caption: str, label: str) -> str:
    spec = "l" + "r" * (len(cols) - 1)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in cols) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}",
              r"\end{table}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ reading runs
def stat(values: list[float]) -> tuple[float, float, int] | None:
    vals = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not vals:
        return None
    return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def rows_by_decoder(jobs: list[Job]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for j in jobs:
        for r in j.results["rows"]:
            out.setdefault(r["decoder"], []).append(r)
    return out


def fid_label(jobs: list[Job]) -> str:
    feats = {(j.results.get("quality") or {}).get("fid_features") for j in jobs} - {None}
    if len(feats) > 1:
        raise ValueError(f"the runs use different FID feature spaces {sorted(feats)}: not comparable in one table")
    return feats.pop() if feats else "no quality measured"


def floor_stat(jobs: list[Job], key: str) -> tuple[float, float, int] | None:
    return stat([((j.results.get("quality") or {}).get("noise_floor") or {}).get("delta", {}).get(key) for j in jobs])


def semantics(jobs: list[Job]) -> list[str]:
    """Which decision semantics every row used (its acceptance rule and proposer options, from results.json)."""
    seen: dict[str, str] = {}
    for job in jobs:
        for row in job.results.get("rows", []):
            cfg = built_of(row)
            acc, prop = cfg.get("acceptance"), cfg.get("proposer") or {}
            if not isinstance(acc, dict):
                continue
            parts = [f"{k}={round(v, 3) if isinstance(v, float) else v}" for k, v in acc.items()
                     if k not in ("name", "lossless")]
            parts += [f"proposer.{k}={v}" for k, v in prop.items() if k in ("draft", "init_q", "init")]
            text = f"`{row['decoder']}`: {acc.get('name')}" + (f" ({', '.join(parts)})" if parts else "")
            seen.setdefault(text, text)  # every distinct setting once (a sweep's jobs differ in one option)
    if not seen:
        return []
    fixed = {json.dumps(j.results.get("decision_semantics"), sort_keys=True) for j in jobs}
    if len(fixed) > 1:
        raise ValueError("the runs decide with different semantics (results.json decision_semantics): "
                         f"{sorted(fixed)}; regenerate the older ones")
    common = jobs[0].results.get("decision_semantics")
    base = (f"CFG mixed in {common.get('cfg_precision')}, GSD ties by {common.get('gsd_tie_order')}, LANTERN zeroes "
            f"after a rejection when a neighbour {common.get('lantern_zeroing')} fits the bound (all official)"
            if common else "CFG mixed in the model's dtype (runs before 2026-12-07, which did not record it)")
    return ["Decision semantics (official defaults unless an option says otherwise; README \"Decoding, precisely\"): "
            + base + "; " + "; ".join(seen.values()) + ".", ""]


def provenance(jobs: list[Job], table_cmd: str) -> list[str]:
    r0 = jobs[0].results
    lines = semantics(jobs) + ["Made by:", "", "```"]
    lines += commands(jobs)
    lines += [table_cmd, "```", "",
              f"Backbone `{r0.get('backbone')}` (revision `{r0.get('revision')}`), {r0.get('num_prompts')} prompts, "
              f"batch {r0.get('batch_size')}, {r0.get('repeats')} timed repeats, device {r0.get('device')}, sampling "
              + ", ".join(f"{k}={v}" for k, v in (r0.get("sampling") or {}).items())
              + f"; {len(jobs)} run(s): {', '.join(str(j.path.parent) for j in jobs)}."]
    return lines


def noise_floor_line(jobs: list[Job]) -> str:
    parts = []
    for key in ("fid", "diversity", "alignment", "clip_score_100cos", "clip_cosine_lantern"):
        s = floor_stat(jobs, key)
        if s:  # one value per distinct noise-floor run (jobs of one sweep share theirs)
            parts.append(f"{key} ±{fmt(s if s[1] > 0 else s[0])}")
    if not parts:
        return "No noise floor in these runs (run with eval.quality.noise_floor=true)."
    seeds = sorted({(j.results["quality"]["noise_floor"]["base_seed"], j.results["quality"]["noise_floor"]["seed"])
                    for j in jobs if (j.results.get("quality") or {}).get("noise_floor")})
    return ("Noise floor (|AR(seed') − AR(seed)|, same prompts and number of images; seeds "
            + ", ".join(f"{a}→{b}" for a, b in seeds) + "): " + ", ".join(parts)
            + ". Quality differences from AR below these are sampling noise.")


def write(out_dir: Path, name: str, md: str, tex: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(md)
    (out_dir / f"{name}.tex").write_text(tex)
    print(f"wrote {out_dir / name}.md, .tex and .json")


# ------------------------------------------------------------------------------------------------ tables
def hawk_groups(jobs: list[Job]) -> list[tuple[str, str, list[dict]]]:
    """(method, decoder, rows) of the Hawk table, in the paper's order."""
    by = rows_by_decoder(jobs)
    return [(name, dec, by.get(dec, [])) for dec, name in HAWK_ROWS.items() if dec not in HAWK_OURS or dec in by]


def gsd_groups(jobs: list[Job]) -> list[tuple[str, str, list[dict]]]:
    """(method, decoder, rows) of the GSD table: AR and SJD from the first job of each seed (every job of a seed
    decodes them alike), then GSD per group size."""
    first: dict[object, Job] = {}
    for j in jobs:
        first.setdefault(j.results.get("seed", j.overrides.get("seed")), j)
    base = rows_by_decoder(list(first.values()))
    gsd: dict[int, list[dict]] = {}
    for j in jobs:
        for r in j.results["rows"]:
            if r["decoder"] == "gsd":
                group = built_of(r).get("acceptance", {}).get("group")
                if group is None:
                    group = int(j.overrides.get("eval.decoders.gsd.acceptance.group",
                                                j.overrides.get("decoder.acceptance.group", -1)))
                gsd.setdefault(int(group), []).append(r)
    out = [("Vanilla AR", "ar", base.get("ar", [])), ("SJD (L = 16)", "sjd", base.get("sjd", []))]
    out += [(f"GSD, ±{g} ranks (G ≤ {2 * g})", f"gsd@{g}", gsd[g]) for g in sorted(gsd)]
    return out


def sweep_groups(jobs: list[Job]) -> list[tuple[str, str, list[dict]]]:
    """One group per job and decoder, named by the job and its varying overrides."""
    varying = split_overrides(jobs)[0]
    out = []
    for j in jobs:
        tag = " ".join(f"{k}={j.overrides[k]}" for k in varying if k in j.overrides)
        out += [(f"job {j.name} {tag} {r['decoder']}".replace("  ", " "), r["decoder"], [r]) for r in j.results["rows"]]
    return out


# The leaderboard (issue 30): every method of the field in one harness, with what its paper reports on Lumina-mGPT 7B
# at 768 px (SJD-PAC's six-method table on COCO-2017, BRIEF-2026 §2.6: step compression / latency speedup / FID / CLIP;
# Hawk's and Medusa's latency from the Hawk paper's Table 1; SCD's abstract: "up to ~4.2x"). None: not reported.
LEADERBOARD = [  # (decoder, method, source of the paper's figures, {step, latency, fid, clip})
    ("ar", "AR", "SJD-PAC Tab.", {"step": "1.00", "lat": "1.00", "fid": "30.79", "clip": "31.31"}),
    ("medusa", "Medusa", "Hawk Tab. 1", {"lat": "1.58"}),
    ("hawk", "Hawk", "Hawk Tab. 1", {"lat": "1.71"}),
    ("eagle", "EAGLE", "SJD-PAC Tab.", {"step": "2.94", "lat": "2.10", "fid": "30.68", "clip": "31.73"}),
    ("sjd", "SJD", "SJD-PAC Tab.", {"step": "2.22", "lat": "2.05", "fid": "31.13", "clip": "31.33"}),
    ("scd_maximal", "SCD, maximal coupling", "SCD abstract", {"lat": "≤ 4.2"}),
    ("scd_gumbel", "SCD, Gumbel coupling", "SCD abstract", {"lat": "≤ 4.2"}),
    ("sjd_pac", "SJD-PAC (exact, ours)", "SJD-PAC Tab.", {"step": "4.51", "lat": "3.80", "fid": "30.69", "clip": "31.21"}),
    ("sjd_pac_released", "SJD-PAC as released (lossy)", "SJD-PAC Tab.", {"step": "4.51", "lat": "3.80", "fid": "30.69",
                                                                       "clip": "31.21"}),
    ("gsd", "GSD (lossy)", "SJD-PAC Tab.", {"step": "3.39", "lat": "3.62", "fid": "33.12", "clip": "31.25"}),
    ("medusa_lanternpp", "LANTERN++ in Medusa (lossy)", "SJD-PAC Tab.", {"step": "3.19", "lat": "2.28", "fid": "29.96",
                                                                      "clip": "30.11"}),
    ("hawk_jacobi", "Hawk + Jacobi (ours)", "—", {}),
    ("hawk_pac", "Hawk on SJD-PAC (ours)", "—", {}),
    ("hawk_eagle", "Hawk + EAGLE (ours)", "—", {}),
]


def leaderboard_groups(jobs: list[Job]) -> list[tuple[str, str, list[dict]]]:
    """(method, decoder, rows) of the leaderboard, in its order; rows of methods not run are left out."""
    by = rows_by_decoder(jobs)
    return [(name, dec, by[dec]) for dec, name, _, _ in LEADERBOARD if by.get(dec)]


def leaderboard_table(jobs: list[Job], table_cmd: str) -> tuple[str, str]:
    """Every method in one harness: step compression, latency speedup, efficiency, FID and alignment with AR's
    noise floor (mean ± std over seeds), the papers' Lumina-mGPT figures beside."""
    label = fid_label(jobs)
    paper = {dec: (src, fig) for dec, _, src, fig in LEADERBOARD}
    cols = ["method", "lossless", "step compression", "speedup", "efficiency", f"FID ({label})", "alignment",
            "paper: step", "paper: latency", "paper: FID", "paper: CLIP", "paper source"]
    rows = []
    for name, dec, rs in leaderboard_groups(jobs):
        g = lambda k: stat([r.get(k) for r in rs])  # noqa: E731
        src, fig = paper[dec]
        rows.append([name, str(rs[0]["lossless"]), fmt(g("step_compression"), 2, "×"), fmt(g("speedup"), 2, "×"),
                     fmt(g("efficiency"), 2), fmt(g("fid"), 2), fmt(g("alignment")),
                     *(fmt(fig.get(k)) for k in ("step", "lat", "fid", "clip")), src])
    seeds = sorted({j.results.get("seed") for j in jobs}, key=str)
    n = jobs[0].results.get("num_prompts") if jobs else None
    md = ["# Leaderboard: every method in one harness (tiny model)", "",
          f"Ours: the embedded tiny model (12×12 codes, 512-code VQ), {n} procedural prompts per seed, seeds "
          f"{', '.join(map(str, seeds))} (mean ± standard deviation over seeds), batch 1, one thread, CPU; every "
          "method decoded and timed in one process per seed against AR. Efficiency = speedup / (step compression × "
          "t_AR-forward / t_tree-forward). Paper columns: Lumina-mGPT 7B at 768 px on COCO-2017 from the source "
          "named (their GPUs). Compare ratios, not absolute values: ours FID is in the "
          f"`{label}` feature space, alignment is the project's attribute classifier (src/hawkspec/metrics/quality.py). "
          "SJD-PAC's paper figures belong to its released (lossy) sampler; our exact version is the row above it.", "",
          markdown_table(cols, rows), noise_floor_line(jobs), ""]
    md += provenance(jobs, table_cmd)
    tex = latex_table(cols, rows, f"Every method in one harness on the tiny model. FID features: {label}.",
                      "tab:leaderboard")
    return "\n".join(md) + "\n", tex


# The spatial comparison (issue 31): rows in flight (ZipAR, PJD; lossy), Hawk's vertical heads and spatial Jacobi (ours,
# lossless), with what the papers report (BRIEF-2026 §4.5, §5.4).
SPATIAL = [  # (decoder, method, the paper's claim)
    ("ar", "AR", "—"),
    ("zipar_w3", "ZipAR, window 3 (lossy)", "—"),
    ("zipar", "ZipAR, window 5 (lossy)", "ZipAR: up to 91% fewer forwards (Emu3), window 16 on Lumina-mGPT"),
    ("zipar_w9", "ZipAR, window 9 (lossy)", "—"),
    ("pjd", "PJD (lossy)", "PJD: 4.8× latency on Lumina-mGPT, up to 6.8× fewer steps"),
    ("hawk", "Hawk", "Hawk: 1.71× latency on Lumina-mGPT"),
    ("sjd", "SJD", "SJD-PAC Tab.: 2.22× fewer steps on Lumina-mGPT"),
    ("hawk_jacobi", "Hawk + Jacobi (ours)", "—"),
    ("spatial_jacobi", "Spatial Jacobi (ours)", "—"),
    ("hawk_spatial_jacobi", "Hawk + spatial Jacobi (ours)", "—"),
]


def spatial_groups(jobs: list[Job]) -> list[tuple[str, str, list[dict]]]:
    """(method, decoder, rows) of the spatial comparison, in its order; rows of methods not run are left out."""
    by = rows_by_decoder(jobs)
    return [(name, dec, by[dec]) for dec, name, _ in SPATIAL if by.get(dec)]


def spatial_table(jobs: list[Job], table_cmd: str) -> tuple[str, str]:
    """The decoders that use the row below: step compression, speedup, efficiency, FID and alignment with AR's noise
    floor (mean ± std over seeds), the papers' claims beside."""
    label = fid_label(jobs)
    claim = {dec: c for dec, _, c in SPATIAL}
    cols = ["method", "lossless", "step compression", "speedup", "efficiency", f"FID ({label})", "alignment",
            "diversity", "paper"]
    rows = []
    for name, dec, rs in spatial_groups(jobs):
        g = lambda k: stat([r.get(k) for r in rs])  # noqa: E731
        rows.append([name, str(rs[0]["lossless"]), fmt(g("step_compression"), 2, "×"), fmt(g("speedup"), 2, "×"),
                     fmt(g("efficiency"), 2), fmt(g("fid"), 2), fmt(g("alignment")), fmt(g("diversity")), claim[dec]])
    seeds = sorted({j.results.get("seed") for j in jobs}, key=str)
    n = jobs[0].results.get("num_prompts") if jobs else None
    md = ["# Rows in flight and the row below: the spatial comparison (tiny model)", "",
          f"Ours: the embedded tiny model (12×12 codes, 13 tokens a row with the end-of-line token), {n} procedural "
          f"prompts per seed, seeds {', '.join(map(str, seeds))} (mean ± standard deviation over seeds), batch 1, one "
          "thread, CPU; every method decoded and timed in one process per seed against AR. ZipAR's window counts a "
          "row's tokens with its leading one (the official Lumina-mGPT code's); PJD at the tiny model's window 4, "
          "opening a row at 5 tokens; spatial Jacobi: a chain of 8 and a lane of 6 nodes one row below. Lossy rows "
          "(ZipAR, PJD) change the images: read their FID and alignment against AR's noise floor below. Paper claims "
          "are on their models and GPUs (BRIEF-2026 §4.5, §5.4): compare ratios, not absolute values.", "",
          markdown_table(cols, rows), noise_floor_line(jobs), ""]
    md += provenance(jobs, table_cmd)
    tex = latex_table(cols[:-1], [r[:-1] for r in rows], f"Spatial decoders on the tiny model. FID features: {label}.",
                      "tab:spatial")
    return "\n".join(md) + "\n", tex


def hawk_table(jobs: list[Job], table_cmd: str) -> tuple[str, str]:
    """Hawk Table 1 analogue: AR, Medusa, Hawk vertical-only, LANTERN++ in Medusa, Hawk."""
    label = fid_label(jobs)
    groups = hawk_groups(jobs)
    has_clip = any(r.get("clip_score_100cos") is not None for _, _, rs in groups for r in rs)
    cols = ["method", "lossless", "speedup", "speedup (paper)", "step compression", "acceptance length",
            "acceptance length (paper)", f"FID ({label})", "FID (paper)", "alignment", "diversity"]
    cols += ["CLIP", "CLIP (paper)"] if has_clip else ["CLIP (paper)"]
    rows = []
    for name, dec, rs in groups:
        paper = HAWK_PAPER[dec]
        g = lambda k: stat([r.get(k) for r in rs])  # noqa: E731
        row = [name, str(rs[0]["lossless"]) if rs else "—", fmt(g("speedup"), 2, "×"), fmt(paper["speedup"]),
               fmt(g("step_compression"), 2, "×"), fmt(g("acceptance_length"), 2), fmt(paper["acceptance_length"]),
               fmt(g("fid"), 2), fmt(paper["fid"]), fmt(g("alignment")), fmt(g("diversity"))]
        row += [fmt(g("clip_score_100cos"), 2), fmt(paper["clip"])] if has_clip else [fmt(paper["clip"])]
        rows.append(row)
    missing = [dec for _, dec, rs in groups if not rs]
    md = ["# Hawk Table 1 analogue", "",
          "Ours: the embedded tiny model (12×12 codes, 512-code VQ) on procedural captions, CPU. Paper: Lumina-mGPT 7B "
          "at 768 px on COCO (500 prompts), their GPU (shared/BRIEF.md §3). Compare ratios (speedup, step "
          "compression, acceptance length), not absolute values; the paper's FID/CLIP are on COCO with Inception/CLIP, "
          f"ours FID is in the `{label}` feature space and alignment is the project's attribute classifier's reading "
          "of colour, shape and position (src/hawkspec/metrics/quality.py). — : not run / not reported.", "",
          markdown_table(cols, rows), noise_floor_line(jobs), ""]
    if missing:
        md += [f"Not in these runs: {', '.join(missing)} (add them to eval.decoders).", ""]
    md += provenance(jobs, table_cmd)
    tex = latex_table(cols, rows, f"Hawk Table 1 analogue on the tiny model. FID features: {label}.", "tab:hawk1")
    return "\n".join(md) + "\n", tex


def gsd_table(jobs: list[Job], table_cmd: str) -> tuple[str, str]:
    """GSD table analogue: AR, SJD, and GSD at each group size found in the runs."""
    label = fid_label(jobs)
    groups = gsd_groups(jobs)
    cols = ["method", "lossless", "step compression", "step compression (paper)", "speedup", "speedup (paper)",
            "acceptance length", f"FID ({label})", "FID (paper)", "alignment", "diversity", "CLIP (paper)"]
    rows = []
    for name, dec, rs in groups:
        if dec.startswith("gsd@"):
            paper = GSD_PAPER["gsd"] if int(dec[4:]) in GSD_PAPER_GROUP else {}
        else:
            paper = GSD_PAPER[dec]
        g = lambda k: stat([r.get(k) for r in rs])  # noqa: E731
        rows.append([name, str(rs[0]["lossless"]) if rs else "—", fmt(g("step_compression"), 2, "×"),
                     fmt(paper.get("step_compression")), fmt(g("speedup"), 2, "×"), fmt(paper.get("speedup")),
                     fmt(g("acceptance_length"), 2), fmt(g("fid"), 2), fmt(paper.get("fid")), fmt(g("alignment")),
                     fmt(g("diversity")), fmt(paper.get("clip"))])
    md = ["# GSD table analogue", "",
          "Ours: the embedded tiny model on procedural captions, CPU; AR and SJD from the first job of each seed, each "
          "GSD row against AR in its own job. Paper: Lumina-mGPT on COCO (5k prompts), G ≈ 10–14 (shared/BRIEF.md §3); its "
          "GSD numbers sit beside our ±5..±7-rank rows. Compare ratios, not absolute values; our FID is in the "
          f"`{label}` feature space. — : not run / not reported.", "",
          markdown_table(cols, rows), noise_floor_line(jobs), ""]
    if not any(dec.startswith("gsd@") for _, dec, _ in groups):
        md += ["No GSD rows in these runs: run the sweep with `gsd` in eval.decoders (eval.decoders.gsd.acceptance.group=1,3,7).", ""]
    md += provenance(jobs, table_cmd)
    tex = latex_table(cols, rows, f"GSD table analogue on the tiny model. FID features: {label}.", "tab:gsd")
    return "\n".join(md) + "\n", tex


def sweep_table(jobs: list[Job], table_cmd: str, title: str | None = None) -> tuple[str, str]:
    """Any sweep: one row per job and decoder, the overrides that vary as columns; ``title`` heads the file."""
    cols, rows = sweep_rows(jobs)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    md = [f"# {title or 'Sweep'}", "", markdown_table(cols, cells), noise_floor_line(jobs), ""]
    summary = seed_summary(jobs)
    if summary:  # a seed sweep: each figure's mean ± standard deviation over the seeds
        scols, srows = summary
        md += ["Mean ± standard deviation over seeds:", "",
               markdown_table(scols, [[fmt(r.get(c)) for c in scols] for r in srows]), ""]
    md += provenance(jobs, table_cmd)
    tex = latex_table(cols, cells, "Sweep over " + ", ".join(c for c in cols[1:] if c not in ("decoder",)), "tab:sweep")
    return "\n".join(md) + "\n", tex


TABLES = {"hawk": (hawk_table, hawk_groups, "hawk_table1"), "gsd": (gsd_table, gsd_groups, "gsd_table"),
          "sweep": (sweep_table, sweep_groups, "sweep_table"),
          "leaderboard": (leaderboard_table, leaderboard_groups, "leaderboard_tiny"),
          "spatial": (spatial_table, spatial_groups, "spatial_tiny")}
#: Figures a reproduction is checked on (within the noise floor); the speed ones are this machine's and reported only.
CHECKED = ("fid", "diversity", "alignment", "clip_score_100cos", "clip_cosine_lantern")
REPORTED = ("step_compression", "acceptance_length", "speedup", "efficiency")


def table_data(kind: str, jobs: list[Job], commands_: list[str]) -> dict:
    """The table's numbers, machine-readable (``<stem>.json``): what ``check`` compares a reproduction with."""
    groups = TABLES[kind][1](jobs)
    floor = {k: s[0] for k in CHECKED if (s := floor_stat(jobs, k))}
    return {"table": kind, "fid_features": fid_label(jobs), "commands": commands_, "noise_floor": floor,
            "num_prompts": jobs[0].results.get("num_prompts"),
            "rows": [{"method": name, "decoder": dec, "runs": len(rs),
                      **{k: (s[0] if (s := stat([r.get(k) for r in rs])) else None) for k in CHECKED + REPORTED}}
                     for name, dec, rs in groups]}


def check(committed: dict, fresh: dict) -> tuple[bool, str]:
    """Compare a fresh run of a table's command with the committed numbers: every quality figure within the
    committed noise floor (a small absolute tolerance for floors that came out 0). Returns (ok, markdown report)."""
    if committed["fid_features"] != fresh["fid_features"]:
        return False, (f"FID feature spaces differ: committed {committed['fid_features']}, fresh "
                       f"{fresh['fid_features']} (run the command as written, with eval.quality.fid_features)")
    by = {r["method"]: r for r in fresh["rows"]}
    lines = ["| method | figure | committed | fresh | abs diff | noise floor | ok |", "|---|---|---:|---:|---:|---:|---|"]
    ok = True
    for row in committed["rows"]:
        new = by.get(row["method"])
        for k in CHECKED + REPORTED:
            old = row.get(k)
            if old is None:
                continue
            got = new.get(k) if new else None
            if k in CHECKED:
                tol = max(committed["noise_floor"].get(k, 0.0), 1e-6)
                good = got is not None and abs(got - old) <= tol
                ok &= good
                verdict, floor = ("yes" if good else "**no**"), f"{tol:.3f}"
            else:  # reported, not checked: speed is the machine's; counts follow the samples
                verdict, floor = "(machine-dependent)" if k == "speedup" else "(reported)", "—"
            diff = f"{abs(got - old):.3f}" if got is not None else "—"
            lines.append(f"| {row['method']} | {k} | {old:.3f} | {fmt(got)} | {diff} | {floor} | {verdict} |")
    return ok, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("table", choices=sorted(TABLES) + ["check"],
                    help="a table to make, or `check COMMITTED.json RESULTS...`: does a fresh run reproduce it?")
    ap.add_argument("results", nargs="+", help="results.json files or folders of hawkspec-eval runs "
                    "(for check: the committed <table>.json first)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"), help="output folder")
    ap.add_argument("--name", default=None, help="file name stem (default: per table)")
    ap.add_argument("--title", default=None, help="the file's heading (sweep tables only; default: Sweep)")
    args = ap.parse_args(argv)
    if args.table == "check":
        committed_path, *runs = args.results
        committed = json.loads(Path(committed_path).read_text())
        if not runs:
            ap.error("check needs the committed <table>.json and the fresh run(s) made by its commands")
        jobs = load_jobs(runs)
        ok, report = check(committed, table_data(committed["table"], jobs, commands(jobs)))
        print(report)
        print("reproduced within the noise floor" if ok else "NOT reproduced within the noise floor")
        return 0 if ok else 1
    fn, _, stem = TABLES[args.table]
    jobs = load_jobs(args.results)
    cmd = "python experiments/tables.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.title and args.table != "sweep":
        ap.error("--title is for sweep tables; the papers' tables have their own headings")
    md, tex = fn(jobs, cmd, title=args.title) if args.table == "sweep" else fn(jobs, cmd)
    out = Path(args.out)
    write(out, args.name or stem, md, tex)
    (out / f"{args.name or stem}.json").write_text(json.dumps(table_data(args.table, jobs, commands(jobs)), indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
