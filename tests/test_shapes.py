"""The procedural `shapes` source, the caption checker that measures its images, and caption files of folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from vqkit.data import NAMED_SOURCES, SourceError, load_source
from vqkit.data.shapes import (COLOURS, REGIONS, SHAPES, ShapesSource, caption_match, measure_shapes, parse_caption,
                               read_captions, region_of, render_scene)


@pytest.fixture(scope="module")
def test_split():
    return load_source("shapes", "test", num_test=600)


def as_unit(source):
    return ((source.data + 1) / 2).numpy()


# ------------------------------------------------------------------------------------------------------- source
def test_source_contract(test_split):
    assert NAMED_SOURCES["shapes"] is ShapesSource
    image, label = test_split[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32) and label == -1
    assert image.min() >= -1 and image.max() <= 1 and not test_split.has_labels
    assert len(test_split) == len(test_split.captions) == len(test_split.attributes) == 600
    counts = {len(objects) for objects in test_split.attributes}
    assert counts == {1, 2}
    for caption, objects in zip(test_split.captions, test_split.attributes):
        assert parse_caption(caption) == [{k: o[k] for k in ("colour", "shape", "region")} for o in objects]
        assert len({o["region"] for o in objects}) == len(objects)
        for o in objects:
            assert o["shape"] in SHAPES and o["colour"] in COLOURS and o["region"] == region_of(*o["centre"], 32, 32)
    assert test_split.captions[0].startswith("a ") and " at the " in test_split.captions[0]


def test_splits_are_fixed_and_distinct(test_split):
    again = ShapesSource("test", num_test=100)
    assert torch.equal(again.data, test_split.data[:100]) and again.captions == test_split.captions[:100]
    train = ShapesSource("train", num_train=100)
    assert train.split == "train" and len(train) == 100
    assert sum(c == d for c, d in zip(train.captions, test_split.captions)) < 20  # different scenes
    assert not any(torch.equal(a, b) for a, b in zip(train.data, test_split.data))


def test_options():
    big = ShapesSource("train", image_size=48, num_train=20, max_objects=1, antialias=False)
    assert big.image_size == (48, 48) and all(len(objects) == 1 for objects in big.attributes)
    assert set(np.unique(((big.data + 1) * 127.5).round().numpy())) <= {0.0, 255.0}  # no antialiasing: pure colours
    assert len(load_source("shapes", "train", num_train=7, max_objects=3)) == 7
    for bad in (dict(image_size=8), dict(num_train=0), dict(max_objects=10)):
        with pytest.raises(SourceError, match="shapes"):
            ShapesSource("train", **bad)
    with pytest.raises(SourceError, match="split"):
        ShapesSource("val")


def test_objects_never_touch(test_split):
    for image, objects in zip(as_unit(test_split), test_split.attributes):
        _, count = ndimage.label(image.max(0) > 0)  # even the faintest antialiased pixels stay apart
        assert count == len(objects)


# -------------------------------------------------------------------------------------------------- measurement
def test_caption_match_is_right_on_held_out_renders(test_split):
    images = as_unit(test_split)
    results = [caption_match(image, objects) for image, objects in zip(images, test_split.attributes)]
    for key in ("colour", "position", "shape", "count", "all"):
        assert np.mean([r[key] for r in results]) >= 0.99, key


def test_caption_match_survives_blur_and_noise(test_split):
    # what a tokenizer's reconstruction does to an image, roughly
    rng = np.random.default_rng(0)
    images = as_unit(test_split)[:300]
    blurred = ndimage.gaussian_filter(images, sigma=(0, 0, 0.8, 0.8))
    degraded = np.clip(blurred + rng.normal(0, 0.04, images.shape), 0, 1)
    results = [caption_match(image, caption) for image, caption in zip(degraded, test_split.captions)]
    assert np.mean([r["all"] for r in results]) >= 0.99


def test_caption_match_catches_mismatches(test_split):
    images = as_unit(test_split)
    for i in range(40):
        objects = test_split.attributes[i]
        assert caption_match(images[i], test_split.captions[i])["all"]
        for key, attribute, values in (("colour", "colour", list(COLOURS)), ("position", "region", list(REGIONS)),
                                       ("shape", "shape", list(SHAPES))):
            wrong = [dict(o) for o in objects]
            wrong[0][attribute] = values[(values.index(wrong[0][attribute]) + 1) % len(values)]
            if len(wrong) == 2 and wrong[0]["region"] == wrong[1]["region"]:
                continue  # not a caption this set can have
            result = caption_match(images[i], wrong)
            assert not result[key] and not result["all"], (test_split.captions[i], wrong)
            assert all(result[k] for k in ("colour", "position", "shape") if k != key)
        extra = objects + [{"shape": "square", "colour": "red", "region": next(r for r in REGIONS if r not in
                                                                                 {o["region"] for o in objects})}]
        result = caption_match(images[i], extra)
        assert not result["count"] and not result["all"]


def test_measure_shapes():
    objects = [{"shape": "triangle", "colour": "cyan", "region": "bottom right", "centre": [26.0, 27.0], "size": 9.0},
               {"shape": "circle", "colour": "yellow", "region": "top", "centre": [15.0, 5.5], "size": 8.0}]
    image = torch.from_numpy(render_scene(objects)).permute(2, 0, 1).float() / 255
    found, empty = measure_shapes(torch.stack([image, torch.zeros_like(image)]))
    assert empty == []
    assert sorted((o["shape"], o["colour"], o["region"]) for o in found) == [
        ("circle", "yellow", "top"), ("triangle", "cyan", "bottom right")]
    triangle = next(o for o in found if o["shape"] == "triangle")
    assert np.allclose(triangle["centre"], [26.0, 27.0], atol=0.5)  # the centre of mass is the centroid
    # a dimmer image has the same colours (hue, not brightness)
    assert [o["colour"] for o in measure_shapes(image[None].numpy() * 0.7)[0]] == [o["colour"] for o in found]
    with pytest.raises(ValueError, match="N, 3, H, W"):
        measure_shapes(image)
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a purple hexagon in the sky")


# ---------------------------------------------------------------------------------------------- caption files
def test_read_captions_jsonl(tmp_path):
    lines = [{"file": "a.png", "caption": "a cat"}, {"file": "sub/b.jpg", "caption": "a dog, running", "x": 1},
             {"file": "./c.png", "caption": ""}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    assert read_captions(tmp_path) == {"a.png": "a cat", "sub/b.jpg": "a dog, running", "c.png": ""}


def test_read_captions_csv(tmp_path):
    (tmp_path / "captions.csv").write_text('file,caption\na.png,a cat\nsub\\b.jpg,"a dog, running"\n\n')
    assert read_captions(tmp_path) == {"a.png": "a cat", "sub/b.jpg": "a dog, running"}
    (tmp_path / "captions.csv").write_text("a.png,no header\n")
    assert read_captions(tmp_path) == {"a.png": "no header"}


@pytest.mark.parametrize("name, text, message", [
    ("captions.jsonl", '{"file": "a.png", "caption": "x"}\n{"file": "b.png"\n', r"captions.jsonl:2: not valid JSON"),
    ("captions.jsonl", '{"file": "a.png"}\n', r"captions.jsonl:1: expected an object with keys"),
    ("captions.jsonl", '{"file": "a.png", "caption": 3}\n', r"captions.jsonl:1: 'file' and 'caption' must be strings"),
    ("captions.jsonl", '{"file": "../a.png", "caption": "x"}\n', r"captions.jsonl:1: 'file' must be a path relative"),
    ("captions.jsonl", '{"file": "/a.png", "caption": "x"}\n', r"captions.jsonl:1: 'file' must be a path relative"),
    ("captions.jsonl", '{"file": "a.png", "caption": "x"}\n{"file": "./a.png", "caption": "y"}\n',
     r"captions.jsonl:2: a second caption for 'a.png' \(first on line 1\)"),
    ("captions.csv", "file,caption\na.png,x\nb.png\n", r"captions.csv:3: expected 2 fields"),
    ("captions.csv", "a.png,x,y\n", r"captions.csv:1: expected 2 fields"),
    ("captions.csv", ",x\n", r"captions.csv:1: 'file' must be a path relative"),
])
def test_read_captions_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(SourceError, match=message):
        read_captions(tmp_path)


def test_read_captions_needs_exactly_one_file(tmp_path):
    with pytest.raises(SourceError, match="no captions.jsonl or captions.csv"):
        read_captions(tmp_path)
    (tmp_path / "captions.jsonl").write_text("")
    (tmp_path / "captions.csv").write_text("")
    with pytest.raises(SourceError, match="both"):
        read_captions(tmp_path)


def test_caption_sample_evaluation_reads_the_requested_split():
    """A 'generator' that draws the real image of each caption it knows: perfect on the split it knows, and the
    split argument really switches the captions (TRAIN's scenes are not TEST's)."""
    from vqkit.apps.sample_eval import evaluate_caption_samples

    test = load_source("shapes", "test")
    by_caption = {c: (test.data[i] + 1) / 2 for i, c in enumerate(test.captions[:40])}

    def generate(n, condition, seed=0, batch_size=64):
        return torch.stack([by_caption.get(c, torch.zeros(3, 32, 32)) for c in condition["captions"]])

    on_test = evaluate_caption_samples(generate, "shapes", num=40)
    assert on_test["split"] == "test" and on_test["num_samples"] == 40 and on_test["match_all"] == 1.0
    ones, twos = on_test["captions_with_1_object"], on_test["captions_with_2_objects"]
    assert ones + twos == 40 and min(ones, twos) > 0
    assert on_test["match_all_with_1_object"] == on_test["match_all_with_2_objects"] == 1.0
    on_train = evaluate_caption_samples(generate, "shapes", num=40, split="train")
    assert on_train["split"] == "train" and on_train["match_all"] < 0.5
