"""What a notebook's parameters cell names, built from the project's Hydra configs.

A notebook says *which* backbone (a ``conf/backbone/`` name plus overrides, e.g. ``backbone.path=...``),
which heads and decoders (``conf/decoder/`` presets) and how many images; these helpers compose the same
configs the console scripts use, so a notebook draws its pictures for any backbone the project loads::

    bb = load_backbone("tiny")                                   # the embedded default
    bb = load_backbone("chameleon", ["backbone.path=/ckpt/Lumina-mGPT-7B-768"], device="cuda")
    decs = load_decoders(["medusa", "hawk", "gsd"], bb)          # shipped heads unless heads_dir is given
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.decoding.sampling import SamplingConfig

#: ``paths.root_dir`` of the composed configs (what ``${hydra:runtime.cwd}`` is for a console script): the
#: checkout when running from one, so that a notebook in ``notebooks/`` resolves paths like ``make`` does.
ROOT = Path(__file__).resolve().parents[3] if (Path(__file__).resolve().parents[3] / "conf").is_dir() else Path.cwd()
SHIPPED_HEADS = Path(__file__).resolve().parents[1] / "assets" / "heads"


def compose(overrides: Sequence[str] = (), config_name: str = "eval") -> DictConfig:
    """The run config ``config_name`` with ``overrides`` (Hydra syntax, and for ``eval`` the short decoder
    spellings of :mod:`hawkspec.cli.overrides`: ``decoder=sjd``, ``'eval.decoders=[ar,hawk]'``), paths resolved
    against the clone."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hawkspec.cli.common import CONF_DIR  # the configs the console scripts read (and their resolvers)
    from hawkspec.cli.overrides import expand

    if config_name == "eval":
        overrides = expand(overrides, CONF_DIR)
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name=config_name,
                            overrides=[f"paths.root_dir={ROOT}", "paths.output_dir=.", *overrides])
    return cfg


def load_backbone(name: str = "tiny", overrides: Sequence[str] = (), device: str | torch.device = "cpu") -> Backbone:
    """The backbone ``conf/backbone/<name>.yaml`` (with ``overrides`` such as ``backbone.path=DIR``), frozen,
    in eval mode, on ``device``."""
    from hawkspec.cli.common import instantiate

    cfg = compose([f"backbone={name}", *overrides])
    backbone = instantiate(cfg.backbone, "backbone")
    return backbone.to(device).eval().requires_grad_(False)


def sampling_config(overrides: Sequence[str] = ()) -> SamplingConfig:
    """The target distribution of ``conf/sampling/default.yaml`` (with ``overrides`` such as
    ``sampling.top_k=2000``)."""
    return SamplingConfig(**OmegaConf.to_container(compose(overrides).sampling, resolve=True))


def heads_path(heads: str | Path | None, kind: str = "hawk") -> Path:
    """A heads folder: ``heads`` itself when it is a folder, else the shipped ``medusa``/``hawk`` heads
    (``heads`` None or one of those names)."""
    if heads is None or str(heads) in ("medusa", "hawk"):
        return SHIPPED_HEADS / (str(heads) if heads else kind)
    return Path(heads)


def load_heads(heads: str | Path | None, backbone: Backbone, kind: str = "hawk"):
    """:class:`~hawkspec.heads.draft.DraftHeads` from a folder (or the shipped ``kind`` heads), on the
    backbone's device; refuses heads trained for another backbone."""
    from hawkspec.heads.draft import DraftHeads

    return DraftHeads.load(heads_path(heads, kind), backbone).to(backbone.code_token_ids.device)


def load_decoders(names: Sequence[str], backbone: Backbone, heads_dir: str | Path | None = None,
                  overrides: Sequence[str] = ()) -> dict:
    """``{name: decoder}`` for the ``conf/decoder/`` presets ``names``, bound to ``backbone``.

    Args:
        heads_dir: A folder holding ``medusa/`` and ``hawk/`` head sets (``paths.heads_dir``); None: the shipped ones.
        overrides: Of the run config, shared by every preset (e.g. ``tree.budget=8``, ``sampling.top_k=2000``) or
            addressed to one (``eval.decoders.hawk.proposer.sources.vertical.vsd=1``).
    """
    from hawkspec.decoding.build import build_decoder

    extra = [f"paths.heads_dir={Path(heads_dir).resolve()}"] if heads_dir else []
    cfg = compose([f"eval.decoders=[{','.join(names)}]", *extra, *overrides])
    sampling = SamplingConfig(**OmegaConf.to_container(cfg.sampling, resolve=True))
    return {name: build_decoder(cfg.eval.decoders[name], backbone, sampling, name=name, key=f"eval.decoders.{name}")
            for name in names}


def analysis_prompts(n: int, seed: int = 1234) -> list[str]:
    """``n`` procedural captions (the ones ``hawkspec-eval`` uses with ``eval.prompt_seed=seed``)."""
    from hawkspec.cache.sources import procedural_captions

    return procedural_captions(seed, 0, n)
