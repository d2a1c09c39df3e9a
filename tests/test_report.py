"""The HTML report: what each run is, its evaluation, its images and curves, several runs side by side."""

from __future__ import annotations

import argparse
import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from vqkit.data.images import save_image
from vqkit.io import VQKitFileError
from vqkit.report import add_report_parser, write_report


def fake_run(path, config: dict, evaluation: dict | None, metrics: list[dict] | None, images=("samples.png",)):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    if evaluation is not None:
        (path / "eval.json").write_text(json.dumps(evaluation))
    if metrics is not None:
        lines = [json.dumps(row) for row in metrics]
        (path / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 9, \"lo")  # a line still being written
    for name in images:
        save_image(path / name, np.random.default_rng(0).random((12, 20, 1)))
    return path


@pytest.fixture
def runs(tmp_path):
    tokenizer = fake_run(
        tmp_path / "tok", {"model_type": "vqkit.VQModel", "in_channels": 1, "image_size": 28,
                           "channel_mult": [1, 2, 4], "codebook_size": 512},
        {"data": "mnist5k", "psnr": 24.56789, "codebook_usage": 0.875, "parameters": 123456, "token_grid": [7, 7]},
        [{"step": s, "loss": 1.0 / s, "rec_loss": 0.5 / s, "psnr": 10 + s, "usage": 0.5, "perplexity": 100.0 + s,
          "lr": 1e-3, "seconds": s} for s in range(1, 6)],
        images=("reconstructions.png", "images/reconstructions_00000004.png"))
    prior = fake_run(tmp_path / "prior", {"model_type": "vqkit.TokenPrior", "mode": "ar", "n_layers": 4, "d_model": 256,
                                          "token_grid": [7, 7], "codebook_size": 512, "num_classes": 10},
                     {"mode": "ar", "test_bits_per_image": 101.25}, None, images=("images/samples_00000500.png",))
    gan = fake_run(tmp_path / "gan", {"model_type": "vqkit.DCGAN", "channels": 1, "image_size": 28, "latent_dim": 64,
                                      "num_classes": 10},
                   {"model": "dcgan", "train_seconds": 301.4, "samples_per_second": 2500.0},
                   [{"step": s, "d_loss": 0.5, "g_loss": 1.0 + s, "logits_real": 1.0, "logits_fake": -1.0, "lr": 2e-4}
                    for s in (50, 100)])
    return tokenizer, prior, gan


def data_uris(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_one_run(runs, tmp_path):
    tokenizer = runs[0]
    out = write_report(tokenizer, tmp_path / "report.html")
    page = out.read_text()
    assert out == tmp_path / "report.html"
    assert "tokenizer" in page and "7x7 tokens" in page and "K=512" in page
    assert "24.57" in page and "0.875" in page and "123,456" in page and "mnist5k" in page  # eval.json, formatted
    assert "token_grid" not in page  # only scalar entries
    for group in ("losses", "psnr", "codebook", "lr"):
        assert (tokenizer / f"curves_{group}.png").is_file(), group
    assert not (tokenizer / "curves_gan.png").exists()
    pictures = data_uris(page)
    # reconstructions.png (the final one replaces the snapshot of the same kind) and four curve groups
    assert len(pictures) == 5 and all(p.startswith(b"\x89PNG") for p in pictures)
    assert "reconstructions_00000004" not in page


def test_several_runs_with_a_comparison_and_extra_tables(runs, tmp_path):
    table = {"Sample evaluation": [{"method": "prior", "accuracy": 0.9312, "FD": 12.5},
                                   {"method": "GAN", "accuracy": 0.88, "FD": 20.25, "samples/s": 2500.0}]}
    page = write_report(list(runs), tmp_path / "all.html", title="Demo <runs>", extra_tables=table).read_text()
    assert "<title>Demo &lt;runs&gt;</title>" in page
    assert "Comparison" in page and page.index("Comparison") < page.index("Sample evaluation")
    assert "ar token prior: 4 layers x 256" in page and "class-conditional (10 classes)" in page
    assert "DCGAN: 1-channel 28 px images" in page and "(GAN)" in page
    assert "101.2" in page and "301.4" in page and "0.9312" in page and "samples/s" in page
    assert "samples at step 500" in page  # a run without a final image shows its newest snapshot
    for name in ("curves_gan.png", "curves_lr.png"):
        assert (runs[2] / name).is_file()
    assert Image.open(runs[2] / "curves_gan.png").size[0] > Image.open(runs[2] / "curves_lr.png").size[0]


def test_a_run_without_metrics_or_eval(tmp_path):
    run = fake_run(tmp_path / "bare", {"model_type": "vqkit.DCGAN", "channels": 3, "image_size": 32}, None, None)
    page = write_report([run], tmp_path / "bare.html").read_text()
    assert "DCGAN" in page and "Training curves" not in page and "Evaluation" not in page
    assert len(data_uris(page)) == 1  # samples.png
    assert not list(run.glob("curves_*.png"))


def test_an_unfinished_run_is_described_from_its_run_config(tmp_path):
    run = tmp_path / "running"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"model": {"image_size": 28, "latent_dim": 64, "channels": 1},
                                                       "d_steps": 1, "steps": 3600, "data": {"source": "mnist5k"},
                                                       "preset": "mnist-gan"}))
    page = write_report(run, tmp_path / "r.html").read_text()
    assert "(GAN)" in page and "3600 steps" in page and "preset mnist-gan" in page


def test_missing_or_empty_directories_are_refused(tmp_path):
    with pytest.raises(VQKitFileError, match="nowhere: no such run directory"):
        write_report(tmp_path / "nowhere", tmp_path / "r.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VQKitFileError, match="not a vqkit run directory"):
        write_report([tmp_path / "empty"], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()


def test_cli_command(runs, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    add_report_parser(parser.add_subparsers())
    args = parser.parse_args(["report", str(runs[0])])
    assert args.func(args) == 0 and (runs[0] / "report.html").is_file()  # one run: DIR/report.html
    monkeypatch.chdir(tmp_path)
    args = parser.parse_args(["report", str(runs[0]), str(runs[2]), "--title", "two"])
    assert args.func(args) == 0 and "<title>two</title>" in (tmp_path / "report.html").read_text()
    assert "wrote report.html" in capsys.readouterr().out
