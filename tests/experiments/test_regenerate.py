"""experiments/regenerate.sh: every step it names exists, is listed, and a typo is refused before anything runs."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "regenerate.sh"


def run(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_every_step_has_a_function_and_a_line_in_the_list():
    text = SCRIPT.read_text()
    steps = re.search(r'^ALL="([^"]+)"', text, re.M).group(1).split()
    listed = [line.split()[0] for line in run("--list").stdout.splitlines()]
    assert listed == steps
    assert all(re.search(rf"^step_{s}\(\) \{{", text, re.M) for s in steps)


def test_an_unknown_step_is_refused_before_any_step_runs(tmp_path):
    import os

    env = {**os.environ, "STEPS": "grid nope", "REGEN_DIR": str(tmp_path / "regen"), "RESULTS_DIR": str(tmp_path)}
    out = run(env=env)
    assert out.returncode == 2 and "unknown step 'nope'" in out.stderr and "hawk_table" in out.stderr
    assert not (tmp_path / "regen").exists()  # grid, listed first, did not start


def test_a_finished_step_is_skipped(tmp_path):
    import os

    (tmp_path / "regen" / "grid").mkdir(parents=True)
    (tmp_path / "regen" / "grid" / ".done").touch()
    env = {**os.environ, "STEPS": "grid", "REGEN_DIR": str(tmp_path / "regen"), "RESULTS_DIR": str(tmp_path)}
    out = run(env=env)
    assert out.returncode == 0 and "grid: done before" in out.stdout
