"""What every Hydra entry point shares: logging, seeding, loggers, prompt loading, W&B teardown."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import hydra
from omegaconf import DictConfig, OmegaConf

from hawkspec.resources import CONF_PACKAGE, conf_dir

log = logging.getLogger("hawkspec")

#: The Hydra config tree as a folder (``conf/`` of the checkout, or ``hawkspec/conf`` of an installed wheel).
CONF_DIR = str(conf_dir())
#: The same as Hydra's package search path: ``@hydra.main(config_path=CONF_PATH, ...)``.
CONF_PATH = CONF_PACKAGE


# Keys of a config node that are settings for others, not arguments of its `_target_`: `backbone.tuning` holds the
# model's decoder constants, read by the decoder presets through `${backbone.tuning...}`.
CONFIG_ONLY = {"backbone": ("tuning",)}


def instantiate(cfg: DictConfig, what: str, **kwargs) -> Any:
    """``hydra.utils.instantiate`` with a log line naming what is built and a readable error."""
    target = cfg.get("_target_", "?") if isinstance(cfg, DictConfig) else "?"
    log.info("Instantiating %s <%s>", what, target)
    drop = [k for k in CONFIG_ONLY.get(what, ()) if isinstance(cfg, DictConfig) and k in cfg]
    if drop:
        cfg = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in drop})
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except Exception as e:  # unwrap Hydra's InstantiationException chain to the real cause
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is e:
            raise
        raise with_context(cause, f"while instantiating `{what}` ({target})") from e


def with_context(exc: BaseException, context: str) -> BaseException:
    """``exc`` with ``context`` prefixed to its message: a new exception of the same type when its constructor
    takes one message, else ``exc`` itself with ``context`` as a note (never an unrelated error, e.g. the
    ``TypeError`` of rebuilding a ``JSONDecodeError``)."""
    message = f"{context}: {exc}"
    try:
        new = type(exc)(message)
    except Exception:
        new = None
    if new is not None and str(new) == message:
        return new
    if hasattr(exc, "add_note"):
        exc.add_note(context)
    return exc


def instantiate_loggers(cfg: DictConfig | None) -> list:
    """Lightning loggers from the ``logger`` group (a dict of logger configs; empty for ``logger=none``)."""
    if not cfg:
        return []
    os.environ.setdefault("WANDB_MODE", "offline")
    return [instantiate(c, f"logger.{name}") for name, c in cfg.items() if c is not None and "_target_" in c]


def load_prompts(prompts: list[str] | None, prompts_file: str | None) -> list[str]:
    """Prompts from ``prompts_file`` (one per line) when set, else the ``prompts`` list."""
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts_file={prompts_file} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"prompts_file={prompts_file} is not a UTF-8 text file ({e.reason} at byte {e.start}); "
                             "one prompt per line expected") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file={prompts_file} holds no prompt (one per line expected)")
    prompts = list(prompts or [])
    if not prompts:
        raise ValueError("the prompt list is empty: set `prompts=[...]` or `prompts_file=PATH`")
    return prompts


def finish_wandb(exit_code: int) -> None:
    """Close the W&B run of this job, if one was started (one run per job under multirun)."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)


def task(fn: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap an entry point body: print the config, close W&B in ``finally`` with the right exit code."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> Any:
        log.debug("config:\n%s", OmegaConf.to_yaml(cfg))
        code = 1
        try:
            out = fn(cfg)
            code = 0
            return out
        finally:
            finish_wandb(code)

    return wrapper


@contextlib.contextmanager
def on_sigterm(hint: Callable[[], str]) -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's kill, ``timeout``) ends the run as ``hawkspec-train``'s does: an
    error line ``SIGTERM: <hint()>`` saying what is kept and how to resume, then exit status 143 (128 + SIGTERM),
    never Python's silent -15. The previous handler comes back after the block (no-op outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while we leave kills at once
        try:
            message = hint()
        except Exception as e:  # the hint must never hide the exit
            message = f"(no resume hint: {e})"
        log.error("SIGTERM: %s", message)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: not set from Python
