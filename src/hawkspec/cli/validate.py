"""Start-up checks of every entry point: each path, file and option a run will need, before any model is loaded,
timed or trained. Every error names the config key to change.

``validate_<entry point>(cfg)`` is the first call of the entry point's ``run``; the checks that need the loaded
model (e.g. ``HeadsConfig.validate(rows)``) stay where the model is.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from hawkspec.io import check_destination, check_writable, read_json

CACHE_MODES = ("write", "verify")


# ----------------------------------------------------------------------------------------------- primitives
def get(cfg: DictConfig, key: str, default=None):
    """``cfg`` at dotted ``key`` (None / ``default`` when missing)."""
    value = OmegaConf.select(cfg, key, default=default)
    return default if value is None else value


def check_int(cfg: DictConfig, key: str, minimum: int = 1, optional: bool = False) -> int | None:
    """The integer at ``key``, which must be ``>= minimum`` (``optional``: or null)."""
    value = OmegaConf.select(cfg, key)
    if value is None:
        if optional:
            return None
        raise ValueError(f"`{key}` must be set (an integer >= {minimum})")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{key}` must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"`{key}` must be >= {minimum}, got {value}")
    return value


def check_choice(cfg: DictConfig, key: str, choices) -> str:
    value = OmegaConf.select(cfg, key)
    if value not in choices:
        raise ValueError(f"`{key}` must be one of {list(choices)}, got {value!r}")
    return value


def check_file(cfg: DictConfig, key: str, hint: str = "") -> Path | None:
    """The file at ``key`` (null allowed), which must exist."""
    value = get(cfg, key)
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"`{key}`={value} is not a file{': ' + hint if hint else ''}")
    return path


def check_folder(cfg: DictConfig, key: str, needs: tuple[str, ...] = (), hint: str = "") -> Path | None:
    """The folder at ``key`` (null allowed), which must exist and hold the files ``needs``."""
    value = get(cfg, key)
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"`{key}`={value} is not a folder{': ' + hint if hint else ''}")
    missing = [n for n in needs if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"`{key}`={value} lacks {missing}{': ' + hint if hint else ''}")
    return path


def check_output_dir(cfg: DictConfig) -> None:
    """The run folder (``paths.output_dir``) must be writable."""
    out = get(cfg, "paths.output_dir")
    if out is not None:
        check_writable(out, "hydra.run.dir (paths.output_dir)")


def check_export_dir(cfg: DictConfig, own: str) -> None:
    """``export_dir`` (when set) must be a folder hawkspec may replace, and must not collide with the run folder:
    neither the run folder, nor a folder holding it, nor the run's own copy ``<run folder>/<own>`` (or inside it)."""
    export = get(cfg, "export_dir")
    if export is None:
        return
    run = get(cfg, "paths.output_dir")
    if run is not None:
        e, r = Path(export).expanduser().absolute(), Path(run).expanduser().absolute()
        if e == r or e in r.parents:
            raise ValueError(f"export_dir={export} is or holds this run's folder (hydra.run.dir={run}): publishing "
                             f"there would replace the run's own files; choose an `export_dir` outside the run folder")
        if e == r / own or r / own in e.parents:
            raise ValueError(f"export_dir={export} is where this run keeps its own copy ({r / own}): the run writes "
                             f"it itself; choose another `export_dir`, or leave it unset and use {r / own}")
    check_destination(export, "export_dir", bool(get(cfg, "overwrite", False)))


# ----------------------------------------------------------------------------------------------- shared groups
def check_backbone(cfg: DictConfig) -> None:
    """A configured tiny-backbone folder must hold its files (other backbones check themselves on load)."""
    if str(get(cfg, "backbone._target_", "")).startswith("hawkspec.backbones.tiny."):
        folder = check_folder(cfg, "backbone.path", ("config.json", "model.safetensors", "vq.safetensors"),
                              "a folder written by `hawkspec-pretrain` (null: the shipped weights)")
        if folder is not None:
            check_json(folder, ("config.json", "hawkspec.json"), "backbone.path")


def check_json(folder: Path, names: tuple[str, ...], key: str) -> None:
    """Every JSON file ``names`` in ``folder`` parses (a corrupt one is named, with the key that points there)."""
    for name in names:
        if (folder / name).is_file():
            read_json(folder / name, f"`{key}`: the file")


def backbone_num_codes(cfg: DictConfig) -> int | None:
    """The codebook size of the configured tiny backbone, read from its files without loading it (None: unknown)."""
    if not str(get(cfg, "backbone._target_", "")).startswith("hawkspec.backbones.tiny."):
        return None
    from hawkspec.resources import package_dir

    folder = Path(get(cfg, "backbone.path") or package_dir() / "assets" / "tiny")
    try:
        return int(json.loads((folder / "hawkspec.json").read_text())["num_codes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_sampling(cfg: DictConfig, num_codes: int | None) -> None:
    top_k = get(cfg, "sampling.top_k")
    if top_k is not None and num_codes is not None and isinstance(top_k, int) and top_k > num_codes:
        raise ValueError(f"`sampling.top_k`={top_k} exceeds the codebook size {num_codes}")


def check_tree(cfg: DictConfig, key: str, num_codes: int | None) -> None:
    """A decoder's candidate tree (``<key>.tree``): counts >= 1, ranks within the codebook."""
    tree = get(cfg, f"{key}.tree")
    if not tree:
        return
    for name in ("budget", "max_depth", "max_rank", "max_nodes"):
        if OmegaConf.select(cfg, f"{key}.tree.{name}") is not None:
            check_int(cfg, f"{key}.tree.{name}", 1)
    max_rank = get(cfg, f"{key}.tree.max_rank")
    if num_codes is not None and max_rank is not None and max_rank > num_codes:
        raise ValueError(f"`{key}.tree.max_rank`={max_rank} exceeds the codebook size {num_codes}")
    paths = get(cfg, f"{key}.tree.paths")
    if paths is not None:
        for p in paths:
            if not len(p) or any(not isinstance(r, int) or r < 0 or (num_codes and r >= num_codes) for r in p):
                raise ValueError(f"`{key}.tree.paths` holds {list(p)}: every path needs ranks in [0, "
                                 f"{num_codes or 'codebook size'})")


def check_device(cfg: DictConfig, key: str = "device") -> None:
    """The torch device at ``key`` (null allowed) parses and exists on this machine: ``device=cuda`` on a CPU-only
    torch is refused here, not by an ``AssertionError`` once the model is loaded."""
    value = get(cfg, key)
    if value is None:
        return
    import torch

    try:
        dev = torch.device(str(value))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"`{key}`={value} is not a torch device ({e}); e.g. {key}=cpu or {key}=cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ValueError(f"`{key}`={value}, but torch {torch.__version__} ({build}) sees no CUDA device here: "
                             f"set {key}=cpu, or run on a machine with a GPU and a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"`{key}`={value}, but this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`{key}`={value}, but torch sees no MPS device here: set {key}=cpu")


def check_accelerator(cfg: DictConfig, key: str = "trainer.accelerator") -> None:
    """A Lightning ``gpu`` / ``cuda`` / ``mps`` accelerator must exist here (``auto`` and ``cpu`` always do)."""
    value = get(cfg, key)
    if value is None or not isinstance(value, str):
        return
    import torch

    if value in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"`{key}`={value}, but torch {torch.__version__} sees no CUDA device here: use "
                         f"trainer=cpu ({key}=cpu), or run on a machine with a GPU and a CUDA build of torch")
    if value == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`{key}`={value}, but torch sees no MPS device here: use trainer=cpu ({key}=cpu)")


def check_devices(cfg: DictConfig) -> None:
    """``device``, the backbone's own ``backbone.device`` and ``trainer.accelerator``, where the config has them."""
    check_device(cfg, "device")
    check_device(cfg, "backbone.device")
    check_accelerator(cfg)


def check_text_file(cfg: DictConfig, key: str, what: str = "a UTF-8 text file") -> None:
    """The file at ``key`` (null allowed, or missing: :func:`check_file` says so) decodes as UTF-8: a binary or
    otherwise encoded file is named with its key, not left to a bare ``UnicodeDecodeError``."""
    value = get(cfg, key)
    if value is None:
        return
    path = Path(str(value)).expanduser()
    if not path.is_file():
        return
    try:
        with open(path, encoding="utf-8") as f:
            while f.read(1 << 20):
                pass
    except UnicodeDecodeError as e:
        raise ValueError(f"`{key}`={value} is not {what}: {e.reason} at byte {e.start} "
                         "(a binary file, or another encoding: save it as UTF-8)") from None


def draft_fixes(cfg: DictConfig, key: str = "decoder") -> list[str]:
    """What makes the proposer at ``<key>.proposer`` draft deterministic top-k candidates (what a dynamic tree
    ranks), one entry per proposer or draft source that samples its drafts; [] when it drafts top-k (or the
    proposer is not one of hawkspec's, which the decoder then checks itself)."""
    p = f"{key}.proposer"
    target = str(get(cfg, f"{p}._target_", "")).rsplit(".", 1)[-1]
    fixes = []
    if target == "JacobiProposer":
        fixes.append(f"The {target} (decoder `{key.rsplit('.', 1)[-1]}`) only drafts random codes, never "
                     f"top-k ones: set {key}.tree.dynamic=null, or pick a decoder whose proposer drafts top-k "
                     "(medusa, hawk, eagle, hawk_eagle)")
    if target == "EagleProposer" and get(cfg, f"{p}.draft", "topk") == "sample":
        fixes.append(f"{p}.draft=sample: set {p}.draft=topk")
    if target == "SpatialProposer":  # a composed proposer (medusa, hawk, hawk_jacobi, hawk_eagle, ...): its sources
        for name in get(cfg, f"{p}.sources") or {}:
            s = f"{p}.sources.{name}"
            if str(get(cfg, f"{s}._target_", "")).rsplit(".", 1)[-1] in ("JacobiSource", "JacobiProposer"):
                fixes.append(f"source `{name}` ({s}) drafts random Jacobi codes: leave it out of {p}.sources "
                             f"and {p}.order (e.g. proposer hawk instead of hawk_jacobi)")
            elif get(cfg, f"{s}.draft", "topk") == "sample":
                fixes.append(f"{s}.draft=sample: set {s}.draft=topk")
    return fixes


def check_dynamic_tree(cfg: DictConfig, key: str = "decoder") -> None:
    """``<key>.tree.dynamic`` (EAGLE-2's dynamic tree) is an integer >= 2 and the configured proposer drafts
    top-k candidates with scores: a dynamic tree choosing among sampled drafts by their own probability would
    bias them (the decoder refuses that too, but only once the models are loaded)."""
    if OmegaConf.select(cfg, f"{key}.tree.dynamic") is None:
        return
    check_int(cfg, f"{key}.tree.dynamic", 2)
    if get(cfg, f"{key}.proposer") is None:
        raise ValueError(f"`{key}.tree.dynamic` is set, but decoder {key.rsplit('.', 1)[-1]!r} has no "
                         f"proposer (no draft tree): set {key}.tree.dynamic=null")
    fixes = draft_fixes(cfg, key)
    if fixes:
        raise ValueError(f"`{key}.tree.dynamic`={get(cfg, f'{key}.tree.dynamic')} ranks deterministic (top-k) drafts "
                         "by their draft probability; choosing among sampled drafts that way would bias them and the "
                         "exact rule would stop being lossless. " + "; ".join(fixes))


# ----------------------------------------------------------------------------------------------- entry points
def validate_generate(cfg: DictConfig) -> None:
    """``hawkspec-generate``: batch size, grid, prompts file, backbone folder, run folder."""
    check_int(cfg, "batch_size", 1)
    check_int(cfg, "grid.ncols", 1)
    check_int(cfg, "grid.scale", 1)
    check_file(cfg, "prompts_file", "one prompt per line")
    check_text_file(cfg, "prompts_file", "a UTF-8 text file (one prompt per line)")
    check_devices(cfg)
    check_backbone(cfg)
    check_sampling(cfg, backbone_num_codes(cfg))
    check_output_dir(cfg)


def validate_cache(cfg: DictConfig) -> None:
    """``hawkspec-cache``: the mode, counts, the output folder (ours or new), the backbone."""
    mode = check_choice(cfg, "mode", CACHE_MODES)
    if mode == "verify":
        folder = Path(str(get(cfg, "cache.out_dir")))
        if not folder.is_dir():
            raise FileNotFoundError(f"`cache.out_dir`={folder} is not a folder: point it at a `hawkspec-cache` output")
        return
    check_int(cfg, "cache.num_samples", 1)
    check_int(cfg, "cache.val_samples", 0)
    check_int(cfg, "cache.shard_size", 1)
    check_int(cfg, "cache.batch_size", 1)
    check_int(cfg, "cache.topk", 0)
    check_cache_out_dir(cfg)
    check_devices(cfg)
    check_backbone(cfg)
    num_codes = backbone_num_codes(cfg)
    check_sampling(cfg, num_codes)
    if num_codes is not None and cfg.cache.topk > num_codes:
        raise ValueError(f"`cache.topk`={cfg.cache.topk} exceeds the codebook size {num_codes}")


def check_cache_out_dir(cfg: DictConfig) -> None:
    """``cache.out_dir`` may be new, empty, or a cache (``train/plan.json``); not someone else's folder."""
    out = Path(str(cfg.cache.out_dir)).expanduser()
    is_cache = any((out / split / "plan.json").is_file() for split in ("train", "val"))
    if not is_cache:
        check_destination(out, "cache.out_dir", bool(get(cfg, "overwrite", False)))
    check_writable(out, "cache.out_dir")


def validate_train(cfg: DictConfig) -> None:
    """``hawkspec-train``: the cache, batch sizes, epochs, the resume checkpoint, the export folder."""
    shards = get(cfg, "shards_dir")
    if shards is None or OmegaConf.is_missing(cfg, "shards_dir"):
        raise ValueError("`shards_dir` is required: the `cache.out_dir` of a `hawkspec-cache` run")
    train_dir = Path(str(get(cfg, "data.train_dir", f"{shards}/train")))
    if not (train_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"`shards_dir`={shards}: no {train_dir / 'manifest.json'}; point it at the output of "
                                "`hawkspec-cache` (`cache.out_dir`, with train/ inside); an unfinished cache run has "
                                "no manifest yet, rerun it")
    check_int(cfg, "data.batch_size", 1)
    check_int(cfg, "data.num_workers", 0)
    check_int(cfg, "data.samples_per_epoch", 1, optional=True)
    check_int(cfg, "data.shuffle_buffer", 0)
    epochs, steps = get(cfg, "trainer.max_epochs"), get(cfg, "trainer.max_steps", -1)
    if (epochs is None or epochs == -1) and steps == -1:
        raise ValueError("set `trainer.max_epochs` or `trainer.max_steps`: training would never end")
    if epochs is not None and epochs != -1:
        check_int(cfg, "trainer.max_epochs", 1)
    if steps != -1:
        check_int(cfg, "trainer.max_steps", 1)
    check_int(cfg, "checkpoint.every_n_train_steps", 1, optional=True)
    ckpt = get(cfg, "ckpt_path")
    if ckpt is not None and ckpt != "last":
        check_file(cfg, "ckpt_path", "a Lightning checkpoint (`last`: the run folder's own; null: start afresh)")
    check_export_dir(cfg, "heads")
    check_devices(cfg)
    check_backbone(cfg)
    check_output_dir(cfg)


def validate_eval(cfg: DictConfig) -> None:
    """``hawkspec-eval``: counts, prompts file, quality paths (evaluator, reference images, CLIP, Inception), the
    trees of the decoder under study vs the codebook, and the heads of every decoder that needs them."""
    e = "eval"
    check_int(cfg, f"{e}.num_prompts", 1)
    check_int(cfg, f"{e}.batch_size", 1)
    check_int(cfg, f"{e}.repeats", 1)
    check_int(cfg, f"{e}.warmup_batches", 0)
    check_int(cfg, f"{e}.grid_images", 0)
    check_int(cfg, f"{e}.threads", 1, optional=True)
    if get(cfg, f"{e}.compile", None) is not None:
        check_choice(cfg, f"{e}.compile", ("none", "forward", "step"))
    if get(cfg, f"{e}.cuda_graphs", False) and not str(get(cfg, "device", "cpu")).startswith("cuda"):
        raise ValueError(f"{e}.cuda_graphs=true records CUDA graphs: it needs device=cuda "
                         f"(got device={get(cfg, 'device', 'cpu')}); set {e}.cuda_graphs=false")
    check_file(cfg, f"{e}.prompts_file", "one prompt per line")
    check_text_file(cfg, f"{e}.prompts_file", "a UTF-8 text file (one prompt per line)")
    source = get(cfg, f"{e}.prompts.source", "procedural")
    if source != "procedural":
        check_text_file(cfg, f"{e}.prompts.path", f"a UTF-8 {source} prompts file")
    check_devices(cfg)
    check_backbone(cfg)
    num_codes = backbone_num_codes(cfg)
    check_sampling(cfg, num_codes)
    decoders = get(cfg, f"{e}.decoders") or {}
    if not isinstance(decoders, (dict, DictConfig)):
        raise ValueError(f"`{e}.decoders` must be a mapping name -> decoder node (got {decoders!r}): name them with "
                         "'eval.decoders=[ar,hawk]' on the command line or a set, decoders=all (conf/decoders/)")
    for name in ("budget", "max_depth", "max_rank", "max_nodes"):  # the run's tree, named as the user set it
        if OmegaConf.select(cfg, f"tree.{name}") is not None:
            check_int(cfg, f"tree.{name}", 1)
    for name in decoders:
        key = f"{e}.decoders.{name}"
        if get(cfg, f"{key}.proposer") is None:
            continue
        check_tree(cfg, key, num_codes)
        check_dynamic_tree(cfg, key)
        check_decoder_heads(cfg, key)
    if get(cfg, f"{e}.quality.enabled", False):
        check_quality(cfg)
    check_output_dir(cfg)


def check_decoder_heads(cfg: DictConfig, node: str) -> None:
    """The decoder at ``node`` (``eval.decoders.hawk``) finds the draft heads it reads, unless the run skips
    decoders whose drafter is missing (``eval.missing_drafter=skip``, set by ``decoders=all``)."""
    if get(cfg, "eval.missing_drafter", "error") == "skip":
        return
    for key in (f"{node}.heads_path", f"{node}.eagle_path"):  # eagle_path: hawk_eagle's second checkpoint
        if get(cfg, key):
            folder = check_folder(cfg, key, ("heads.safetensors", "heads.json"),
                                  "a folder written by `hawkspec-train` (its export_dir)")
            check_json(folder, ("heads.json",), key)


def check_quality(cfg: DictConfig) -> None:
    """``eval.quality``: the evaluator, reference images, CLIP model and Inception weights exist and are usable."""
    q = "eval.quality"
    check_int(cfg, f"{q}.batch_size", 1)
    evaluator = check_folder(cfg, f"{q}.evaluator", ("evaluator.safetensors", "evaluator.json"),
                             "a folder written by `hawkspec-quality` (null: the shipped evaluator)")
    if evaluator is not None:
        check_json(evaluator, ("evaluator.json",), f"{q}.evaluator")
    check_folder(cfg, f"{q}.clip_model", ("config.json",), "a saved transformers CLIP model")
    check_file(cfg, f"{q}.inception_weights", "torch-fidelity's Inception weights (null: the torch hub cache)")
    ref_dir = check_folder(cfg, f"{q}.reference.image_dir")
    if ref_dir is not None:
        from hawkspec.metrics.quality import IMAGE_SUFFIXES, reference_files, unreadable_image

        limit = get(cfg, f"{q}.reference.num_images", 0)
        images = reference_files(ref_dir, limit if isinstance(limit, int) else 0)
        if len(images) < 2:
            raise FileNotFoundError(f"`{q}.reference.image_dir`={ref_dir} holds {len(images)} images "
                                    f"({', '.join(IMAGE_SUFFIXES)}, with num_images={limit}); FID needs at least 2")
        # every file FID will read opens as an image now, not after every decoder has been decoded and timed
        bad = [(p, why) for p in images if (why := unreadable_image(p)) is not None]
        if bad:
            (first, why), more = bad[0], len(bad) - 1
            raise ValueError(f"`{q}.reference.image_dir`={ref_dir}: {first.name} is not a readable image ({why})"
                             + (f"; and {more} more file(s), e.g. {', '.join(p.name for p, _ in bad[1:4])}"
                                if more else "") + f"; remove or replace {'them' if more else 'it'} (the first "
                             f"{len(images)} image files by name are read)")
    else:
        check_int(cfg, f"{q}.reference.num_images", 2)
    cache_dir = get(cfg, f"{q}.reference.cache_dir")
    if cache_dir is not None:
        check_writable(cache_dir, f"{q}.reference.cache_dir")


def validate_pretrain(cfg: DictConfig, own: str = "tiny") -> None:
    """``hawkspec-pretrain`` and ``hawkspec-quality``: the export folder and the run folder (``own``: the run's own
    copy of what it exports, ``tiny/`` or ``evaluator/``)."""
    check_export_dir(cfg, own)
    check_output_dir(cfg)
