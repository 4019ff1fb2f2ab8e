"""The README's lists are the code's: every preset, proposer and acceptance rule it names has a config and every
config is named; its Layout names every package folder and config group, and every file it names exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PACKAGE = ROOT / "src" / "hawkspec"
CONF = ROOT / "conf"


def names(text: str) -> set[str]:
    """The backticked words of ``text``."""
    return set(re.findall(r"`([\w/.@=-]+)`", text))


def between(start: str, end: str, text: str = README) -> str:
    """The text from ``start`` to ``end``, line breaks read as spaces."""
    text = " ".join(text.split())
    i = text.index(start) + len(start)
    return text[i : text.index(end, i)]


def stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("*.yaml")}


def test_the_preset_list_names_every_preset():
    presets = names(between("Presets:", "any other pair is one override away"))
    assert presets == stems(CONF / "decoder")


def test_the_proposer_and_rule_lists_name_every_option():
    proposers = names(between("(where candidates come from:", "; `conf/decoder/proposer/`"))
    rules = names(between("(how the target judges them:", "; `conf/decoder/acceptance/`"))
    assert proposers == stems(CONF / "decoder" / "proposer")
    assert rules == stems(CONF / "decoder" / "acceptance")


def test_all_decoders_config_lists_every_preset():
    listed = set(re.findall(r"/decoder@eval\.decoders\.(\w+): (\w+)", (CONF / "decoders" / "all.yaml").read_text()))
    assert {a for a, b in listed} == {b for a, b in listed} == stems(CONF / "decoder")


LAYOUT = README[README.index("## Layout\n") :]


def bullets(indent: str) -> dict[str, str]:
    """Layout bullets at ``indent``: the first backticked name -> the bullet's text (continuation lines joined)."""
    out, key = {}, None
    for line in LAYOUT.splitlines():
        m = re.match(rf"^{indent}- `([^`]+)`(.*)", line)
        if m:
            key = m.group(1)
            out[key] = m.group(0)
        elif key and line.startswith(indent + "  ") and not line.lstrip().startswith("- "):
            out[key] += " " + line.strip()
        else:
            key = None if not line.startswith(indent + " ") else key
    return out


def test_the_layout_names_every_package_folder_and_the_files_it_names_exist():
    top = bullets("  ")
    folders = {k for k in top if k.endswith("/")}
    real = {p.name + "/" for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == real
    for folder, text in top.items():
        here = PACKAGE / folder if folder.endswith("/") else PACKAGE
        for name in names(text):
            if name.endswith(".py") or (name.endswith("/") and folder.endswith("/") and name != folder):
                assert (here / name).exists(), f"README Layout names {folder} {name}, which does not exist"
    modules = {n for t in top.values() for n in names(t) if n.endswith(".py") and "/" not in n}
    assert {"testing.py", "determinism.py", "io.py", "resources.py"} <= modules


def test_the_layout_names_every_config_group():
    conf = bullets("")["conf/"]
    groups = {n for n in re.findall(r"\b([a-z_]+)/", between("groups", ".", conf))}
    real = {p.name for p in CONF.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert groups - {"local"} <= real and real <= groups
    primary = names(between("primary configs", ")", conf))
    assert primary == stems(CONF)


@pytest.mark.parametrize("path", sorted(set(re.findall(r"`python -m ([\w.]+)", README))))
def test_every_module_the_readme_runs_exists(path):
    import importlib.util

    assert importlib.util.find_spec(path) is not None, path


ONE_STEP = {  # what "One step, file by file" walks through: (file under src/hawkspec/decoding, names)
    "engine.py": ["SpeculativeDecoder.step", "SpeculativeDecoder.locate", "SpeculativeDecoder.propose",
                  "SpeculativeDecoder.build_tree", "SpeculativeDecoder.forward_tree", "SpeculativeDecoder.outcome",
                  "SpeculativeDecoder.write_tokens",
                  "SpeculativeDecoder.notify_proposer", "SpeculativeDecoder.advance_cache"],
    "state.py": ["Batch", "DecodeState", "Step", "Tree", "Forward", "Verdict", "Outcome"],
    "walks.py": ["choose_walk", "TriesWalk", "PointMassWalk"],
    "static.py": ["StepRunner.loop", "StepRunner.step"],
}


def _spans(path: Path) -> dict[str, int]:
    """Lines of every top-level class / function and every method (``Class.method``) of a module."""
    import ast

    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            out[node.name] = node.end_lineno - node.lineno + 1
            for sub in getattr(node, "body", []):
                if isinstance(sub, ast.FunctionDef):
                    out[f"{node.name}.{sub.name}"] = sub.end_lineno - sub.lineno + 1
    return out


def test_the_one_step_section_counts_the_lines_a_step_takes():
    folder = ROOT / "src" / "hawkspec" / "decoding"
    total = sum(_spans(folder / f)[name] for f, names in ONE_STEP.items() for name in names)
    said = re.search(r"\*\*(\d+) lines in (\d+) files\*\*", README)
    assert said, "README: the 'One step, file by file' section states '**N lines in M files**'"
    assert (int(said.group(1)), int(said.group(2))) == (total, len(ONE_STEP)), f"a step is {total} lines now"


def test_a_step_and_every_stage_take_at_most_four_arguments():
    import inspect

    from hawkspec.decoding import walks
    from hawkspec.decoding.engine import SpeculativeDecoder

    for name in ONE_STEP["engine.py"]:
        fn = getattr(SpeculativeDecoder, name.split(".")[1])
        args = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert len(args) <= 4, (name, args)
    for cls in (walks.LongestWalk, walks.LongestRowWalk, walks.TriesWalk, walks.ChainWalk, walks.PointMassWalk):
        assert list(inspect.signature(cls.__call__).parameters) == ["self", "tree", "p", "active", "rng"], cls


def test_no_decoder_branches_on_a_missing_runner_and_eval_glue_stays_short():
    import ast

    src = ROOT / "src" / "hawkspec"
    offenders = [str(p) for p in src.rglob("*.py") if re.search(r"runner is (not )?None", p.read_text())]
    assert not offenders, offenders
    tree = ast.parse((src / "cli" / "eval.py").read_text())
    longest = max((n.end_lineno - n.lineno + 1, n.name) for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    assert longest[0] < 50, longest
