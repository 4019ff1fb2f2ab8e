"""Late-discovered bad paths and numeric edge cases: found at start-up, before any model is loaded or timed, with an
error naming the key."""

import json

import pytest
from hydra import initialize_config_dir

from hawkspec.cli.common import CONF_DIR, instantiate, with_context
from hawkspec.cli.validate import validate_cache, validate_eval, validate_generate, validate_train
from hawkspec.testing import compose, run_cli


def cfg_of(name, tmp_path, *overrides):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(name, overrides=[f"paths.output_dir={tmp_path}/run", f"paths.root_dir={tmp_path}", *overrides])


@pytest.fixture
def empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


EVAL_CASES = [
    ("eval.repeats=0", "eval.repeats"),  # used to run once and record zero repeats
    ("eval.batch_size=0", "eval.batch_size"),  # range() arg 3 must not be zero
    ("eval.num_prompts=-1", "eval.num_prompts"),  # with a prompts file: silently dropped the last prompt
    ("eval.num_prompts=0", "eval.num_prompts"),
    ("eval.warmup_batches=-1", "eval.warmup_batches"),
    ("eval.grid_images=-2", "eval.grid_images"),  # silently dropped images from the grid
    ("eval.threads=0", "eval.threads"),
    ("eval.compile=fast", "eval.compile"),
    ("eval.cuda_graphs=true", "eval.cuda_graphs"),  # device=cpu: nothing to record a CUDA graph on
    ("eval.prompts_file=/nope.txt", "eval.prompts_file"),
    ("eval.quality.evaluator=/nope", "eval.quality.evaluator"),  # used to fail after every decoder was timed
    ("eval.quality.evaluator={empty}", "eval.quality.evaluator"),
    ("eval.quality.reference.image_dir={empty}", "eval.quality.reference.image_dir"),  # empty reference folder
    ("eval.quality.reference.image_dir=/nope", "eval.quality.reference.image_dir"),
    ("eval.quality.reference.num_images=1", "eval.quality.reference.num_images"),
    ("eval.quality.clip_model={empty}", "eval.quality.clip_model"),
    ("eval.quality.inception_weights=/nope.pth", "eval.quality.inception_weights"),
    ("eval.quality.batch_size=0", "eval.quality.batch_size"),
    ("eval.decoders.hawk.tree.max_rank=100000", "eval.decoders.hawk.tree.max_rank"),  # ranks beyond the codebook
    ("tree.max_rank=0", "tree.max_rank"),  # the run's tree: named as the user set it, not per decoder
    ("tree.budget=0", "tree.budget"),
    ("eval.decoders.hawk.tree.paths=[[0],[600]]", "eval.decoders.hawk.tree.paths"),
    ("decoder.tree.budget=0", "eval.decoders.hawk.tree.budget"),  # the old spelling: Hawk's, as it always was
    ("paths.heads_dir={empty}", "eval.decoders.medusa.heads_path"),
    ("backbone.path={empty}", "backbone.path"),
]


@pytest.mark.parametrize("override, key", EVAL_CASES)
def test_eval_checks_name_the_key(tmp_path, empty_dir, override, key):
    """Expect: an error whose message names `key`."""
    cfg = cfg_of("eval", tmp_path, override.format(empty=empty_dir))
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        validate_eval(cfg)
    assert key in str(err.value)


def test_the_default_configs_pass(tmp_path):
    """Expect: the shipped defaults validate (heads, evaluator and backbone from the package)."""
    validate_eval(cfg_of("eval", tmp_path))
    validate_generate(cfg_of("generate", tmp_path))
    validate_cache(cfg_of("cache", tmp_path, f"cache.out_dir={tmp_path}/c"))


@pytest.mark.parametrize("override, key", [
    ("batch_size=0", "batch_size"), ("grid.ncols=0", "grid.ncols"), ("prompts_file=/nope", "prompts_file"),
    ("sampling.top_k=100000", "sampling.top_k"),
])
def test_generate_checks_name_the_key(tmp_path, override, key):
    with pytest.raises((ValueError, FileNotFoundError), match=key.replace(".", r"\.")):
        validate_generate(cfg_of("generate", tmp_path, override))


@pytest.mark.parametrize("override, key", [
    ("cache.shard_size=0", "cache.shard_size"), ("cache.val_samples=-1", "cache.val_samples"),
    ("cache.batch_size=0", "cache.batch_size"), ("cache.topk=100000", "cache.topk"), ("mode=check", "mode"),
    ("cache.out_dir={foreign}", "cache.out_dir"),
])
def test_cache_checks_name_the_key(tmp_path, override, key):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises((ValueError, FileExistsError)) as err:
        validate_cache(cfg_of("cache", tmp_path, override.format(foreign=tmp_path / "foreign")))
    assert key in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=0", "data.batch_size"), ("trainer.max_epochs=0", "trainer.max_epochs"),
    ("ckpt_path=/nope.ckpt", "ckpt_path"), ("checkpoint.every_n_train_steps=0", "checkpoint.every_n_train_steps"),
    ("export_dir={foreign}", "export_dir"),
])
def test_train_checks_name_the_key(tmp_path, disk_cache, override, key):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    cfg = cfg_of("train", tmp_path, f"shards_dir={disk_cache}", override.format(foreign=tmp_path / "foreign"))
    with pytest.raises((ValueError, FileNotFoundError, FileExistsError)) as err:
        validate_train(cfg)
    assert key in str(err.value)


def test_train_without_a_cache_names_shards_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="shards_dir"):
        validate_train(cfg_of("train", tmp_path, f"shards_dir={tmp_path}/none"))


def test_a_corrupt_json_file_is_named_not_replaced_by_a_type_error(tmp_path, random_backbone_dir):
    """The instantiate wrapper rebuilt a JSONDecodeError with one argument (a TypeError). Expect: the start-up
    check names the corrupt file and the key; the wrapper keeps the real exception type."""
    import shutil

    bad = tmp_path / "bb"
    shutil.copytree(random_backbone_dir, bad)
    (bad / "hawkspec.json").write_text('{"words": [')
    with pytest.raises(ValueError, match=r"backbone\.path.*hawkspec\.json.*not valid JSON"):
        validate_generate(cfg_of("generate", tmp_path, f"backbone.path={bad}"))
    try:
        json.loads("{")
    except json.JSONDecodeError as e:
        assert with_context(e, "while instantiating `backbone`") is e  # same object, with a note
    from omegaconf import OmegaConf

    with pytest.raises(json.JSONDecodeError):
        instantiate(OmegaConf.create({"_target_": "json.loads", "s": "{"}), "thing")


def test_cache_val_samples_0_then_training_works(tmp_path, random_backbone_dir, write_cache):
    """`cache.val_samples=0` (documented) used to end in a misleading 'run hawkspec-cache first'. Expect: training
    runs without validation, with a warning, and saves the heads of the last step."""
    import hawkspec.cli.train as train
    from hawkspec.backbones.tiny import TinyBackbone

    write_cache(TinyBackbone.from_pretrained(random_backbone_dir), tmp_path / "c", num_samples=8, split="train")
    cfg = cfg_of("train", tmp_path, f"backbone.path={random_backbone_dir}", f"shards_dir={tmp_path / 'c'}",
                 "trainer.max_steps=2", "data.batch_size=4", "data.num_workers=0", "logger=none")
    summary = train.run(cfg)
    assert summary["global_step"] == 2 and (tmp_path / "run" / "heads" / "heads.safetensors").is_file()


def test_eval_cli_stops_before_loading_anything(tmp_path, empty_dir):
    """Expect: exit 1 naming the key, no backbone instantiated, nothing timed."""
    proc = run_cli("hawkspec-eval", f"eval.quality.reference.image_dir={empty_dir}", f"hydra.run.dir={tmp_path}/r",
                   ok=False)
    out = proc.stdout + proc.stderr
    assert "eval.quality.reference.image_dir" in out and "Instantiating backbone" not in out
