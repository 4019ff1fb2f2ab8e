"""Read a procedural caption back into the attributes it asks for (the inverse of
:func:`hawkspec.data.procedural.caption`)."""

from __future__ import annotations

import re

from hawkspec.data.procedural import (
    BACKGROUNDS,
    COLOR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    _background_phrase,
    _position_phrase,
)

_POSITION = {_position_phrase(p): p for p in POSITIONS}
_BACKGROUND = {_background_phrase(b, c): (b, c) for b in BACKGROUNDS for c in COLOR_NAMES}


def _alt(options) -> str:
    return "|".join(re.escape(o) for o in sorted(options, key=len, reverse=True))


_CAPTION = re.compile(
    rf"^a (?P<size>{_alt(SIZES)}) (?P<color>{_alt(COLOR_NAMES)}) (?P<shape>{_alt(SHAPES)}) "
    rf"(?P<position>{_alt(_POSITION)}) on a (?P<background>{_alt(_BACKGROUND)}) background$"
)


def parse_caption(text: str) -> dict[str, str] | None:
    """The attributes of a caption written by the procedural grammar, or ``None`` if it is not one.

    Case, repeated spaces and a final full stop are ignored.

    Returns:
        ``{"shape", "color", "size", "position", "background", "bg_color"}`` -> class name.
    """
    norm = " ".join(text.lower().strip().rstrip(".").split())
    m = _CAPTION.match(norm)
    if m is None:
        return None
    background, bg_color = _BACKGROUND[m["background"]]
    return {"shape": m["shape"], "color": m["color"], "size": m["size"], "position": _POSITION[m["position"]],
            "background": background, "bg_color": bg_color}
