"""Build a decoder from its config: ``ar`` or any proposer x any acceptance rule.

A decoder preset (``conf/decoder/<name>.yaml``) looks like::

    name: hawk                      # the row name in results
    proposer: {_target_: hawkspec.decoding.proposers.SpatialProposer, sources: {...}, order: [...]}
    acceptance: {_target_: hawkspec.decoding.acceptance.ExactAcceptance}
    heads_path: ...                 # trained heads (the sources' `path` interpolates it)
    tree: {budget: 16, max_depth: 4, max_rank: 4, paths: null, max_nodes: 256}

``proposer: null`` is plain AR (:func:`hawkspec.decoding.ar.ar_generate`, the speed baseline); a ``rows:`` node
(``method: zipar | pjd``) is a rows-in-flight decoder (:mod:`hawkspec.decoding.rows`).

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

A missing or mismatched checkpoint names the key to set, below the node's place in the run config (``key``; in a
run, ``eval.decoders.<name>``): the decoder-level key a source's ``path`` interpolates (``eval.decoders.<name>.eagle_path``),
else ``eval.decoders.<name>.proposer.sources.<source>.path``. Checkpoints load when the decoder is
built, so ``eval.decoders=all`` skips a preset whose checkpoint is missing (a FileNotFoundError).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.ar import ARDecoder
from hawkspec.decoding.engine import SpeculativeDecoder
from hawkspec.decoding.proposers.config import build_proposer, interpolated_key
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import EAGER, ExecutionMode
from hawkspec.decoding.tree import normalize_paths, paths_from_budget

log = logging.getLogger("hawkspec")


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


def build_decoder(cfg: DictConfig, backbone: Backbone, sampling: SamplingConfig, name: str | None = None,
                  key: str | None = None, mode: ExecutionMode = EAGER):
    """The decoder described by a decoder config node, bound to ``backbone``.

    Args:
        name: The row name; None: the node's ``name`` key if it has one, else its own key in the run config
            (``eval.decoders.hawk`` -> ``hawk``).
        key: Where the node sits in the run config (every error names keys below it); None: the node's own path
            (``eval.decoders.hawk``), or ``decoder`` for a node made on its own.
        mode: How its steps run (``eval.compile``, ``eval.cuda_graphs``: :meth:`ExecutionMode.from_config`); every
            decoder of a run gets the same, AR included.
    """
    own = cfg._get_full_key(None) if isinstance(cfg, DictConfig) else ""
    key = key or own or "decoder"
    name = name or cfg.get("name") or key.rsplit(".", 1)[-1]
    if cfg.get("rows") is not None:  # rows in flight (ZipAR): a schedule of multi-row forwards, no proposer
        return rows_decoder(cfg.rows, backbone, sampling, name, f"{key}.rows", mode)
    if cfg.get("proposer") is None:
        return ARDecoder(backbone, sampling, name=name, mode=mode)
    # every source loads its checkpoint from its own `path`; its errors name `<key>.proposer.sources.<name>...`
    # or the decoder-level key its path interpolates (source_keys)
    proposer = build_proposer(cfg.proposer, f"{key}.proposer")
    acceptance = hydra.utils.instantiate(cfg.acceptance)
    return NamedDecoder(
        name, backbone, proposer, acceptance, sampling, tree_paths(cfg.tree),
        max_tree_nodes=int(cfg.tree.get("max_nodes", 256)),
        dynamic_nodes=None if cfg.tree.get("dynamic") is None else int(cfg.tree.dynamic), mode=mode,
    )


def rows_decoder(cfg: DictConfig, backbone: Backbone, sampling: SamplingConfig, name: str, key: str,
                 mode: ExecutionMode = EAGER):
    """The rows-in-flight decoder of a ``rows:`` node (``method: zipar | pjd``); errors name ``<key>.<field>``."""
    from hawkspec.decoding.rows import PJDDecoder, RowsDecoder

    method = cfg.get("method")
    if method not in ("zipar", "pjd"):
        raise ValueError(f"{key}.method={method!r}: the rows-in-flight methods are ['zipar', 'pjd']")
    try:
        if method == "pjd":
            return PJDDecoder(backbone, sampling, int(cfg.window), int(cfg.open_at), float(cfg.reuse), name=name,
                              mode=mode)
        return RowsDecoder(backbone, sampling, int(cfg.window), cfg.get("schedule"), name=name, mode=mode)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from err


def source_keys(cfg: DictConfig, key: str = "decoder") -> dict[str, str]:
    """For each draft source of a composed proposer whose ``path`` is an interpolation (``${....eagle_path}``): the
    config key it reads (``<key>.eagle_path``), which its errors then name (:func:`build_proposer` does the same
    while building)."""
    sources = cfg.proposer.get("sources") if isinstance(cfg.proposer, DictConfig) else None
    if not isinstance(sources, DictConfig):
        return {}
    out = {}
    for name, node in OmegaConf.to_container(sources, resolve=False).items():
        if not isinstance(node, dict) or node.get("path_key"):
            continue
        ref = interpolated_key(node.get("path"), [*key.split("."), "proposer", "sources", str(name)])
        if ref is not None:
            out[str(name)] = ref
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
