"""Evaluation of generated images: class accuracy, FD and KID against TEST next to the FD(TRAIN, TEST) floor,
sampling speed, and (for captioned data) caption agreement measured on the images."""

from __future__ import annotations

import time
from typing import Callable

import torch

from ..data.sources import load_source

# generate(n, labels or captions or None, seed, batch_size) -> images [n, C, H, W] in [0, 1]
GenerateFn = Callable[..., torch.Tensor]


def prior_generator(prior, tokenizer, sampling: dict, guide=None) -> GenerateFn:
    from .generate import decode_samples, sampling_kwargs

    kwargs = sampling_kwargs(sampling, prior)
    if guide is not None:
        kwargs["guide"] = guide

    def generate(n, condition=None, seed=0, batch_size=64):
        grids = prior.sample(n, condition, seed=seed, batch_size=batch_size, **kwargs)
        return decode_samples(tokenizer, grids)

    return generate


def gan_generator(gan) -> GenerateFn:
    def generate(n, condition=None, seed=0, batch_size=64):
        labels = condition.get("labels") if isinstance(condition, dict) else None
        return gan.sample(n, labels=labels, seed=seed, batch_size=batch_size)

    return generate


def time_generation(generate: GenerateFn, condition_for: Callable[[int], object], batch_size: int, repeats: int = 3) -> float:
    """Seconds per image when generating ``batch_size`` images at once (median over ``repeats``, after a warm-up)."""
    generate(batch_size, condition_for(batch_size), seed=123, batch_size=batch_size)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        generate(batch_size, condition_for(batch_size), seed=1000 + r, batch_size=batch_size)
        times.append((time.perf_counter() - t0) / batch_size)
    return sorted(times)[len(times) // 2]


def sample_labels(dataset: str, per_class: int | None = None) -> torch.Tensor:
    """The class of every sample to generate: ``per_class`` of each class, or by default exactly TRAIN's labels
    (sorted), so the samples match TRAIN in number and class mix and their FD against TEST reads directly against
    FD(TRAIN, TEST)."""
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {per_class}")
        return torch.arange(load_source(dataset, "test").num_classes).repeat_interleave(per_class)
    train = load_source(dataset, "train")
    labels = getattr(train, "labels", None)
    if labels is None:
        labels = torch.tensor([train[i][1] for i in range(len(train))])
    return torch.as_tensor(labels).long().sort().values


@torch.no_grad()
def evaluate_class_samples(generate: GenerateFn, dataset: str = "mnist5k", per_class: int | None = None,
                           seed: int = 0, batch_size: int = 64, progress: bool = True, timing: bool = True,
                           tokenizer=None, fid_network=None) -> dict:
    """Class-conditional samples of every class, judged by vqkit's classifier trained on TRAIN only.

    FD is biased upwards by a term that shrinks with the number of images (1000 real TRAIN images score about 1.0
    against MNIST-5k TEST where all 4000 score 0.36), so the floor is always taken at the samples' own size:
    ``fd_floor_same_n`` is FD(TRAIN, TEST) with as many TRAIN images as there are samples (mean over random subsets
    when fewer), and ``fd_over_floor`` the ratio to read. By default (``per_class=None``) the samples follow TRAIN's
    labels exactly, and the two floors coincide.

    With the prior's ``tokenizer``, ``fd_tokenizer_ceiling`` is FD(TRAIN's reconstructions, TEST) at the same size:
    what a prior that reproduced TRAIN's token grids exactly would score, so the gap between it and ``fd`` is the
    prior's and the gap between the floor and it the tokenizer's.

    FD rewards copying TRAIN (TRAIN itself scores the floor), so ``train_nearest_neighbour_ratio`` says how close
    the samples sit to TRAIN in the classifier's feature space relative to TEST's images (1: as novel as new real
    images; well below 1: copies).

    With ``fid_network`` (an ``InceptionFeatures``), also the standard FID of the samples against TEST,
    ``fid_inception``, beside ``fid_inception_floor`` (FID(TRAIN, TEST) at the samples' size).
    """
    from ..metrics.classifier import fd_floor_of_features, get_classifier, source_tensors
    from ..metrics.fd import frechet_distance, kernel_distance, nearest_neighbour_ratio

    with torch.enable_grad():  # the first call trains the classifier (then it is cached)
        classifier = get_classifier(dataset, progress=progress)
    test = load_source(dataset, "test")
    num_classes = test.num_classes
    labels = sample_labels(dataset, per_class)
    t0 = time.perf_counter()
    images = generate(len(labels), {"labels": labels}, seed=seed, batch_size=batch_size)
    wall = time.perf_counter() - t0
    x = images * 2 - 1
    accuracy = float((classifier.predict(x) == labels).float().mean())
    # features of each set once, for FD, KID and both floors
    sample_feats, test_feats = classifier.features(x), classifier.features(source_tensors(test)[0])
    train = load_source(dataset, "train")
    train_feats = classifier.features(source_tensors(train)[0])
    kid = kernel_distance(sample_feats, test_feats)
    fd = frechet_distance(sample_feats, test_feats)
    floor = fd_floor_of_features(train_feats, test_feats)
    floor_same_n = fd_floor_of_features(train_feats, test_feats, n=len(labels))
    result = {
        "dataset": dataset, "num_samples": len(labels), "class_accuracy": accuracy,
        "fd": fd, "fd_floor_same_n": floor_same_n, "fd_over_floor": fd / floor_same_n,
        "fd_floor_train_test": floor, "kid": kid.mean, "kid_std": kid.std,
        "feature_network": classifier.name, "samples_per_second": len(labels) / wall,
        # copying check: ~1 when the samples are as far from TRAIN as TEST's images are, well below 1 when they copy
        "train_nearest_neighbour_ratio": nearest_neighbour_ratio(sample_feats, train_feats, test_feats),
    }
    if tokenizer is not None:
        from .generate import decode_samples, tokenize_source

        reconstructions = decode_samples(tokenizer, tokenize_source(tokenizer, train, progress=False))
        recon_feats = classifier.features(reconstructions * 2 - 1)
        result["fd_tokenizer_ceiling"] = fd_floor_of_features(recon_feats, test_feats, n=len(labels))
    if fid_network is not None:
        from ..metrics.inception import fid_scores

        result.update(fid_scores(fid_network, x, source_tensors(test)[0], source_tensors(train)[0], progress))
    if timing:
        condition_for = lambda n: {"labels": torch.arange(n) % num_classes}  # noqa: E731
        # one image takes milliseconds and this VM's timings wander: the median of 25
        result["latency_batch1_seconds"] = time_generation(generate, condition_for, 1, repeats=25)
        result["throughput_batch64_images_per_second"] = 1.0 / time_generation(generate, condition_for, 64)
    return result


@torch.no_grad()
def evaluate_caption_samples(generate: GenerateFn, dataset: str = "shapes", num: int = 500, seed: int = 0,
                             batch_size: int = 64, split: str = "test", fid_network=None) -> dict:
    """Text-conditional samples for the first ``num`` captions of ``split`` (TEST; TRAIN's serve to choose sampling
    settings without looking at TEST), checked by measuring colour, position and shape in the images. With
    ``fid_network`` also ``fid_inception`` of the samples against those captions' images, beside its floor (as many
    images of the other split against the same images)."""
    from ..data.shapes import caption_match

    source = load_source(dataset, split)
    captions = list(source.captions[:num])
    images = generate(len(captions), {"captions": captions}, seed=seed, batch_size=batch_size)
    checks = [caption_match(images[i], source.attributes[i]) for i in range(len(captions))]
    share = {k: sum(c[k] for c in checks) / len(checks) for k in ("colour", "position", "shape", "all")}
    # the same check split by how many objects the caption names (two objects also test which colour goes where)
    counts = [len(source.attributes[i]) for i in range(len(captions))]
    by_objects = {}
    for n in sorted(set(counts)):
        hits = [check["all"] for check, m in zip(checks, counts) if m == n]
        name = f"{n}_object" + ("s" if n > 1 else "")
        by_objects[f"captions_with_{name}"] = len(hits)
        by_objects[f"match_all_with_{name}"] = sum(hits) / len(hits)
    result = {"dataset": dataset, "split": split, "num_samples": len(captions),
              **{f"match_{k}": v for k, v in share.items()}, **by_objects}
    if fid_network is not None:
        from ..metrics.classifier import source_tensors
        from ..metrics.inception import fid_scores

        other = load_source(dataset, "train" if split == "test" else "test")
        result.update(fid_scores(fid_network, images * 2 - 1, source_tensors(source)[0][:num],
                                 source_tensors(other)[0]))
    return result
