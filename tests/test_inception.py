"""The standard FID's Inception-v3 (vqkit.metrics.inception): parity with torch-fidelity's port of the reference
graph, TF1 resizing, finding and checking the weight file, and `--fid inception` on the command line.

The real weights (91 MB) cannot be downloaded here, so every test uses random weights in the reference layout;
what they prove is that the same file gives the same features as the reference implementation."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.cli import main
from vqkit.io import VQKitFileError
from vqkit.metrics import inception
from vqkit.metrics.inception import (INCEPTION_FILES, FIDInceptionV3, InceptionFeatures, InceptionWeightsMissing,
                                     fid_scores, find_inception_weights, load_fid_inception, resize_bilinear_tf1)


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """Random weights, with BatchNorm statistics moved off their defaults so that a wrongly wired one shows."""
    torch.manual_seed(seed)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return net.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILES[0]
    torch.save(random_inception().state_dict(), path)
    return path


@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    """Every place vqkit looks for the weights points into an empty temporary folder."""
    monkeypatch.setenv("VQKIT_HOME", str(tmp_path / "vqkit"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VQKIT_INCEPTION_WEIGHTS", raising=False)
    return tmp_path


def import_torch_fidelity_inception():
    """torch-fidelity's Inception module, imported without the package's __init__ (which needs torchvision)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("torch-fidelity is not installed (pip install --no-deps torch-fidelity==0.4.0)")
    if "torch_fidelity" not in sys.modules:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3


def test_features_match_torch_fidelity_for_the_same_weight_file(weights_file):
    reference_class = import_torch_fidelity_inception()
    reference = reference_class("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file))
    ours = InceptionFeatures(weights=weights_file)
    g = torch.Generator().manual_seed(1)
    # odd sizes: the resize to 299 is part of what must agree; grayscale goes in repeated to RGB
    rgb = torch.randint(0, 256, (2, 3, 28, 37), dtype=torch.uint8, generator=g)
    expected = reference(rgb)[0]
    got = ours.features(rgb.float() / 127.5 - 1)
    assert got.shape == (2, 2048)
    assert float(expected.abs().max()) > 0.05  # the features are not trivially zero
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())
    gray = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8, generator=g)
    assert torch.allclose(ours.features(gray.float() / 127.5 - 1), reference(gray.expand(-1, 3, -1, -1))[0],
                          atol=1e-4, rtol=1e-4)


def test_tf1_resize_samples_without_a_half_pixel_offset():
    x = torch.tensor([[[[0.0, 10.0]]]])  # one row, two pixels
    # output pixel i reads input position i * 2 / 4 = 0, 0.5, 1, 1.5 (the last one clamps to the edge)
    assert resize_bilinear_tf1(x.expand(1, 1, 2, 2), 4)[0, 0, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    same = torch.rand(1, 3, 5, 7)
    assert torch.allclose(resize_bilinear_tf1(torch.full((1, 3, 5, 7), 3.0), 11), torch.full((1, 3, 11, 11), 3.0))
    square = torch.rand(1, 3, 6, 6)
    assert torch.allclose(resize_bilinear_tf1(square, 6), square)
    assert resize_bilinear_tf1(same, 9).shape == (1, 3, 9, 9)


def test_images_are_quantised_to_8_bits_and_scaled_like_the_reference():
    x = torch.tensor([-1.0, -0.999, 0.0, 1.0]).reshape(1, 1, 2, 2)
    prepared = InceptionFeatures.prepare(x)
    assert prepared.shape == (1, 3, 299, 299)
    values = {round(float(v), 6) for v in prepared.unique()}
    # -0.999 -> 0.1275 rounds to 0 like -1; 0 -> 127.5 rounds to 128 (round half to even) -> 0 after the shift
    assert min(values) == pytest.approx(-1.0) and max(values) == pytest.approx(127 / 128)
    assert torch.equal(prepared[..., 0, 0], torch.full((1, 3), -1.0))


def test_missing_weights_say_where_to_get_and_put_them(no_caches):
    with pytest.raises(InceptionWeightsMissing) as caught:
        find_inception_weights()
    message = str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    for needed in (INCEPTION_FILES[0], inception.INCEPTION_URL, "never", "~/.cache/vqkit",
                   "--inception-weights", "VQKIT_INCEPTION_WEIGHTS",
                   str(no_caches / "torch" / "hub" / "checkpoints" / INCEPTION_FILES[1])):
        assert needed in message, needed
    with pytest.raises(InceptionWeightsMissing, match="absent.pth: no such file"):
        find_inception_weights(no_caches / "absent.pth")


def test_weights_are_found_in_the_caches_under_either_name(no_caches, weights_file):
    hub = no_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / INCEPTION_FILES[1]).write_bytes(weights_file.read_bytes())  # torch-fidelity's name
    assert find_inception_weights() == hub / INCEPTION_FILES[1]
    home = no_caches / "vqkit"
    home.mkdir()
    (home / INCEPTION_FILES[0]).write_bytes(weights_file.read_bytes())  # vqkit's folder comes first
    assert find_inception_weights() == home / INCEPTION_FILES[0]
    net = load_fid_inception()
    assert torch.equal(net.Mixed_7c.branch_pool.conv.weight, random_inception().Mixed_7c.branch_pool.conv.weight)
    assert not any(p.requires_grad for p in net.parameters()) and not net.training


def test_wrong_corrupt_and_pickled_files_are_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(VQKitFileError, match=r"wrong.pth: not the FID Inception-v3 weights.*missing"):
        load_fid_inception(tmp_path / "wrong.pth")
    state = random_inception().state_dict()
    state["fc.weight"] = torch.zeros(1000, 2048)  # torchvision's ImageNet head, not the FID graph's 1008
    torch.save(state, tmp_path / "imagenet.pth")
    with pytest.raises(VQKitFileError, match="wrong shape: fc.weight"):
        load_fid_inception(tmp_path / "imagenet.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(VQKitFileError, match="corrupt.pth: not a readable PyTorch weight file"):
        load_fid_inception(tmp_path / "corrupt.pth")
    torch.save({"net": Path("x")}, tmp_path / "pickled.pth")  # an arbitrary object: weights_only refuses it
    with pytest.raises(VQKitFileError, match="pickled.pth"):
        load_fid_inception(tmp_path / "pickled.pth")


def test_fid_scores_zero_for_the_same_images_and_floor_at_the_same_size(monkeypatch):
    monkeypatch.setattr(inception, "INPUT_SIZE", 80)  # the smallest input the network takes; fast
    extractor = InceptionFeatures(network=random_inception())
    g = torch.Generator().manual_seed(0)
    test = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1
    train = torch.rand(10, 1, 28, 28, generator=g) * 2 - 1
    same = fid_scores(extractor, test, test)
    assert same["fid_inception"] == pytest.approx(0.0, abs=1e-6) and "fid_inception_floor" not in same
    shifted = fid_scores(extractor, (test + 0.5).clamp(-1, 1), test, train)
    assert shifted["fid_inception"] > 0 and shifted["fid_inception_floor"] > 0
    assert shifted["fid_feature_network"] == "inception_v3_fid"


def write_split(folder: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")


def test_cli_eval_tokenizer_with_fid_inception(tmp_path, monkeypatch, weights_file, capsys):
    from vqkit import VQModel

    monkeypatch.setattr(inception, "INPUT_SIZE", 80)
    model = VQModel(in_channels=1, base_channels=8, channel_mult=[1, 2], z_channels=8, embed_dim=8,
                    codebook_size=16, mid_attention=False)
    model.save_pretrained(tmp_path / "tok")
    write_split(tmp_path / "data" / "train", 7, 0)
    write_split(tmp_path / "data" / "test", 4, 1)
    out = tmp_path / "eval.json"
    assert main(["eval", "tokenizer", "--model", str(tmp_path / "tok"), "--data", str(tmp_path / "data"), "--no-fd",
                 "--fid", "inception", "--inception-weights", str(weights_file), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_images"] == 4
    assert np.isfinite(result["fid_inception"]) and result["fid_inception"] > 0  # an untrained tokenizer
    assert np.isfinite(result["fid_inception_floor"])
    assert "recon. fid_inception" in capsys.readouterr().out


def test_cli_missing_inception_weights_fail_before_any_work(no_caches, capsys):
    # the prior does not exist either: the weights are checked first, so their message is what the user sees
    for argv in (["eval", "samples", "--prior", str(no_caches / "no-prior"), "--fid", "inception"],
                 ["eval", "tokenizer", "--model", str(no_caches / "no-model"), "--data", "mnist5k",
                  "--fid", "inception"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "FID Inception weights" in err and "Traceback" not in err, argv
