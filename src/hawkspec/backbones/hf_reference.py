"""transformers' own ``generate`` on a backbone, with the image layout as a logits processor.

This is the reference our AR baseline is checked against: greedy outputs must match token for token, and
our seconds per image must be within 10% of these (``make bench``). Supported without CFG only.

Only tests and ``experiments/bench_ar.py`` use it, but it stays in ``backbones/``: it drives the backbone's
transformers model itself (``backbone.model.generate``), which nothing outside ``backbones/`` may touch
(``tests/backbones/test_boundary.py``).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from hawkspec.backbones.hf import HFBackbone
from hawkspec.decoding.sampling import SamplingConfig


class ImageLayoutLogitsProcessor(LogitsProcessor):
    """Allow only image codes, and only the end-of-line token where the layout forces it."""

    def __init__(self, backbone: HFBackbone, prompt_length: int):
        self.prompt_length = prompt_length
        self.forced = backbone.grid.forced_mask()
        self.eol = backbone.eol_token_id
        self.code_ids = backbone.code_token_ids.cpu()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        j = input_ids.shape[1] - self.prompt_length
        out = torch.full_like(scores, float("-inf"))
        if self.forced[j]:
            out[:, self.eol] = 0.0
        else:
            out[:, self.code_ids] = scores[:, self.code_ids]
        return out


@torch.no_grad()
def hf_generate(backbone: HFBackbone, prompts: list[str], sampling: SamplingConfig, compile: str = "none") -> torch.Tensor:
    """Image-body tokens (B, rows*W) from ``model.generate``; seed with ``torch.manual_seed`` beforehand.

    ``compile``: ``"none"`` -- eager, the default cache; ``"static"`` -- ``cache_implementation="static"`` eager;
    ``"forward"`` -- the static cache with transformers' own ``torch.compile`` of the decoding forward (on any
    device), the counterpart of ``HFBackbone.compile_steps("forward")``; ``"graphs"`` -- the same compiled with
    ``mode="reduce-overhead"`` (CUDA graphs), the counterpart of ``eval.cuda_graphs``."""
    if sampling.use_cfg:
        raise ValueError("hf_generate is the no-CFG reference: set sampling.cfg_scale=1.0")
    model = backbone.model
    seqs = [p + list(backbone.image_start_ids) for p in backbone.encode(prompts).cond]
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), backbone.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, L - len(s) :], mask[i, L - len(s) :] = torch.tensor(s), 1
    kwargs = dict(do_sample=False) if sampling.greedy else dict(
        do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k or None,
        top_p=sampling.top_p if sampling.use_top_p else None
    )
    if compile not in ("none", "static", "forward", "graphs"):
        raise ValueError(f"compile must be none, static, forward or graphs, got {compile!r}")
    if compile != "none":
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=False, dynamic=False,
                               mode="reduce-overhead" if compile == "graphs" else "default")
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
        kwargs.update(cache_implementation="static", disable_compile=compile == "static", compile_config=config)
    out = model.generate(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        max_new_tokens=backbone.grid.length,
        min_new_tokens=backbone.grid.length,
        logits_processor=LogitsProcessorList([ImageLayoutLogitsProcessor(backbone, L)]),
        pad_token_id=backbone.pad_token_id,
        eos_token_id=None,
        **kwargs,
    )
    return out[:, L:]
