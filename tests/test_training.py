"""Training: config resolution, checkpoints, deterministic batches and exact resume."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch

from vqkit import VQModel
from vqkit.data.sources import ArraySource, ImageSource
from vqkit.io import VQKitFileError
from vqkit.training import ConfigError, TrainConfig, resolve_config, train_tokenizer
from vqkit.training import checkpoint as ckpt_module
from vqkit.training.checkpoint import (flatten_state, latest_checkpoint, list_checkpoints, load_checkpoint,
                                       save_checkpoint, unflatten_state)
from vqkit.training.config import list_presets, load_yaml, parse_overrides, preset_path
from vqkit.training.run import RUN_CONFIG
from vqkit.training.trainer import batch_indices, iterate_batches, lr_at




TINY = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.z_channels=8", "model.embed_dim=8",
        "model.mid_attention=false", "model.codebook_size=128", "model.dead_code_window=1", "batch_size=16",
        "optim.warmup_steps=2", "image_every=0", "eval_batch_size=500"]


# ------------------------------------------------------------------------------------------------------ config


def test_preset_and_overrides():
    cfg = resolve_config("mnist5k", overrides=["model.codebook_size=128", "steps=7", "optim.betas=[0.5, 0.9]",
                                               "model.channel_mult=[1,2]", "model.codebook_dim=null"])
    assert isinstance(cfg, TrainConfig)
    assert cfg.preset == "mnist-vqvae" and "mnist-vqvae" in list_presets()
    assert cfg.data.source == "mnist5k"
    assert cfg.model.codebook_size == 128 and cfg.steps == 7
    assert cfg.optim.betas == [0.5, 0.9] and cfg.model.channel_mult == [1, 2] and cfg.model.codebook_dim is None
    # untouched keys come from the preset, the rest from the dataclass defaults
    preset = load_yaml(preset_path("mnist-vqvae"))
    for key, value in preset["model"].items():
        if key not in ("codebook_size", "channel_mult"):
            assert getattr(cfg.model, key) == value, key
    for key in ("ema_decay", "beta", "cosine"):
        if key not in preset["model"]:
            assert getattr(cfg.model, key) == getattr(TrainConfig().model, key), key
    # and the result round-trips through the run config format
    from vqkit.training.config import config_from_dict

    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_file_between_preset_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 11\nmodel:\n  codebook_size: 64\n  z_channels: 16\n")
    cfg = resolve_config("mnist5k", config_file=str(f), overrides=["model.codebook_size=32"])
    assert cfg.steps == 11 and cfg.model.z_channels == 16 and cfg.model.codebook_size == 32
    assert cfg.preset is None  # an explicit config file replaces the automatic preset
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        resolve_config("mnist5k", config_file=str(bad))
    with pytest.raises(ConfigError, match="missing.yaml"):
        resolve_config("mnist5k", config_file=str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("override,name", [("model.codebok_size=12", "codebok_size"), ("stepz=3", "stepz"),
                                           ("optim.lrr=0.1", "lrr"), ("data.sauce=x", "sauce")])
def test_unknown_keys_are_named(override, name):
    with pytest.raises(ConfigError, match=name):
        resolve_config("mnist5k", overrides=[override])


def test_bad_override_syntax_and_presets():
    with pytest.raises(ConfigError, match="key=value"):
        resolve_config("mnist5k", overrides=["steps"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.codebook_size"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        resolve_config("mnist5k", overrides=["model=3"])
    with pytest.raises(ConfigError, match="no-such-preset"):
        resolve_config("mnist5k", preset="no-such-preset")
    with pytest.raises(ConfigError, match="codebook_size"):
        resolve_config("mnist5k", overrides=["model.codebook_size=1"])  # the model config's own validation
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=", "f=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": None,
                                                                       "f": [1, 2]}


def test_learning_rate_schedule():
    cfg = resolve_config("mnist5k", overrides=["steps=100", "optim.warmup_steps=10", "optim.lr=1.0",
                                               "optim.min_lr_ratio=0.1"])
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # cosine decays monotonically after warm-up
    assert lrs[99] == pytest.approx(0.1, abs=1e-3) and lrs[99] >= 0.1


# ------------------------------------------------------------------------------------------------- checkpoints


def adam_state():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.8, 0.95))
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    return net, opt


def assert_same(a, b, where="state"):
    if isinstance(a, dict):  # an OrderedDict (state_dict) may come back as a plain dict, in the same order
        assert isinstance(b, dict), f"{where}: {type(b).__name__} is not a dict"
    else:
        assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), where
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def test_flatten_unflatten_round_trip_with_adam():
    net, opt = adam_state()
    state = {"step": 7, "model": net.state_dict(), "optimizer": opt.state_dict(), "none": None, "flag": True,
             "name": "x", "ratio": 0.5, "nested": [(1, 2.0, "three"), {"k": torch.arange(3)}], "empty": {}}
    assert set(state["optimizer"]["state"]) == {0, 1, 2, 3}  # int keys
    assert isinstance(state["optimizer"]["param_groups"][0]["betas"], tuple)
    tree, tensors = flatten_state(state)
    json.dumps(tree)  # the tree is pure JSON
    assert all(torch.is_tensor(t) for t in tensors.values())
    back = unflatten_state(json.loads(json.dumps(tree)), tensors)
    assert_same(state, back)


def test_checkpoint_file_is_safetensors_and_restores_adam(tmp_path):
    net, opt = adam_state()
    path = save_checkpoint(tmp_path, 3, {"step": 3, "model": net.state_dict(), "optimizer": opt.state_dict()})
    raw = path.read_bytes()
    # safetensors layout: u64 header length, JSON header, raw tensor bytes (no pickle, no zip)
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert "vqkit_state" in header["__metadata__"]
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    assert 8 + n + max(ends) == len(raw)
    assert not raw.startswith(b"\x80") and not raw.startswith(b"PK")
    loaded = load_checkpoint(path)
    assert_same({"step": 3, "model": net.state_dict(), "optimizer": opt.state_dict()}, loaded)
    # the restored optimizer continues exactly like the original
    net2, opt2 = adam_state()
    opt2 = torch.optim.Adam(net2.parameters(), lr=0.5)
    net2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    x = torch.randn(5, 3)
    for n_, o_ in ((net, opt), (net2, opt2)):
        o_.zero_grad()
        n_(x).pow(2).sum().backward()
        o_.step()
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_writes_are_atomic_and_pruned(tmp_path, monkeypatch):
    for step in (1, 2, 10):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep=2)
    # keep=2 pruned step 1; nothing else (no temp files) is in the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002.safetensors", "step_00000010.safetensors"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.safetensors", "step_00000010.safetensors"]
    assert latest_checkpoint(tmp_path).name == "step_00000010.safetensors"
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 10
    assert latest_checkpoint(tmp_path / "none") is None

    # a write that dies half-way leaves neither a partial checkpoint nor a temp file behind
    import vqkit.io

    def dying_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(vqkit.io, "save_file", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 11, {"step": 11, "w": torch.zeros(2)}, keep=2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002.safetensors", "step_00000010.safetensors"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 10


def test_load_checkpoint_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(VQKitFileError, match="plain.safetensors"):
        load_checkpoint(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(VQKitFileError, match="junk.safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(TypeError):
        flatten_state({"bad": object()})
    assert ckpt_module.CKPT_PATTERN.match("step_00000001.safetensors")


# ------------------------------------------------------------------------------------------- deterministic batches


def test_batch_indices_are_deterministic_epochs():
    n, bs = 50, 8
    per_epoch = n // bs
    a = [batch_indices(n, bs, seed=3, step=s) for s in range(2 * per_epoch)]
    b = [batch_indices(n, bs, seed=3, step=s) for s in range(2 * per_epoch)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    first = torch.cat(a[:per_epoch])
    assert len(first) == per_epoch * bs and len(set(first.tolist())) == len(first)  # no repeats within an epoch
    assert int(first.min()) >= 0 and int(first.max()) < n
    assert not torch.equal(torch.cat(a[per_epoch:]), first)  # a new permutation each epoch
    assert not torch.equal(batch_indices(n, bs, seed=4, step=0), a[0])  # the seed matters
    tiny = batch_indices(5, 8, seed=0, step=2)  # fewer images than a batch: sampled with replacement
    assert len(tiny) == 8 and int(tiny.max()) < 5 and torch.equal(tiny, batch_indices(5, 8, seed=0, step=2))


class AugmentedSource(ImageSource):
    """A source without .tensors() whose images depend on the augmentation rng (DataLoader path)."""

    name, split, channels, image_size = "aug", "train", 1, (4, 4)

    def __len__(self):
        return 37

    def get(self, index, rng=None):
        noise = rng.random((1, 4, 4)) if rng is not None else np.zeros((1, 4, 4))
        return torch.full((1, 4, 4), float(index)) + torch.from_numpy(noise).float(), index


@pytest.mark.parametrize("source", [AugmentedSource(), ArraySource(
    np.random.default_rng(0).integers(0, 256, (37, 4, 4, 1), dtype=np.uint8), np.arange(37), "arr", "train")])
def test_iterate_batches_resumes_mid_run(source):
    cfg = TrainConfig(batch_size=8, seed=5)
    full = list(iterate_batches(source, cfg, 0, 9))
    tail = list(iterate_batches(source, cfg, 5, 9))
    assert len(full) == 9 and len(tail) == 4
    for (xa, ya), (xb, yb) in zip(full[5:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert full[0][0].shape == (8, 1, 4, 4)
    assert not torch.equal(full[0][1], full[1][1])
    # labels are the indices that batch_indices chose
    assert torch.equal(full[3][1], batch_indices(37, 8, 5, 3))


# ------------------------------------------------------------------------------------------------ exact resume


def tiny_cfg(*extra):
    return resolve_config("mnist5k", overrides=TINY + ["steps=12", "ckpt_every=4", "log_every=1",
                                                       "keep_checkpoints=0", *extra])


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a, b, c = root / "A", root / "B", root / "C"
    result_a = train_tokenizer(tiny_cfg(), a, progress=False)
    # B: interrupted at step 6, then resumed to the end
    assert train_tokenizer(tiny_cfg(), b, stop_at=6, progress=False) is None
    assert not (b / "model.safetensors").exists()  # nothing final before the end
    b_metrics_at_stop = metrics(b)
    result_b = train_tokenizer(None, b, resume=True, progress=False)
    # C: killed after logging step 7 but before its checkpoint (we delete it): resumes from step 4
    assert train_tokenizer(tiny_cfg(), c, stop_at=7, progress=False) is None
    (c / "checkpoints" / "step_00000007.safetensors").unlink()
    assert latest_checkpoint(c / "checkpoints").name == "step_00000004.safetensors"
    assert train_tokenizer(None, c, resume=True, stop_at=8, progress=False) is None
    return {"A": a, "B": b, "C": c, "result_a": result_a, "result_b": result_b, "b_metrics_at_stop": b_metrics_at_stop}


def final_state(run_dir, step=12):
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}.safetensors")


def test_resume_is_bit_identical(runs):
    a, b = final_state(runs["A"]), final_state(runs["B"])
    assert a["step"] == b["step"] == 12
    ma, mb = a["task"]["model"], b["task"]["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"model {k} differs after resume"
    for k in ("quantize.ema_count", "quantize.ema_sum", "quantize.codebook", "quantize.last_used", "quantize.steps"):
        assert k in ma
    assert int(ma["quantize.steps"]) == 12
    assert_same(a["task"]["optimizer"], b["task"]["optimizer"], "optimizer")
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # the final model files are identical too, and so is the evaluation
    wa = VQModel.from_pretrained(runs["A"]).state_dict()
    wb = VQModel.from_pretrained(runs["B"]).state_dict()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for key in ("psnr", "ssim", "perplexity", "codebook_usage"):
        assert runs["result_a"][key] == runs["result_b"][key]


def test_resume_test_is_not_vacuous(runs):
    log = metrics(runs["A"])
    # dead-code restarts (which draw from the global RNG) happened after the resume point
    assert sum(r["restarted"] for r in log if r["step"] > 6) > 0
    # the state really changes between the checkpoint we resumed from and the end
    s8, s12 = final_state(runs["A"], 8)["task"]["model"], final_state(runs["A"])["task"]["model"]
    assert not torch.equal(s8["quantize.codebook"], s12["quantize.codebook"])
    assert not torch.equal(s8["encoder.conv_in.weight"], s12["encoder.conv_in.weight"])


def test_crash_between_log_and_checkpoint_resumes_exactly(runs):
    a, c = final_state(runs["A"], 8), final_state(runs["C"], 8)
    for k in a["task"]["model"]:
        assert torch.equal(a["task"]["model"][k], c["task"]["model"][k]), k
    assert_same(a["task"]["optimizer"], c["task"]["optimizer"], "optimizer")
    steps = [r["step"] for r in metrics(runs["C"])]
    assert steps == list(range(1, 9))  # lines logged after the step-4 checkpoint were dropped, then re-logged
    # the re-logged values are those of the uninterrupted run (except wall-clock time)
    la = {r["step"]: r for r in metrics(runs["A"])}
    for r in metrics(runs["C"]):
        assert r["loss"] == la[r["step"]]["loss"] and r["restarted"] == la[r["step"]]["restarted"]


def test_metrics_have_no_duplicated_steps(runs):
    assert [r["step"] for r in runs["b_metrics_at_stop"]] == list(range(1, 7))
    for name in ("A", "B"):
        steps = [r["step"] for r in metrics(runs[name])]
        assert steps == list(range(1, 13)), name
    for r in metrics(runs["B"]):
        assert set(r) >= {"loss", "rec_loss", "q_loss", "psnr", "usage", "perplexity", "lr", "seconds"}
        assert math.isfinite(r["loss"])


def test_run_outputs_and_evaluation(runs):
    out = runs["B"]
    for name in ("config.json", "model.safetensors", "eval.json", "metrics.jsonl", RUN_CONFIG, "reconstructions.png"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp"))
    ev = json.loads((out / "eval.json").read_text())
    model = VQModel.from_pretrained(out)
    cfg = model.config
    assert ev["num_images"] == 1000 and ev["data"] == "mnist5k" and ev["split"] == "test"
    assert 0 < ev["psnr"] < 100 and -1 <= ev["ssim"] <= 1
    assert 0 < ev["codebook_usage"] <= 1
    assert ev["codes_used"] == round(ev["codebook_usage"] * cfg.codebook_size)
    assert 1 <= ev["perplexity"] <= ev["codes_used"]
    h, w = cfg.token_grid()
    assert ev["token_grid"] == [h, w] == [14, 14]
    assert ev["bits_per_image"] == pytest.approx(h * w * math.log2(cfg.codebook_size))
    assert ev["steps"] == 12
    # the model matches the last checkpoint and the run config
    last = final_state(out)["task"]["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, last[k]), k
    saved = json.loads((out / RUN_CONFIG).read_text())
    assert saved["model"]["codebook_size"] == cfg.codebook_size == 128
    assert cfg.in_channels == 1 and cfg.image_size == 28
    # the evaluation is reproducible from the saved model
    from vqkit.data.sources import load_source
    from vqkit.evaluation import evaluate_tokenizer

    again = evaluate_tokenizer(model, load_source("mnist5k", "test"), batch_size=500)
    assert again["psnr"] == pytest.approx(ev["psnr"], abs=1e-9)
    assert again["perplexity"] == pytest.approx(ev["perplexity"], abs=1e-9)


def snapshot(directory):
    return {p.relative_to(directory).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_existing_run_is_never_overwritten(runs):
    out = runs["A"]
    before = snapshot(out)
    with pytest.raises(ConfigError, match="--resume"):
        train_tokenizer(tiny_cfg(), out, progress=False)
    assert snapshot(out) == before


def test_resume_without_a_run_fails(tmp_path):
    with pytest.raises(ConfigError, match="no run to resume"):
        train_tokenizer(None, tmp_path / "empty", resume=True, progress=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / RUN_CONFIG).write_text(json.dumps(tiny_cfg().to_dict()))
    with pytest.raises(ConfigError, match="no run to resume"):  # a config but no checkpoint
        train_tokenizer(None, tmp_path / "half", resume=True, progress=False)


def test_every_preset_builds():
    """Each shipped preset builds its config; a distillation count without a teacher is refused, naming --teacher."""
    from vqkit.training.config import ConfigError, resolve_config

    for name in list_presets():
        kind = "prior" if "prior" in name else "gan" if name.endswith("-gan") else "tokenizer"
        assert resolve_config("mnist5k", name, kind=kind).preset == name
    with pytest.raises(ConfigError, match="--teacher"):
        resolve_config("mnist5k", "mnist-prior-mask", overrides=["distill_samples=8"], kind="prior")
    # a group-causal prior can only decode in its own Halton groups: a sampling setting it cannot use is refused
    # before any training time is spent
    cfg = resolve_config("mnist5k", "mnist-prior-mask", overrides=["prior.mask_attention=group_causal"], kind="prior")
    assert cfg.prior.group_causal
    with pytest.raises(ConfigError, match="sampling.order=halton"):
        resolve_config("mnist5k", "mnist-prior-mask", kind="prior",
                       overrides=["prior.mask_attention=group_causal", "sampling.order=confidence"])


def test_a_default_derived_in_post_init_follows_the_field_it_derives_from():
    # The merge of defaults and overrides must not freeze out_channels (= in_channels unless set) at the class
    # default's value when only in_channels is overridden.
    from vqkit.training.config import resolve_config

    model = resolve_config(preset="mnist-vqvae", overrides=["model.in_channels=3"]).model
    assert (model.in_channels, model.out_channels) == (3, 3)
