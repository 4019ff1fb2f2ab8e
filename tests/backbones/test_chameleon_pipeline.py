"""One code path: the console scripts run on a tiny random Chameleon saved like a Lumina-mGPT checkpoint
(``backbone=lumina_mgpt_768 backbone.path=<tmp>`` plus overrides making it tiny), exactly as on the tiny model:
cache from a folder of captioned images (the paper's training data) -> a few training steps -> eval with Hawk; and
without ``backbone.vqgan_path`` the runs save code grids and say images were not decoded."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hawkspec.backbones.chameleon import ChameleonBackbone
from hawkspec.data import image_text
from hawkspec.data.manifest import ShardManifest
from hawkspec.testing import run_cli

CAPTIONS = ["a large red circle in the center", "a small blue square on the left", "a green triangle at the top",
            "a yellow ring at the bottom", "a white cross on a black background", "an orange square on the right",
            "a purple circle at the bottom left", "a black triangle in the center", "a small red ring",
            "a large blue cross", "a green circle on a white background", "a yellow square at the top left"]


def write_pairs(folder: Path, n: int, size: int = 24) -> Path:
    """LAION-style pairs: x.png + x.txt (plus an RGBA image and one without a caption)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 5:05d}"
        sub.mkdir(exist_ok=True)
        mode = "RGBA" if i == 0 else "RGB"
        Image.fromarray(rng.integers(0, 255, (size, size + 8 * (i % 2), len(mode)), dtype=np.uint8), mode).save(
            sub / f"{i:09d}.png")
        (sub / f"{i:09d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n")
    Image.fromarray(np.zeros((size, size, 3), dtype=np.uint8)).save(folder / "no_caption.png")
    return folder


def test_image_folder_pairs_split_and_crop(tmp_path):
    folder = write_pairs(tmp_path / "pairs", 7)
    spec = {"path": str(folder), "seed": 0}
    pairs = image_text.load_pairs(str(folder))
    assert len(pairs) == 7 and pairs.captions[0] == CAPTIONS[0]
    train = image_text.pair_indices(spec, "train", 0, 4)
    val = image_text.pair_indices(spec, "val", 0, 3)
    assert sorted(train + val) == list(range(7))  # disjoint, together every pair
    image_text.check_splits(spec, 4, 3)
    with pytest.raises(ValueError, match="cache.num_samples"):
        image_text.check_splits(spec, 5, 3)
    img = image_text.load_image(pairs.images[1], (16, 16))
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
    assert image_text.load_image(pairs.images[0], (16, 16)).shape == (3, 16, 16)  # RGBA blended onto white
    with pytest.raises(ValueError, match="cache.images.path"):
        image_text.load_pairs(None)


def test_coco_annotations(tmp_path):
    from PIL import Image

    (tmp_path / "train2017").mkdir()
    for i in (1, 2):
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "train2017" / f"{i:012d}.jpg")
    ann = {"images": [{"id": 2, "file_name": "000000000002.jpg"}, {"id": 1, "file_name": "000000000001.jpg"}],
           "annotations": [{"id": 9, "image_id": 1, "caption": "second"}, {"id": 3, "image_id": 1, "caption": " first "},
                           {"id": 5, "image_id": 2, "caption": "two"}]}
    (tmp_path / "captions_train2017.json").write_text(json.dumps(ann))
    pairs = image_text.load_pairs(str(tmp_path / "train2017"), str(tmp_path / "captions_train2017.json"))
    assert pairs.captions == ("first", "two") and pairs.images[0].endswith("000000000001.jpg")


@pytest.fixture(scope="module")
def lumina_dir(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lumina_pipeline")
    bb = ChameleonBackbone.random(rows=4, cols=4, num_codes=32, seed=0)
    bb.save_pretrained(root / "model", vqgan_dir=root / "vqgan")
    write_pairs(root / "pairs", 12)
    return {"root": root, "model": root / "model", "vqgan": root / "vqgan" / "vqgan.ckpt", "pairs": root / "pairs"}


def tiny_lumina(d: dict, vqgan: bool, sampling: bool = True) -> list[str]:
    """``backbone=lumina_mgpt_768`` pointed at the saved tiny random model (16 px = 4x4 codes, 32 codes)."""
    return (["backbone=lumina_mgpt_768", f"backbone.path={d['model']}", "backbone.resolution=16",
             "backbone.dtype=float32"] + (["sampling.top_k=16"] if sampling else [])
            + ([f"backbone.vqgan_path={d['vqgan']}"] if vqgan else []))


@pytest.mark.slow
def test_cache_train_eval_with_hawk(lumina_dir, tmp_path):
    d = lumina_dir
    shards = tmp_path / "shards"
    run_cli("hawkspec-cache", *tiny_lumina(d, vqgan=True), "cache.source=images", f"cache.images.path={d['pairs']}",
            "cache.num_samples=8", "cache.val_samples=4", "cache.shard_size=4", "cache.batch_size=4", "cache.topk=4",
            f"cache.out_dir={shards}", f"hydra.run.dir={tmp_path / 'cache_run'}")
    train = ShardManifest.read(shards / "train")
    assert train.num_samples == 8 and train.source == "images"
    assert train.backbone == "lumina-mgpt-7b-16"  # the name carries the resolution (backbone.resolution=16)
    assert train.grid == {"rows": 4, "cols": 4, "eol": True} and train.tokens_per_row == 5
    plan = json.loads((shards / "train" / "plan.json").read_text())
    assert plan["images"]["path"] == str(d["pairs"])

    heads = tmp_path / "heads"
    run_cli("hawkspec-train", *tiny_lumina(d, vqgan=False, sampling=False), f"shards_dir={shards}", "heads=hawk",
            "trainer.max_steps=3", "data.batch_size=4", "logger=csv", f"export_dir={heads / 'hawk'}",
            f"hydra.run.dir={tmp_path / 'train_run'}")
    assert (heads / "hawk" / "heads.safetensors").is_file()

    # eval without the VQGAN: speed and acceptance, code grids saved, images not decoded, quality skipped
    out = tmp_path / "eval"
    proc = run_cli("hawkspec-eval", *tiny_lumina(d, vqgan=False), "eval.decoders=[ar,hawk]", "eval.num_prompts=4",
                   "eval.batch_size=2", "eval.repeats=1", "eval.warmup_batches=0", f"paths.heads_dir={heads}",
                   f"hydra.run.dir={out}", "logger=none")
    results = json.loads((out / "results.json").read_text())
    assert [r["decoder"] for r in results["rows"]] == ["ar", "hawk"]
    assert results["images_decoded"] is False and "backbone.vqgan_path" in results["quality_skipped"]
    assert "quality" not in results and all(r["grid"] is None for r in results["rows"])
    assert "not decoded" in proc.stdout.lower()
    codes = np.load(out / "codes_hawk.npy")
    assert codes.shape == (4, 4, 4) and torch.equal(torch.load(out / "codes_hawk.pt"), torch.from_numpy(codes))
    assert results["rows"][1]["acceptance_length"] >= 1


@pytest.mark.slow
@pytest.mark.parametrize("vqgan", [True, False])
def test_generate_with_and_without_the_vqgan(lumina_dir, tmp_path, vqgan):
    d = lumina_dir
    proc = run_cli("hawkspec-generate", *tiny_lumina(d, vqgan=vqgan), "prompts=[a red circle,a blue square]",
                   f"hydra.run.dir={tmp_path}")
    summary = json.loads((tmp_path / "generate.json").read_text())
    assert np.load(tmp_path / "codes.npy").shape == (2, 4, 4)
    assert summary["images_decoded"] is vqgan and (tmp_path / "grid.png").is_file() is vqgan
    if not vqgan:
        assert "backbone.vqgan_path" in summary["not_decoded_because"] and "NOT decoded" in proc.stdout


@pytest.mark.slow
def test_missing_model_path_on_the_command_line(tmp_path):
    proc = run_cli("hawkspec-generate", "backbone=lumina_mgpt_768", f"hydra.run.dir={tmp_path}", ok=False)
    assert "backbone.path" in proc.stderr + proc.stdout
