"""Whole decoding steps compiled (``eval.compile=step``) and replayed from CUDA graphs (``eval.cuda_graphs``).

A step of AR or of the speculative engine (propose, build the tree, forward, verify, commit) has static shapes
and never reads a device value back to the host: the KV cache writes each row at its own slots
(:class:`~hawkspec.backbones.hf.RowStaticLayer`), trees are padded to a fixed node count, every walk is
vectorised, and the random draws come from one buffer of uniforms drawn before the step
(:class:`~hawkspec.decoding.sampling.Uniforms`). So a step can be

* compiled as one graph: ``torch.compile(fullgraph=True)`` -- a graph break is an error, not a slowdown;
* recorded once as a CUDA graph and replayed: one launch per step instead of hundreds.

A CUDA graph replays fixed addresses, so every tensor a step reads or writes must stay in the same memory from
step to step and from batch to batch. :class:`Persistent` keeps that promise for the decoders' state (the run,
its KV state and cache, the proposer) without asking them to write in place: after each recorded step and each
batch's start, a tensor rebound to a new tensor is copied into the one first seen under the same name, and the
name points back at it. A proposer declares its per-batch tensors (:meth:`~hawkspec.decoding.proposers.Proposer.state`
and ``set_state``), as do the engine's :class:`~hawkspec.decoding.state.DecodeState` and AR's run; the backbone's
KV state, which no decoder owns, is walked attribute by attribute.

Both apply to AR and to every decoder alike (compiled vs compiled, graphs vs graphs). The mode is an
:class:`ExecutionMode`, given when a decoder is built (``build_decoder(..., mode=)``); every decoder owns a
:class:`StepRunner` made from it, which runs its steps (eagerly too: one loop for every mode), installs compiled
forwards, and times the backbone forwards for step accounting (:meth:`StepRunner.accounting`).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import types
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from hawkspec.decoding.sampling import Uniforms

log = logging.getLogger("hawkspec")

COMPILE_MODES = ("none", "forward", "step")
RECOMPILE_LIMIT = 64
"""Each runner and step kind compiles a code object of its own (:func:`_own_code`), but the functions a step
inlines (every decoder's ``step``, AR's step) are shared, and each batch shape and first-step variant is one more
guarded entry: a runner raises torch's default limit of 8 to this so a long run never falls back to eager."""
ROUND_CAPACITY = 64
"""KV capacities are rounded up to a multiple of this when forwards or steps are compiled or recorded
(:attr:`ExecutionMode.capacity_round`), so batches whose prompts differ a little reuse one compiled graph / one
CUDA graph instead of recompiling (and hitting torch's recompile limit)."""


def _tensor_attrs(obj, path: str, seen: set, depth: int = 0) -> Iterator[tuple[str, object, str, torch.Tensor]]:
    """(path, owner, attribute, tensor) for every tensor attribute reachable from ``obj`` through plain objects,
    lists and dicts (modules, generators and classes are not entered: their memory does not move)."""
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from _tensor_attrs(x, f"{path}[{i}]", seen, depth + 1)
        return
    if isinstance(obj, dict):
        for k, x in obj.items():
            yield from _tensor_attrs(x, f"{path}[{k!r}]", seen, depth + 1)
        return
    if isinstance(obj, (nn.Module, torch.Generator, Uniforms, type, torch.Tensor)) or not hasattr(obj, "__dict__"):
        return
    if callable(obj) and not hasattr(type(obj), "__dataclass_fields__"):
        return
    for name, value in list(vars(obj).items()):
        if isinstance(value, torch.Tensor):
            yield f"{path}.{name}", obj, name, value
        elif isinstance(value, (list, tuple, dict)) or hasattr(value, "__dict__"):
            yield from _tensor_attrs(value, f"{path}.{name}", seen, depth + 1)


def _declares_state(obj) -> bool:
    return callable(getattr(obj, "state", None)) and callable(getattr(obj, "set_state", None))


def _root_tensors(roots: dict[str, object]) -> list[tuple[str, Callable, torch.Tensor]]:
    """(name, rebind, tensor) for every tensor under ``roots``: a root that declares its state (a proposer:
    ``state()`` -> named tensors, ``set_state``) by its declaration, any other (the backbone's KV state) by its
    attributes. ``rebind(t)`` points the name at ``t``."""
    out = []
    for key, root in roots.items():
        if _declares_state(root):
            out += [(f"{key}.{name}", lambda t, root=root, name=name: root.set_state({name: t}), t)
                    for name, t in root.state().items()]
        else:
            out += [(path, lambda t, owner=owner, name=name: setattr(owner, name, t), t)
                    for path, owner, name, t in _tensor_attrs(root, key, set())]
    return out


_CODE_IDS = itertools.count()


def _own_code(fn: Callable, key) -> Callable:
    """``fn`` with a code object of its own (same bytecode, globals and closure).

    Dynamo keeps its compiled entries on the code object and, at every call, checks their guards one after the
    other, newest first. Every runner's ``body`` shares one code object, so without this a run with several
    decoders piles all their entries (decoder x step kind x batch shape) on it, and every step of the decoder
    compiled first -- AR, in ``make bench`` -- pays the failing guards of all the others before its own match:
    per-step overhead that grows with the number of decoders in the run. One code object per runner and key keeps
    one entry each."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_CODE_IDS)}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    own.__qualname__ = f"{fn.__qualname__}[{key!r}]"
    return own


class Persistent:
    """The memory a recorded step reads and writes, by name (``run.n``, ``proposer.vertical.ring_tok``, ...)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}

    def adopt(self, roots: dict[str, object], strict: bool = False) -> bool:
        """Point every tensor under ``roots`` (:func:`_root_tensors`) at its persistent tensor, copying the new
        value in.

        Returns True when every name already had a persistent tensor of the same shape, dtype and device
        (recorded graphs stay valid). ``strict``: while recording, anything else is an error."""
        found = _root_tensors(roots)
        known = {id(t) for t in self.tensors.values()}
        same, moves = True, []
        for path, rebind, t in found:
            keep = self.tensors.get(path)
            if keep is None or keep.shape != t.shape or keep.dtype != t.dtype or keep.device != t.device:
                if strict:
                    raise RuntimeError(f"a recorded decoding step changed `{path}` to a new shape/dtype "
                                       f"({tuple(t.shape)}, {t.dtype}): its step is not static; run it with "
                                       "eval.cuda_graphs=false")
                if id(t) in known:  # another path's memory: this path gets its own (read before any copy)
                    t = t.clone()
                    rebind(t)
                self.tensors[path], same = t, False
                known.add(id(t))
            elif keep is not t:
                moves.append((rebind, keep, t.clone() if id(t) in known else t))  # never read a copied target
        for rebind, keep, t in moves:
            keep.copy_(t)
            rebind(keep)
        return same


@dataclass(frozen=True)
class ExecutionMode:
    """How a decoder's steps run: ``eval.compile`` and ``eval.cuda_graphs``, fixed when the decoder is built.

    Attributes:
        compile: ``none`` (eager), ``forward`` (the backbone's forwards compiled, the rest of the step eager) or
            ``step`` (every step compiled as one graph).
        cuda_graphs: Record each step once as a CUDA graph and replay it (CUDA only).
        persist_every_step: Move the state into the persistent memory after every step, as recording does,
            without recording (what CPU tests use to check that a replayed step would see the right memory).
    """

    compile: str = "none"
    cuda_graphs: bool = False
    persist_every_step: bool = False

    def __post_init__(self):
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"eval.compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.cuda_graphs and not torch.cuda.is_available():
            raise ValueError("eval.cuda_graphs=true needs a CUDA device (device=cuda): set eval.cuda_graphs=false")

    @classmethod
    def from_config(cls, e) -> "ExecutionMode":
        """The mode an ``eval`` config node asks for (``eval.compile``, ``eval.cuda_graphs``)."""
        return cls(str(e.get("compile") or "none"), bool(e.get("cuda_graphs", False)))

    @property
    def static(self) -> bool:
        """Steps of static shape that never read the device back (compiled, recorded, or persisted as if)."""
        return self.compile == "step" or self.cuda_graphs or self.persist_every_step

    @property
    def capacity_round(self) -> int:
        """KV capacities are rounded up to a multiple of this: :data:`ROUND_CAPACITY` whenever something is compiled
        or recorded (batches whose prompts differ a little share one graph), else 1."""
        return ROUND_CAPACITY if self.static or self.compile == "forward" else 1


EAGER = ExecutionMode()


class StepRunner:
    """Runs a decoder's steps in its :class:`ExecutionMode`: eagerly, compiled, and/or replayed from CUDA graphs.

    A step is ``fn(*args, rng)``: it reads and updates the state reachable from ``roots`` and draws every random
    number from ``rng``. Eager (``mode.static`` false), ``rng`` is the caller's generator and the step runs as
    written. Static steps are keyed (AR has one for code positions and one for end-of-line tokens); each key's first
    step runs eagerly and counts its uniforms (:class:`~hawkspec.decoding.sampling.Uniforms`), its second runs for
    real (compiling, on a side stream when recording) and records the CUDA graph, and the rest are replays after
    one in-place fill of the uniform buffer.

    A recorded graph replays what the step did when it was recorded, whatever Python state says later, so with
    graphs the first step of every batch runs eagerly (a proposer's "nothing cached yet" branch, say) and the
    state it leaves is moved into the persistent memory before the replays go on.

    The decoders call the backbone's forward through :meth:`forward`, so step accounting
    (:meth:`accounting`) times them without replacing anything.

    Args:
        mode: How steps run.
        backbone: The backbone whose forwards the steps call; ``mode.compile == "forward"`` compiles them
            (:meth:`~hawkspec.backbones.base.Backbone.compile_steps`, shared by every decoder on the backbone).
    """

    def __init__(self, mode: ExecutionMode = EAGER, backbone=None):
        self.mode, self.backbone = mode, backbone
        if mode.compile == "forward":
            backbone.compile_steps("forward")
        self.persist = Persistent()
        self.clock = None  # a ForwardClock while accounting
        self._eager_next: set = set()
        self.n_uniforms: dict[object, int] = {}
        self.buffers: dict[object, torch.Tensor] = {}
        self.graphs: dict[object, torch.cuda.CUDAGraph] = {}
        self._compiled: dict[object, Callable] = {}

    @property
    def static(self) -> bool:
        """Whether steps run static (no read-back inside a step: walks run their bounded length)."""
        return self.mode.static and self.clock is None

    def forward(self, state, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """The backbone's :meth:`~hawkspec.backbones.base.Backbone.forward`, timed while :meth:`accounting`."""
        if self.clock is None:
            return self.backbone.forward(state, input_ids, **kwargs)
        return self.clock.time(self.backbone.forward, state, input_ids, **kwargs)

    @contextlib.contextmanager
    def accounting(self, clock):
        """Step accounting: while inside, steps run eagerly (a clock cannot stop inside a compiled or recorded step)
        and every backbone forward is timed by ``clock`` (:class:`~hawkspec.metrics.accounting.ForwardClock`);
        under ``compile=step`` the forwards are compiled, so their times are those of the compiled step's."""
        compiled = self.mode.compile == "step"
        if compiled:
            self.backbone.compile_steps("forward")
        self.clock = clock
        try:
            yield clock
        finally:
            self.clock = None
            if compiled:
                self.backbone.compile_steps("none")

    def begin(self, roots: dict[str, object]) -> None:
        """A new batch has started: move its state into the persistent memory (recorded graphs stay valid when
        every shape matches the last batch's; otherwise they are recorded again)."""
        if not (self.static and self._persists and self.persist.tensors):
            return
        if not self.persist.adopt(roots):
            self.graphs.clear()
        self._eager_next = set(self.n_uniforms)

    @property
    def _persists(self) -> bool:
        return self.mode.persist_every_step or self.mode.cuda_graphs

    def _body(self, key, fn: Callable) -> Callable:
        def body(args, buf):
            fn(*args, Uniforms(buf))

        if self.mode.compile != "step":
            return body
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(_own_code(body, key), fullgraph=True, dynamic=False)
        return self._compiled[key]

    @staticmethod
    def _call(body: Callable, args: tuple, buf: torch.Tensor) -> None:
        try:
            body(args, buf)
        except torch._dynamo.exc.TorchDynamoException as e:
            raise RuntimeError(f"this decoder's step does not compile as one graph (eval.compile=step): {e}\n"
                               "Use eval.compile=forward.") from e

    def _fill(self, key, generator) -> torch.Tensor:
        buf = self.buffers[key]
        if generator is None or generator.device.type == buf.device.type:
            return buf.uniform_(generator=generator)
        return buf.copy_(torch.rand(buf.shape, generator=generator))

    def step(self, key, fn: Callable, args: tuple, roots: dict[str, object], generator) -> None:
        """Run one step of kind ``key``."""
        if not self.static:
            fn(*args, generator)
            return
        if key not in self.n_uniforms or key in self._eager_next:  # eager, counting the draws
            counter = Uniforms(None, generator)
            fn(*args, counter)
            if key in self._eager_next:
                self._eager_next.discard(key)
            else:
                self.n_uniforms[key] = counter.taken
                device = next((t.device for _, _, t in _root_tensors(roots)), torch.device("cpu"))
                self.buffers[key] = torch.zeros(max(counter.taken, 1), device=device)
            if self._persists:
                self.persist.adopt(roots)
            return
        body = self._body(key, fn)
        buf = self._fill(key, generator)
        if not self.mode.cuda_graphs:
            self._call(body, args, buf)
            if self._persists:
                self.persist.adopt(roots)
            return
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        # this step for real on a side stream (it compiles, warms cuBLAS up), then record the same step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._call(body, args, buf)
            self.persist.adopt(roots)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records only: nothing runs
            body(args, buf)
            self.persist.adopt(roots, strict=True)
        self.graphs[key] = graph
        log.info("recorded a CUDA graph for decoding step %r (%d uniforms)", key, self.n_uniforms[key])

    def loop(self, step: Callable, args: tuple, roots: dict[str, object], left: Callable[[], torch.Tensor],
             most: int, generator, bar=None) -> None:
        """Run ``step(*args, rng)`` until no row has anything ``left()`` ((B,) body tokens still to commit), in
        every mode alike. The host reads ``left()`` only between stretches of steps: a step commits at least one
        and at most ``most`` tokens per row, so ``ceil(max(left) / most)`` steps never overshoot the last row's end
        (and run exactly the steps that a check before every step would)."""
        self.begin(roots)
        done = None
        while True:
            rest = left()
            remaining, total = torch.stack([rest.max(), rest.sum()]).tolist()  # one read-back per stretch
            if bar is not None and done is not None:
                bar.update(done - total)
            done = total
            if remaining == 0:
                return
            for _ in range(-(-remaining // most)):
                self.step("step", step, args, roots, generator)
