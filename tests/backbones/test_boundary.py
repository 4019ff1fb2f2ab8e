"""The backbone boundary: nothing outside ``backbones/`` (and the image tokenizers in ``vq/``) reaches into a
model's internals. Decoders, heads, the cache, training and metrics see :mod:`hawkspec.backbones.base` only."""

import re
from pathlib import Path

import hawkspec

ROOT = Path(hawkspec.__file__).resolve().parent
# attribute access to a backbone's model, LM head or VQ, however the backbone variable is named
LEAK = re.compile(r"\b(backbone|bb|self\.backbone)\.(model|lm_head|vq|transformer|lm_head_weight)\b"
                  r"|\.model\.(model|lm_head)\b|\bheads\.lm_head\b")
# a transformers language-model class taken from transformers: only backbones/ builds one (the footprint command
# sizes one through backbones/loading.py)
MODEL_CLASS = re.compile(r"\btransformers\b.*"
                         r"\b(\w+For(CausalLM|ConditionalGeneration)|AutoModel(For\w+)?|PreTrainedModel)\b")


def leaks(root: Path = ROOT, pattern: re.Pattern = LEAK) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("backbones/", "vq/")):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    return found


def test_no_module_outside_backbones_touches_model_internals():
    assert leaks() == []


def test_no_module_outside_backbones_names_a_transformers_model_class():
    assert leaks(pattern=MODEL_CLASS) == []


def test_the_check_catches_a_leak(tmp_path):
    (tmp_path / "decoding").mkdir()
    (tmp_path / "decoding" / "x.py").write_text("w = backbone.model.lm_head.weight\nv = bb.vq\n")
    (tmp_path / "backbones").mkdir()
    (tmp_path / "backbones" / "ok.py").write_text("w = self.model.lm_head.weight\n")
    assert leaks(tmp_path) == ["decoding/x.py:1: w = backbone.model.lm_head.weight", "decoding/x.py:2: v = bb.vq"]
    (tmp_path / "cli" / "x.py").parent.mkdir()
    (tmp_path / "cli" / "x.py").write_text("from transformers import LlamaForCausalLM, CLIPModel\n")
    (tmp_path / "backbones" / "ok.py").write_text("from transformers import ChameleonForConditionalGeneration\n")
    assert leaks(tmp_path, MODEL_CLASS) == ["cli/x.py:1: from transformers import LlamaForCausalLM, CLIPModel"]
