"""Evaluation prompt sets read from local files, and seeded random subsets of them (``eval.prompts``).

Sources (``eval.prompts.source``):

* ``procedural``: captions of :class:`~hawkspec.data.procedural.ProceduralDataset` (the tiny model's grammar).
* ``coco``: a COCO captions annotations file (``captions_val2017.json``: ``images`` + ``annotations``); one
  caption per image, the ``longest`` (characters; ties: the first) or a seeded ``random`` one
  (``eval.prompts.caption``). LANTERN's ``captions_val2017_longest.json`` is the ``longest`` choice.
* ``flickr30k``: Karpathy's split file (``dataset_flickr30k.json``: ``images[].sentences[].raw``, filter with
  ``split``) or the original captions file (``results_20130124.token``: ``<image>.jpg#<n>\\t<caption>``); one
  caption per image as for COCO.
* ``parti``: PartiPrompts' TSV (``Prompt``, ``Category``, ... columns); ``category`` keeps one category.
* ``txt`` (one prompt per line) and ``jsonl`` (one object per line, the prompt under ``field``).

Each prompt keeps its position in the full set (``index``), the id of its image or line (``id``) and, for
Parti, its ``category``. A set larger than ``num`` is cut to a *seeded random* subset of ``num`` prompts (in
their original order), never to the first ``num``. A missing or malformed file raises an error naming the
file and, where there is one, the line; so does a file that is not UTF-8 text (a binary file).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SOURCES = ("procedural", "coco", "flickr30k", "parti", "txt", "jsonl")
CAPTION_CHOICES = ("longest", "random")


@dataclass
class Prompt:
    """One evaluation prompt."""

    index: int
    """Position in the full prompt set (before subsetting): the key of its image in a sharded run."""
    text: str
    id: str
    """The image id (COCO, Flickr30K) or line number the prompt comes from."""
    category: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptSpec:
    """``eval.prompts`` (see ``conf/eval.yaml``)."""

    source: str = "procedural"
    path: str | None = None
    num: int | None = None
    """Prompts wanted; a larger set is cut to a seeded random subset. None: all of them."""
    seed: int = 1234
    """Seeds the subset, the ``random`` caption choice and the procedural captions."""
    caption: str = "longest"
    split: str | None = None
    """Karpathy split to keep (``test``, ``val``, ``train``, ``restval``); None: every image."""
    category: str | None = None
    """PartiPrompts category to keep; None: all."""
    field: str = "prompt"
    """jsonl: the key that holds the prompt."""

    def validate(self) -> "PromptSpec":
        if self.source not in SOURCES:
            raise ValueError(f"eval.prompts.source={self.source!r}: choose one of {SOURCES}")
        if self.caption not in CAPTION_CHOICES:
            raise ValueError(f"eval.prompts.caption={self.caption!r}: choose one of {CAPTION_CHOICES}")
        if self.num is not None and int(self.num) < 1:
            raise ValueError(f"the number of prompts must be >= 1 (eval.num_prompts), got {self.num}")
        if self.source == "procedural":
            if self.num is None:
                raise ValueError("procedural prompts need a count: set eval.num_prompts")
        elif not self.path:
            raise ValueError(f"eval.prompts.source={self.source} reads a file: set eval.prompts.path")
        elif not Path(self.path).expanduser().is_file():
            raise FileNotFoundError(f"eval.prompts.path={self.path} does not exist ({self.source} prompts)")
        return self


def load_prompt_set(spec: PromptSpec | dict) -> list[Prompt]:
    """The prompts of ``spec``: the whole set, or a seeded random subset of ``spec.num`` of them."""
    spec = spec if isinstance(spec, PromptSpec) else PromptSpec(**spec)
    spec.validate()
    if spec.source == "procedural":
        from hawkspec.data.procedural import ProceduralDataset

        ds = ProceduralDataset(int(spec.num), seed=spec.seed)
        return [Prompt(i, ds[i]["caption"], str(i)) for i in range(int(spec.num))]
    path = Path(spec.path).expanduser()
    rng = np.random.default_rng(spec.seed)
    reader = {"coco": _coco, "flickr30k": _flickr, "parti": _parti, "txt": _txt, "jsonl": _jsonl}[spec.source]
    try:
        items = reader(path, spec, rng)  # [(id, text, category)]
    except UnicodeDecodeError as e:  # a binary file, or another encoding: name the file, not just the codec
        raise ValueError(f"{path}: not a UTF-8 {spec.source} prompts file ({e.reason} at byte {e.start}); "
                         "eval.prompts.path (or eval.prompts_file) must name a text file saved as UTF-8") from None
    if not items:
        raise ValueError(f"{path}: no prompts found ({spec.source}"
                         + (f", split {spec.split}" if spec.split else "")
                         + (f", category {spec.category}" if spec.category else "") + ")")
    prompts = [Prompt(i, text, str(pid), cat) for i, (pid, text, cat) in enumerate(items)]
    return subset(prompts, spec.num, spec.seed)


def subset(prompts: list[Prompt], num: int | None, seed: int) -> list[Prompt]:
    """A seeded random subset of ``num`` prompts in their original order (all when ``num`` is None or more)."""
    if num is None or int(num) >= len(prompts):
        return prompts
    keep = np.sort(np.random.default_rng([seed, 1]).choice(len(prompts), int(num), replace=False))
    return [prompts[i] for i in keep]


# ---------------------------------------------------------------------------------------------- readers
def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from e


def _one_caption(captions: list[str], how: str, rng: np.random.Generator) -> str:
    if how == "longest":
        return max(captions, key=len)  # the first of the longest
    return captions[int(rng.integers(len(captions)))]


def _coco(path: Path, spec: PromptSpec, rng):
    data = _load_json(path)
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO captions file (no 'annotations' list; expected e.g. "
                         "annotations/captions_val2017.json)")
    by_image: dict[int, list[str]] = {}
    for n, a in enumerate(data["annotations"]):
        if "image_id" not in a or "caption" not in a:
            raise ValueError(f"{path}: annotation {n} lacks 'image_id' or 'caption': {a}")
        by_image.setdefault(a["image_id"], []).append(" ".join(str(a["caption"]).split()))
    return [(img, _one_caption(caps, spec.caption, rng), None) for img, caps in sorted(by_image.items())]


def _flickr(path: Path, spec: PromptSpec, rng):
    if path.suffix == ".json":
        data = _load_json(path)
        if not isinstance(data, dict) or "images" not in data:
            raise ValueError(f"{path}: not a Karpathy split file (no 'images' list; expected dataset_flickr30k.json)")
        items = []
        for n, img in enumerate(data["images"]):
            if spec.split and img.get("split") != spec.split:
                continue
            caps = [s.get("raw", " ".join(s.get("tokens", []))) for s in img.get("sentences", [])]
            if not caps or "filename" not in img:
                raise ValueError(f"{path}: image {n} lacks 'filename' or 'sentences': {str(img)[:200]}")
            items.append((img["filename"], _one_caption(caps, spec.caption, rng), None))
        return items
    if spec.split:
        raise ValueError(f"eval.prompts.split={spec.split} needs Karpathy's dataset_flickr30k.json; {path} is "
                         "the captions file, which has no splits")
    by_image: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, tab, caption = line.rstrip("\n").partition("\t")
            if not tab or "#" not in key or not caption.strip():
                raise ValueError(f"{path}:{line_no}: expected '<image>.jpg#<n><TAB><caption>', got {line.strip()[:80]!r}")
            by_image.setdefault(key.split("#")[0], []).append(caption.strip())
    return [(img, _one_caption(caps, spec.caption, rng), None) for img, caps in by_image.items()]


def _parti(path: Path, spec: PromptSpec, rng):
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        header = next(rows, None)
        if not header or "Prompt" not in header:
            raise ValueError(f"{path}:1: expected a PartiPrompts TSV header with a 'Prompt' column, got {header}")
        ip, ic = header.index("Prompt"), header.index("Category") if "Category" in header else None
        items = []
        for line_no, row in enumerate(rows, 2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) <= max(ip, ic or 0) or not row[ip].strip():
                raise ValueError(f"{path}:{line_no}: expected {len(header)} tab-separated columns with a prompt, "
                                 f"got {row}")
            cat = row[ic] if ic is not None else None
            if spec.category and cat != spec.category:
                continue
            items.append((f"line{line_no}", row[ip].strip(), cat))
    return items


def _txt(path: Path, spec: PromptSpec, rng):
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(f"line{n}", line.strip(), None) for n, line in enumerate(lines, 1) if line.strip()]


def _jsonl(path: Path, spec: PromptSpec, rng):
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: malformed JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not str(obj.get(spec.field, "")).strip():
                raise ValueError(f"{path}:{line_no}: no prompt under key {spec.field!r} (eval.prompts.field)")
            items.append((str(obj.get("id", f"line{line_no}")), str(obj[spec.field]).strip(), obj.get("category")))
    return items
