"""Weight EMA of a prior: the average it keeps, its warm-up, its checkpoint state, and what a prior run saves."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vqkit.training.ema import WeightEMA


def test_average_follows_the_decay_after_warm_up():
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # warm-up decay min(0.5, 2 / 11) = 2/11
    expected = start + (1 - 2 / 11) * 1.0
    assert torch.allclose(ema.averaged.weight, expected)
    for _ in range(30):
        ema.update(model)  # decay 0.5 now: the gap to the current weights halves each update
    assert torch.allclose(ema.averaged.weight, model.weight, atol=1e-6)
    assert not ema.averaged.weight.requires_grad and not ema.averaged.training


def test_state_round_trip_and_validation():
    model = torch.nn.Linear(3, 2)
    ema = WeightEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.mul_(3)
    ema.update(model)
    other = WeightEMA(torch.nn.Linear(3, 2), decay=0.9)
    other.load_state(ema.state())
    assert other.updates == 1 and torch.equal(other.averaged.weight, ema.averaged.weight)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="decay"):
            WeightEMA(model, bad)


def test_prior_run_saves_the_averaged_weights(tmp_path):
    """With ema_decay the saved model is the average, not the raw weights (which stay in the checkpoint)."""
    from vqkit.cli import main
    from vqkit.training.checkpoint import latest_checkpoint, load_checkpoint

    tok = tmp_path / "tok"
    assert main(["train", "tokenizer", "--data", "digits", "--out", str(tok), "steps=2", "batch_size=16",
                 "log_every=1", "image_every=0", "model.codebook_size=16", "model.kmeans_init=false"]) == 0
    prior = tmp_path / "prior"
    assert main(["train", "prior", "--tokenizer", str(tok), "--data", "digits", "--out", str(prior), "--steps", "5",
                 "batch_size=16", "log_every=1", "image_every=0", "ckpt_every=5", "prior.d_model=16",
                 "prior.n_layers=1", "prior.n_heads=2", "ema_decay=0.8"]) == 0
    assert json.loads((prior / "train_config.json").read_text())["ema_decay"] == 0.8
    saved = load_file(prior / "model.safetensors")
    state = load_checkpoint(latest_checkpoint(prior / "checkpoints"))["task"]
    assert state["ema"]["updates"] == 5
    raw, averaged = state["prior"], state["ema"]["averaged"]
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)


def test_ema_decay_is_validated(tmp_path, capsys):
    from vqkit.cli import main

    assert main(["train", "prior", "--tokenizer", str(tmp_path), "--data", "digits", "--out", str(tmp_path / "p"),
                 "ema_decay=1.5"]) == 2
    assert "ema_decay" in capsys.readouterr().err
