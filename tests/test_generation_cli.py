"""End-to-end generation through the CLI with tiny models: train a tokenizer, train a prior over its tokens (class-
and text-conditional), sample to a grid and to a folder, resume, and the errors a user meets."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit.apps.generate import load_generator, resolve_tokenizer_path
from vqkit.cli import main
from vqkit.io import VQKitFileError

TINY_TOKENIZER = ["steps=4", "batch_size=16", "log_every=2", "image_every=0", "ckpt_every=4", "eval_batch_size=500",
                  "model.base_channels=8", "model.channel_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8",
                  "model.codebook_size=32", "model.kmeans_init=false"]
TINY_PRIOR = ["batch_size=16", "log_every=2", "image_every=3", "ckpt_every=3", "eval_batch_size=500",
              "prior.d_model=32", "prior.n_layers=1", "prior.n_heads=2"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "tok"
    assert main(["train", "tokenizer", "--data", "mnist5k", "--out", str(out), *TINY_TOKENIZER]) == 0
    return out


@pytest.mark.parametrize("mode", ["ar", "mask"])
def test_train_prior_then_sample(tokenizer_dir, tmp_path, mode):
    prior = tmp_path / "prior"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(prior),
                 "--mode", mode, "--steps", "6", *TINY_PRIOR]) == 0
    config = json.loads((prior / "config.json").read_text())
    assert config["mode"] == mode and config["num_classes"] == 10 and config["token_grid"] == [14, 14]
    assert config["codebook_size"] == 32
    ev = json.loads((prior / "eval.json").read_text())
    assert ev["mode"] == mode and ev["num_images"] == 1000
    assert (prior / "samples.png").is_file() and (prior / "images" / "samples_00000003.png").is_file()
    # sampling: a .png gets a grid, anything else a folder of per-sample PNGs at the data's resolution + grid.png
    assert main(["sample", "--prior", str(prior), "--class", "3", "--n", "5", "--seed", "1",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 28
    assert main(["sample", "--prior", str(prior), "--n", "3", "--out", str(tmp_path / "many")]) == 0
    files = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert files == ["grid.png", "sample_00000.png", "sample_00001.png", "sample_00002.png"]
    assert Image.open(tmp_path / "many" / "sample_00000.png").size == (28, 28)
    # the decoding options reach the sampler (revisit is for masked priors; an AR prior ignores it)
    assert main(["sample", "--prior", str(prior), "--class", "3", "--n", "2", "--guidance", "2",
                 "--guidance-schedule", "linear", "--revisit", "--out", str(tmp_path / "options.png")]) == 0
    assert (tmp_path / "options.png").is_file()
    assert main(["sample", "--prior", str(prior), "--class", "3", "--n", "2", "--order", "halton",
                 "--out", str(tmp_path / "halton.png")]) == 0
    assert (tmp_path / "halton.png").is_file()


def test_samples_are_seeded(tokenizer_dir, tmp_path):
    prior = tmp_path / "prior"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(prior),
                 "--steps", "3", *TINY_PRIOR]) == 0
    a, b, c = (tmp_path / n for n in ("a.png", "b.png", "c.png"))
    for path, seed in ((a, "7"), (b, "7"), (c, "8")):
        assert main(["sample", "--prior", str(prior), "--class", "1", "--n", "4", "--seed", seed, "--out", str(path)]) == 0
    pixels = [np.asarray(Image.open(p)) for p in (a, b, c)]
    assert np.array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


@pytest.mark.parametrize("ema", [[], ["ema_decay=0.9"]], ids=["raw", "ema"])
def test_prior_resume_is_exact(tokenizer_dir, tmp_path, ema):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--steps", "6", *TINY_PRIOR,
              *ema]
    assert main([*common, "--out", str(straight)]) == 0
    assert main([*common, "--out", str(resumed), "--stop-at", "3"]) == 0
    assert not (resumed / "model.safetensors").exists()
    assert main(["train", "prior", "--out", str(resumed), "--resume"]) == 0
    from safetensors.torch import load_file

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prior_records_its_tokenizer_relative(tokenizer_dir, tmp_path):
    prior = tmp_path / "prior"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(prior),
                 "--steps", "2", *TINY_PRIOR]) == 0
    recorded = json.loads((prior / "config.json").read_text())["tokenizer"]
    assert resolve_tokenizer_path(prior, recorded).resolve() == tokenizer_dir.resolve()
    prior_model, tokenizer, sampling = load_generator(prior)
    assert tokenizer.config.codebook_size == prior_model.config.codebook_size
    with pytest.raises(VQKitFileError, match="not found"):
        resolve_tokenizer_path(prior, "no/such/tokenizer")


def test_text_conditional_prior_on_shapes(tmp_path, capsys):
    tok, prior = tmp_path / "tok", tmp_path / "prior"
    assert main(["train", "tokenizer", "--data", "shapes", "--out", str(tok), *TINY_TOKENIZER]) == 0
    assert main(["train", "prior", "--tokenizer", str(tok), "--data", "shapes", "--out", str(prior), "--steps", "2",
                 *TINY_PRIOR, "prior.text_vocab=bytes", "prior.max_text_len=72"]) == 0
    config = json.loads((prior / "config.json").read_text())
    assert config["text_vocab"] == "bytes" and config["num_classes"] is None
    assert main(["sample", "--prior", str(prior), "--text", "a red circle at the top left", "--n", "2",
                 "--out", str(tmp_path / "red.png")]) == 0
    # class labels on a text-conditional prior: a clear error, exit code 2
    assert main(["sample", "--prior", str(prior), "--class", "1", "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    # a word vocabulary read from TRAIN's captions: saved in the config, unknown words refused with their names
    words = tmp_path / "words"
    assert main(["train", "prior", "--tokenizer", str(tok), "--data", "shapes", "--out", str(words), "--steps", "2",
                 *TINY_PRIOR, "prior.max_text_len=17"]) == 0  # the shapes preset's vocabulary: words
    config = json.loads((words / "config.json").read_text())
    assert config["text_vocab"] == "words" and {"red", "circle", "top", "and"} <= set(config["text_words"])
    assert main(["sample", "--prior", str(words), "--text", "a red circle at the top left", "--n", "2",
                 "--out", str(tmp_path / "red-words.png")]) == 0
    assert main(["sample", "--prior", str(words), "--text", "a purple star", "--n", "1",
                 "--out", str(tmp_path / "star.png")]) == 2
    assert "purple, star" in capsys.readouterr().err
    assert main(["train", "prior", "--tokenizer", str(tok), "--data", "shapes", "--out", str(tmp_path / "short"),
                 "--steps", "2", *TINY_PRIOR, "prior.text_vocab=words", "prior.max_text_len=8"]) == 2
    assert "max_text_len" in capsys.readouterr().err


def test_train_prior_errors(tokenizer_dir, tmp_path, capsys):
    assert main(["train", "prior", "--data", "mnist5k", "--out", str(tmp_path / "p")]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["train", "prior", "--tokenizer", str(tmp_path / "missing"), "--data", "mnist5k",
                 "--out", str(tmp_path / "p2")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "photos",
                 "--out", str(tmp_path / "p3")]) == 2  # RGB data, 1-channel tokenizer
    assert "channel" in capsys.readouterr().err
    assert main(["train", "prior", "--out", str(tmp_path / "nothing"), "--resume"]) == 2


@pytest.mark.parametrize("setting, message", [("sampling.order=raster", "order must be one of"),
                                              ("sampling.guidance_schedule=cosine", "guidance_schedule must be"),
                                              ("sampling.temperature=0", "temperature must be > 0")])
def test_bad_sampling_settings_are_refused_before_training(tokenizer_dir, tmp_path, capsys, setting, message):
    """A prior's saved sampling settings are checked with the config, not when the trained prior first samples."""
    out = tmp_path / "prior"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(out),
                 "--mode", "mask", "--steps", "3", *TINY_PRIOR, setting]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_demo_runs_end_to_end_with_tiny_settings(tmp_path, monkeypatch):
    """The demo's plumbing (tokenizer -> prior -> samples -> evaluation -> report) with tiny models and a tiny
    feature classifier in a private cache; its quality is judged by benchmarks/generation_mnist.py, not here."""
    import vqkit.metrics.classifier as classifier_module
    from vqkit.apps.demo import run_demo
    from vqkit.metrics.classifier import ClassifierRecipe

    tiny = ClassifierRecipe(stage_widths=((4,), (8,)), grid=2, hidden=16, epochs=1, batch_size=32,
                            max_train_images=256, max_steps=6)
    real_get = classifier_module.get_classifier
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(classifier_module, "get_classifier", lambda dataset, **kw: real_get(dataset, recipe=tiny, **kw))
    out = tmp_path / "demo"
    summary = run_demo(out, progress=False, tokenizer_overrides=TINY_TOKENIZER,
                       prior_overrides=[*TINY_PRIOR, "steps=3"], per_class=2)
    for name in ("tokenizer/model.safetensors", "prior/model.safetensors", "samples.png", "report.html",
                 "eval_samples.json", "demo.json"):
        assert (out / name).is_file(), name
    samples = summary["samples"]
    assert samples["num_samples"] == 20 and 0.0 <= samples["class_accuracy"] <= 1.0 and samples["fd"] >= 0
    assert "classifier" in samples["feature_network"]
    assert json.loads((out / "demo.json").read_text())["prior"]["steps"] == 3
    # a second call reuses the finished stages instead of training again
    again = run_demo(out, progress=False, per_class=2)
    assert again["prior"] == summary["prior"] and again["tokenizer"] == summary["tokenizer"]


def test_eval_samples_applies_the_sampling_options(tokenizer_dir, tmp_path, monkeypatch):
    """`vqkit eval samples --prior`: the command-line options override the prior's saved sampling settings, and the
    results reach the terminal and --json (tiny classifier in a private cache)."""
    import vqkit.apps.sample_eval as sample_eval
    import vqkit.metrics.classifier as classifier_module
    from vqkit.metrics.classifier import ClassifierRecipe

    prior = tmp_path / "prior"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(prior),
                 "--mode", "mask", "--steps", "3", *TINY_PRIOR]) == 0
    tiny = ClassifierRecipe(stage_widths=((4,), (8,)), grid=2, hidden=16, epochs=1, batch_size=32,
                            max_train_images=256, max_steps=6)
    real_get, real_generator, used = classifier_module.get_classifier, sample_eval.prior_generator, []
    monkeypatch.setenv("VQKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(classifier_module, "get_classifier", lambda dataset, **kw: real_get(dataset, recipe=tiny, **kw))
    monkeypatch.setattr(sample_eval, "prior_generator",
                        lambda p, t, sampling: used.append(sampling) or real_generator(p, t, sampling))
    out = tmp_path / "eval.json"
    assert main(["eval", "samples", "--prior", str(prior), "--per-class", "2", "--no-timing", "--order", "halton",
                 "--top-p", "0.9", "--min-p", "0.05", "--guidance", "1.5", "--steps", "4", "--json", str(out)]) == 0
    saved = json.loads((prior / "sampling.json").read_text())
    assert used[-1] == {**saved, "order": "halton", "top_p": 0.9, "min_p": 0.05, "guidance_scale": 1.5, "steps": 4}
    result = json.loads(out.read_text())
    assert result["num_samples"] == 20 and 0 <= result["class_accuracy"] <= 1 and result["fd"] >= 0
    # --fid inception adds the standard FID beside its floor (random Inception weights; its features are replaced by
    # a cheap pooling here, since 5000 real images through Inception take minutes: this checks the plumbing)
    import torch.nn.functional as F

    from vqkit.metrics import inception

    weights = tmp_path / "inception.pth"
    torch.save(inception.FIDInceptionV3().state_dict(), weights)
    monkeypatch.setattr(inception.InceptionFeatures, "features",
                        lambda self, x, **kw: F.adaptive_avg_pool2d(x.float(), 3).flatten(1))
    assert main(["eval", "samples", "--prior", str(prior), "--per-class", "2", "--no-timing", "--fid", "inception",
                 "--inception-weights", str(weights), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["fid_inception"] > 0 and result["fid_inception_floor"] > 0 and "fd" in result


def test_shift_images_moves_content_by_whole_pixels():
    from vqkit.apps.generate import pixel_offsets, shift_images

    x = torch.zeros(1, 1, 6, 6)
    x[0, 0, 2, 3] = 1.0
    moved = shift_images(x, 1, -2)
    assert moved.shape == x.shape and moved[0, 0, 3, 1] == 1.0 and moved.sum() == 1.0
    assert torch.equal(shift_images(x, 0, 0), x)
    edge = torch.arange(4.0).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    assert torch.equal(shift_images(edge, 0, 1)[0, 0, :, 0], edge[0, 0, :, 0])  # uncovered column repeats the edge
    offsets = pixel_offsets(1)
    assert offsets[0] == (0, 0) and len(offsets) == len(set(offsets)) == 9
    with pytest.raises(ValueError, match="radius"):
        pixel_offsets(-1)


def test_prior_trains_on_shifted_copies(tokenizer_dir, tmp_path):
    """shift_radius=1 gives 9 token grids per TRAIN image, the first copy the plain tokens, every copy labelled."""
    from safetensors.torch import load_file

    plain, shifted = tmp_path / "plain", tmp_path / "shifted"
    for out, extra in ((plain, []), (shifted, ["shift_radius=1"])):
        assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(out),
                     "--steps", "2", *TINY_PRIOR, *extra]) == 0
    a = load_file(str(plain / "tokens" / "train.safetensors"))["tokens"]
    b = load_file(str(shifted / "tokens" / "train.safetensors"))["tokens"]
    assert len(b) == 9 * len(a) and torch.equal(b[:len(a)], a)
    assert not torch.equal(b[len(a):2 * len(a)], a)  # a shifted copy tokenizes differently
    assert json.loads((shifted / "train_config.json").read_text())["shift_radius"] == 1
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out",
                 str(tmp_path / "bad"), "--steps", "2", *TINY_PRIOR, "shift_radius=-1"]) == 2


def test_token_cache_is_keyed_by_the_tokenizer_weights(tokenizer_dir, tmp_path):
    """The cached token grids are reused only for the same tokenizer weights, source, split and shift radius; a
    tokenizer retrained in place is tokenized again, and the cache rewritten."""
    from safetensors.torch import load_file, save_file

    from vqkit.apps.generate import token_set
    from vqkit.data.sources import load_source
    from vqkit.io import read_safetensors_metadata
    from vqkit.models.tokenizer import VQModel

    tokenizer = VQModel.from_pretrained(tokenizer_dir, device="cpu")
    source = load_source("mnist5k", split="test")
    cache = tmp_path / "test.safetensors"
    first = token_set(tokenizer, source, "class", cache, progress=False).tokens
    # the same tokenizer reads the cache: a cache edited behind its back (metadata kept) is what comes back
    metadata = read_safetensors_metadata(cache)
    save_file({"tokens": (first + 1) % 7}, str(cache), metadata=metadata)
    assert torch.equal(token_set(tokenizer, source, "class", cache, progress=False).tokens, (first + 1) % 7)
    # another shift radius or a tokenizer with other weights tokenizes again
    shifted = token_set(tokenizer, source, "class", cache, progress=False, shift_radius=1).tokens
    assert len(shifted) == 9 * len(first) and torch.equal(shifted[:len(first)], first)
    with torch.no_grad():
        tokenizer.quant_conv.weight.mul_(-1.0)  # "retrained": other weights, other codes
    changed = token_set(tokenizer, source, "class", cache, progress=False).tokens
    assert torch.equal(changed, token_set(tokenizer, source, "class", None, progress=False).tokens)  # tokenized anew
    assert not torch.equal(changed, first)
    assert torch.equal(load_file(str(cache))["tokens"], changed)


def test_prior_distills_from_a_teacher(tokenizer_dir, tmp_path):
    """distill_from + distill_samples: TRAIN's grids plus the teacher's own samples (its saved sampling settings,
    TRAIN's labels in turn, seeded), cached so that a resumed run trains on the same data; mismatches are refused."""
    from safetensors.torch import load_file

    from vqkit.apps.generate import load_generator, sampling_kwargs

    teacher = tmp_path / "teacher"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(teacher),
                 "--mode", "ar", "--steps", "3", *TINY_PRIOR, "sampling.top_k=5"]) == 0
    distill = [f"distill_from={teacher}", "distill_samples=40"]
    common = ["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--mode", "mask",
              "--steps", "6", *TINY_PRIOR, *distill]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main([*common, "--out", str(straight)]) == 0
    grids = load_file(str(straight / "tokens" / "distill.safetensors"))["tokens"]
    real = load_file(str(straight / "tokens" / "train.safetensors"))["tokens"]
    assert grids.shape == (40, *real.shape[1:])
    # they are the teacher's samples for TRAIN's first 40 labels, drawn with its saved settings and the run's seed
    prior, _, sampling = load_generator(teacher, device="cpu")
    from vqkit.data.sources import load_source

    labels = torch.as_tensor(load_source("mnist5k", split="train").labels[:40])
    expected = prior.sample(40, {"labels": labels}, seed=0, batch_size=256, **sampling_kwargs(sampling, prior))
    assert torch.equal(grids, expected)
    assert not any(torch.equal(g, r) for g in grids[:5] for r in real)  # not copies of TRAIN's grids
    # resume trains on the same data: the same weights as the straight run
    assert main([*common, "--out", str(resumed), "--stop-at", "3"]) == 0
    assert main(["train", "prior", "--out", str(resumed), "--resume"]) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a teacher re-tuned in place is sampled again, not read from the student's cache
    from vqkit.apps.generate import TokenSet, with_teacher_samples

    cache = straight / "tokens" / "distill.safetensors"
    train_set = TokenSet(real, torch.as_tensor(load_source("mnist5k", split="train").labels), None, "mnist5k",
                         "train", "class")
    again = with_teacher_samples(train_set, teacher, tokenizer_dir, 40, cache, seed=0, progress=False)
    assert torch.equal(again.tokens[len(real):], grids)  # unchanged teacher: the cached grids
    sampling_file = teacher / "sampling.json"
    sampling_file.write_text(json.dumps({**json.loads(sampling_file.read_text()), "top_k": 2}))
    retuned = with_teacher_samples(train_set, teacher, tokenizer_dir, 40, cache, seed=0, progress=False)
    assert not torch.equal(retuned.tokens[len(real):], grids)
    assert torch.equal(load_file(str(cache))["tokens"], retuned.tokens[len(real):])
    # --teacher is distill_from
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out",
                 str(tmp_path / "flag"), "--stop-at", "0", "--teacher", str(teacher), *TINY_PRIOR,
                 "distill_samples=8"]) == 0
    assert len(load_file(str(tmp_path / "flag" / "tokens" / "distill.safetensors"))["tokens"]) == 8
    assert json.loads((tmp_path / "flag" / "train_config.json").read_text())["distill_from"] == str(teacher)
    # refused: a count without a teacher, a teacher that conditions differently, a teacher of another tokenizer
    def bad(out, *extra, tokenizer=tokenizer_dir):
        return ["train", "prior", "--tokenizer", str(tokenizer), "--data", "mnist5k", "--out", str(tmp_path / out),
                "--steps", "2", *TINY_PRIOR, *extra]

    assert main(bad("b1", "distill_samples=8")) == 2
    assert main(bad("uncond", "conditioning=none")) == 0
    assert main(bad("b2", f"distill_from={tmp_path / 'uncond'}", "distill_samples=8")) == 2
    other_tok = tmp_path / "other_tok"
    assert main(["train", "tokenizer", "--data", "mnist5k", "--out", str(other_tok), *TINY_TOKENIZER]) == 0
    assert main(bad("b3", *distill, tokenizer=other_tok)) == 2
    assert main(bad("b4", f"distill_from={tmp_path / 'nothing'}", "distill_samples=8")) == 2


def test_distill_samples_default_to_ten_times_train(tokenizer_dir, tmp_path, monkeypatch):
    import vqkit.apps.generate as generate

    asked = []

    def record(train, teacher_dir, tokenizer, n, *args, **kwargs):
        asked.append(n)
        return train

    monkeypatch.setattr(generate, "with_teacher_samples", record)
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out",
                 str(tmp_path / "p"), "--stop-at", "0", "--teacher", str(tmp_path / "any"), *TINY_PRIOR]) == 0
    assert asked and set(asked) == {40000}  # TRAIN has 4000 grids


def test_a_prior_can_start_from_another_priors_weights(tokenizer_dir, tmp_path):
    """init_from: a masked prior starts from an autoregressive prior's weights (same tokenizer, same sizes); other
    tokenizers and other sizes are refused before any step."""
    from vqkit.models.prior import TokenPrior
    from vqkit.training.config import ConfigError
    from vqkit.training.run import load_initial_weights

    ar = tmp_path / "ar"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(ar),
                 "--mode", "ar", "--steps", "3", *TINY_PRIOR]) == 0
    source = TokenPrior.from_pretrained(ar)
    masked = TokenPrior(**{**source.config.to_dict(), "mode": "mask"})
    before = masked.blocks[0].attn.qkv.weight.clone()
    load_initial_weights(masked, ar, tokenizer_dir, verbose=False)
    theirs = source.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in masked.state_dict().items() if k != "pos_emb")
    # the AR sequence's extra position (its start token): positions line up by the image token they predict
    assert len(theirs["pos_emb"]) == len(masked.pos_emb) + 1
    assert torch.equal(masked.pos_emb, theirs["pos_emb"][:-1])
    assert not torch.equal(before, masked.blocks[0].attn.qkv.weight)
    # through the CLI: the run trains from those weights and records where they came from
    out = tmp_path / "mask"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(out),
                 "--mode", "mask", "--steps", "2", *TINY_PRIOR, f"init_from={ar}"]) == 0
    assert json.loads((out / "train_config.json").read_text())["init_from"] == str(ar)
    # refused: other sizes, another tokenizer, no prior there
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out",
                 str(tmp_path / "b1"), "--steps", "2", *TINY_PRIOR, "prior.d_model=48", f"init_from={ar}"]) == 2
    other_tok = tmp_path / "other_tok"
    assert main(["train", "tokenizer", "--data", "mnist5k", "--out", str(other_tok), *TINY_TOKENIZER]) == 0
    with pytest.raises(ConfigError, match="belongs to the tokenizer"):
        load_initial_weights(masked, ar, other_tok, verbose=False)
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out",
                 str(tmp_path / "b3"), "--steps", "2", *TINY_PRIOR, f"init_from={tmp_path / 'nothing'}"]) == 2


def test_alignment_fine_tuning_through_the_cli(tokenizer_dir, tmp_path):
    """cca_weight: a trained prior is fine-tuned against itself (frozen) by condition contrastive alignment; the run
    records its reference and can be resumed; without a prior to start from, or on a bidirectional prior, it is
    refused before any step."""
    ar = tmp_path / "ar"
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(ar),
                 "--mode", "ar", "--steps", "3", *TINY_PRIOR]) == 0
    out = tmp_path / "cca"
    args = ["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out", str(out), "--mode",
            "ar", *TINY_PRIOR, f"init_from={ar}", "cca_weight=10", "sampling.guidance_scale=1.0"]
    assert main([*args, "--steps", "4", "--stop-at", "3"]) == 0
    assert main(["train", "prior", "--out", str(out), "--resume", "--steps", "4"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["cca_weight"] == 10 and saved["init_from"] == str(ar)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(0 < row["loss"] < 2 for row in logged)
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out",
                 str(tmp_path / "c1"), "--steps", "2", *TINY_PRIOR, "cca_weight=10"]) == 2
    assert main(["train", "prior", "--tokenizer", str(tokenizer_dir), "--data", "mnist5k", "--out",
                 str(tmp_path / "c2"), "--mode", "mask", "--steps", "2", *TINY_PRIOR, "cca_weight=10",
                 f"init_from={ar}"]) == 2
