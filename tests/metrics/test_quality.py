"""Quality metrics: FID / diversity in the project's feature space, prompt alignment, CLIP score, the reference
cache, the noise floor, and the errors of their config keys."""

import importlib.util
import logging
from pathlib import Path

import pytest
import torch

from hawkspec.data.procedural import ProceduralDataset
from hawkspec.metrics.evaluator import EXTRACTOR_NAME
from hawkspec.metrics.quality import (
    INCEPTION_FILE,
    QualityMeter,
    QualitySettings,
    inception_weights_path,
    noise_floor,
)
from hawkspec.testing import build_tiny_clip


def settings(cache_dir, **kw) -> QualitySettings:
    ref = {"num_images": 256, "seed": 4321, "image_dir": None, "cache_dir": str(cache_dir), **kw.pop("reference", {})}
    return QualitySettings(**{"fid_features": "tiny", "batch_size": 128, "reference": ref, **kw})


def renders(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    ds = ProceduralDataset(n, seed=seed)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), [it["caption"] for it in items]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("reference")


@pytest.fixture(scope="module")
def meter(cache_dir) -> QualityMeter:
    torch.set_num_threads(1)
    return QualityMeter(settings(cache_dir).validate(8), image_side=48)


@pytest.fixture(scope="module")
def real():
    return renders(128, seed=7)


def test_real_images_are_close_to_the_reference_and_noise_is_far(meter, real):
    images, captions = real
    got = meter.measure(images, captions)
    assert got["fid_features"] == EXTRACTOR_NAME and got["quality_images"] == 128
    assert got["fid_protocol"] == "center-crop-48-lanczos"  # the tiny extractor reads the decoded size
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    flat = torch.full_like(images, 128)
    assert got["fid"] < 0.25 * meter.measure(noise, captions)["fid"]
    assert got["fid"] < 0.25 * meter.measure(flat, captions)["fid"]
    assert 0.8 < got["diversity"] < 1.2  # as spread as the data
    assert meter.measure(flat, captions)["diversity"] < 0.05  # one image repeated: collapsed


def test_fid_between_a_set_and_itself_is_zero(meter, real):
    images, _ = real
    assert meter.fid_between(images, images) == pytest.approx(0.0, abs=1e-3)


def test_alignment_reads_what_the_caption_asks_for(meter, real):
    images, captions = real
    right = meter.alignment(images, captions)
    assert right["alignment"] > 0.9 and right["alignment_images"] == 128
    assert right["alignment_color"] > 0.9 and right["alignment_position"] > 0.9
    shifted = captions[1:] + captions[:1]  # every image judged against another image's caption
    assert meter.alignment(images, shifted)["alignment"] < 0.5
    assert meter.alignment(images[:2], ["a photo of a cat", "a dog"]) == {"alignment": None}


def test_reference_statistics_are_computed_once_and_cached(meter, cache_dir, caplog):
    files = list(cache_dir.glob(f"{EXTRACTOR_NAME}-*.pt"))
    assert [Path(meter.reference["cache"])] == files
    with caplog.at_level(logging.INFO, logger="hawkspec"):
        again = QualityMeter(settings(cache_dir).validate(8), image_side=48)
    assert "loaded from cache" in caplog.text
    assert torch.equal(again.fid.real_features_sum, meter.fid.real_features_sum)
    assert again.reference["trace_cov"] == pytest.approx(meter.reference["trace_cov"])
    other = QualityMeter(settings(cache_dir, reference={"num_images": 64, "seed": 5}).validate(8), image_side=48)
    assert other.reference["cache"] != meter.reference["cache"]
    assert len(list(cache_dir.glob("*.pt"))) == 2


def test_reference_from_an_image_folder(cache_dir, tmp_path, real):
    from PIL import Image

    images, captions = real
    for i, img in enumerate(images[:16]):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:03d}.png")
    m = QualityMeter(settings(cache_dir, reference={"image_dir": str(tmp_path), "num_images": 0}).validate(8), 48)
    assert m.reference["source"] == "image_dir" and m.reference["num_images"] == 16
    assert m.fid_between(images[:16], images[:16]) == pytest.approx(0.0, abs=1e-3)


def test_noise_floor_is_the_absolute_change_of_each_figure():
    ar = {"fid": 10.0, "diversity": 0.9, "alignment": 0.5, "alignment_images": 8, "fid_features": "x",
          "quality_images": 8}
    again = {"fid": 12.5, "diversity": 0.8, "alignment": 0.75, "alignment_images": 8, "fid_features": "x",
             "quality_images": 8}
    assert noise_floor(ar, again) == pytest.approx({"fid": 2.5, "diversity": 0.1, "alignment": 0.25})


# --------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kw, num, key", [
    ({"fid_features": "bogus"}, 8, "eval.quality.fid_features"),
    ({"fid_filter": "nearest"}, 8, "eval.quality.fid_filter"),
    ({"fid_resize": 3}, 8, "eval.quality.fid_resize"),
    ({}, 1, "eval.num_prompts"),
    ({"batch_size": 0}, 8, "eval.quality.batch_size"),
    ({"inception_weights": "/does/not/exist.pth"}, 8, "eval.quality.inception_weights"),
    ({"clip_model": "/does/not/exist"}, 8, "eval.quality.clip_model"),
    ({"reference": {"num_images": 1}}, 8, "eval.quality.reference.num_images"),
    ({"reference": {"image_dir": "/does/not/exist"}}, 8, "eval.quality.reference.image_dir"),
])
def test_bad_settings_name_their_key(tmp_path, kw, num, key):
    with pytest.raises((ValueError, FileNotFoundError), match=key.replace(".", r"\.")):
        settings(tmp_path, **kw).validate(num)


def test_inception_without_weights_names_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache
    assert inception_weights_path(None) is None
    with pytest.raises(FileNotFoundError, match=r"eval\.quality\.inception_weights"):
        QualityMeter(settings(tmp_path, fid_features="inception").validate(8), 48)


def test_auto_without_inception_weights_labels_the_project_extractor(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    m = QualityMeter(settings(tmp_path, fid_features="auto", reference={"num_images": 16}).validate(8), 48)
    assert m.fid_features == EXTRACTOR_NAME and m.describe()["fid_features"] == EXTRACTOR_NAME


def test_torch_hub_cache_copy_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not really weights")
    assert inception_weights_path(None) == cached


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_names_the_extra(tmp_path):
    weights = tmp_path / INCEPTION_FILE
    weights.write_bytes(b"x")
    s = settings(tmp_path, fid_features="inception", inception_weights=str(weights)).validate(8)
    with pytest.raises(ModuleNotFoundError, match=r"\.\[inception\]"):
        QualityMeter(s, 48)


_HUB_WEIGHTS = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is None or not _HUB_WEIGHTS.is_file(),
                    reason="the standard FID Inception path needs torch-fidelity (pip install -e '.[inception]') and "
                           f"{INCEPTION_FILE} in the torch hub cache; neither is downloaded by the tests")
def test_inception_features_when_available(tmp_path, real):
    images, captions = real
    m = QualityMeter(settings(tmp_path, fid_features="auto", reference={"num_images": 32}).validate(8), 48)
    assert m.fid_features == "inception"
    assert m.measure(images[:16], captions[:16])["fid_features"] == "inception"


# --------------------------------------------------------------------------------------------- CLIP score
def test_clip_score_with_a_local_clip_model_in_both_conventions(tmp_path, real):
    from transformers import CLIPModel, CLIPProcessor

    clip_dir = build_tiny_clip(tmp_path / "clip")
    m = QualityMeter(settings(tmp_path, clip_model=str(clip_dir), reference={"num_images": 16}).validate(8), 48)
    images, captions = real
    got = m.measure(images[:8], captions[:8])
    assert "clip_score" not in got  # every key names its convention
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)

    def cosines(texts, **cut):
        with torch.no_grad():
            img = model.get_image_features(**proc(images=list(images[:8]), return_tensors="pt"))
            txt = model.get_text_features(**proc(text=texts, return_tensors="pt", padding=True, **cut))
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
        return torch.nn.functional.cosine_similarity(img, txt, dim=-1)

    # torchmetrics: 100 x cosine of the projected embeddings, averaged, floored at 0
    assert got["clip_score_100cos"] == pytest.approx(max(float((100 * cosines(captions[:8])).mean()), 0.0), abs=1e-3)
    # LANTERN: the raw cosine with "A photo depicts " before the caption, averaged (no x100, no floor), the text cut
    # to the model's context (77 tokens for real CLIP; 32 for the tiny one, which the prefix overflows here)
    prefixed = ["A photo depicts " + c for c in captions[:8]]
    assert max(len(t) for t in proc.tokenizer(prefixed)["input_ids"]) > 32
    lantern = cosines(prefixed, truncation=True, max_length=32)
    assert got["clip_cosine_lantern"] == pytest.approx(float(lantern.mean()), abs=1e-5)
    assert got["clip_cosine_lantern"] != pytest.approx(float(cosines(captions[:8]).mean()), abs=1e-6)
    clip = m.describe()["clip"]
    assert clip["conventions"]["lantern"]["key"] == "clip_cosine_lantern" and "A photo depicts" in \
        clip["conventions"]["lantern"]["definition"]
    assert clip["conventions"]["torchmetrics"]["key"] == "clip_score_100cos"


def test_clip_conventions_can_be_chosen(tmp_path, real):
    clip_dir = build_tiny_clip(tmp_path / "clip")
    s = settings(tmp_path, clip_model=str(clip_dir), clip_conventions=["lantern"], reference={"num_images": 16})
    m = QualityMeter(s.validate(8), 48)
    images, captions = real
    got = m.measure(images[:4], captions[:4])
    assert "clip_cosine_lantern" in got and "clip_score_100cos" not in got
    with pytest.raises(ValueError, match=r"eval\.quality\.clip_conventions"):
        settings(tmp_path, clip_conventions=["openai"]).validate(8)
