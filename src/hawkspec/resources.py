"""Where hawkspec's own files are, wherever it is installed: the package folder, its Hydra configs, its assets.

The configs are the package ``hawkspec.conf`` (the repository's top-level ``conf/`` folder, mapped into the
package by ``pyproject.toml``), so the entry points use ``config_path="pkg://hawkspec.conf"`` and work from any
directory, from a checkout or from a wheel. Configs name shipped assets with the resolver
``${hawkspec.package:}`` (this package's folder), never with the working directory.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

#: Hydra's package search path of the configs.
CONF_PACKAGE = "pkg://hawkspec.conf"


def package_dir() -> Path:
    """The installed ``hawkspec`` package folder (``src/hawkspec`` in a checkout)."""
    return Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The folder of the ``hawkspec.conf`` package (the repository's ``conf/`` in an editable install)."""
    spec = importlib.util.find_spec("hawkspec.conf")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve()
    checkout = package_dir().parents[1] / "conf"  # a source tree on sys.path without an install
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("the hawkspec configs (package hawkspec.conf) are not installed: reinstall hawkspec")


def register_resolvers() -> None:
    """``${hawkspec.package:}``: the package folder (idempotent)."""
    if not OmegaConf.has_resolver("hawkspec.package"):
        OmegaConf.register_new_resolver("hawkspec.package", lambda: str(package_dir()))


register_resolvers()
