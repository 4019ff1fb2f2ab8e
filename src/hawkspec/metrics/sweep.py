"""Read the ``results.json`` of many ``hawkspec-eval`` jobs (a Hydra multirun folder, or files) into one table.

Each job's command-line overrides come from its ``.hydra/overrides.yaml``; the overrides that differ between
jobs become columns, the others are the sweep's common settings. When jobs differ only by ``seed``, a second
table gives each figure's mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hawkspec.cli.overrides import contract
from hawkspec.metrics.quality import QUALITY_KEYS

#: Figures of a results row the sweep tables show, in order (those present in some row).
FIGURES = ("acceptance_length", "step_compression", "speedup", "seconds_per_image", *QUALITY_KEYS)


@dataclass
class Job:
    """One ``hawkspec-eval`` run.

    Attributes:
        path: Its ``results.json``.
        results: The parsed file.
        overrides: ``key -> value`` of its command-line overrides (``hydra.*`` excluded).
        hydra: Its ``hydra.*`` overrides (``hydra.run.dir=...`` or ``hydra.sweep.dir=...``; the mode excluded).
        multirun: Whether it was a job of a multirun.
    """

    path: Path
    results: dict
    overrides: dict[str, str] = field(default_factory=dict)
    hydra: list[str] = field(default_factory=list)
    multirun: bool = False

    @property
    def name(self) -> str:
        return self.path.parent.name

    def command(self) -> str:
        """The ``hawkspec-eval`` command that reproduces this job alone (its overrides, quoted where needed)."""
        args = contract([f"{k}={v}" for k, v in self.overrides.items()])  # as typed: 'eval.decoders=[...]'
        args += [h for h in self.hydra if not h.startswith("hydra.sweep.")]
        return " ".join(["hawkspec-eval", *map(_quote, args)])


def built_of(row: dict) -> dict:
    """What a results row says was built (proposer, acceptance, tree size): ``built``, or ``config`` in results
    written before each row carried its resolved settings."""
    return row.get("built") or row.get("config") or {}


def commands(jobs: list[Job]) -> list[str]:
    """The commands that made ``jobs``: one ``hawkspec-eval -m`` per multirun (its sweep rebuilt from the jobs'
    overrides: ``key=v1,v2`` for the keys that vary), one ``hawkspec-eval`` per single run."""
    out: list[str] = []
    sweeps: dict[tuple, list[Job]] = {}
    for j in jobs:
        if j.multirun:
            sweeps.setdefault(tuple(j.hydra), []).append(j)
        else:
            out.append(j.command())
    for hydra_args, members in sweeps.items():
        keys = list(dict.fromkeys(k for j in members for k in j.overrides))
        args = []
        for k in keys:
            values = list(dict.fromkeys(j.overrides.get(k) for j in members if k in j.overrides))
            args.append(f"{k}={','.join(values)}")
        args = contract(args)
        out.append(" ".join(["hawkspec-eval", "-m", *map(_quote, args), *map(_quote, hydra_args)]))
    return list(dict.fromkeys(out))


def _quote(s: str) -> str:
    return f"'{s}'" if re.search(r"[\[\]{}()*? ]", s) else s


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_results(paths: list[str | Path]) -> list[Path]:
    """Every ``results.json`` named or found under the given files / folders, in natural order (job 2 < job 10)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            found += sorted(p.rglob("results.json"), key=_natural)
        else:
            raise FileNotFoundError(f"{p} does not exist (expected a results.json or a folder of hawkspec-eval runs)")
    if not found:
        raise FileNotFoundError(f"no results.json under {', '.join(map(str, paths))}: did the hawkspec-eval jobs finish?")
    return found


def load_job(path: Path) -> Job:
    results = json.loads(Path(path).read_text())
    if "rows" not in results:
        raise ValueError(f"{path} is not a hawkspec-eval results.json (no `rows`)")
    overrides: dict[str, str] = {}
    hydra_args, multirun = [], False
    ov = Path(path).parent / ".hydra" / "overrides.yaml"
    if ov.is_file():
        for item in yaml.safe_load(ov.read_text()) or []:
            key, _, value = str(item).partition("=")
            if not key.startswith("hydra.") and not key.startswith("hydra/"):
                overrides[key] = value
    hy = Path(path).parent / ".hydra" / "hydra.yaml"
    if hy.is_file():
        recorded = (yaml.safe_load(hy.read_text()) or {}).get("hydra", {}).get("overrides", {}).get("hydra") or []
        multirun = "hydra.mode=MULTIRUN" in recorded
        hydra_args = [h for h in recorded if not h.startswith("hydra.mode=")]
    return Job(Path(path), results, overrides, hydra_args, multirun)


def load_jobs(paths: list[str | Path]) -> list[Job]:
    return [load_job(p) for p in find_results(paths)]


def split_overrides(jobs: list[Job]) -> tuple[list[str], dict[str, str]]:
    """(keys whose value differs between jobs, in first-seen order; the overrides every job shares)."""
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    common = {k: jobs[0].overrides[k] for k in keys if k not in varying and k in jobs[0].overrides}
    return varying, common


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def sweep_rows(jobs: list[Job]) -> tuple[list[str], list[dict]]:
    """One flat row per (job, decoder): the varying overrides, the decoder and the figures; and the columns."""
    varying, _ = split_overrides(jobs)
    figures = [f for f in FIGURES if any(r.get(f) is not None for j in jobs for r in j.results["rows"])]
    rows = []
    for j in jobs:
        for r in j.results["rows"]:
            rows.append({"job": j.name, **{k: j.overrides.get(k) for k in varying}, "decoder": r["decoder"],
                         "lossless": r.get("lossless"), **{f: r.get(f) for f in figures}})
    return ["job", *varying, "decoder", "lossless", *figures], rows


def seed_summary(jobs: list[Job]) -> tuple[list[str], list[dict]] | None:
    """Mean ± std over seeds of each figure, per (other varying overrides, decoder); None unless `seed` varies."""
    varying, _ = split_overrides(jobs)
    if "seed" not in varying:
        return None
    others = [k for k in varying if k != "seed"]
    cols, rows = sweep_rows(jobs)
    figures = [c for c in cols if c in FIGURES]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in others) + (r["decoder"],), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip([*others, "decoder"], key))
        row["seeds"] = len(members)
        for f in figures:
            vals = [m[f] for m in members if isinstance(m[f], (int, float))]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                row[f] = f"{statistics.mean(vals):.3f} ± {sd:.3f}"
            else:
                row[f] = None
        out.append(row)
    return [*others, "decoder", "seeds", *figures], out


def markdown(cols: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def sweep_markdown(jobs: list[Job], title: str = "Sweep results") -> str:
    """The per-job table, the seed summary (if seeds vary), the common overrides and each job's command."""
    _, common = split_overrides(jobs)
    cols, rows = sweep_rows(jobs)
    q = jobs[0].results.get("quality") or {}
    parts = [f"# {title}", "", f"{len(jobs)} jobs of `hawkspec-eval`; backbone `{jobs[0].results.get('backbone')}`, "
             f"{jobs[0].results.get('num_prompts')} prompts per job, device {jobs[0].results.get('device')}."
             + (f" FID features: `{q['fid_features']}`." if q else ""),
             "", "Common overrides: " + (" ".join(f"`{k}={v}`" for k, v in common.items()) or "none"), "",
             markdown(cols, rows)]
    summary = seed_summary(jobs)
    if summary:
        parts += ["Mean ± standard deviation over seeds:", "", markdown(*summary)]
    floors = [(j.name, (j.results.get("quality") or {}).get("noise_floor")) for j in jobs]
    floors = [(n, f) for n, f in floors if f]
    if floors:
        parts += ["Noise floor of each job (|AR(seed') − AR(seed)|, same prompts and size):", ""]
        keys = [k for k in QUALITY_KEYS if k in floors[0][1]["delta"]]
        parts += [markdown(["job", *keys, "fid_ar_vs_ar"],
                           [{"job": n, **{k: f["delta"].get(k) for k in keys}, "fid_ar_vs_ar": f.get("fid_ar_vs_ar")}
                            for n, f in floors])]
    parts += ["Made by:", "", "```", *commands(jobs), "```", "", "Each job alone:", "", "```",
              *[j.command() for j in jobs], "```", ""]
    return "\n".join(parts)


def write_sweep_table(sweep_dir: str | Path) -> Path | None:
    """Write ``sweep_results.md`` and ``sweep_results.json`` into ``sweep_dir``; None if no job wrote results."""
    sweep_dir = Path(sweep_dir)
    try:
        jobs = load_jobs([sweep_dir])
    except FileNotFoundError:
        return None
    cols, rows = sweep_rows(jobs)
    out = sweep_dir / "sweep_results.md"
    out.write_text(sweep_markdown(jobs))
    (sweep_dir / "sweep_results.json").write_text(json.dumps(
        {"columns": cols, "rows": rows, "jobs": [{"dir": str(j.path.parent), "overrides": j.overrides} for j in jobs]},
        indent=1))
    return out
