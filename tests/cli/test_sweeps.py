"""Hydra sweeps of `hawkspec-eval`: one offline W&B run per job with its summary, one table over the jobs, the
launcher configs (joblib locally, submitit for SLURM), and the sweep commands listed in experiments/README.md."""

import json
import re
import shlex
import subprocess
from pathlib import Path

import hydra
import pytest
from hydra import initialize_config_dir

from hawkspec.testing import compose, run_cli, wandb_offline_records, wandb_offline_summary

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"


def multirun(*overrides, env=None) -> subprocess.CompletedProcess:
    return run_cli("hawkspec-eval", "-m", *overrides, env={"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})},
                   timeout=900)


def test_wandb_multirun_makes_one_offline_run_per_job_and_one_table(tmp_path):
    """The issue's example: `hawkspec-eval -m 'eval.decoders=[ar]' eval.num_prompts=2 seed=1,2,3 logger=wandb`."""
    sweep = tmp_path / "sweep"
    multirun("eval.decoders=[ar]", "eval.num_prompts=2", "seed=1,2,3", "logger=wandb",
             "eval.quality.reference.num_images=64", f"eval.quality.reference.cache_dir={tmp_path / 'ref'}",
             "eval.quality.fid_features=tiny", f"hydra.sweep.dir={sweep}", env={"WANDB_MODE": "offline"})
    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert len(runs) == 3 and sorted(r.parents[1].name for r in runs) == ["0", "1", "2"]
    ids, fids = set(), []
    for run in runs:
        records = wandb_offline_records(next(run.glob("run-*.wandb")))
        (head,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        ids.add(head.run_id)
        assert head.display_name == f"eval-{run.parents[1].name}" and head.run_group == "eval"
        config = [r for r in records if r.WhichOneof("record_type") == "config"]
        assert config and any(item.key == "seed" for r in config for item in r.config.update)
        summary = wandb_offline_summary(next(run.glob("run-*.wandb")))
        for key in ("eval/ar/speedup", "eval/ar/acceptance_length", "eval/ar/fid", "eval/ar/alignment",
                    "eval/noise_floor/fid", "eval/noise_floor/fid_ar_vs_ar", "fid_features", "eval/results/_type",
                    "eval/grid/ar/_type"):
            assert key in summary, (run, key, sorted(summary))
        assert json.loads(summary["fid_features"]) == "hawkspec-tiny-extractor"
        fids.append(json.loads(summary["eval/ar/fid"]))
    assert len(ids) == 3 and len(set(fids)) == 3  # three runs, three seeds
    table = (sweep / "sweep_results.md").read_text()
    assert "| job | seed | decoder |" in table and "Mean ± standard deviation over seeds" in table
    assert "hawkspec-eval -m 'eval.decoders=[ar]' eval.num_prompts=2 seed=1,2,3 logger=wandb" in table
    assert f"hydra.sweep.dir={sweep}" in table
    assert "hawkspec-eval 'eval.decoders=[ar]' eval.num_prompts=2 seed=3 logger=wandb" in table  # job 2 alone
    rows = json.loads((sweep / "sweep_results.json").read_text())["rows"]
    assert [(r["job"], r["seed"]) for r in rows] == [("0", "1"), ("1", "2"), ("2", "3")]
    assert [r["fid"] for r in rows] == pytest.approx(fids)


@pytest.mark.parametrize("launcher, target, key, value", [
    ("local", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs", 2),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "gpus_per_node", 1),
    ("submitit_local", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "nodes", 1),
])
def test_launcher_configs_compose(launcher, target, key, value):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target and cfg.hydra.launcher[key] == value
    assert hydra.utils.get_class(target) is not None
    if launcher == "slurm":
        assert cfg.hydra.launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))


@pytest.mark.slow
def test_joblib_launcher_runs_a_sweep_in_parallel_processes(tmp_path):
    sweep = tmp_path / "sweep"
    multirun("hydra/launcher=local", "eval.decoders=[ar]", "eval.num_prompts=2", "eval.threads=1", "seed=1,2",
             "logger=csv", "eval.quality.reference.num_images=64", f"eval.quality.reference.cache_dir={tmp_path}",
             f"hydra.sweep.dir={sweep}")
    rows = json.loads((sweep / "sweep_results.json").read_text())["rows"]
    assert [r["seed"] for r in rows] == ["1", "2"]
    assert all((sweep / j / "csv").is_dir() for j in ("0", "1"))


# ------------------------------------------------------------------------------ the README's sweep commands
def readme_sweeps() -> list[str]:
    text = (ROOT / "experiments" / "README.md").read_text()
    return re.findall(r"`(hawkspec-eval -m [^`]+)`", text)


def first_values(arg: str) -> str:
    """`k=a,b,c` -> `k=a` (commas inside brackets are a list, not a sweep)."""
    key, sep, value = arg.partition("=")
    if not sep:
        return arg
    depth = 0
    for i, ch in enumerate(value):  # the first top-level comma ends the first value
        depth += ch in "[{(" and 1 or (-1 if ch in "]})" else 0)
        if ch == "," and depth == 0:
            return f"{key}={value[:i]}"
    return arg


def test_readme_lists_a_sweep_per_ablation_axis():
    cmds = " ".join(readme_sweeps())
    for axis in ("eval.decoders.hawk.proposer.sources.vertical.vsd=1,2,3",
                 "tree.budget=", "eval.decoders.hawk.proposer.order=", "eval.decoders.gsd.acceptance.group=",
                 "eval.decoders.lantern.acceptance.delta=", "sampling.cfg_scale="):
        assert axis in cmds, axis


@pytest.mark.parametrize("command", readme_sweeps())
def test_readme_sweep_commands_compose(command):
    args = [a for a in shlex.split(command)[2:] if not a.startswith("hydra")]
    preset = next((a.split("=", 1)[1] for a in args if a.startswith("decoder=")), None)
    if preset and not (CONF / "decoder" / f"{preset}.yaml").is_file():
        pytest.skip(f"decoder preset {preset!r} is not in conf/decoder/ in this checkout")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        compose("eval", overrides=[first_values(a) for a in args] + ["paths.root_dir=/r"])


def readme_table_commands() -> list[str]:
    """The `hawkspec-eval` commands of the README's code blocks (continuation lines joined)."""
    text = (ROOT / "experiments" / "README.md").read_text().replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("hawkspec-eval")]


def test_readme_has_the_papers_table_commands():
    cmds = readme_table_commands()
    assert any("hawk_vertical_only" in c and "medusa_lanternpp" in c for c in cmds)
    assert any("eval.decoders.gsd.acceptance.group=" in c and "sjd" in c and " -m " in f" {c} " for c in cmds)
    assert all("eval.quality.fid_features=tiny" in c for c in cmds)  # reproducible whatever the torch hub cache holds


@pytest.mark.parametrize("command", readme_table_commands())
def test_readme_table_commands_compose(command):
    args = [a for a in shlex.split(command)[1:] if a != "-m" and not a.startswith("hydra")]
    names = next(a for a in args if a.startswith("eval.decoders=")).split("=", 1)[1].strip("[]").split(",")
    missing = [n for n in names if not (CONF / "decoder" / f"{n}.yaml").is_file()]
    if missing:
        pytest.skip(f"decoder presets {missing} are not in conf/decoder/ in this checkout")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        compose("eval", overrides=[first_values(a) for a in args] + ["paths.root_dir=/r"])
