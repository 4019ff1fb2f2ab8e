"""Installs outside the checkout: the wheel carries its configs (package ``hawkspec.conf``) and its assets, and the
console scripts work from an empty directory."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def sh(*cmd, cwd=None, env=None, timeout=900):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow
def test_the_wheel_runs_generate_and_eval_from_an_empty_directory(tmp_path):
    """Expect: `pip install <wheel>` into a fresh venv, then `hawkspec-generate` and `hawkspec-eval` (tiny limits)
    succeed from an empty directory, importing hawkspec from the venv, not from this checkout."""
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, ROOT)
    wheel = next(dist.glob("hawkspec-*.whl"))
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", "--without-pip", venv)
    py = venv / "bin" / "python"
    site = Path(sh(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    # The big dependencies (torch, lightning, ...) come from this venv, after the new venv's own packages; a path
    # line in a .pth file does not run that folder's .pth files, so this checkout's editable install stays out.
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    sh(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel)
    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "1"}
    where = sh(py, "-c", "import hawkspec, hawkspec.conf; print(hawkspec.__file__, hawkspec.conf.__file__)",
               cwd=work, env=env).stdout
    assert str(site) in where and str(ROOT) not in where
    sh(venv / "bin" / "hawkspec-generate", "prompts=[a large red circle in the center]", "batch_size=1",
       "hydra.run.dir=gen", cwd=work, env=env)
    assert (work / "gen" / "grid.png").is_file()
    sh(venv / "bin" / "hawkspec-eval", "eval.decoders=[ar,medusa]", "eval.num_prompts=2", "eval.batch_size=2",
       "eval.repeats=1", "eval.warmup_batches=0", "eval.quality.enabled=false", "logger=none", "hydra.run.dir=ev",
       cwd=work, env=env)
    assert (work / "ev" / "results.json").is_file()


def test_the_setuptools_floor_builds_the_spdx_license():
    """`license = "Apache-2.0"` is an SPDX expression (PEP 639), which setuptools reads from 77 on: older ones
    (65-76, e.g. a build without isolation) fail on it. Expect: build-system.requires has a setuptools floor of
    at least 77 whenever the license (or license-files) takes that form, and no `License ::` classifier beside it
    (setuptools >= 77 refuses both)."""
    import re

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floors = [m.group(1) for r in data["build-system"]["requires"]
              if (m := re.fullmatch(r"\s*setuptools\s*>=\s*([0-9]+(?:\.[0-9]+)*)\s*(?:,.*)?", r))]
    assert len(floors) == 1, f"build-system.requires names no `setuptools>=N` floor: {data['build-system']['requires']}"
    floor = tuple(int(x) for x in floors[0].split("."))
    project = data["project"]
    if isinstance(project.get("license"), str) or "license-files" in project:
        assert floor >= (77,), (f"pyproject.toml: license = {project.get('license')!r} (SPDX, PEP 639) needs "
                                f"setuptools>=77 in build-system.requires, not >={floors[0]}")
        assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
