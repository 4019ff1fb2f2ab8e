"""Safe outputs: files and folders appear complete or not at all, and nothing we did not write is destroyed.

* :func:`atomic_write_text` / :func:`atomic_write_json`: write a temporary sibling, fsync, ``os.replace``.
* :func:`publish_dir`: put a finished folder at a destination (``export_dir`` and the like). The destination
  may be missing, empty, or a folder this project wrote (it holds the marker file :data:`MARKER`); any other
  non-empty destination is refused with an error naming the config key, unless ``overwrite=True``. The old
  folder is renamed aside, the new one renamed into place, then the old one removed: a crash at any point
  leaves the old or the new folder (and at worst a ``.<name>.old-*`` sibling), never half of either.
* :func:`check_destination`: the same check, to run at start-up before any work.
* :func:`all_finite` / :func:`check_finite_state`: the finiteness checks for weights before they are saved or
  loaded (``DraftHeads.load`` should call :func:`check_finite_state` on the loaded state dict).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

#: Written into every folder ``publish_dir`` puts in place: "hawkspec wrote this; it may be replaced".
MARKER = ".hawkspec-output"


class OutputExistsError(FileExistsError):
    """A destination holds files this project did not write; the message names the config key."""


class NonFiniteError(ValueError):
    """NaN or Inf where only finite numbers may go; the message names the tensor, sample or step."""


# ----------------------------------------------------------------------------------------------- files
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported everywhere (e.g. some network file systems)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary sibling and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj) -> Path:
    """``atomic_write_text`` of ``json.dumps(obj, indent=1)``."""
    return atomic_write_text(path, json.dumps(obj, indent=1))


def read_json(path: str | Path, what: str = "file") -> dict:
    """Parse a JSON file; a missing or corrupt file raises an error naming it (not a bare decoder error)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e}): it is corrupt or was cut short; "
                         "rewrite it with the command that made it") from e


# ----------------------------------------------------------------------------------------------- folders
def is_ours(folder: str | Path) -> bool:
    """True when ``folder`` carries the marker of a folder this project published."""
    return (Path(folder) / MARKER).is_file()


def check_destination(path: str | Path, key: str, overwrite: bool = False) -> Path:
    """Refuse a destination that holds someone else's files; returns the path.

    Allowed: a missing path, an empty folder, a folder with our :data:`MARKER`, or anything with ``overwrite``.
    The parent must be creatable and writable (checked now, not after the work).

    Raises:
        OutputExistsError: naming ``key``, for a non-empty foreign folder or a file.
        PermissionError: naming ``key``, when the destination cannot be written.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        if not path.is_dir():
            raise OutputExistsError(f"{key}={path} is a file, not a folder: choose another `{key}`")
        if any(path.iterdir()) and not is_ours(path):
            raise OutputExistsError(
                f"{key}={path} is a non-empty folder that hawkspec did not write (no {MARKER} file in it): "
                f"choose another `{key}`, or add `overwrite=true` to replace it"
            )
    check_writable(path.parent, key)  # the folder is renamed into place inside its parent
    return path


def check_writable(folder: str | Path, key: str) -> None:
    """Raise a PermissionError naming ``key`` unless ``folder`` (or its nearest existing ancestor) is writable."""
    folder = Path(folder).expanduser().absolute()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{key}: {probe} is a file, so {folder} cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{key}: cannot write to {probe} (permission denied); choose another `{key}`")


def publish_dir(staged: str | Path, dest: str | Path, key: str, overwrite: bool = False) -> Path:
    """Move the finished folder ``staged`` to ``dest`` (see the module docstring); returns ``dest``.

    ``staged`` should be a sibling of ``dest`` (same file system: the renames are atomic); it gets our marker.
    """
    staged, dest = Path(staged), check_destination(dest, key, overwrite)
    (staged / MARKER).write_text(json.dumps({"key": key}) + "\n")
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(staged, dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_dir(dest: str | Path, key: str, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``dest`` to fill; on success it is published there atomically.

    ``dest`` is checked before anything is written; on an exception the temporary folder is removed and ``dest``
    is untouched.
    """
    dest = check_destination(dest, key, overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); the published folder gets a plain mkdir's mode
    try:
        yield tmp
        publish_dir(tmp, dest, key, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def copy_dir(src: str | Path, dest: str | Path, key: str, overwrite: bool = False) -> Path:
    """Copy folder ``src`` to ``dest`` through :func:`staged_dir` (atomic, refuses foreign destinations)."""
    with staged_dir(dest, key, overwrite) as tmp:
        for item in Path(src).iterdir():
            if item.name == MARKER:
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
    return Path(dest)


# ----------------------------------------------------------------------------------------------- numbers
def all_finite(value) -> bool:
    """True when a tensor / array / float holds no NaN or Inf."""
    import torch

    if isinstance(value, torch.Tensor):
        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    if isinstance(value, float):
        return math.isfinite(value)
    import numpy as np

    arr = np.asarray(value)
    return not np.issubdtype(arr.dtype, np.floating) or bool(np.isfinite(arr).all())


def check_finite_state(state: Mapping, where: str) -> None:
    """Raise :class:`NonFiniteError` naming every tensor of a state dict that holds NaN or Inf.

    Args:
        state: ``name -> tensor`` (a module's ``state_dict()`` or a loaded safetensors file).
        where: What the weights are, for the message (a path, or "the heads of step 120").
    """
    bad = [name for name, t in state.items() if not all_finite(t)]
    if bad:
        raise NonFiniteError(f"{where} hold non-finite values (NaN or Inf) in {bad[:5]}"
                             + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
