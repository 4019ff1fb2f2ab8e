"""Proposers from their config nodes (``conf/decoder/proposer/*.yaml``), every part told its own config key.

:func:`build_proposer` is what ``build_decoder`` calls: each draft source of a composed proposer is built from
its ``_target_`` with ``key`` (its node, ``eval.decoders.hawk.proposer.sources.vertical``) and ``path_key`` (the
key its checkpoint's errors name: the decoder-level key its ``path`` interpolates, e.g.
``eval.decoders.hawk.heads_path``, else ``<key>.path``). :func:`proposer_from_config` builds the same proposers
in Python (tests, notebooks) from the same YAML, with modules in memory instead of checkpoints.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from hawkspec.decoding.proposers.base import Proposer
from hawkspec.decoding.proposers.spatial import SpatialProposer

_INTERPOLATION = re.compile(r"\$\{(\.*)([\w.]+)\}")


def interpolated_key(value, own: list[str]) -> str | None:
    """The absolute config key an interpolation ``value`` (``${....heads_path}``) of the node at ``own`` reads,
    or None when ``value`` is not a plain interpolation."""
    m = _INTERPOLATION.fullmatch(str(value))
    if m is None:
        return None
    dots, ref = len(m.group(1)), m.group(2)
    return ref if dots == 0 else ".".join([*own[: len(own) - dots + 1], ref])


def _extras(target, key: str, path_key: str | None) -> dict:
    params = inspect.signature(target).parameters
    out = {"key": key} if "key" in params else {}
    if path_key is not None and "path_key" in params:
        out["path_key"] = path_key
    return out


def _plain(value):
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) or OmegaConf.is_list(value) else value


def build_proposer(node: DictConfig, key: str) -> Proposer:
    """The proposer of the config node ``node`` sitting at ``key`` (``eval.decoders.hawk.proposer``); ``node``
    keeps its parents, so its interpolations resolve against the run config."""
    own = key.split(".")
    target = hydra.utils.get_class(node._target_)
    raw = OmegaConf.to_container(node, resolve=False)
    # a composition of draft sources: SpatialProposer, or any proposer taking `sources` (hawk_pac)
    composed = issubclass(target, SpatialProposer) or "sources" in inspect.signature(target).parameters
    sources = node.get("sources") if composed else None
    if not isinstance(sources, DictConfig):
        path_key = interpolated_key(raw.get("path"), own) if not raw.get("path_key") else None
        return hydra.utils.instantiate(node, **_extras(target, key, path_key))
    built = {}
    for name, src in sources.items():
        src_key = f"{key}.sources.{name}"
        src_target = hydra.utils.get_class(src._target_)
        path_key = None
        if not src.get("path_key"):
            path_key = interpolated_key(raw["sources"][name].get("path"), [*own, "sources", str(name)])
        built[str(name)] = hydra.utils.instantiate(src, **_extras(src_target, src_key, path_key))
    rest = {k: _plain(node[k]) for k in node if k not in ("_target_", "sources")}
    return target(sources=built, **{**_extras(target, key, None), **rest})


def proposer_from_config(name: str, modules: dict | None = None, **keys) -> Proposer:
    """The proposer ``conf/decoder/proposer/<name>.yaml`` built in Python, as a preset builds it.

    Args:
        name: The proposer option (``medusa``, ``hawk``, ``hawk_jacobi``, ``hawk_vertical_only``, ...).
        modules: Trained modules in memory, by source (``{"horizontal": heads, "vertical": heads}``; for the
            proposer itself: ``{"": drafter}``), given to each as ``heads`` or ``drafter`` instead of its ``path``.
        **keys: Config keys below the proposer, dots as ``__`` (``sources__vertical__vsd=1``, ``order=[...]``).
    """
    from hawkspec.resources import conf_dir

    path = Path(conf_dir()) / "decoder" / "proposer" / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    for parent in cfg.pop("defaults", []) or []:
        if parent != "_self_":
            cfg = OmegaConf.merge(OmegaConf.load(path.parent / f"{parent}.yaml"), cfg)
    for k, v in keys.items():
        OmegaConf.update(cfg, k.replace("__", "."), v, merge=False)
    modules = dict(modules or {})

    def make(node: DictConfig, module, key: str):
        target = hydra.utils.get_class(node._target_)
        kwargs = {k: _plain(node[k]) for k in node if k not in ("_target_", "path")}
        params = inspect.signature(target).parameters
        if module is not None:
            kwargs["heads" if "heads" in params else "drafter"] = module
        return target(**kwargs, **_extras(target, key, None))  # errors name the key, as build_proposer's

    if "sources" not in cfg:
        return make(cfg, modules.get(""), "decoder.proposer")
    sources = {str(n): make(node, modules.get(str(n)), f"decoder.proposer.sources.{n}") for n, node in cfg.sources.items()}
    target = hydra.utils.get_class(cfg._target_)
    return target(sources=sources, **{k: _plain(cfg[k]) for k in cfg if k not in ("_target_", "sources")})
