"""Prompt sets from local files (hawkspec.data.prompts): COCO, Flickr30K (both formats), PartiPrompts, txt,
jsonl; seeded random subsets (never the first N); errors naming the file and line."""

import json

import pytest

from hawkspec.data.prompts import PromptSpec, load_prompt_set, subset


def coco_file(path, n_images=6):
    anns = []
    for img in range(n_images):
        for k, cap in enumerate(["short", f"a much longer caption of image {img}", f"mid caption {img}"]):
            anns.append({"image_id": 100 + img, "id": img * 10 + k, "caption": cap})
    path.write_text(json.dumps({"images": [{"id": 100 + i, "file_name": f"{i}.jpg"} for i in range(n_images)],
                                "annotations": anns}))
    return path


def test_coco_one_caption_per_image_longest_or_seeded_random(tmp_path):
    f = coco_file(tmp_path / "captions_val2017.json")
    longest = load_prompt_set(PromptSpec(source="coco", path=str(f)))
    assert [p.text for p in longest] == [f"a much longer caption of image {i}" for i in range(6)]
    assert [p.id for p in longest] == [str(100 + i) for i in range(6)] and [p.index for p in longest] == list(range(6))
    rnd = [p.text for p in load_prompt_set(PromptSpec(source="coco", path=str(f), caption="random", seed=1))]
    assert rnd == [p.text for p in load_prompt_set(PromptSpec(source="coco", path=str(f), caption="random", seed=1))]
    assert rnd != [p.text for p in longest]  # with 3 captions per image, some random pick is not the longest


def test_subsets_are_seeded_random_not_the_first_n(tmp_path):
    f = coco_file(tmp_path / "c.json", n_images=40)
    a = load_prompt_set(PromptSpec(source="coco", path=str(f), num=5, seed=0))
    b = load_prompt_set(PromptSpec(source="coco", path=str(f), num=5, seed=0))
    c = load_prompt_set(PromptSpec(source="coco", path=str(f), num=5, seed=1))
    idx = [p.index for p in a]
    assert idx == [p.index for p in b] and idx != [p.index for p in c]
    assert idx != list(range(5)) and idx == sorted(idx)  # original order, not the first 5
    assert len(subset(a, None, 0)) == 5


def test_flickr_karpathy_json_and_token_file(tmp_path):
    data = {"dataset": "flickr30k", "images": [
        {"filename": f"{i}.jpg", "split": "test" if i % 2 else "train",
         "sentences": [{"raw": "a dog"}, {"raw": f"a dog running on grass {i}"}]} for i in range(6)]}
    kj = tmp_path / "dataset_flickr30k.json"
    kj.write_text(json.dumps(data))
    test = load_prompt_set(PromptSpec(source="flickr30k", path=str(kj), split="test"))
    assert [p.id for p in test] == ["1.jpg", "3.jpg", "5.jpg"] and test[0].text == "a dog running on grass 1"
    tok = tmp_path / "results_20130124.token"
    tok.write_text("10.jpg#0\tTwo dogs .\n10.jpg#1\tTwo dogs play in the snow .\n11.jpg#0\tA man .\n")
    got = load_prompt_set(PromptSpec(source="flickr30k", path=str(tok)))
    assert [(p.id, p.text) for p in got] == [("10.jpg", "Two dogs play in the snow ."), ("11.jpg", "A man .")]
    bad = tmp_path / "bad.token"
    bad.write_text("10.jpg#0\tfine\nno tab here\n")
    with pytest.raises(ValueError, match=r"bad.token:2"):
        load_prompt_set(PromptSpec(source="flickr30k", path=str(bad)))


def test_parti_tsv_with_categories(tmp_path):
    f = tmp_path / "PartiPrompts.tsv"
    f.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na cat\tAnimals\tBasic\t\n"
                 "a red dog\tAnimals\tColors\t\n")
    allp = load_prompt_set(PromptSpec(source="parti", path=str(f)))
    assert [(p.text, p.category) for p in allp] == [("bond", "Abstract"), ("a cat", "Animals"), ("a red dog", "Animals")]
    animals = load_prompt_set(PromptSpec(source="parti", path=str(f), category="Animals"))
    assert [p.text for p in animals] == ["a cat", "a red dog"]
    bad = tmp_path / "bad.tsv"
    bad.write_text("Text\tCategory\nx\ty\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1"):
        load_prompt_set(PromptSpec(source="parti", path=str(bad)))


def test_txt_jsonl_and_errors_name_the_file_and_line(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("one\n\ntwo\n")
    assert [p.text for p in load_prompt_set(PromptSpec(source="txt", path=str(t)))] == ["one", "two"]
    j = tmp_path / "p.jsonl"
    j.write_text('{"prompt": "a"}\n{"prompt": "b", "category": "x"}\n')
    assert [(p.text, p.category) for p in load_prompt_set(PromptSpec(source="jsonl", path=str(j)))] == [("a", None), ("b", "x")]
    j.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: malformed JSON"):
        load_prompt_set(PromptSpec(source="jsonl", path=str(j)))
    c = tmp_path / "c.json"
    c.write_text('{"annotations": [\n{"image_id": 1,\n')
    with pytest.raises(ValueError, match=r"c.json:\d+: malformed JSON"):
        load_prompt_set(PromptSpec(source="coco", path=str(c)))
    with pytest.raises(FileNotFoundError, match="eval.prompts.path=.*missing.json"):
        load_prompt_set(PromptSpec(source="coco", path=str(tmp_path / "missing.json")))
    with pytest.raises(ValueError, match="eval.prompts.source"):
        load_prompt_set(PromptSpec(source="laion", path=str(t)))


def test_procedural_default_matches_the_old_captions():
    from hawkspec.data.procedural import ProceduralDataset

    got = load_prompt_set(PromptSpec(source="procedural", num=4, seed=1234))
    ds = ProceduralDataset(4, seed=1234)
    assert [p.text for p in got] == [ds[i]["caption"] for i in range(4)]
