"""The short spellings of a run's decoders, expanded into Hydra's own before it composes the config.

Every decoder of a ``hawkspec-eval`` run is a node of the run config, ``eval.decoders.<name>``, put there by the
defaults list (``conf/decoders/<set>.yaml``: ``- /decoder@eval.decoders.hawk: hawk``). Hydra's own spellings for
that are long, so three short ones are expanded first (:func:`expand`, called by every entry point that composes
``eval`` and by :func:`hawkspec.analysis.loading.compose`):

=============================================  =====================================================================
``'eval.decoders=[ar,sjd,gsd]'``               ``decoders=none +decoder@eval.decoders.ar=ar +decoder@...sjd=sjd ...``
``eval.decoders=all``                          ``decoders=all``
``decoder=gsd``                                a one-entry mapping: ``decoders=none +decoder@eval.decoders.gsd=gsd``
                                               (or, with a list, ``gsd`` joins it)
``decoder.acceptance.group=3``                 ``eval.decoders.gsd.acceptance.group=3`` (the decoder ``decoder=``
                                               names; ``hawk`` when none is named)
``decoder/tree=gpu``                           ``tree=gpu``: the tree every tree decoder of the run shares
=============================================  =====================================================================

Whatever cannot be expanded without guessing is refused with the spelling to use: a sweep over decoder lists or
over ``decoder=``, ``decoder/<group>=`` of another group, a key of a decoder not in the run.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger("hawkspec")

#: The decoder that ``decoder.KEY=V`` addresses when no ``decoder=NAME`` is given (the old default under study).
DEFAULT_DECODER = "hawk"

_NAME = re.compile(r"[A-Za-z_][\w-]*")


class OverrideError(ValueError):
    """A decoder spelling that cannot be expanded; the message says what to write instead."""


def _names(value: str, key: str) -> list[str]:
    """``[a,b]`` / ``a`` -> names; a sweep (``[a],[b]`` or ``a,b``) is refused."""
    v = value.strip()
    if v.startswith("[") and v.endswith("]") and "],[" not in v.replace(" ", ""):
        inner = v[1:-1]
        items = [s.strip().strip("'\"") for s in inner.split(",") if s.strip()]
    elif "," in v or "[" in v or "(" in v:
        raise OverrideError(
            f"`{key}={value}` sweeps over decoder lists, which Hydra cannot compose: sweep over decoder sets "
            "instead (`decoders=SET1,SET2`, each a conf/decoders/<SET>.yaml), or run every decoder in one job "
            f"('{key}=[ar,a,b]') and compare the rows")
    else:
        items = [v.strip("'\"")]
    bad = [n for n in items if not _NAME.fullmatch(n)]
    if bad:
        raise OverrideError(f"`{key}={value}`: {bad} are not decoder names (presets of conf/decoder/)")
    return items


def _check_presets(names: Iterable[str], conf_dir: str | Path | None, key: str) -> None:
    if conf_dir is None:
        return
    presets = sorted(p.stem for p in (Path(conf_dir) / "decoder").glob("*.yaml"))
    unknown = [n for n in names if n not in presets]
    if unknown:
        raise OverrideError(f"unknown decoder(s) {unknown} in `{key}`: choose from {presets} "
                            f"(presets live in {Path(conf_dir) / 'decoder'})")


def expand(args: Sequence[str], conf_dir: str | Path | None = None) -> list[str]:
    """``args`` (command-line overrides, flags left alone) with the short decoder spellings expanded (module doc).

    Args:
        conf_dir: The config folder, to refuse unknown preset names with the list to choose from (None: Hydra
            refuses them itself).
    """
    listed: list[str] | None = None
    named: str | None = None
    set_given = any(a.split("=", 1)[0].lstrip("+") == "decoders" for a in args if "=" in a and not a.startswith("-"))
    out: list[tuple[int, str]] = []
    keyed: list[tuple[int, str, str]] = []  # (index, sub-key with its operator, value) of `decoder.KEY=V`
    for i, arg in enumerate(args):
        if arg.startswith("-") or "=" not in arg:
            out.append((i, arg))
            continue
        key, value = arg.split("=", 1)
        bare = key.lstrip("+~")
        if bare == "eval.decoders" and not key.startswith("~"):
            if value.strip().strip("'\"") == "all":
                out.append((i, "decoders=all"))
                continue
            listed = _names(value, "eval.decoders")  # given twice: the last one, as Hydra's overrides
            _check_presets(listed, conf_dir, "eval.decoders")
            out = [(j, a) for j, a in out if a != "\0list"]
            out.append((i, "\0list"))
            continue
        if bare == "decoder" and not key.startswith(("+", "~")):
            (named,) = _names(value, "decoder") if "," not in value else _refuse_decoder_sweep(value)
            _check_presets([named], conf_dir, "decoder")
            out.append((i, "\0named"))
            continue
        if bare.startswith("decoder/"):
            group, _, package = bare[len("decoder/"):].partition("@")
            if package:  # Hydra's own spelling for one decoder's group option: nothing to expand
                out.append((i, arg))
                continue
            if group == "tree" and not package and not key.startswith(("+", "~")):
                log.info("`%s` is now `tree=%s`: the tree every tree decoder of the run shares (conf/tree/)",
                         arg, value)
                out.append((i, f"tree={value}"))
                continue
            raise OverrideError(
                f"`{arg}`: the run has no single `decoder` node; every decoder is eval.decoders.<name>. Choose a "
                f"group option for one of them with `{key.replace('decoder/', 'decoder/', 1)}@eval.decoders.<name>."
                f"{group}={value}`, or set its keys: eval.decoders.<name>.{group}.<key>=V")
        if bare.startswith("decoder."):
            prefix = key[: len(key) - len(bare)]
            keyed.append((i, prefix, bare[len("decoder."):] + "=" + value))
            continue
        out.append((i, arg))
    target = named or DEFAULT_DECODER
    if keyed and listed is not None and target not in listed and named is None:
        raise OverrideError(
            f"`decoder.{keyed[0][2]}` sets a key of `{target}` (the decoder `decoder.` addresses when no "
            f"`decoder=NAME` is given), which is not in eval.decoders={listed}: write eval.decoders.<name>."
            f"{keyed[0][2]} for the decoder you mean")
    result: list[str] = []
    keyed_at = {i: (prefix, rest) for i, prefix, rest in keyed}
    for i in range(len(args)):
        if i in keyed_at:
            prefix, rest = keyed_at[i]
            result.append(f"{prefix}eval.decoders.{target}.{rest}")
            continue
        item = next((a for j, a in out if j == i), None)
        if item is None:  # an earlier eval.decoders= that a later one replaced
            continue
        if item == "\0list":
            names = list(listed or [])
            if named and named not in names:
                names.append(named)
            result.append("decoders=none")
            result.extend(f"+decoder@eval.decoders.{n}={n}" for n in dict.fromkeys(names))
        elif item == "\0named":
            if listed is None and not set_given:
                result.append("decoders=none")
                result.append(f"+decoder@eval.decoders.{named}={named}")
        else:
            result.append(item)
    return result


def _refuse_decoder_sweep(value: str):
    raise OverrideError(
        f"`decoder={value}` sweeps over decoders: put them in one run instead ('eval.decoders=[ar,{value}]', the "
        "same prompts and seeds, timed against one AR), or sweep over decoder sets (`decoders=SET1,SET2`)")


def contract(args: Sequence[str]) -> list[str]:
    """The inverse of :func:`expand` for what Hydra records (``.hydra/overrides.yaml``): ``decoders=none`` and the
    ``+decoder@eval.decoders.N=N`` entries after it become ``'eval.decoders=[...]'`` again, so a recorded command
    reads as it was typed (and runs the same). Anything else is left alone."""
    args = list(args)
    if "decoders=none" not in args:
        return args
    names, rest = [], []
    for a in args:
        m = re.fullmatch(r"\+decoder@eval\.decoders\.([\w-]+)=([\w-]+)", a)
        if m and m.group(1) == m.group(2):
            names.append(m.group(1))
        else:
            rest.append(a)
    if not names:
        return args
    at = rest.index("decoders=none")
    rest[at] = f"eval.decoders=[{','.join(names)}]"
    return rest


def decoder_names(cfg) -> list[str]:
    """The names of a composed run's decoders (``eval.decoders``), AR first."""
    names = list((cfg.eval.get("decoders") or {}).keys())
    return (["ar"] if "ar" not in names else []) + names
