"""``hawkspec-eval``: run several decoders on the same prompts and seeds, time them against AR in the same
run, score their images (FID, diversity, prompt alignment, CLIP score; :mod:`hawkspec.metrics.quality`) beside
AR's noise floor, and write ``results.json`` (the contract other tools read), ``results.md``, ``results.csv``,
image grids and acceptance heatmaps; the same go to the configured loggers (one W&B run per job)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hawkspec.backbones.base import Backbone
from hawkspec.cli.common import CONF_DIR, CONF_PATH, instantiate, instantiate_loggers, on_sigterm, task
from hawkspec.cli import eval_shards
from hawkspec.cli.overrides import OverrideError, decoder_names, expand
from hawkspec.cli.validate import validate_eval
from hawkspec.data.prompts import Prompt, PromptSpec, load_prompt_set
from hawkspec.data.render import save_grid
from hawkspec.decoding.acceptance import DECISION_SEMANTICS
from hawkspec.decoding.build import build_decoder
from hawkspec.decoding.sampling import SamplingConfig
from hawkspec.decoding.static import ExecutionMode
from hawkspec.determinism import pin_threads, thread_settings
from hawkspec.evaluation import Evaluation, noise_floor_seed, score_quality
from hawkspec.metrics.quality import QUALITY_KEYS, QualitySettings
from hawkspec.metrics.sweep import built_of

log = logging.getLogger("hawkspec")


def prompt_spec(cfg: DictConfig) -> PromptSpec:
    """``eval.prompts`` with ``eval.num_prompts`` as its count; the older ``eval.prompts_file`` is a ``txt`` set."""
    e = cfg.eval
    spec = OmegaConf.to_container(e.get("prompts") or {}, resolve=True)
    if e.get("prompts_file"):
        if spec.get("source", "procedural") != "procedural":
            raise ValueError("set either eval.prompts_file or eval.prompts.source/path, not both")
        spec.update(source="txt", path=e.prompts_file)
    spec.setdefault("seed", e.get("prompt_seed", 1234))
    if spec.get("seed") is None:
        spec["seed"] = e.get("prompt_seed", 1234)
    known = set(PromptSpec.__dataclass_fields__) - {"num"}
    unknown = set(spec) - known
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in eval.prompts: expected {sorted(known)}")
    return PromptSpec(**spec, num=int(e.num_prompts)).validate()


def eval_prompt_set(cfg: DictConfig) -> list[Prompt]:
    """The prompts of ``eval.prompts`` (:mod:`hawkspec.data.prompts`): procedural captions, or a seeded random
    subset of ``eval.num_prompts`` from a COCO / Flickr30K / PartiPrompts / txt / jsonl file."""
    return load_prompt_set(prompt_spec(cfg))


def prompt_shortfall(cfg: DictConfig, prompt_set: list[Prompt]) -> dict | None:
    """When the prompt file (after its split / category filter) holds fewer prompts than ``eval.num_prompts``:
    how many were asked and evaluated, the file and its key, and a one-line note (None: all were found)."""
    asked = int(cfg.eval.num_prompts)
    if len(prompt_set) >= asked:
        return None
    spec = prompt_spec(cfg)
    key = "eval.prompts_file" if cfg.eval.get("prompts_file") else "eval.prompts.path"
    kept = "".join(f", {k} {v}" for k, v in (("split", spec.split), ("category", spec.category)) if v)
    note = (f"{len(prompt_set)} prompts evaluated, not the {asked} asked: eval.num_prompts={asked} but {key}="
            f"{spec.path} holds only {len(prompt_set)} ({spec.source}{kept})")
    return {"requested": asked, "evaluated": len(prompt_set), "key": key, "path": spec.path, "note": note}


def eval_prompts(cfg: DictConfig) -> list[str]:
    """The texts of :func:`eval_prompt_set`."""
    return [p.text for p in eval_prompt_set(cfg)]


def resources(device) -> dict:
    """Peak memory of this process so far: CPU resident set size and, on CUDA, the allocator's maximum."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"peak_rss_mib": rss / (1024 * 1024 if sys.platform == "darwin" else 1024)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    else:
        out["cuda_max_allocated_mib"] = None
    return out


def decoder_settings(cfg: DictConfig, name: str) -> dict:
    """Decoder ``name``'s resolved node, as results.json records it (``config`` of its row)."""
    return OmegaConf.to_container(decoder_config(cfg, name), resolve=True)


def flat(node, prefix: str = "") -> dict:
    """``{"tree.budget": 8, ...}`` from a nested dict."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for k, v in node.items():
        out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differing_settings(rows: list[dict]) -> list[tuple[str, dict]]:
    """The settings in which the decoders of a run differ: ``(key, {decoder: value})`` for every key at least two
    non-AR rows hold, with not all of them equal (a key only one decoder has is its own, not a difference)."""
    flats = {r["decoder"]: flat(r["config"]) for r in rows
             if isinstance(r.get("config"), dict) and r["config"].get("proposer") is not None}
    keys = sorted({k for f in flats.values() for k in f if not k.endswith("_target_")})  # what, not how
    out = []
    for k in keys:
        held = {name: f[k] for name, f in flats.items() if k in f}
        if len(held) >= 2 and len({repr(v) for v in held.values()}) > 1:
            out.append((k, held))
    return out


def settings_note(rows: list[dict]) -> str:
    """results.md's list, under the table, of the settings in which the rows differ (every row's full settings:
    results.json, ``config``)."""
    diff = differing_settings(rows)
    if not diff:
        return ""
    lines = ["Settings in which the decoders differ (each row's resolved settings: results.json `config`):", ""]
    for key, held in diff:
        lines.append(f"- `{key}`: " + ", ".join(f"{n} {v}" for n, v in held.items()))
    return "\n".join(lines) + "\n"


def expand_argv() -> None:
    """``sys.argv`` with the short decoder spellings expanded; a spelling that cannot be is refused (exit 2)."""
    import sys

    try:
        sys.argv[1:] = expand(sys.argv[1:], CONF_DIR)
    except OverrideError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def decoder_config(cfg: DictConfig, name: str) -> DictConfig:
    """The node of decoder ``name``: ``eval.decoders.<name>`` (AR's preset when the run does not list AR)."""
    nodes = cfg.eval.get("decoders") or {}
    if name in nodes:
        return nodes[name]
    if name != "ar":
        raise ValueError(f"decoder {name!r} is not in eval.decoders ({list(nodes)})")
    return OmegaConf.create({"proposer": None})


def accept_heatmap(path: Path, maps: torch.Tensor, title: str) -> None:
    """Mean per-position acceptance (rows x cols) as a PNG heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3.6))
    im = ax.imshow(maps.float().mean(0).numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("column"), ax.set_ylabel("row")
    fig.colorbar(im, ax=ax, label="P(accepted from a draft)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SPEED_COLUMNS = ["decoder", "lossless", "acceptance_length", "forwards_per_image", "step_compression",
                 "seconds_per_image", "speedup"]
ACCOUNTING_COLUMNS = ["seconds_per_forward", "forward_share", "efficiency"]  # eval.step_accounting=true


def table_columns(rows: list[dict]) -> list[str]:
    """The speed columns, ``pass_spread`` beside the speedup when passes were timed (a one-process run), step
    accounting when it ran, then the quality figures present in any row."""
    speed = list(SPEED_COLUMNS)
    if any("pass_spread" in r for r in rows):
        speed.insert(speed.index("speedup") + 1, "pass_spread")
    accounting = [k for k in ACCOUNTING_COLUMNS if any(r.get(k) is not None for r in rows)]
    return speed + accounting + [k for k in QUALITY_KEYS if any(r.get(k) is not None for r in rows)]


def table_cell(column: str, value) -> str:
    """One cell of results.md: floats to 3 decimals, ``pass_spread`` as a percentage, None as ``n/a``."""
    if value is None:
        return "n/a"
    if column == "pass_spread":
        return f"{value:.1%}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict], quality: dict | None = None) -> str:
    """The results table; with ``quality``, FID is labelled with its feature space and the noise floor follows."""
    cols = table_columns(rows)
    head = [f"fid ({quality['fid_features']})" if c == "fid" and quality else c for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(table_cell(c, r.get(c)) for c in cols) + " |" for r in rows]
    if quality:
        ref = quality["reference"]
        lines += ["", f"Quality over {rows[0].get('quality_images')} images per decoder; FID features: "
                  f"`{quality['fid_features']}` against {ref['num_images']} real images ({ref['source']}"
                  + (f", seed {ref['seed']}" if "seed" in ref else "") + ")."]
        floor = quality.get("noise_floor")
        if floor:
            parts = [f"{k} ±{floor['delta'][k]:.3f}" for k in QUALITY_KEYS if k in floor["delta"]]
            lines += [f"Noise floor — AR with seed {floor['seed']} instead of {floor['base_seed']}, same prompts and "
                      f"size: {', '.join(parts)}; FID(AR, AR') = {floor['fid_ar_vs_ar']:.3f}. A decoder's difference "
                      "from AR smaller than this is sampling noise."]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, rows: list[dict]) -> None:
    """One line per decoder with every scalar of its row (always written, whatever the loggers)."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if v is None or isinstance(v, (int, float, str))))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def quality_settings(cfg: DictConfig, num_images: int) -> QualitySettings | None:
    """``eval.quality`` checked before anything heavy runs; None when quality is off."""
    q = cfg.eval.get("quality")
    if not q or not q.get("enabled", False):
        return None
    known = set(QualitySettings.__dataclass_fields__) | {"noise_floor_seed"}
    unknown = set(q) - known
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in eval.quality: expected {sorted(known)}")
    if q.get("noise_floor") and q.get("noise_floor_seed") is not None and int(q.noise_floor_seed) == cfg.seed:
        raise ValueError(f"eval.quality.noise_floor_seed={q.noise_floor_seed} equals seed: the noise floor needs "
                         "another seed (null: seed + 1)")
    kw = {k: v for k, v in OmegaConf.to_container(q, resolve=True).items() if k != "noise_floor_seed"}
    return QualitySettings(**kw).validate(num_images)


def log_results(cfg: DictConfig, results: dict) -> None:
    """Send the run to every configured logger under stable names.

    Metrics: ``eval/<decoder>/<metric>`` (every scalar of a row) and ``eval/noise_floor/<metric>``; the config as
    hyperparameters; with W&B, also the run summary, the results table (``eval/results``), the image grids
    (``eval/grid/<decoder>``) and the acceptance heatmaps (``eval/accept_map/<decoder>``).
    """
    rows = results["rows"]
    metrics = {f"eval/{r['decoder']}/{k}": float(v) for r in rows for k, v in r.items() if isinstance(v, (int, float))}
    floor = (results.get("quality") or {}).get("noise_floor")
    if floor:
        metrics.update({f"eval/noise_floor/{k}": float(v) for k, v in floor["delta"].items()})
        metrics["eval/noise_floor/fid_ar_vs_ar"] = float(floor["fid_ar_vs_ar"])
    for lg in instantiate_loggers(cfg.get("logger")):
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        lg.log_metrics(metrics)
        if hasattr(lg, "log_table"):  # W&B
            cols = table_columns(rows) + (["fid_features"] if results.get("quality") else [])
            lg.log_table("eval/results", columns=cols, data=[[r.get(c) for c in cols] for r in rows])
            for row in rows:
                if row.get("grid"):  # None when the backbone cannot decode images
                    lg.log_image(f"eval/grid/{row['decoder']}", [row["grid"]])
                if row.get("accept_map"):
                    lg.log_image(f"eval/accept_map/{row['decoder']}", [row["accept_map"]])
            summary = {**metrics, "backbone": results["backbone"], "num_prompts": results["num_prompts"],
                       "device": results["device"]}
            if results.get("quality"):
                summary["fid_features"] = results["quality"]["fid_features"]
            lg.experiment.summary.update(summary)
        lg.finalize("success")


@task
def run(cfg: DictConfig) -> dict:
    validate_eval(cfg)  # every path and count, before any model is loaded or timed
    with on_sigterm(lambda: resume_hint(cfg)):  # exit 143 with what is kept, as hawkspec-train
        return evaluate(cfg)


def resume_hint(cfg: DictConfig) -> str:
    """What a SIGTERM'd evaluation keeps and how to go on (``eval.store``: per batch; else nothing but the speed
    results when they were already written)."""
    e, out_dir = cfg.eval, Path(cfg.paths.output_dir)
    if e.get("store"):
        if e.get("merge") is True:
            return (f"the merge stopped; eval.store={e.store} is untouched: rerun the same command to merge again")
        return (f"every batch all decoders finished is kept in eval.store={e.store} (images and records); rerun the "
                "same command (same eval.store, eval.shard.index/count and prompts) to resume: finished batches are "
                "skipped, the unfinished one is decoded again")
    kept = "nothing is kept"
    results = out_dir / "results.json"
    if results.is_file() and "quality_pending" in results.read_text():
        kept = (f"{results} keeps the speed results of every decoder (timed); the quality figures were not scored "
                "(quality_pending)")
    return (f"{kept}; an unsharded evaluation times every decoder in one process and cannot resume: rerun the "
            "command to start over, or set eval.store=FOLDER (sharded evaluation) to make it resumable per batch")


def evaluate(cfg: DictConfig) -> dict:
    """The body of :func:`run`, once the config is validated: the prompts, the backbone and the decoders, then a
    one-process run (:func:`evaluate_here`) or a shard of a sharded one (:func:`decode_shard`, :func:`merge_store`)."""
    e = cfg.eval
    names = decoder_names(cfg)  # AR first when the run does not list it: speedups are against AR in this run
    L.seed_everything(cfg.seed, workers=True)
    pin_threads(e.get("threads"))  # every parallel region on exactly this many threads, however loaded the machine
    prompt_set = eval_prompt_set(cfg)
    shortfall = prompt_shortfall(cfg, prompt_set)
    if shortfall:  # said here, in results.json (prompt_shortfall) and at the head of results.md
        log.warning("%s", shortfall["note"])
    quality = quality_settings(cfg, len(prompt_set))
    if e.get("store") and e.get("merge", "auto") is True:  # sharded, merge only: no model is loaded
        return merge_store(cfg, names, prompt_set, quality, shortfall)
    if not e.get("store") and (e.get("merge") is True or int((e.get("shard") or {}).get("count", 1)) > 1):
        raise ValueError("sharded evaluation needs eval.store: a folder every shard (and the merge) can reach")
    backbone: Backbone = instantiate(cfg.backbone, "backbone").to(cfg.device).eval()
    undecoded_why = undecodable(backbone)
    if undecoded_why:
        quality = None
    decoders, skipped = build_decoders(cfg, backbone, names)
    if not e.get("store"):
        return evaluate_here(cfg, backbone, decoders, prompt_set, quality,
                             {"skipped_decoders": skipped, "prompt_shortfall": shortfall}, undecoded_why)
    decode_shard(cfg, backbone, decoders, prompt_set, quality)
    if e.get("merge", "auto") == "auto" and int(e.shard.count) == 1:
        return merge_store(cfg, names, prompt_set, quality, shortfall)
    return {"shard": int(e.shard.index), "shards": int(e.shard.count), "store": str(e.store)}


def undecodable(backbone: Backbone) -> str | None:
    """Why the backbone's codes cannot be decoded to images (said in the log), or None when they can."""
    decodable, why = backbone.can_decode()
    if decodable:
        return None
    log.warning("images will not be decoded: %s; code grids are saved (codes_<decoder>.pt / .npy) and the "
                "image-quality metrics are skipped", why)  # e.g. Lumina-mGPT without backbone.vqgan_path
    return why


def build_decoders(cfg: DictConfig, backbone: Backbone, names: list[str]) -> tuple[dict, dict]:
    """Every decoder of the run, bound to ``backbone``; with ``eval.missing_drafter=skip`` (``decoders=all``), those
    whose drafter is not trained here are skipped, loudly: ``(decoders, {skipped name: why})``. All are built in
    the run's one execution mode (``eval.compile``, ``eval.cuda_graphs``), AR included."""
    sampling = SamplingConfig(**cfg.sampling).validate(backbone.num_codes)
    mode = ExecutionMode.from_config(cfg.eval)
    decoders, skipped = {}, {}
    for name in names:
        log.info("Instantiating decoder %s", name)
        try:
            decoders[name] = build_decoder(decoder_config(cfg, name), backbone, sampling, name=name,
                                           key=f"eval.decoders.{name}", mode=mode)
        except FileNotFoundError as err:
            if cfg.eval.get("missing_drafter", "error") != "skip":
                raise
            log.warning("eval.missing_drafter=skip: skipping %s (%s)", name, err)
            skipped[name] = str(err)
    return decoders, skipped


def evaluation_of(cfg: DictConfig, backbone: Backbone, decoders: dict, prompts: list[str]) -> Evaluation:
    """The run's :class:`~hawkspec.evaluation.Evaluation` (``eval.batch_size``, ``eval.repeats``, the warm-up)."""
    e = cfg.eval
    return Evaluation(backbone, decoders, prompts, seed=cfg.seed, batch_size=e.batch_size, device=cfg.device,
                      repeats=e.repeats, warmup_batches=warmup_batches(e))


def evaluate_here(cfg: DictConfig, backbone: Backbone, decoders: dict, prompt_set: list[Prompt],
                  quality: QualitySettings | None, notes: dict, undecoded_why: str | None) -> dict:
    """A one-process run: every decoder timed against AR, taking turns per batch; step accounting when
    ``eval.step_accounting``; grids, heatmaps and codes written; then the quality scored (the speed results are on
    disk first). ``notes``: results.json keys said only when set (skipped decoders, a prompt shortfall)."""
    e, out_dir = cfg.eval, Path(cfg.paths.output_dir)
    prompts = [p.text for p in prompt_set]
    ev = evaluation_of(cfg, backbone, decoders, prompts)
    timing = ev.time()
    accounting = None
    if e.get("step_accounting"):  # an untimed pass of its own: the clock synchronises every forward
        accounting = ev.account()
    rows = ev.rows(timing.outputs, timing, accounting)
    images_of = write_outputs(cfg, backbone, decoders, rows, timing.outputs, prompts, undecoded_why is None)
    results = {**run_description(cfg, backbone, rows, len(prompts)), **{k: v for k, v in notes.items() if v}}
    if undecoded_why:
        results["images_decoded"] = False
        results["quality_skipped"] = f"images were not decoded: {undecoded_why}"
        print(f"Images were NOT decoded ({undecoded_why}): code grids saved as codes_<decoder>.pt / .npy in "
              f"{out_dir}; image-quality metrics skipped.")
    results["prompts"] = prompt_description(cfg, prompt_set)
    results["speed_note"] = ("Speed measured within this one process on one device; decoders take turns per batch, "
                             f"seconds = median of {e.repeats} timed passes; backbone forwards "
                             + speed_mode(ExecutionMode.from_config(e)))
    results["timing"] = timing.describe()
    if quality is not None:
        floor = configured_floor_seed(cfg)
        again = lambda: backbone.decode_codes(torch.cat([o.codes for o in ev.decode("ar", seed=floor)]))  # noqa: E731
        results["quality"] = scored_after_speed(cfg, out_dir, results, lambda: score_quality(
            quality, cfg.device, rows, images_of, prompts, base_seed=cfg.seed, floor_seed=floor, ar_again=again))
    results["resources"] = resources(cfg.device)
    return write_results(cfg, out_dir, results)


def run_description(cfg: DictConfig, backbone: Backbone, rows: list[dict], num_prompts: int) -> dict:
    """results.json's head of a one-process run: backbone, prompts, device, batching, execution mode, target, seed,
    the rows, the decision semantics and the thread settings."""
    e, mode = cfg.eval, ExecutionMode.from_config(cfg.eval)
    return {"backbone": backbone.name, "revision": backbone.revision, "num_prompts": num_prompts,
            "device": str(cfg.device) if cfg.device != "cpu" else f"cpu ({torch.get_num_threads()} threads)",
            "batch_size": e.batch_size, "repeats": e.repeats, "compile": mode.compile,
            "cuda_graphs": mode.cuda_graphs,
            "sampling": OmegaConf.to_container(cfg.sampling), "seed": cfg.seed, "rows": rows,
            "decision_semantics": dict(DECISION_SEMANTICS), "threads": thread_settings()}


def write_outputs(cfg: DictConfig, backbone: Backbone, decoders: dict, rows: list[dict], outputs: dict,
                  prompts: list[str], decodable: bool) -> dict[str, torch.Tensor]:
    """Each row's settings (``config``, ``built``), image grid and acceptance heatmap; every decoder's codes as
    ``codes_<decoder>.pt`` / ``.npy``. Returns decoder -> its images (N, 3, H, W) uint8 when ``decodable``."""
    e, out_dir = cfg.eval, Path(cfg.paths.output_dir)
    images_of = {}
    for row in rows:
        name, outs = row["decoder"], outputs[row["decoder"]]
        row.update(config=decoder_settings(cfg, name), built=decoders[name].describe(), grid=None)
        codes = torch.cat([o.codes for o in outs])
        if decodable:
            images_of[name] = backbone.decode_codes(codes)  # scored later (quality), once every decoder is timed
            if e.grid_images > 0:  # eval.grid_images=0: no grid
                row["grid"] = str(save_grid(out_dir / f"grid_{name}.png", list(images_of[name][: e.grid_images]),
                                            prompts[: e.grid_images]))
        maps = [o.accept_map for o in outs if o.accept_map is not None]
        if maps:
            accept_heatmap(out_dir / f"accept_map_{name}.png", torch.cat(maps), f"{name}: acceptance by position")
            row["accept_map"] = str(out_dir / f"accept_map_{name}.png")
        torch.save(codes, out_dir / f"codes_{name}.pt")
        np.save(out_dir / f"codes_{name}.npy", codes.cpu().numpy())
    return images_of


def scored_after_speed(cfg: DictConfig, out_dir: Path, results: dict, score) -> dict:
    """``score()`` (the quality figures) once the speed results are on disk: results.json / .md / .csv are written
    first with ``quality_pending``, so a failure or a kill while scoring never throws away the timed work; a
    failure is recorded as ``quality_error`` and raised."""
    results["resources"] = resources(cfg.device)
    results["quality_pending"] = "quality not scored yet: these are the speed results, written before scoring"
    write_results(cfg, out_dir, results, final=False)
    try:
        quality = score()
    except Exception as err:
        del results["quality_pending"]
        results["quality_error"] = f"scoring failed after every decoder was timed: {type(err).__name__}: {err}"
        write_results(cfg, out_dir, results, final=False)
        log.error("image quality failed; the speed results are in %s (quality_error)", out_dir / "results.json")
        raise
    del results["quality_pending"]
    return quality


def warmup_batches(e: DictConfig) -> int:
    """Untimed batches per decoder: ``eval.warmup_batches``, at least 2 when whole steps are compiled or recorded
    (a batch's first step is its own variant, compiled or recorded on the second batch), so no timed pass
    compiles."""
    n = int(e.warmup_batches)
    return max(n, 2) if ExecutionMode.from_config(e).static else n


def speed_mode(mode: ExecutionMode) -> str:
    """How AR and the decoders ran, for results.json's speed note."""
    what = {"none": "eager", "forward": "backbone forwards compiled (torch.compile)",
            "step": "whole decoding steps compiled (torch.compile, one graph per step)"}[mode.compile]
    return what + (", replayed from CUDA graphs" if mode.cuda_graphs else "") + ", for AR and every decoder alike."


def prompt_description(cfg: DictConfig, prompt_set: list[Prompt]) -> dict:
    """What results.json records about the prompts: source, file, subset seed, and the chosen indices."""
    spec = prompt_spec(cfg)
    return {"source": spec.source, "path": spec.path, "num": len(prompt_set), "requested": int(cfg.eval.num_prompts),
            "seed": spec.seed,
            "caption": spec.caption if spec.source in ("coco", "flickr30k") else None, "split": spec.split,
            "category": spec.category, "indices": [p.index for p in prompt_set]}


def semantics_line(results: dict) -> str:
    """What the rows' decisions rest on: the target's precision, then each rule with its official-vs-ours options."""
    fixed = results.get("decision_semantics") or {}
    parts = [f"CFG mixed in {fixed.get('cfg_precision', 'the model dtype')}"]
    for row in results["rows"]:
        built = built_of(row)
        rows = built.get("rows_in_flight")
        if rows:  # ZipAR: a schedule, every token sampled and committed without a test
            how = ("sampled and committed, no test" if rows["method"] == "zipar" else
                   f"open at {rows.get('open_at')}, reuse {rows.get('reuse')}; lower rows residual-free")
            parts.append(f"`{row['decoder']}`: {rows['method']} ({rows['schedule']} schedule, window {rows['window']}; "
                         f"{how})")
        acc = built.get("acceptance")
        if isinstance(acc, dict) and acc.get("name") not in ("exact", "greedy"):
            opts = ", ".join(f"{k}={v}" for k, v in acc.items() if k not in ("name", "lossless"))
            parts.append(f"`{row['decoder']}`: {acc.get('name')} ({opts})")
    if fixed:
        parts.append(f"GSD ties by {fixed['gsd_tie_order']}; LANTERN zeroes when a neighbour "
                     f"{fixed['lantern_zeroing']} fits the bound (both official)")
    return "Decision semantics (README \"Decoding, precisely\"): " + "; ".join(parts) + "."


def timing_note(results: dict) -> str:
    """results.md's lines, right under the table, of what makes its speedups doubtful (results.json
    ``timing.warnings``: passes that spread, a single pass, a busy machine); empty when nothing does."""
    warnings = (results.get("timing") or {}).get("warnings") or []
    return "".join(f"\n**Timing warning**: {w}.\n" for w in warnings)


def write_results(cfg: DictConfig, out_dir: Path, results: dict, final: bool = True) -> dict:
    """results.json / .csv / .md and (``final``) the printed table and the loggers."""
    rows = results["rows"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_csv(out_dir / "results.csv", rows)
    table = markdown_table(rows, results.get("quality")) + timing_note(results) + f"\n{results['speed_note']}\n"
    table += "\n" + semantics_line(results) + "\n"
    note = settings_note(rows)
    if note:
        table += "\n" + note
    if results.get("prompt_shortfall"):  # at the head: the table is over fewer prompts than asked
        table = f"**Prompts: {results['prompt_shortfall']['note']}.**\n\n" + table
    for key in ("quality_pending", "quality_error"):
        if results.get(key):
            table += f"\n**{key}**: {results[key]}\n"
    if results.get("skipped_decoders"):
        table += f"\nSkipped (no trained drafter here): {', '.join(results['skipped_decoders'])}.\n"
    (out_dir / "results.md").write_text(table)
    if final:
        print(table)
        log_results(cfg, results)
    return results


def decode_shard(cfg: DictConfig, backbone: Backbone, decoders: dict, prompt_set: list[Prompt],
                 quality: QualitySettings | None) -> dict:
    """This shard's share of the prompts into ``eval.store`` (:mod:`hawkspec.cli.eval_shards`); finished batches
    are skipped, so a rerun resumes. AR's noise-floor reseed is decoded too (untimed) when quality wants it."""
    e = cfg.eval
    store = Path(e.store)
    extra = {}
    if quality is not None and quality.noise_floor:
        extra["ar_reseed"] = (decoders["ar"], configured_floor_seed(cfg))
    meta = {"backbone": backbone.name, "revision": backbone.revision, "ar_forwards": backbone.grid.length}
    report = eval_shards.run_shard(
        store, prompt_set, decoders, backbone.decode_codes, seed=cfg.seed, batch_size=e.batch_size,
        index=int(e.shard.index), count=int(e.shard.count), device=str(cfg.device),
        warmup_batches=warmup_batches(e), max_batches=e.shard.get("max_batches"), extra=extra,
        meta=meta)
    report["resources"] = resources(cfg.device)
    eval_shards.write_shard_report(store, report)
    return report


def configured_floor_seed(cfg: DictConfig) -> int:
    """AR's noise-floor seed of this run (:func:`hawkspec.evaluation.noise_floor_seed` of
    ``eval.quality.noise_floor_seed``)."""
    return noise_floor_seed(cfg.seed, cfg.eval.quality.get("noise_floor_seed"))


def merge_store(cfg: DictConfig, names: list[str], prompt_set: list[Prompt], quality: QualitySettings | None,
                shortfall: dict | None = None) -> dict:
    """The table over the union of the shards in ``eval.store``: speed counters and quality over every image."""
    e = cfg.eval
    store, out_dir = Path(e.store), Path(cfg.paths.output_dir)
    prompts = [p.text for p in prompt_set]
    first = eval_shards.load_records(store, "ar", prompt_set[:1])[0]
    rows, by_shard = eval_shards.merged_rows(store, names, prompt_set, int(first["ar_forwards"]))
    reports = eval_shards.shard_reports(store)
    for k, v in by_shard.items():
        v["calls"] = reports.get(k, [])
    images = {name: eval_shards.load_images(store, name, prompt_set) for name in names}
    for row in rows:
        name = row["decoder"]
        row["config"] = decoder_settings(cfg, name)  # the merge's own settings: run it with the shards' overrides
        row["grid"] = None if e.grid_images <= 0 else str(save_grid(
            out_dir / f"grid_{name}.png", list(images[name][: e.grid_images]), prompts[: e.grid_images]))
    results = {"backbone": first["backbone"], "revision": first["revision"], "num_prompts": len(prompts),
               "device": sorted({v["device"] for v in by_shard.values()}), "batch_size": e.batch_size, "repeats": 1,
               "sampling": OmegaConf.to_container(cfg.sampling), "seed": cfg.seed, "rows": rows,
               "decision_semantics": dict(DECISION_SEMANTICS),
               "sharding": {"store": str(store), "shards": sorted(by_shard), "speed_by_shard": by_shard}}
    if shortfall:
        results["prompt_shortfall"] = shortfall
    if quality is not None:
        results["quality"] = score_quality(
            quality, cfg.device, rows, images, prompts, base_seed=cfg.seed, floor_seed=configured_floor_seed(cfg),
            ar_again=lambda: eval_shards.load_images(store, "ar_reseed", prompt_set))
    results["prompts"] = prompt_description(cfg, prompt_set)
    results["speed_note"] = eval_shards.SPEED_NOTE
    results["timing"] = eval_shards.merged_timing(rows, by_shard)
    results["resources"] = {"merge": resources(cfg.device),
                            "shards": {k: (v["calls"][-1]["resources"] if v["calls"] else None) for k, v in by_shard.items()}}
    return write_results(cfg, out_dir, results)


@hydra.main(version_base="1.3", config_path=CONF_PATH, config_name="eval")
def hydra_main(cfg: DictConfig) -> None:
    run(cfg)


def main() -> None:
    """``hawkspec-eval``: the short decoder spellings expanded (:mod:`hawkspec.cli.overrides`), then Hydra."""
    expand_argv()
    hydra_main()


if __name__ == "__main__":
    main()
