"""Data sources: named sets, image files, folders, array files, photos."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.data import (ArraySource, FolderSource, PhotoSource, SourceError, load_array_source, load_source,
                        make_grid, read_image, resize_image, save_image, to_channels)
from vqkit.data import folder as folder_module
from vqkit.data.folder import IMAGE_EXTENSIONS
from vqkit.data.photos import TEST_PHOTOS, TRAIN_PHOTOS


def write_png(path, pixels, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)
    return path


def gradient(h=20, w=24, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8).squeeze()


def image_bytes(values, fmt="PNG"):
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, fmt)
    return buffer.getvalue()


# ---------------------------------------------------------------- named sources


@pytest.fixture(scope="module")
def mnist():
    return load_source("mnist5k", "train"), load_source("mnist5k", "test")


def test_mnist5k_split(mnist):
    train, test = mnist
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.image_size == (28, 28) and train.channels == 1 and train.num_classes == 10
    train_rows = {bytes(row.numpy().tobytes()) for row in train.data.to(torch.float16)}
    assert not any(bytes(row.numpy().tobytes()) in train_rows for row in test.data.to(torch.float16))


def test_mnist5k_value_range(mnist):
    image, label = mnist[0][0]
    assert image.dtype == torch.float32 and image.shape == (1, 28, 28)
    assert image.min() == -1.0 and image.max() == 1.0 and 0 <= label < 10


def test_digits():
    train, test = load_source("digits", "train"), load_source("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    image, _ = test[0]
    assert image.shape == (1, 8, 8) and -1.0 <= image.min() and image.max() <= 1.0


@pytest.mark.parametrize("spec", ["no_such_source", "missing_dir/", "missing.npy", "missing.npz"])
def test_load_source_missing(tmp_path, spec):
    with pytest.raises(SourceError, match="missing|no such"):
        load_source(str(tmp_path / spec) if spec != "no_such_source" else spec, "train")


def test_load_source_unknown_split():
    with pytest.raises(SourceError, match="split"):
        load_source("digits", "validation")


# ---------------------------------------------------------------- read_image and friends


def test_read_image_gray_rgb(tmp_path):
    gray = read_image(write_png(tmp_path / "g.png", gradient(channels=1)))
    rgb = read_image(write_png(tmp_path / "c.png", gradient()))
    assert gray.shape == (20, 24, 1) and rgb.shape == (20, 24, 3)
    assert gray.dtype == np.float32 and np.allclose(rgb, gradient() / 255.0)


def test_read_image_alpha_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest is transparent black
    image = read_image(write_png(tmp_path / "a.png", rgba))
    assert image.shape == (4, 4, 3)
    assert np.allclose(image[0, 0], (1, 0, 0)) and np.allclose(image[1, 1], 1.0)
    la = read_image(write_png(tmp_path / "la.png", np.zeros((4, 4, 4), np.uint8), "LA"))
    assert la.shape == (4, 4, 1) and np.allclose(la, 1.0)


def test_read_image_palette(tmp_path):
    colour = Image.fromarray(gradient()).convert("P", palette=Image.ADAPTIVE)
    colour.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (20, 24, 3)
    Image.fromarray(gradient(channels=1)).convert("P").save(tmp_path / "gray_p.png")
    assert read_image(tmp_path / "gray_p.png").shape == (20, 24, 1)


def test_read_image_16_bit_not_clipped(tmp_path):
    values = np.full((8, 8), 40000, np.uint16)
    values[0, 0] = 65535
    image = read_image(write_png(tmp_path / "deep.png", values))
    assert image.shape == (8, 8, 1)
    assert image[1, 1, 0] == pytest.approx(40000 / 65535, abs=1e-4) and image[0, 0, 0] == 1.0
    Image.fromarray(values.astype(np.int32), "I").save(tmp_path / "deep.tif")
    assert read_image(tmp_path / "deep.tif")[1, 1, 0] == pytest.approx(0.61, abs=0.01)


def test_read_image_bilevel_and_cmyk(tmp_path):
    Image.fromarray(gradient(channels=1) > 127).save(tmp_path / "bits.png")
    bits = read_image(tmp_path / "bits.png")
    assert bits.shape == (20, 24, 1) and set(np.unique(bits)) <= {0.0, 1.0}
    Image.fromarray(gradient()).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert read_image(tmp_path / "cmyk.jpg").shape == (20, 24, 3)


def test_read_image_corrupt(tmp_path):
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    data = image_bytes(gradient(64, 64))
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    for name in ("noise.png", "cut.png"):
        with pytest.raises(SourceError, match=name):
            read_image(tmp_path / name)


def test_to_channels():
    rgb = np.random.default_rng(0).random((5, 6, 3), dtype=np.float32)
    gray = to_channels(rgb, 1)
    assert gray.shape == (5, 6, 1)
    assert np.allclose(to_channels(gray, 3), np.repeat(gray, 3, -1))
    assert to_channels(rgb, 3) is rgb


@pytest.mark.parametrize("policy", ["resize", "crop", "stretch", "pad"])
@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (10, 12)])
def test_resize_policies_give_the_size(policy, shape):
    image = np.random.default_rng(0).random((*shape, 3), dtype=np.float32)
    out = resize_image(image, 16, policy)
    assert out.shape == (16, 16, 3) and 0.0 <= out.min() and out.max() <= 1.0
    assert resize_image(image, (12, 20), policy).shape == (12, 20, 3)


def test_resize_random_crop_follows_rng():
    image = np.random.default_rng(0).random((16, 64, 1), dtype=np.float32)
    first = resize_image(image, 16, "crop", np.random.default_rng(5))
    assert np.array_equal(first, resize_image(image, 16, "crop", np.random.default_rng(5)))
    assert np.array_equal(resize_image(image, 16, "crop"), image[:, 24:40])
    with pytest.raises(ValueError, match="policy"):
        resize_image(image, 16, "zoom")


def test_save_image_round_trip(tmp_path):
    chw = torch.rand(3, 10, 12)
    save_image(tmp_path / "out" / "c.png", chw)
    assert np.allclose(read_image(tmp_path / "out" / "c.png"), chw.permute(1, 2, 0).numpy(), atol=1 / 255)
    save_image(tmp_path / "g.png", np.full((10, 12, 1), 0.5, np.float32))
    with Image.open(tmp_path / "g.png") as img:
        assert img.mode == "L" and img.getpixel((0, 0)) == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.png", "out"]  # no temporary files left


def test_make_grid():
    grid = make_grid(torch.zeros(5, 3, 4, 6), nrow=3, padding=2)
    assert grid.shape == (2 * 6 + 2, 3 * 8 + 2, 3)
    assert grid[0].min() == 1.0 and grid[2, 2].max() == 0.0
    assert make_grid(torch.zeros(4, 1, 5, 5), padding=0).shape == (10, 10, 1)


# ---------------------------------------------------------------- folders


def make_folder(root, names, size=(16, 16), channels=3):
    for k, name in enumerate(names):
        write_png(root / name, gradient(*size, channels=channels, seed=k))
    return root


def test_folder_formats_and_size(tmp_path):
    pixels = gradient(16, 16)
    for ext in ("png", "jpg", "webp", "bmp", "tiff", "PNG", "JPEG", "tif"):
        Image.fromarray(pixels).save(tmp_path / f"img_{ext}.{ext}", {"jpg": "JPEG", "tif": "TIFF"}.get(ext.lower()))
    (tmp_path / "notes.txt").write_text("not an image")
    both = [FolderSource(tmp_path, split) for split in ("train", "test")]
    assert sum(len(s) for s in both) == 8
    image, label = both[0][0]
    assert image.shape == (3, 16, 16) and label == -1 and both[0].num_classes is None
    assert both[0].image_size == (16, 16) and both[0].channels == 3


def test_folder_channels_inferred(tmp_path):
    gray = make_folder(tmp_path / "gray", [f"{k}.png" for k in range(4)], channels=1)
    assert FolderSource(gray).channels == 1
    make_folder(gray, ["colour.png"])
    source = FolderSource(gray, channels=None)
    assert source.channels == 3 and source[0][0].shape == (3, 16, 16)
    assert FolderSource(gray, channels=1)[0][0].shape == (1, 16, 16)


def test_folder_hash_split(tmp_path):
    names = [f"img{k:02d}.png" for k in range(30)]
    make_folder(tmp_path, names)
    expected_test = {n for n in names if zlib.crc32(n.encode()) % 10 == 0}
    assert expected_test  # this set of names exercises the rule itself, not the fallback
    test = FolderSource(tmp_path, "test")
    train = FolderSource(tmp_path, "train")
    assert {p.name for p in test.files} == expected_test
    assert {p.name for p in train.files} == set(names) - expected_test
    assert [p.name for p in FolderSource(tmp_path, "test").files] == [p.name for p in test.files]


def test_folder_hash_split_fallback(tmp_path):
    names = [n for n in (f"f{k}.png" for k in range(40)) if zlib.crc32(n.encode()) % 10 != 0][:3]
    make_folder(tmp_path, names)
    assert [p.name for p in FolderSource(tmp_path, "test").files] == [sorted(names)[-1]]
    assert len(FolderSource(tmp_path, "train")) == 2


def test_folder_class_labels(tmp_path):
    for cls in ("dog", "cat", "bird"):
        make_folder(tmp_path / cls, [f"{cls}{k}.png" for k in range(10)] + [f"deeper/{cls}_x.png"])
    train = FolderSource(tmp_path, "train")
    assert train.class_names == ["bird", "cat", "dog"] and train.num_classes == 3
    for path, label in zip(train.files, train.labels):
        assert train.class_names[label] == path.relative_to(tmp_path).parts[0]
    assert FolderSource(tmp_path, "train", labels=False).num_classes is None


def test_folder_train_test_subfolders(tmp_path):
    make_folder(tmp_path / "train" / "a", ["1.png", "2.png"])
    make_folder(tmp_path / "train" / "b", ["3.png"])
    make_folder(tmp_path / "val" / "b", ["4.png"])
    train, test = FolderSource(tmp_path, "train"), FolderSource(tmp_path, "test")
    assert (len(train), len(test)) == (3, 1)
    assert train.class_names == test.class_names == ["a", "b"]
    assert test[0][1] == 1


def test_folder_corrupt_files_skipped_or_strict(tmp_path):
    make_folder(tmp_path / "train", ["good1.png", "good2.png"])
    make_folder(tmp_path / "test", ["good3.png"])
    (tmp_path / "train" / "noise.png").write_bytes(np.random.default_rng(1).bytes(300))
    data = image_bytes(gradient(16, 16))
    (tmp_path / "train" / "truncated.png").write_bytes(data[:len(data) * 2 // 3])
    with pytest.warns(UserWarning) as caught:
        source = FolderSource(tmp_path, "train")
    messages = " ".join(str(w.message) for w in caught)
    assert "noise.png" in messages and "truncated.png" in messages
    assert [p.name for p in source.files] == ["good1.png", "good2.png"]
    with pytest.raises(SourceError, match="noise.png"):
        FolderSource(tmp_path, "train", strict=True)


def test_folder_lazy_verification_substitutes_next(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_module, "LAZY_VERIFY_ABOVE", 0)
    make_folder(tmp_path / "train", ["a.png", "c.png"])
    make_folder(tmp_path / "test", ["t.png"])
    (tmp_path / "train" / "b.png").write_bytes(b"not a png")
    source = FolderSource(tmp_path, "train")
    assert len(source) == 3
    with pytest.warns(UserWarning, match="b.png"):
        substituted, _ = source[1]
    assert torch.equal(substituted, source[2][0])
    with pytest.raises(SourceError, match="b.png"):
        FolderSource(tmp_path, "train", strict=True)[1]


def test_folder_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing here")
    with pytest.raises(SourceError, match=r"no images.*\.png") as err:
        FolderSource(tmp_path)
    assert str(tmp_path) in str(err.value) and all(ext in str(err.value) for ext in IMAGE_EXTENSIONS)


def test_folder_no_readable_images(tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(SourceError, match="no readable images"):
        FolderSource(tmp_path)



def test_folder_unreadable_test_split_names_its_files(tmp_path):
    """Without train/ and test/ subfolders a small folder's TEST split can be a single file; when that file cannot
    be read, the error names it (the train split, readable, still loads)."""
    make_folder(tmp_path, [f"{k}.png" for k in range(5)])
    (tmp_path / "zz_broken.png").write_bytes(b"garbage")  # sorted last: TEST when no path hashes to TEST
    assert len(FolderSource(tmp_path, "train")) == 5  # no path of these hashes to TEST (crc32, deterministic)
    with pytest.warns(UserWarning, match="zz_broken.png"):
        with pytest.raises(SourceError, match=r"test split: its 1 file\(s\) \(zz_broken.png\) could not be read"):
            FolderSource(tmp_path, "test")

def test_folder_mixed_sizes(tmp_path):
    make_folder(tmp_path, [f"s{k}.png" for k in range(5)], size=(16, 16))
    make_folder(tmp_path, [f"t{k}.png" for k in range(5)], size=(20, 30))
    with pytest.raises(SourceError, match="image_size"):
        FolderSource(tmp_path)
    for policy in ("resize", "crop", "stretch", "pad"):
        source = FolderSource(tmp_path, image_size=12, resize=policy)
        assert {tuple(source[i][0].shape) for i in range(len(source))} == {(3, 12, 12)}


def test_folder_random_crops(tmp_path):
    make_folder(tmp_path / "train", ["wide.png"], size=(16, 48))
    make_folder(tmp_path / "test", ["t.png"])
    source = FolderSource(tmp_path, "train", image_size=16)
    first = source.get(0, np.random.default_rng(3))[0]
    assert torch.equal(first, source.get(0, np.random.default_rng(3))[0])
    crops = {source.get(0, np.random.default_rng(s))[0].sum().item() for s in range(10)}
    assert len(crops) > 1 and torch.equal(source[0][0], source[0][0])
    stretched = FolderSource(tmp_path, "train", image_size=16, resize="stretch")
    assert torch.equal(stretched.get(0, np.random.default_rng(1))[0], stretched[0][0])


def test_folder_not_a_folder(tmp_path):
    with pytest.raises(SourceError, match="not a folder"):
        FolderSource(tmp_path / "missing")


# ---------------------------------------------------------------- array files


@pytest.mark.parametrize("layout", ["nhw", "nhwc1", "nhwc3", "nchw1", "nchw3"])
def test_npy_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    shape = {"nhw": (10, 8, 9), "nhwc1": (10, 8, 9, 1), "nhwc3": (10, 8, 9, 3),
             "nchw1": (10, 1, 8, 9), "nchw3": (10, 3, 8, 9)}[layout]
    np.save(tmp_path / "x.npy", rng.integers(0, 256, shape, dtype=np.uint8))
    train, test = load_array_source(tmp_path / "x.npy", "train"), load_source(str(tmp_path / "x.npy"), "test")
    assert (len(train), len(test)) == (8, 2)
    assert train.image_size == (8, 9) and train.channels == (3 if "3" in layout else 1)
    assert train.name == "x.npy" and not train.has_labels


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.bool_, np.float32, np.float64])
def test_npy_dtypes(tmp_path, dtype):
    full = {np.uint8: 255, np.uint16: 65535, np.bool_: True}.get(dtype, 1.0)
    images = np.zeros((5, 4, 4), dtype)
    images[:, 0, 0] = full
    np.save(tmp_path / "x.npy", images)
    image = load_array_source(tmp_path / "x.npy", "train")[0][0]
    assert image[0, 0, 0] == 1.0 and image[0, 1, 1] == -1.0


def test_npy_rgba_composited_on_white(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 4, 4, 4), np.uint8))  # transparent black
    source = load_array_source(tmp_path / "x.npy", "train")
    assert source.channels == 3 and torch.all(source[0][0] == 1.0)


@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (0.0, 255.0)])
def test_npy_float_out_of_range(tmp_path, low, high):
    np.save(tmp_path / "x.npy", np.linspace(low, high, 5 * 16, dtype=np.float32).reshape(5, 4, 4))
    with pytest.raises(SourceError, match=r"x\.npy.*\[0, 1\]"):
        load_array_source(tmp_path / "x.npy", "train")


class _Tripwire:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def _touch(path):
    open(path, "w").close()


def test_object_arrays_refused_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    objects = np.empty(5, dtype=object)
    objects[:] = [_Tripwire(marker) for _ in range(5)]
    np.save(tmp_path / "obj.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "obj.npz", images=np.zeros((5, 4, 4), np.uint8), labels=objects)
    for name in ("obj.npy", "obj.npz"):
        with pytest.raises(SourceError, match=rf"{name}.*object"):
            load_source(str(tmp_path / name), "train")
    assert not marker.exists()


def test_npz_keys_and_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    labels = np.arange(20) % 4
    np.savez(tmp_path / "a.npz", x=images, y=labels)
    train, test = load_array_source(tmp_path / "a.npz", "train"), load_array_source(tmp_path / "a.npz", "test")
    assert (len(train), len(test)) == (16, 4) and train.num_classes == test.num_classes == 4
    assert test.labels.tolist() == labels[4::5].tolist()
    np.savez(tmp_path / "only.npz", anything=images)
    assert len(load_array_source(tmp_path / "only.npz", "train")) == 16
    np.savez(tmp_path / "two.npz", first=images, second=images)
    with pytest.raises(SourceError, match="two.npz.*images"):
        load_array_source(tmp_path / "two.npz", "train")


def test_npz_explicit_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "s.npz", x_train=rng.random((7, 5, 5), dtype=np.float32), y_train=np.arange(7) % 3,
             x_test=rng.random((3, 5, 5), dtype=np.float32), y_test=np.array([0, 1, 2]))
    train, test = load_array_source(tmp_path / "s.npz", "train"), load_array_source(tmp_path / "s.npz", "test")
    assert (len(train), len(test)) == (7, 3) and test.labels.tolist() == [0, 1, 2]


def test_array_options(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).integers(0, 256, (5, 10, 14, 3), dtype=np.uint8))
    source = load_array_source(tmp_path / "x.npy", "train", image_size=8, channels=1, strict=True)
    assert isinstance(source, ArraySource) and source[0][0].shape == (1, 8, 8)


def test_bad_array_files(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SourceError, match="junk.npz"):
        load_array_source(tmp_path / "junk.npz", "train")
    np.save(tmp_path / "flat.npy", np.zeros((5, 16)))
    with pytest.raises(SourceError, match="flat.npy.*shape"):
        load_array_source(tmp_path / "flat.npy", "train")


# ---------------------------------------------------------------- photos


@pytest.fixture(scope="module")
def photos():
    return PhotoSource("train", crop_size=32, crops_per_photo=4), PhotoSource("test", crop_size=32)


def test_photos_split_and_shapes(photos):
    train, test = photos
    assert not set(train.photo_names) & set(test.photo_names)
    assert train.photo_names == TRAIN_PHOTOS and test.photo_names == TEST_PHOTOS
    assert len(train) == 4 * len(TRAIN_PHOTOS) and 0 < len(test) <= 16 * len(TEST_PHOTOS)
    for source in photos:
        image, label = source.get(len(source) - 1, np.random.default_rng(0))
        assert image.shape == (3, 32, 32) and label == -1 and -1.0 <= image.min() and image.max() <= 1.0
        assert source.channels == 3 and source.num_classes is None and source.image_size == (32, 32)


def test_photos_deterministic(photos):
    train, test = photos
    assert torch.equal(train.get(5, np.random.default_rng(7))[0], train.get(5, np.random.default_rng(7))[0])
    assert not torch.equal(train.get(5, np.random.default_rng(7))[0], train.get(5, np.random.default_rng(8))[0])
    assert torch.equal(train[3][0], train[3][0])
    assert torch.equal(test.get(2, np.random.default_rng(1))[0], test[2][0])


def test_photos_named_source():
    source = load_source("photos", "test", image_size=48)
    assert source.image_size == (48, 48) and source[0][0].shape == (3, 48, 48)


def test_folder_captions_from_jsonl(tmp_path):
    import json

    for i in range(12):
        Image.fromarray(np.full((16, 16, 3), i * 20, dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i in range(11):
            f.write(json.dumps({"file": f"im{i}.png", "caption": f"picture {i}"}) + "\n")
    with pytest.warns(UserWarning, match="no caption"):
        train = load_source(str(tmp_path), "train")
    test = load_source(str(tmp_path), "test")
    captions = train.captions + test.captions
    assert len(captions) == 12 and captions.count("") == 1  # im11 has none
    for path, caption in zip(train.files, train.captions):
        assert caption in ("", f"picture {path.stem[2:]}")  # each caption belongs to its own file


def test_published_files_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); what they publish must be readable like any file the user
    writes (0666 minus the umask), or a report's PNGs and a model's weights are unreadable to everyone else."""
    import os
    import stat

    from vqkit.data.images import save_image
    from vqkit.io import atomic_save_safetensors, atomic_write_json

    umask = os.umask(0o022)
    try:
        save_image(tmp_path / "a.png", np.zeros((4, 4, 3)))
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        atomic_save_safetensors(tmp_path / "a.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(umask)
    for name in ("a.png", "a.json", "a.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.png", "a.safetensors"]  # no temp files left
