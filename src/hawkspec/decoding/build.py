"""Build a decoder from its config: ``ar`` or any proposer x any acceptance rule.

A decoder preset (``conf/decoder/<name>.yaml``) looks like::

    name: hawk                      # the row name in results
    proposer: {_target_: hawkspec.decoding.proposers.HawkProposer, vsd: 2, ...}
    acceptance: {_target_: hawkspec.decoding.acceptance.ExactAcceptance}
    heads_path: ...                 # trained heads (for proposers that take `heads`)
    tree: {budget: 16, max_depth: 4, max_rank: 4, paths: null, max_nodes: 256}

``proposer: null`` is plain AR (:func:`hawkspec.decoding.ar.ar_generate`, the speed baseline).

A composed proposer (:class:`~hawkspec.decoding.proposers.SpatialProposer`) lists its draft sources, each built
from its ``_target_``; a source with a checkpoint reads its own ``path``, so one proposer can mix two (``hawk_eagle``:
``heads_path`` for the vertical heads, ``eagle_path`` for the EAGLE draft model)::

    heads_path: ${paths.heads_dir}/hawk
    eagle_path: ${paths.heads_dir}/eagle
    proposer:
      _target_: hawkspec.decoding.proposers.SpatialProposer
      sources:
        vertical: {_target_: hawkspec.decoding.proposers.sources.VerticalSource, path: ${....heads_path}}
        eagle: {_target_: hawkspec.decoding.proposers.sources.EagleSource, path: ${....eagle_path}}
      order: [vertical, eagle]

A missing or mismatched checkpoint names the key to set: the decoder-level key a source's ``path`` interpolates
(``decoder.eagle_path``), else ``decoder.proposer.sources.<name>.path``. Checkpoints load when the decoder is
built, so ``eval.decoders=all`` skips a preset whose checkpoint is missing (a FileNotFoundError).
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.ar import ar_generate
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.tree import normalize_paths, paths_from_budget
from hawkspec.heads.draft import DraftHeads

log = logging.getLogger("hawkspec")


@dataclass
class ARDecoder:
    """Plain AR sampling behind the decoder interface (lossless by definition)."""

    backbone: Backbone
    sampling: SamplingConfig
    name: str = "ar"
    lossless: bool = True
    runner: object = None  # a hawkspec.decoding.static.StepRunner: compiled / graph-captured steps

    def generate(self, prompts, generator=None, progress=False, track_entropy=False) -> GenerationOutput:
        return ar_generate(self.backbone, prompts, self.sampling, generator, progress, track_entropy, self.runner)

    def describe(self) -> dict:
        return {"name": self.name, "proposer": None, "acceptance": "ar", "lossless": True}


class NamedDecoder(SpeculativeDecoder):
    """A :class:`SpeculativeDecoder` with the preset name it was built from."""

    def __init__(self, name: str, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = name

    def describe(self) -> dict:
        return {
            "name": self.name, "proposer": self.proposer.describe(), "acceptance": self.acceptance.describe(),
            "lossless": self.lossless, "tree_nodes": self.table.num_nodes, "tree_paths": len(self.table.paths),
        }


def tree_paths(tree: DictConfig) -> list[tuple[int, ...]]:
    """Rank paths from ``decoder.tree``: SJD-PAC's tree (``pac: {nodes, width, depth}``), explicit ``paths`` or the
    best ``budget`` under the default prior."""
    if tree.get("pac"):
        from hawkspec.decoding.proposers.pac import pac_paths

        return pac_paths(int(tree.pac.nodes), int(tree.pac.width), int(tree.pac.depth))
    if tree.get("paths"):
        return normalize_paths([tuple(p) for p in tree.paths])
    return paths_from_budget(int(tree.budget), int(tree.max_depth), int(tree.max_rank))


def build_decoder(cfg: DictConfig, backbone: Backbone, sampling: SamplingConfig):
    """The decoder described by a ``decoder`` config node, bound to ``backbone``."""
    name = cfg.get("name") or "decoder"
    if cfg.get("proposer") is None:
        return ARDecoder(backbone, sampling, name=name)
    target = hydra.utils.get_class(cfg.proposer._target_)
    kwargs = {}
    if "heads" in inspect.signature(target).parameters:
        if not cfg.get("heads_path"):
            raise ValueError(f"decoder `{name}` drafts with trained heads: set decoder.heads_path")
        kwargs["heads"] = DraftHeads.load(Path(cfg.heads_path), backbone)
    proposer = hydra.utils.instantiate(cfg.proposer, **kwargs)
    for src, key in source_keys(cfg).items():  # loading errors name the key the preset sets
        proposer.sources[src].key = key
    acceptance = hydra.utils.instantiate(cfg.acceptance)
    return NamedDecoder(
        name, backbone, proposer, acceptance, sampling, tree_paths(cfg.tree),
        max_tree_nodes=int(cfg.tree.get("max_nodes", 256)),
        dynamic_nodes=None if cfg.tree.get("dynamic") is None else int(cfg.tree.dynamic),
    )


def source_keys(cfg: DictConfig) -> dict[str, str]:
    """For each draft source of a composed proposer whose ``path`` is an interpolation (``${....eagle_path}``) and
    that names no ``key`` itself: the config key it reads (``decoder.eagle_path``), which its errors then name."""
    sources = cfg.proposer.get("sources") if isinstance(cfg.proposer, DictConfig) else None
    if not isinstance(sources, DictConfig):
        return {}
    out = {}
    for name, node in OmegaConf.to_container(sources, resolve=False).items():
        if not isinstance(node, dict) or node.get("key"):
            continue
        m = re.fullmatch(r"\$\{(\.*)([\w.]+)\}", str(node.get("path")))
        if m is None:
            continue
        dots, ref = len(m.group(1)), m.group(2)
        own = ["decoder", "proposer", "sources", str(name)]  # the node holding `path`; `.` is this node
        out[str(name)] = ref if dots == 0 else ".".join([*own[: len(own) - dots + 1], ref])
    return out


def decoder_presets(conf_dir: str | Path) -> list[str]:
    """Names of the presets in ``conf/decoder/``."""
    return sorted(p.stem for p in (Path(conf_dir) / "decoder").glob("*.yaml"))


def load_preset(conf_dir: str | Path, name: str, parent: DictConfig) -> DictConfig:
    """``conf/decoder/<name>.yaml`` resolved against the run config ``parent`` (for ``${paths...}``)."""
    path = Path(conf_dir) / "decoder" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(
            f"unknown decoder {name!r} in eval.decoders: choose from {decoder_presets(conf_dir)} "
            f"(presets live in {Path(conf_dir) / 'decoder'})"
        )
    merged = OmegaConf.merge(parent, {"decoder": OmegaConf.load(path)})
    return merged.decoder


def seeded(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
