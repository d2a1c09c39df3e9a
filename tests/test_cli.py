"""The ``vqkit`` command, run in-process through vqkit.cli.main (plus one real console-script call)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqkit import VQModel
from vqkit.cli import build_parser, main

TINY = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8",
        "model.mid_attention=false", "model.codebook_size=32", "batch_size=16", "optim.warmup_steps=2",
        "image_every=0", "log_every=2", "eval_batch_size=500"]




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "tokenizer", "--data", "mnist5k", "--out", str(out), "steps=6", *TINY]) == 0
    return out


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def mixed_folder(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    sizes = {"a_gray": (28, 28), "b_rgb": (30, 29), "c_gray": (20, 36)}
    write_png(folder / "a_gray.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    write_png(folder / "b_rgb.png", rng.integers(0, 256, (30, 29, 3), dtype=np.uint8))
    write_png(folder / "c_gray.png", rng.integers(0, 256, (20, 36), dtype=np.uint8))
    return folder, sizes


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.height, im.width


# ------------------------------------------------------------------------------------------------- happy path


def test_train_writes_a_loadable_model(model_dir, capsys):
    for name in ("config.json", "model.safetensors", "eval.json", "metrics.jsonl", "train_config.json"):
        assert (model_dir / name).is_file(), name
    model = VQModel.from_pretrained(model_dir)
    assert model.config.codebook_size == 32 and model.config.base_channels == 8
    run = json.loads((model_dir / "train_config.json").read_text())
    assert run["steps"] == 6 and run["data"]["source"] == "mnist5k"


def test_info(model_dir, capsys):
    assert main(["info", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert str(model_dir) in out
    assert "14x14" in out and "K=32" in out  # 28 px, factor 2
    assert "PSNR" in out  # eval.json is shown
    assert "checkpoints" in out


def test_eval_json(model_dir, tmp_path, capsys):
    target = tmp_path / "sub" / "e.json"
    # --no-fd: the reconstruction FD trains a classifier first (minutes); it has tests of its own
    assert main(["eval", "tokenizer", "--model", str(model_dir), "--data", "mnist5k", "--no-fd",
                 "--json", str(target)]) == 0
    ev = json.loads(target.read_text())
    for key in ("psnr", "ssim", "codebook_usage", "perplexity", "bits_per_image"):
        assert key in ev
    assert ev["num_images"] == 1000
    # the same numbers as the evaluation written at the end of training
    trained = json.loads((model_dir / "eval.json").read_text())
    assert ev["psnr"] == pytest.approx(trained["psnr"], abs=1e-6)
    assert ev["perplexity"] == pytest.approx(trained["perplexity"], abs=1e-6)
    assert "PSNR" in capsys.readouterr().out


def test_reconstruct_folder_of_mixed_images(model_dir, mixed_folder, tmp_path, capsys):
    folder, sizes = mixed_folder
    out = tmp_path / "rec"
    assert main(["reconstruct", "--model", str(model_dir), "--images", str(folder), "--out", str(out)]) == 0
    for name, (h, w) in sizes.items():
        assert png_size(out / f"{name}.png") == (h, 2 * w), name  # original | reconstruction
    with open(out / "psnr.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert sorted(r["image"] for r in rows) == sorted(sizes)
    assert all(0 < float(r["psnr"]) < 100 for r in rows)
    # the left half of a side-by-side image is the (grayscale) original
    left = np.asarray(Image.open(out / "a_gray.png").convert("L"))[:, :28]
    original = np.asarray(Image.open(folder / "a_gray.png"))
    assert np.abs(left.astype(int) - original.astype(int)).max() <= 1
    assert "mean PSNR" in capsys.readouterr().out


def test_encode_decode_safetensors_keeps_sizes(model_dir, mixed_folder, tmp_path):
    folder, sizes = mixed_folder
    tokens = tmp_path / "t.safetensors"
    assert main(["encode", "--model", str(model_dir), "--images", str(folder), "--out", str(tokens)]) == 0
    from safetensors.torch import load_file

    grids = load_file(str(tokens))
    assert len(grids) == 3
    model = VQModel.from_pretrained(model_dir)
    shapes = sorted(tuple(g.shape) for g in grids.values())
    assert shapes == sorted(model.config.token_grid(h, w) for h, w in sizes.values())
    for g in grids.values():
        assert g.dtype == torch.int64 and int(g.min()) >= 0 and int(g.max()) < model.config.codebook_size
    out = tmp_path / "dec"
    assert main(["decode", "--model", str(model_dir), "--tokens", str(tokens), "--out", str(out)]) == 0
    for name, size in sizes.items():
        assert png_size(out / f"{name}.png") == size, name


def test_encode_npy_matches_the_api_and_decodes(model_dir, tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "same"
    pixels = [rng.integers(0, 256, (27, 26), dtype=np.uint8) for _ in range(2)]
    for i, p in enumerate(pixels):
        write_png(folder / f"img{i}.png", p)
    tokens = tmp_path / "t.npy"
    assert main(["encode", "--model", str(model_dir), "--images", str(folder), "--out", str(tokens)]) == 0
    arr = np.load(tokens, allow_pickle=False)
    assert arr.dtype == np.int64 and arr.shape == (2, 14, 13)
    meta = json.loads(tokens.with_suffix(".json").read_text())
    assert meta["names"] == ["img0", "img1"] and meta["image_sizes"] == [[27, 26], [27, 26]]
    model = VQModel.from_pretrained(model_dir)
    x = torch.from_numpy(np.stack(pixels)).float().div(255).unsqueeze(1)
    assert np.array_equal(arr, model.tokenize(x).numpy())
    out = tmp_path / "dec"
    assert main(["decode", "--model", str(model_dir), "--tokens", str(tokens), "--out", str(out)]) == 0
    for i in range(2):
        assert png_size(out / f"img{i}.png") == (27, 26)
    decoded = np.asarray(Image.open(out / "img0.png").convert("L")).astype(np.float32) / 255
    expected = model.detokenize(torch.from_numpy(arr[:1]), size=(27, 26))[0, 0].numpy()
    assert np.abs(decoded - expected).max() <= 1 / 255 + 1e-6


def test_resume_of_a_finished_run_via_cli(model_dir, tmp_path, capsys):
    # --resume with --steps continues a finished run to more steps
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    assert main(["train", "tokenizer", "--out", str(copy), "--resume", "--steps", "8"]) == 0
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    assert json.loads((copy / "eval.json").read_text())["steps"] == 8


# ------------------------------------------------------------------------------------------------ error paths


def run_err(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, code, err)
    assert err.strip(), argv
    return err


def test_missing_data(tmp_path, capsys):
    err = run_err(["train", "tokenizer", "--out", str(tmp_path / "x")], capsys)
    assert "--data" in err
    assert not (tmp_path / "x").exists()


def test_unknown_preset(tmp_path, capsys):
    err = run_err(["train", "tokenizer", "--data", "mnist5k", "--preset", "no-such-preset", "--out",
                   str(tmp_path / "x")], capsys)
    assert "no-such-preset" in err and "mnist-vqvae" in err  # names the problem and the choices


def test_unknown_override_key(tmp_path, capsys):
    err = run_err(["train", "tokenizer", "--data", "mnist5k", "--out", str(tmp_path / "x"), "model.codebok_size=3"],
                  capsys)
    assert "codebok_size" in err


def test_nonexistent_folder(tmp_path, model_dir, capsys):
    missing = tmp_path / "no_such_folder"
    err = run_err(["train", "tokenizer", "--data", str(missing), "--out", str(tmp_path / "x"), *TINY], capsys)
    assert str(missing) in err
    err = run_err(["reconstruct", "--model", str(model_dir), "--images", str(missing), "--out", str(tmp_path / "r")],
                  capsys)
    assert str(missing) in err
    err = run_err(["encode", "--model", str(model_dir), "--images", str(missing), "--out", str(tmp_path / "t.npy")],
                  capsys)
    assert str(missing) in err


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    err = run_err(["train", "tokenizer", "--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert "resume" in err and str(tmp_path / "empty") in err


def test_resume_cannot_change_the_config(model_dir, capsys):
    before = (model_dir / "model.safetensors").read_bytes()
    err = run_err(["train", "tokenizer", "--out", str(model_dir), "--resume", "--data", "mnist5k"], capsys)
    assert "--resume" in err
    err = run_err(["train", "tokenizer", "--out", str(model_dir), "--resume", "model.codebook_size=8"], capsys)
    assert "--steps" in err
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_existing_run_without_resume(model_dir, capsys):
    before = (model_dir / "model.safetensors").read_bytes()
    err = run_err(["train", "tokenizer", "--data", "mnist5k", "--out", str(model_dir), *TINY], capsys)
    assert "--resume" in err
    assert (model_dir / "model.safetensors").read_bytes() == before


def test_other_error_paths(model_dir, mixed_folder, tmp_path, capsys):
    folder, _ = mixed_folder
    err = run_err(["info", str(tmp_path / "nomodel")], capsys)
    assert str(tmp_path / "nomodel") in err
    # mixed sizes cannot go into one .npy array
    err = run_err(["encode", "--model", str(model_dir), "--images", str(folder), "--out", str(tmp_path / "t.npy")],
                  capsys)
    assert ".safetensors" in err
    err = run_err(["encode", "--model", str(model_dir), "--images", str(folder / "a_gray.png"), "--out",
                   str(tmp_path / "t.txt")], capsys)
    assert "t.txt" in err
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 2, 2), dtype=np.float32))
    err = run_err(["decode", "--model", str(model_dir), "--tokens", str(bad), "--out", str(tmp_path / "d")], capsys)
    assert "bad.npy" in err
    out_of_range = tmp_path / "big.npy"
    np.save(out_of_range, np.full((1, 14, 14), 1000, dtype=np.int64))
    err = run_err(["decode", "--model", str(model_dir), "--tokens", str(out_of_range), "--out", str(tmp_path / "d")],
                  capsys)
    assert "31" in err  # the valid range [0, K-1]
    err = run_err(["eval", "tokenizer", "--model", str(model_dir), "--data", "nope_source"], capsys)
    assert "nope_source" in err


# ------------------------------------------------------------------------------------------------------- help


def all_subcommands(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from all_subcommands(sub, prefix + (name,))


def test_every_subcommand_has_help(capsys):
    commands = list(all_subcommands(build_parser()))
    assert ("train", "tokenizer") in commands and ("reconstruct",) in commands and ("eval", "tokenizer") in commands
    for cmd in [()] + commands:
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0, cmd
        out = capsys.readouterr().out
        assert "usage: vqkit" in out and (not cmd or cmd[-1] in out), cmd
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_console_script_help():
    exe = shutil.which("vqkit") or str(Path(sys.executable).parent / "vqkit")
    assert os.path.exists(exe), "the vqkit console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: vqkit" in proc.stdout and "train" in proc.stdout
