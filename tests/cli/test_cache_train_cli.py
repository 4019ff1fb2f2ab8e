"""``hawkspec-cache`` and ``hawkspec-train`` as a user runs them (subprocesses, tiny settings), DDP included."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from hawkspec.cli.train import training_factory
from hawkspec.data.manifest import ShardManifest, sample_key
from hawkspec.testing import run_cli

ROOT = Path(__file__).resolve().parents[2]
CACHE_TINY = ["cache.shard_size=4", "cache.batch_size=4", "sampling.top_k=32"]




def keys(folder: Path) -> list[str]:
    import webdataset as wds

    m = ShardManifest.read(folder)
    return [s["__key__"] for url in m.urls(folder) for s in wds.WebDataset(url, shardshuffle=False)]


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory, random_backbone_dir) -> Path:
    """A cache written by the console script: 8 train + 4 val samples, top-4 targets."""
    run_dir = tmp_path_factory.mktemp("cli_cache")
    run_cli("hawkspec-cache", f"backbone.path={random_backbone_dir}", f"hydra.run.dir={run_dir}", "cache.num_samples=8",
            "cache.val_samples=4", "cache.topk=4", *CACHE_TINY)
    return run_dir / "shards"


def test_cache_cli_writes_train_and_val_splits(cli_cache):
    assert keys(cli_cache / "train") == [sample_key(i) for i in range(8)]
    assert keys(cli_cache / "val") == [sample_key(i) for i in range(4)]
    val = ShardManifest.read(cli_cache / "val")
    assert val.seed == 1 and ShardManifest.read(cli_cache / "train").seed == 0 and val.topk == 4
    summary = json.loads((cli_cache / "cache_summary.json").read_text())
    assert summary["splits"][0]["samples_written"] == 8 and summary["splits"][0]["samples_per_s"] > 0


@pytest.mark.parametrize("heads, extra", [("medusa", []), ("hawk", ["experiment=vsd3", "loss.distill_weight=0.5"])])
def test_train_cli_exports_heads_and_metrics(tmp_path, cli_cache, random_backbone_dir, heads, extra):
    from hawkspec.backbones.tiny import TinyBackbone
    from hawkspec.heads.draft import DraftHeads

    export = tmp_path / "export"
    proc = run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={cli_cache}",
                   f"hydra.run.dir={tmp_path / 'run'}", f"heads={heads}", "trainer.max_steps=3", "data.batch_size=4",
                   "logger=csv", f"export_dir={export}", *extra)
    report = json.loads((export / "val_metrics.json").read_text())
    names = [r["name"] for r in report["heads"]]
    assert names == (["h1", "h2", "h3", "h4"] if heads == "medusa" else ["h1", "h2", "h3", "h4", "v1", "v2", "v3"])
    assert report["global_step"] == 3 and all(0 <= r["top1"] <= r["top5"] <= 1 for r in report["heads"])
    assert DraftHeads.load(export, TinyBackbone.from_pretrained(random_backbone_dir)).names == names
    assert (tmp_path / "run" / "heads" / "heads.safetensors").is_file() and "top-1" in proc.stdout


@pytest.mark.parametrize("override, key", [
    ("heads.vsd=4", "heads.vsd"),  # the random backbone has 4 rows: vsd <= 3
    ("heads.num_horizontal=0", "heads.num_horizontal"),
    ("heads.vsd=0", "heads.vsd"),
])
def test_train_cli_bad_heads_name_the_key(tmp_path, cli_cache, random_backbone_dir, override, key):
    proc = run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={cli_cache}",
                   f"hydra.run.dir={tmp_path}", override, ok=False)
    assert key in proc.stderr + proc.stdout


def test_heads_group_options_compose_and_validate(random_backbone):
    from hawkspec.cli.common import instantiate
    from hawkspec.training.eagle import EagleTrainingModule
    from hawkspec.training.heads import HeadTrainingModule

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for overrides in (["heads=medusa"], ["heads=hawk"], ["experiment=vertical_off"], ["experiment=vsd1"],
                          ["heads=eagle"], ["heads=eagle_spatial"]):
            cfg = compose("train", overrides=[*overrides, "loss.distill_weight=0.5"])
            training_factory(cfg)  # resolves `_target_` and checks the keys, without a backbone
            module = instantiate(cfg.heads, "heads", backbone=random_backbone, optimizer=None)
            eagle = overrides[0].startswith("heads=eagle")
            assert type(module) is (EagleTrainingModule if eagle else HeadTrainingModule)
            assert module.needs_topk is not eagle  # the shared `loss` group reaches the heads' module
        with pytest.raises(ValueError, match="heads.vsd"):
            instantiate(compose("train", overrides=["heads.vsd=0"]).heads, "heads", backbone=random_backbone, optimizer=None)
        with pytest.raises(ValueError, match="vsdd"):
            training_factory(compose("train", overrides=["+heads.vsdd=1"]))
        with pytest.raises(ValueError, match="_target_"):
            training_factory(compose("train", overrides=["~heads._target_"]))


TOY_DRAFT = """
from hawkspec.heads.draft import DraftHeads, HeadsConfig
from hawkspec.training.heads import HeadTrainingModule


class ToyDraft(HeadTrainingModule):
    \"\"\"A new draft model outside hawkspec: `depth` Medusa heads.\"\"\"

    @classmethod
    def build(cls, backbone, optimizer, scheduler=None, warmup_ratio=0.05, depth=1):
        heads = DraftHeads.for_backbone(HeadsConfig(num_horizontal=depth, vertical=False, vsd=0), backbone)
        return cls(heads, backbone.grid, optimizer, scheduler, warmup_ratio)
"""


def test_train_cli_builds_the_module_named_by_heads_target(tmp_path, cli_cache, random_backbone_dir):
    """A new draft model is one file and one YAML: `hawkspec-train heads=toy` builds the `_target_` of toy.yaml."""
    (tmp_path / "toy_draft.py").write_text(TOY_DRAFT)
    (tmp_path / "conf" / "heads").mkdir(parents=True)
    (tmp_path / "conf" / "heads" / "toy.yaml").write_text("_target_: toy_draft.ToyDraft.build\ndepth: 2\n")
    env = {"PYTHONPATH": str(tmp_path)}
    args = [f"backbone.path={random_backbone_dir}", f"shards_dir={cli_cache}", f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "heads=toy", "trainer.max_steps=2", "data.batch_size=4", "logger=none"]
    export = tmp_path / "export"
    run_cli("hawkspec-train", *args, f"hydra.run.dir={tmp_path / 'run'}", f"export_dir={export}", env=env)
    report = json.loads((export / "val_metrics.json").read_text())
    assert [r["name"] for r in report["heads"]] == ["h1", "h2"] and report["global_step"] == 2
    proc = run_cli("hawkspec-train", *args, "+heads.width=3", f"hydra.run.dir={tmp_path / 'bad'}", env=env, ok=False)
    assert "width" in proc.stderr and "toy_draft.ToyDraft.build" in proc.stderr


def test_train_cli_refuses_shards_of_another_backbone(tmp_path, cli_cache):
    from hawkspec.testing import build_random_backbone, run_cli

    other = tmp_path / "other"
    build_random_backbone(rows=3, cols=3).save_pretrained(other)
    proc = run_cli("hawkspec-train", f"backbone.path={other}", f"shards_dir={cli_cache}", "heads.vsd=1",
                   f"hydra.run.dir={tmp_path / 'run'}", ok=False)
    assert "grid=" in proc.stderr and "cached from another backbone" in proc.stderr


def test_cache_cli_bad_settings_name_the_key(tmp_path, random_backbone_dir):
    proc = run_cli("hawkspec-cache", f"backbone.path={random_backbone_dir}", f"hydra.run.dir={tmp_path}",
                   "cache.source=web", ok=False)
    assert "cache.source" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["medusa", "eagle"])
def test_ddp_cache_and_one_exact_epoch_see_every_sample_once(tmp_path, random_backbone_dir, heads):
    """2 CPU processes: the cache splits its shards without duplicates, an exact training epoch reads each once --
    for the draft heads and for the EAGLE draft model alike."""
    run_cli("hawkspec-cache", f"backbone.path={random_backbone_dir}", f"hydra.run.dir={tmp_path / 'cache'}",
            "trainer=ddp", "cache.num_samples=30", "cache.val_samples=4", "cache.shard_size=8", "cache.batch_size=8")
    shards = tmp_path / "cache" / "shards"
    assert sorted(keys(shards / "train")) == [sample_key(i) for i in range(30)]  # 4 shards, the last of 6
    assert keys(shards / "val") == [sample_key(i) for i in range(4)]  # 1 shard: rank 1 had nothing to do
    assert json.loads((shards / "cache_summary.json").read_text())["world_size"] == 2

    run = tmp_path / "train"
    run_cli("hawkspec-train", f"backbone.path={random_backbone_dir}", f"shards_dir={shards}", f"hydra.run.dir={run}",
            "trainer=ddp", "trainer.max_epochs=1", "data.resampled=false", "data.batch_size=4", "record_keys=true",
            "logger=csv", f"heads={heads}")
    per_rank = [(run / "seen_keys" / f"rank{r}.txt").read_text().split() for r in range(2)]
    assert all(per_rank) and not set(per_rank[0]) & set(per_rank[1])
    seen = per_rank[0] + per_rank[1]
    assert sorted(seen) == [sample_key(i) for i in range(30)]  # exactly once across the world
    assert json.loads((run / "heads" / "val_metrics.json").read_text())["global_step"] == 4


def experiments_for(entry_point: str) -> list[str]:
    """The experiments whose header command runs ``entry_point`` (every experiment names its command)."""
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")
                  if f"#   {entry_point} " in p.read_text())


def test_every_experiment_names_its_command():
    named = set(experiments_for("hawkspec-train")) | set(experiments_for("hawkspec-eval"))
    assert named == {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}


@pytest.mark.slow
def test_every_experiment_runs_in_a_multirun(tmp_path, cli_cache, random_backbone_dir):
    experiments = experiments_for("hawkspec-train")
    run_cli("hawkspec-train", "-m", f"backbone.path={random_backbone_dir}", f"shards_dir={cli_cache}",
            f"hydra.sweep.dir={tmp_path}", f"experiment={','.join(experiments)}", "trainer.max_steps=2",
            "data.batch_size=4", "logger=csv")
    for job in range(len(experiments)):
        assert (tmp_path / str(job) / "heads" / "val_metrics.json").is_file()


@pytest.mark.slow
def test_every_tiny_eval_experiment_runs_in_a_multirun(tmp_path):
    """The paper tables' tiny analogues (the Lumina-mGPT ones need local weights and data), shrunk to 2 prompts."""
    experiments = [e for e in experiments_for("hawkspec-eval") if e.endswith("_tiny")]
    assert experiments
    run_cli("hawkspec-eval", "-m", f"hydra.sweep.dir={tmp_path}", f"experiment={','.join(experiments)}",
            "eval.num_prompts=2", "eval.batch_size=2", "eval.repeats=1", "eval.warmup_batches=0",
            "eval.quality.enabled=false", "logger=none")
    for job in range(len(experiments)):
        assert (tmp_path / str(job) / "results.json").is_file()
