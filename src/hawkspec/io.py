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
* :func:`load_safetensors` / :func:`check_safetensors`: read (or only check) a ``.safetensors`` file; a truncated
  or corrupt one raises :class:`CorruptWeightsError` naming the file, the tensor at fault where there is one, and
  the command that remakes the file (not safetensors' bare "incomplete metadata").
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


# ----------------------------------------------------------------------------------------------- weights files
class CorruptWeightsError(ValueError):
    """A ``.safetensors`` file that cannot be read; the message names the file, the tensor at fault (where the
    problem is one tensor's) and how to remake the file."""


#: Bytes per element of the safetensors dtypes (other dtypes, e.g. sub-byte floats, are not size-checked).
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                         "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def safetensors_problem(path: str | Path) -> str | None:
    """What is wrong with the safetensors file ``path``, judged from its header and its size alone (cheap: the
    tensors are not read), or None. Finds a truncated file (naming the first tensor cut off), a corrupt header,
    a tensor whose byte range disagrees with its dtype and shape (naming it), and bytes after the last tensor."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"it has {size} bytes, fewer than a safetensors header: it is truncated or empty"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            return f"its header claims {n} bytes but the whole file has {size}: it is truncated"
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError(f"a JSON {type(header).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
        return f"its header is not valid safetensors JSON ({e}): the file is corrupt"
    data, spans = size - 8 - n, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape, dtype = [int(d) for d in info["shape"]], str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"tensor `{key}` has a malformed header entry ({info!r}): the file is corrupt"
        want = math.prod(shape) * _SAFETENSORS_ITEMSIZE.get(dtype, 0)
        if not 0 <= begin <= end or (dtype in _SAFETENSORS_ITEMSIZE and end - begin != want):
            return (f"tensor `{key}` ({dtype}{shape}, {want} bytes) has the byte range [{begin}, {end}) in its "
                    "header: the file is corrupt")
        spans.append((begin, end, key))
    spans.sort()
    last = max((e for _, e, _ in spans), default=0)
    if last > data:
        cut = [k for _, e, k in spans if e > data]
        more = f" (and the {len(cut) - 1} after it)" if len(cut) > 1 else ""
        return (f"it is truncated: {size} bytes where its header describes {8 + n + last}; tensor `{cut[0]}` is cut "
                f"off{more}")
    if last < data:
        return f"it has {data - last} bytes after its last tensor: it was overwritten or appended to"
    return None


def _weights_error(path: Path, what: str, remake: str, cause: Exception | None = None) -> CorruptWeightsError:
    problem = safetensors_problem(path) if path.is_file() else "it does not exist"
    detail = f"{problem} (safetensors: {cause})" if problem and cause else problem or f"safetensors: {cause}"
    return CorruptWeightsError(f"cannot load {what} {path}: {detail}. {remake}")


def check_safetensors(path: str | Path, what: str, remake: str) -> Path:
    """Raise :class:`CorruptWeightsError` when ``path`` is not a complete safetensors file (header and size only,
    :func:`safetensors_problem`); for files that another library loads (``from_pretrained``). Returns ``path``.

    Args:
        path: The file.
        what: What it holds, for the message ("the tiny backbone's weights").
        remake: How to remake it, appended to the message ("Run `make pretrain` ...").
    """
    path = Path(path)
    problem = safetensors_problem(path)
    if problem:
        raise CorruptWeightsError(f"cannot load {what} {path}: {problem}. {remake}")
    return path


def load_safetensors(path: str | Path, what: str, remake: str, device: str = "cpu") -> dict:
    """``safetensors.torch.load_file(path)``, but a file it cannot read raises :class:`CorruptWeightsError` naming
    the file (and the tensor at fault), with ``remake`` (see :func:`check_safetensors`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as e:
        raise _weights_error(path, what, remake, e) from e
