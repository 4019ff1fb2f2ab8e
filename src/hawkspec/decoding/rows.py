"""Rows in flight: decoders that write several image rows at once (ZipAR), lossy and labelled so.

ZipAR (arXiv 2412.04062, ICML 2025; official code ThisisBillhe/ZipAR) opens image row r + 1 once row r holds a
window of tokens, and from then on every forward feeds each open row's latest token at its own raster position and
*samples and commits* the next token of every open row from its output -- no draft, no test. A lower row's tokens
are therefore drawn from the model conditioned on an unfinished upper row, and their keys and values are never
recomputed: not the AR distribution (``lossless = False``). The schedule depends on the grid and the window only, so
it is computed once (:func:`zipar_schedule`) and every image of a batch follows it.

Each forward is one :meth:`~hawkspec.backbones.base.Backbone.forward` with explicit ``positions``: the cache is
read raster-causally (a token sees the committed tokens at positions up to its own), which is the official
Lumina-mGPT code's mask (``_update_causal_mask_ZIPAR``: key index <= query index in an insertion-ordered cache).

The official code has two schedules, one per model, and a backbone gets the one written for its token layout:

* ``lumina`` (grids with an end-of-line token: Lumina-mGPT, Emu3, the tiny model; ``modeling_chameleon.py``
  L1906-2070): row 0 starts after the image start; a row's count includes its leading token (the image start or
  the end-of-line token before it); when row r's count reaches the window, row r + 1 opens by feeding row r's
  end-of-line token at its raster position (so row r + 1's first code follows ``window - 1`` codes of row r); when a
  row finishes, its last code is fed once more at its position to write its keys and values (output unused); the
  image ends when the last row finishes.
* ``llamagen`` (grids without one: LlamaGen, Janus; ``generate_zipar.py`` L124-273): row 0 is plain AR; row 1
  then opens at once, fed by row 0's last code; when row r (r >= 1) holds ``window`` codes, row r + 1 opens, fed by a
  stand-in -- a copy of the latest code of row r - 1 placed at the position of row r's last column -- which row r's
  real last code replaces when it is written (a committed token at a held position replaces it).

Deliberate difference (README "Decoding, precisely"): the official LlamaGen code reads the whole static cache
below a query's position, so its lower rows also attend to the zero keys of upper-row slots not generated yet
(logit 0); here those slots are masked, as in the official Lumina-mGPT code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hawkspec.backbones.base import Backbone, ImageGrid
from hawkspec.decoding.output import GenerationOutput
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, entropy, sample, target_probs

log = logging.getLogger("hawkspec")

SCHEDULES = ("lumina", "llamagen")


@dataclass(frozen=True)
class RowsForward:
    """One forward of a rows-in-flight schedule, in body positions (0 = the first code; -1 = the last image-start
    token, already in the cache after the prefill).

    Attributes:
        feed: Where each fed token sits (its raster position).
        source: The body position whose token is fed there: ``feed`` itself, or (a ``llamagen`` stand-in) another
            position whose token is copied.
        emit: For each fed token, the body position sampled from its output, or None (keys and values only).
    """

    feed: tuple[int, ...]
    source: tuple[int, ...]
    emit: tuple[int | None, ...]


def zipar_schedule(grid: ImageGrid, window: int, schedule: str | None = None) -> list[RowsForward]:
    """ZipAR's forwards for one image, the prefill first (``feed == (-1,)``: its output samples body position 0).

    Args:
        grid: The backbone's grid.
        window: Lumina: a row opens the next one when its count (leading token included) reaches it (official 16
            at 768 px); LlamaGen: when it holds this many codes (official 8).
        schedule: ``lumina`` or ``llamagen``; None: the one written for the grid's layout (``lumina`` with an
            end-of-line token, ``llamagen`` without).

    Raises:
        ValueError naming ``backbone.tuning.zipar.window`` for a window the schedule cannot use.
    """
    schedule = schedule or ("lumina" if grid.eol else "llamagen")
    if schedule not in SCHEDULES:
        raise ValueError(f"ZipAR schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "lumina" and not grid.eol:
        raise ValueError("ZipAR's lumina schedule opens a row with the end-of-line token: this grid has none "
                         "(use the llamagen schedule)")
    if schedule == "llamagen" and grid.eol:
        raise ValueError("ZipAR's llamagen schedule is for grids without an end-of-line token: use lumina")
    low, high = (2, grid.tokens_per_row) if schedule == "lumina" else (1, grid.tokens_per_row - 1)
    if not low <= window <= high:
        raise ValueError(f"window={window}: the {schedule} schedule on this grid ({grid.tokens_per_row} tokens a "
                         f"row) takes {low} to {high} (the backbone's is backbone.tuning.zipar.window)")
    return _lumina(grid, window) if schedule == "lumina" else _llamagen(grid, window)


def _lumina(grid: ImageGrid, window: int) -> list[RowsForward]:
    W, rows, cols = grid.tokens_per_row, grid.rows, grid.cols
    count = {0: 1}  # tokens of each open row, its leading token included
    latest = {0: -1}  # body position of each open row's latest token (row 0: the image start)
    ongoing, last, out = [0], None, []
    while True:
        feed = ([last] if last is not None else []) + [latest[r] for r in ongoing]
        emit: list[int | None] = [None] * (last is not None)
        last, finished, done = None, [], False
        for r in list(ongoing):  # the rows open when the forward was built, in order
            p = r * W + count[r] - 1
            emit.append(p)
            latest[r] = p
            count[r] += 1
            if count[r] == window and r < rows - 1 and r + 1 not in ongoing:  # open the next row: its leading
                ongoing.append(r + 1)  # token is this row's end-of-line token, at its own position
                count[r + 1], latest[r + 1] = 1, r * W + cols
            elif r == rows - 1 and count[r] == W:  # the last row is done: the image ends
                done = True
                break
            if count[r] == W:  # done: its last code is fed once more, keys and values only
                last = p
                finished.append(r)
        out.append(RowsForward(tuple(feed), tuple(feed), tuple(emit)))
        if done:
            return out
        for r in finished:
            ongoing.remove(r)


def _llamagen(grid: ImageGrid, window: int) -> list[RowsForward]:
    W, rows = grid.tokens_per_row, grid.rows
    out = [RowsForward((-1,), (-1,), (0,))]  # row 0: plain AR
    out += [RowsForward((c,), (c,), (c + 1,)) for c in range(W - 1)]
    if rows == 1:
        return out
    count = {1: 0}  # codes of each open row
    latest = {1: (W - 1, W - 1)}  # (position, source) of each open row's next input
    ongoing, last, written = [1], None, W
    while written < grid.length:
        feed = ([last] if last is not None else []) + [latest[r] for r in ongoing]
        emit: list[int | None] = [None] * (last is not None)
        last, finished = None, []
        for r in list(ongoing):
            p = r * W + count[r]
            emit.append(p)
            latest[r] = (p, p)
            count[r] += 1
            written += 1
            if count[r] == window and r < rows - 1 and r + 1 not in ongoing:
                # the stand-in: row r - 1's latest code, at row r's last column (replaced by row r's own later)
                upper = (r - 1) * W + (count[r - 1] if r - 1 in count else W) - 1
                ongoing.append(r + 1)
                count[r + 1], latest[r + 1] = 0, ((r + 1) * W - 1, upper)
            if count[r] == W:
                last = (p, p)
                finished.append(r)
        out.append(RowsForward(tuple(f for f, _ in feed), tuple(s for _, s in feed), tuple(emit)))
        for r in finished:
            ongoing.remove(r)
    return out


class RowsDecoder:
    """ZipAR behind the decoder interface: a precomputed schedule, one committed multi-row forward per step.

    Args:
        backbone: The frozen model.
        sampling: The run's sampling (CFG, temperature, top-k): every token is drawn from the target at its forward.
        window: ZipAR's window (``backbone.tuning.zipar.window``).
        schedule: ``lumina`` / ``llamagen``; None: the one written for the backbone's layout.
        name: The row name in results.
    """

    lossless = False

    def __init__(self, backbone: Backbone, sampling: SamplingConfig, window: int, schedule: str | None = None,
                 name: str = "zipar"):
        self.backbone, self.sampling, self.name = backbone, sampling, name
        self.window = int(window)
        self.schedule_name = schedule or ("lumina" if backbone.grid.eol else "llamagen")
        self.schedule = zipar_schedule(backbone.grid, self.window, self.schedule_name)
        self.runner = None
        grid = backbone.grid
        self._fed = sum(len(f.feed) for f in self.schedule[1:])  # KV slots the image needs past the prompt
        self._code_index = {p: (p // grid.tokens_per_row) * grid.cols + p % grid.tokens_per_row
                            for p in grid.code_positions().tolist()}
        emitted = sorted(e for f in self.schedule for e in f.emit if e is not None)
        if emitted != sorted(self._code_index):  # every code exactly once: a schedule bug must not pass silently
            raise AssertionError("the ZipAR schedule does not sample every code position exactly once")

    def describe(self) -> dict:
        return {"name": self.name, "proposer": None, "acceptance": "zipar (sampled and committed, no test)",
                "lossless": False, "rows_in_flight": {"method": "zipar", "schedule": self.schedule_name,
                                                      "window": self.window, "forwards": len(self.schedule)}}

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator | None = None, progress: bool = False,
                 track_entropy: bool = False) -> GenerationOutput:
        if self.runner is not None:
            raise ValueError(f"{self.name}: rows-in-flight decoders run their forwards eagerly or compiled "
                             "(eval.compile=none|forward); whole compiled steps and CUDA graphs "
                             "(eval.compile=step, eval.cuda_graphs) are not supported for them")
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        bb, grid, sampling = self.backbone, self.backbone.grid, self.sampling
        B, L = len(prompts), grid.length
        state, hidden = bb.prefill(bb.encode(prompts), cfg=sampling.use_cfg, reserve=self._fed, generator=generator)
        device, streams = hidden.device, state.streams
        base = state.next_pos.clone()  # (N,) the position id of body position 0
        tokens = torch.zeros((B, L), dtype=torch.long, device=device)
        if grid.eol:
            tokens[:, grid.forced_mask().to(device)] = bb.eol_token_id
        codes = torch.zeros((B, grid.num_codes), dtype=torch.long, device=device)
        ent_sum = torch.zeros((), device=device)
        for k, fw in enumerate(tqdm(self.schedule, disable=not progress, desc=self.name, leave=False)):
            if k == 0:  # the prefill's output samples body position 0
                h = hidden[:, None]
            else:
                ids = tokens[:, list(fw.source)].repeat(streams, 1)
                h = bb.forward(state, ids, positions=base[:, None] + torch.tensor(fw.feed, device=device))
            sel = [i for i, e in enumerate(fw.emit) if e is not None]
            at = [fw.emit[i] for i in sel]
            probs = target_probs(combine_cfg(bb.code_logits(h[:, sel]), streams, sampling.cfg_scale), sampling)
            if track_entropy:
                ent_sum += entropy(probs).mean(0).sum()
            code = probs.argmax(-1) if sampling.greedy else sample(probs, generator)  # (B, len(at))
            tokens[:, at] = bb.code_token_ids[code]
            codes[:, [self._code_index[p] for p in at]] = code
        n = len(self.schedule)
        # as the speculative decoders count: body tokens after the first per forward after the prefill (the
        # acceptance length), none of them a verified draft
        return GenerationOutput(
            codes=codes.view(B, grid.rows, grid.cols), tokens=tokens, forwards=n,
            forwards_per_image=torch.full((B,), n), accepted_tokens=torch.zeros(B, dtype=torch.long),
            mean_entropy=float(ent_sum) / grid.num_codes if track_entropy else None,
            extras={"steps": torch.full((B,), n - 1), "committed": torch.full((B,), L - 1)},
        )
