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
from hawkspec.decoding.sampling import SamplingConfig, combine_cfg, entropy, one_hot, sample, target_probs, uniform
from hawkspec.decoding.static import EAGER, ExecutionMode, StepRunner

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


def _runner(name: str, mode: ExecutionMode, backbone: Backbone) -> StepRunner:
    """The runner of a rows-in-flight decoder; refused for static steps (its blocks change size from forward to
    forward), naming the keys."""
    if mode.static:
        raise ValueError(f"{name}: rows-in-flight decoders run their forwards eagerly or compiled "
                         "(eval.compile=none|forward); whole compiled steps and CUDA graphs "
                         "(eval.compile=step, eval.cuda_graphs) are not supported for them")
    return StepRunner(mode, backbone)


def _check_call(prompts: list[str]) -> None:
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")


def _output(grid: ImageGrid, codes: torch.Tensor, tokens: torch.Tensor, forwards: int,
            ent_sum: torch.Tensor | None) -> GenerationOutput:
    """The batch's output from (B, L) body codes and tokens. Counted as the speculative decoders count: body tokens
    after the first per forward after the prefill (the acceptance length), none of them a verified draft."""
    B = codes.shape[0]
    return GenerationOutput(
        codes=codes[:, grid.code_positions().to(codes.device)].view(B, grid.rows, grid.cols), tokens=tokens,
        forwards=forwards, forwards_per_image=torch.full((B,), forwards),
        accepted_tokens=torch.zeros(B, dtype=torch.long),
        mean_entropy=None if ent_sum is None else float(ent_sum) / grid.num_codes,
        extras={"steps": torch.full((B,), forwards - 1), "committed": torch.full((B,), grid.length - 1)},
    )


class RowsDecoder:
    """ZipAR behind the decoder interface: a precomputed schedule, one committed multi-row forward per step.

    Args:
        backbone: The frozen model.
        sampling: The run's sampling (CFG, temperature, top-k): every token is drawn from the target at its forward.
        window: ZipAR's window (``backbone.tuning.zipar.window``).
        schedule: ``lumina`` / ``llamagen``; None: the one written for the backbone's layout.
        name: The row name in results.
        mode: How its forwards run (``eval.compile=none|forward``).
    """

    lossless = False

    def __init__(self, backbone: Backbone, sampling: SamplingConfig, window: int, schedule: str | None = None,
                 name: str = "zipar", mode: ExecutionMode = EAGER):
        self.backbone, self.sampling, self.name = backbone, sampling, name
        self.window = int(window)
        self.schedule_name = schedule or ("lumina" if backbone.grid.eol else "llamagen")
        self.schedule = zipar_schedule(backbone.grid, self.window, self.schedule_name)
        self.runner = _runner(name, mode, backbone)
        self._fed = sum(len(f.feed) for f in self.schedule[1:])  # KV slots the image needs past the prompt
        emitted = sorted(e for f in self.schedule for e in f.emit if e is not None)
        if emitted != backbone.grid.code_positions().tolist():  # every code exactly once, or a schedule bug
            raise AssertionError("the ZipAR schedule does not sample every code position exactly once")
        # each forward's index tensors, made once: (fed sources, fed positions, outputs sampled, positions sampled)
        dev = backbone.code_token_ids.device
        as_t = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
        self._plan = [(as_t(f.source), as_t(f.feed), as_t([i for i, e in enumerate(f.emit) if e is not None]),
                       as_t([e for e in f.emit if e is not None])) for f in self.schedule]

    def describe(self) -> dict:
        return {"name": self.name, "proposer": None, "acceptance": "zipar (sampled and committed, no test)",
                "lossless": False, "rows_in_flight": {"method": "zipar", "schedule": self.schedule_name,
                                                      "window": self.window, "forwards": len(self.schedule)}}

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator | None = None, progress: bool = False,
                 track_entropy: bool = False) -> GenerationOutput:
        _check_call(prompts)
        bb, grid, sampling = self.backbone, self.backbone.grid, self.sampling
        B, L = len(prompts), grid.length
        state, hidden = bb.prefill(bb.encode(prompts), cfg=sampling.use_cfg, reserve=self._fed,
                                   round_to=self.runner.mode.capacity_round, generator=generator)
        device, streams = hidden.device, state.streams
        base = state.next_pos.clone()  # (N,) the position id of body position 0
        tokens = torch.zeros((B, L), dtype=torch.long, device=device)
        if grid.eol:
            tokens[:, grid.forced_mask().to(device)] = bb.eol_token_id
        codes = torch.zeros((B, L), dtype=torch.long, device=device)
        ent_sum = torch.zeros((), device=device) if track_entropy else None
        for k, (source, feed, sel, at) in enumerate(tqdm(self._plan, disable=not progress, desc=self.name,
                                                         leave=False)):
            if k == 0:  # the prefill's output samples body position 0
                h = hidden[:, None]
            else:
                h = self.runner.forward(state, tokens[:, source].repeat(streams, 1), positions=base[:, None] + feed)
            probs = target_probs(combine_cfg(bb.code_logits(h[:, sel]), streams, sampling.cfg_scale), sampling)
            if track_entropy:
                ent_sum += entropy(probs).mean(0).sum()
            code = probs.argmax(-1) if sampling.greedy else sample(probs, generator)  # (B, len(at))
            tokens[:, at] = bb.code_token_ids[code]
            codes[:, at] = code
        return _output(grid, codes, tokens, len(self.schedule), ent_sum)


# --------------------------------------------------------------------------------------------------------- PJD
def pjd_row(pt: torch.Tensor, c: torch.Tensor, q: torch.Tensor, u: torch.Tensor | None, top: bool, reuse: float,
            room: bool, draw) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """One open row's PJD decision for a batch (BRIEF-2026 §4.2).

    Args:
        pt: (B, n, K) the target at the window's nodes; node j predicts the position after it (draft j, then, for
            the last node, the position after the window).
        c, q: (B, n - 1) the drafts and (B, n - 1, K) the q each was drawn from (one-hot for fresh random drafts).
        u: (B, n - 1) uniforms for SJD's test u < min(1, p/q); None: greedy (a draft passes iff it is p's argmax).
        top: The top open row (a residual token after the first rejection, the last node's draw when all pass).
        reuse: After the first rejection a draft is kept iff min(1, p/q) > reuse (its old q), else y ~ p (q = p).
        room: The position after the window belongs to this row (the last node's output drafts it).
        draw: probs (B, K) -> (B,) codes.

    Returns:
        The codes committed, in order (each (B,)): the batch's smallest run of accepted drafts (an image that
        accepted further commits its own accepted draft at the top row's extra position), plus one token on the top
        row; and the drafts carried to the positions after them, as (code (B,), q (B, K)).
    """
    nd = c.shape[1]
    pd = pt[:, :nd].gather(-1, c[..., None]).squeeze(-1)
    qd = q.gather(-1, c[..., None]).squeeze(-1)
    ratio = torch.where(qd > 0, pd / qd.clamp_min(1e-30), torch.zeros_like(pd)).clamp(max=1.0)
    ok = (pt[:, :nd].argmax(-1) == c) if u is None else (u < ratio)
    acc = ok.long().cumprod(1).sum(1)  # (B,) leading acceptances
    a = int(acc.min()) if nd else 0
    out = [c[:, j] for j in range(a)]
    if top:
        if a < nd:  # the first rejection: the residual's draw, or the image's own accepted draft
            res = (pt[:, a] - q[:, a]).clamp(min=0)
            res = torch.where(res.sum(-1, keepdim=True) > 0, res, pt[:, a])
            out.append(torch.where(acc > a, c[:, a], draw(res)))
        else:  # every draft passed: the last node's draw
            out.append(draw(pt[:, a]))
    carried = []
    for j in range(len(out), nd):  # after the commit point (a lower row: from its rejected draft on)
        y = draw(pt[:, j])
        stay = ratio[:, j] > reuse
        carried.append((torch.where(stay, c[:, j], y), torch.where(stay[:, None], q[:, j], pt[:, j])))
    if room and len(out) <= nd:  # the position after the window, unless the top row just committed it
        carried.append((draw(pt[:, nd]), pt[:, nd]))
    return out, carried


class PJDDecoder:
    """PJD (Parallel Jacobi Decoding, arXiv 2606.05703, CVPR 2026; boyaliao/PJD) behind the decoder interface: a
    Jacobi window on every open row, all rows in one forward under the row-causal mask. LOSSY (``lossless = False``).

    Reconstructed from BRIEF-2026 §4 (the official repository could not be fetched here); each point the brief
    leaves open is settled as stated and named in ``describe()``:

    * Row 0 opens after the image start; row r + 1 opens when row r holds ``open_at`` tokens, its leading token
      counted (official ``long_size`` 9: eight codes), fed by row r's end-of-line token. (Grids with an end-of-line
      token only: the LlamaGen code is absent from the official repository.)
    * An open row's window: its last committed token, then drafts -- carried from the last forward, else fresh
      uniform codes with a one-hot q -- ``min(codes left in the row, window)`` nodes on the top row,
      ``min(count of the row above - count of this row, window)`` on a lower row, so a lower row never drafts past
      the column the row above has committed. A node sees the committed tokens at positions up to its own, its own
      row's nodes before it, and the upper rows' last committed tokens -- never their drafts (the row-causal mask).
      A window's first token already in the cache (an accepted draft of the last forward) is fed again for its
      output; its keys and values are not stored twice (``kv_refeed: drop``, ours: the brief does not say).
    * SJD's test on every row (accept with min(1, p/q)); the top row commits the accepted drafts and one token --
      the residual's draw after the first rejection, the last node's draw when all pass; a lower row commits the
      accepted drafts only. A batch commits the smallest count of its images on every row; an image that accepted
      further commits its own accepted draft at the extra position.
    * After the first rejection (and at it, on a lower row), a draft is kept iff min(1, p/q) > ``reuse`` (official
      0.5) with its old q, else replaced by y ~ p with q = p; the last node's output drafts the position after the
      window (y ~ p, q = p).
    * A finished top row's last code is fed once more for its keys and values (output unused).
    """

    lossless = False

    def __init__(self, backbone: Backbone, sampling: SamplingConfig, window: int = 8, open_at: int = 9,
                 reuse: float = 0.5, name: str = "pjd", mode: ExecutionMode = EAGER):
        grid = backbone.grid
        if not grid.eol:
            raise ValueError("pjd: the official code opens a row with the end-of-line token; this backbone's grid "
                             "has none (the LlamaGen PJD code was not released)")
        if window < 1 or not 2 <= open_at <= grid.tokens_per_row:
            raise ValueError(f"pjd: window={window} must be >= 1 and open_at={open_at} between 2 and the row's "
                             f"{grid.tokens_per_row} tokens (backbone.tuning.pjd)")
        self.backbone, self.sampling, self.name = backbone, sampling, name
        self.window, self.open_at, self.reuse = int(window), int(open_at), float(reuse)
        self.runner = _runner(name, mode, backbone)

    def describe(self) -> dict:
        return {"name": self.name, "proposer": None, "acceptance": "pjd (SJD test; lower rows residual-free)",
                "lossless": False, "rows_in_flight": {"method": "pjd", "schedule": "lumina", "window": self.window,
                                                      "open_at": self.open_at, "reuse": self.reuse,
                                                      "kv_refeed": "drop"}}

    @torch.no_grad()
    def generate(self, prompts: list[str], generator: torch.Generator | None = None, progress: bool = False,
                 track_entropy: bool = False) -> GenerationOutput:
        _check_call(prompts)
        bb, grid, s = self.backbone, self.backbone.grid, self.sampling
        B, L, W, K = len(prompts), grid.length, grid.tokens_per_row, bb.num_codes
        state, hidden = bb.prefill(bb.encode(prompts), cfg=s.use_cfg, reserve=L + grid.rows * self.window + 1,
                                   round_to=self.runner.mode.capacity_round, generator=generator)
        dev, S = hidden.device, state.streams
        base = state.next_pos.clone()
        tokens = torch.zeros((B, L), dtype=torch.long, device=dev)
        tokens[:, grid.forced_mask().to(dev)] = bb.eol_token_id
        codes = torch.full((B, L), -1, dtype=torch.long, device=dev)
        ent_sum = torch.zeros((), device=dev) if track_entropy else None

        def target(h):  # (N, n, d) -> (B, n, K)
            return target_probs(combine_cfg(bb.code_logits(h), S, s.cfg_scale), s)

        def commit(pos: int, code: torch.Tensor) -> None:
            codes[:, pos], tokens[:, pos] = code, bb.code_token_ids[code]

        # row 0's first code from the prefill, as AR; its window then starts at code 0
        p0 = target(hidden[:, None])[:, 0]
        if track_entropy:
            ent_sum += entropy(p0).mean()
        commit(0, p0.argmax(-1) if s.greedy else sample(p0, generator))
        count = {0: 2}  # tokens each open row holds, its leading token counted
        fed = {0: False}  # whether the row's last committed token is in the cache
        drafts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {0: []}  # carried (code (B,), q (B, K))
        ongoing, finished_last, steps = [0], None, 0
        bar = tqdm(total=grid.num_codes, disable=not progress, desc=self.name, leave=False)
        while ongoing:
            steps += 1
            feed, rowof, first, nodes = [], [], [], {}
            if finished_last is not None:  # keys and values of a finished row's last code
                feed.append(finished_last)
                rowof.append(-1)
                first.append(True)
            for i, r in enumerate(ongoing):
                last = r * W + count[r] - 2  # the row's last committed token (its leading token when count is 1)
                left = W - count[r] if i == 0 else count[ongoing[i - 1]] - count[r]
                n = max(1, min(left, self.window))
                while len(drafts[r]) < n - 1:  # fresh random drafts, one-hot q
                    c = (uniform((B,), generator, dev) * K).long().clamp(max=K - 1)
                    drafts[r].append((c, one_hot(c, K, torch.float32)))
                drafts[r] = drafts[r][: n - 1]
                nodes[r] = list(range(len(feed), len(feed) + n))
                feed += list(range(last, last + n))
                rowof += [r] * n
                first += [True] + [False] * (n - 1)
                for j, (c, _) in enumerate(drafts[r]):
                    tokens[:, last + 1 + j] = bb.code_token_ids[c]
            T = len(feed)
            fpos = torch.tensor(feed, device=dev)
            rows_t, first_t = torch.tensor(rowof, device=dev), torch.tensor(first, device=dev)
            # i sees j: raster-causal, and j in i's row or a committed token (a row's first node)
            mask = (fpos[None, :] <= fpos[:, None]) & ((rows_t[None, :] == rows_t[:, None]) | first_t[None, :])
            ids = tokens[:, fpos]
            h = self.runner.forward(state, ids.repeat(S, 1), tree_mask=mask, positions=base[:, None] + fpos)
            p = target(h)  # (B, T, K)
            keep = [0] if finished_last is not None else []
            finished_last, done_now = None, []
            for i, r in enumerate(list(ongoing)):
                idx, top = nodes[r], i == 0
                last = r * W + count[r] - 2
                if not fed[r]:
                    keep.append(idx[0])
                nd = len(idx) - 1
                c = torch.stack([d[0] for d in drafts[r]], 1) if nd else torch.zeros((B, 0), dtype=torch.long, device=dev)
                q = torch.stack([d[1] for d in drafts[r]], 1) if nd else torch.zeros((B, 0, K), device=dev)
                pt = p[:, idx]  # (B, n, K): node j predicts position last + 1 + j
                if track_entropy:
                    ent_sum += entropy(pt[:, 0]).mean()
                u = None if s.greedy else uniform((B, nd), generator, dev)
                draw = (lambda probs: probs.argmax(-1)) if s.greedy else (lambda probs: sample(probs, generator))  # noqa: E731
                room = last + nd + 1 <= r * W + grid.cols - 1  # the position after the window is this row's
                new_codes, carried = pjd_row(pt, c, q, u, top, self.reuse, room, draw)
                a = len(new_codes) - (1 if top else 0)  # accepted drafts (the top row commits one more token)
                for j, code in enumerate(new_codes):
                    commit(last + 1 + j, code)
                keep += idx[1 : 1 + a]
                n_new = len(new_codes)
                drafts[r] = carried
                count[r] += n_new
                # the top row's extra token has no keys and values yet; a lower row's last committed token is an
                # accepted draft or the window's first node, stored now
                fed[r] = not (top and n_new > a)
                bar.update(n_new)
                if count[r] >= self.open_at and r + 1 < grid.rows and r + 1 not in count:
                    count[r + 1], fed[r + 1], drafts[r + 1] = 1, False, []  # opened by row r's end-of-line token
                    ongoing.append(r + 1)
                if count[r] == W:  # done
                    done_now.append(r)
                    if not fed[r]:
                        finished_last = r * W + grid.cols - 1
            keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
            bb.compact(state, keep_t.expand(B * S, -1), torch.full((B * S,), len(keep), device=dev))
            for r in done_now:
                ongoing.remove(r)
            if not ongoing and finished_last is not None:
                finished_last = None
        bar.close()
        return _output(grid, codes, tokens, 1 + steps, ent_sum)
