"""Use a published taming-transformers or latent-diffusion VQGAN as a vqkit tokenizer.

vqkit reads the autoencoder of a taming-transformers ``VQModel`` checkpoint, or of a latent-diffusion VQ first-stage
model (same layout), and writes an ordinary vqkit model directory. The discriminator and LPIPS weights stored next to
it (``loss.*``) are left behind.

1. Download the checkpoint and its config yourself:

   - taming-transformers' VQGAN ImageNet f16 with 1024 or 16384 codes: ``last.ckpt`` and ``model.yaml``, linked from
     the taming-transformers README;
   - latent-diffusion's VQ-f4 or VQ-f8: ``model.ckpt`` from the zip linked in the latent-diffusion README, and the
     ``config.yaml`` of that model's folder under ``models/first_stage_models/`` in the latent-diffusion repository.
     A full latent-diffusion checkpoint works too: its ``first_stage_model.*`` weights are used.

2. Convert::

       vqkit convert taming last.ckpt out/ --config model.yaml

   The config is optional. The architecture is always inferred from the weights; with ``--config`` vqkit also checks
   that inference against the YAML and records the model's ``resolution`` as ``image_size`` (256 without it).

3. Load::

       from vqkit.models import VQModel
       model = VQModel.from_pretrained("out")
       tokens = model.tokenize(images)  # images in [0, 1]; the same indices taming computes from images in [-1, 1]

Safety: checkpoints are read with ``torch.load(weights_only=True)``, so no object in the file is ever unpickled into
running code. Lightning checkpoints name Lightning's ``ModelCheckpoint`` class in their training metadata; vqkit reads
that one name as an inert placeholder and does not import Lightning. Any other pickled object makes vqkit refuse the
file and name the objects. If they are metadata you do not need (only the tensors are kept), name them and they are
read as inert placeholders too: nothing is imported and nothing is called::

    vqkit convert taming last.ckpt out/ --allow-global some.module.SomeClass

Worth knowing:

- Quantizers trained with index remapping (``remap`` in the config) map codebook indices to a smaller set; vqkit's
  tokens are the codebook indices before that remap. Reconstructions are unaffected.
- Fine-tuning a converted model uses vqkit's quantizer loss, which puts beta on the commitment term (the VQ-VAE paper);
  taming's loss puts it on the codebook term.
- Not supported (refused with an error): Gumbel and other non-nearest-neighbour quantizers, linear attention
  (``attn_type: linear``), ``tanh_out`` / ``give_pre_end`` decoders, blocks with 3x3 ``conv_shortcut``, and resampling
  without convolutions (``resamp_with_conv: false``).
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import warnings
from pathlib import Path

import torch
import yaml

from ..io import VQKitFileError
from ..models.tokenizer import VQModel, VQModelConfig

GENERATOR_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
# latent-diffusion stores its autoencoder under this prefix inside a full diffusion-model checkpoint
LDM_FIRST_STAGE_PREFIX = "first_stage_model."
TAMING_CODEBOOK_KEY = "quantize.embedding.weight"
VQKIT_CODEBOOK_KEY = "quantize.codebook"
# EMA statistics of taming's EMA quantizer: its codebook is already in embedding.weight
EMA_QUANTIZER_KEYS = {"quantize.embedding.cluster_size", "quantize.embedding.embed_avg"}
# the index remap table of taming's VectorQuantizer2(remap=...): vqkit tokens are the indices before the remap
REMAP_KEY = "quantize.used"
DEFAULT_IMAGE_SIZE = 256

# Lightning callback classes that Lightning 1.x checkpoints name (as dict keys of the "callbacks" metadata).
LIGHTNING_CALLBACK_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
)


class _InertPlaceholder:
    """Stands in for a class or function a checkpoint names in metadata (a Lightning callback class used as a dict
    key, or a name the user allowed): "calling" it only stores the arguments, so loading runs no code of the file."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


# ------------------------------------------------------------------------------------------------------- loading
def load_taming_state_dict(ckpt_path: str | Path, allow_globals: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a Lightning checkpoint's ``state_dict`` (or of a bare state dict), loaded without unpickling.
    ``allow_globals``: further pickled names (module.qualname) to read as inert placeholders."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise VQKitFileError(f"{path}: checkpoint not found")
    placeholders = [(_InertPlaceholder, name) for name in (*LIGHTNING_CALLBACK_NAMES, *allow_globals)]
    try:
        with torch.serialization.safe_globals(placeholders):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e, allow_globals) from None
    except Exception as e:  # the unpickler meets junk with whatever error the bytes provoke (KeyError, EOFError, ...)
        raise VQKitFileError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise VQKitFileError(f"{path}: expected a Lightning checkpoint with a 'state_dict' or a state dict of tensors")
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _refusal(path: Path, error: Exception, allowed: tuple[str, ...] = ()) -> VQKitFileError:
    try:  # scans the pickle's opcodes only; nothing is loaded
        needed = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                  if g not in LIGHTNING_CALLBACK_NAMES and g not in allowed]
    except Exception:  # a legacy-format file (no zip archive to scan): take the names from the unpickler's message
        needed = re.findall(r"GLOBAL ([\w.]+)", str(error))
    what = ", ".join(needed) if needed else str(error).strip().splitlines()[0]
    return VQKitFileError(
        f"{path}: loading this file needs pickled objects ({what}); vqkit will not unpickle objects from a file, as "
        f"that can run arbitrary code. If these are metadata you do not need, pass each as --allow-global NAME "
        f"(allow_globals=... in Python): vqkit then reads them as inert placeholders and keeps only the tensors")


def generator_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The autoencoder's weights (encoder, decoder, quantizer, 1x1 convs); drops loss.* and everything else."""
    if not any(k.startswith("encoder.") for k in state) and any(k.startswith(LDM_FIRST_STAGE_PREFIX) for k in state):
        state = {k[len(LDM_FIRST_STAGE_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_FIRST_STAGE_PREFIX)}
    return {k: v for k, v in state.items() if k.startswith(GENERATOR_PREFIXES)}


# ------------------------------------------------------------------------------------------ architecture inference
def _count(weights: dict, key_pattern: str) -> int:
    """How many consecutive indices i have ``key_pattern.format(i)`` in weights."""
    n = 0
    while key_pattern.format(n) in weights:
        n += 1
    return n


def _shape(weights: dict, key: str, source: str) -> torch.Size:
    if key not in weights:
        raise VQKitFileError(f"{source}: no '{key}' among the weights; "
                             f"not a taming / latent-diffusion VQModel checkpoint")
    return weights[key].shape


def infer_architecture(weights: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    """VQModelConfig fields read off taming-layout weights (``generator_weights`` output)."""
    if TAMING_CODEBOOK_KEY not in weights and "quantize.embed.weight" in weights:
        raise VQKitFileError(f"{source}: a Gumbel-softmax quantizer; vqkit converts nearest-neighbour VQ models only")
    codebook_size, embed_dim = _shape(weights, TAMING_CODEBOOK_KEY, source)
    ch, in_channels = _shape(weights, "encoder.conv_in.weight", source)[:2]
    z_channels = _shape(weights, "encoder.conv_out.weight", source)[0]
    out_channels = _shape(weights, "decoder.conv_out.weight", source)[0]

    num_levels = _count(weights, "encoder.down.{}.block.0.conv1.weight")
    if num_levels == 0:
        raise VQKitFileError(f"{source}: no encoder.down.0.block.0 weights; not a taming VQModel checkpoint")
    num_res_blocks = _count(weights, "encoder.down.0.block.{}.conv1.weight")
    channel_mult = []
    for level in range(num_levels):
        width = weights[f"encoder.down.{level}.block.{num_res_blocks - 1}.conv2.weight"].shape[0]
        if width % ch:
            raise VQKitFileError(f"{source}: level {level} has {width} channels, not a multiple of conv_in's {ch}")
        channel_mult.append(width // ch)

    def levels_with_attention(stages: str) -> list[int]:
        return [lv for lv in range(num_levels) if f"{stages}.{lv}.attn.0.q.weight" in weights]

    attn_levels = levels_with_attention("encoder.down")
    if levels_with_attention("decoder.up") != attn_levels:
        raise VQKitFileError(f"{source}: encoder attention at levels {attn_levels} but decoder at "
                             f"{levels_with_attention('decoder.up')}; vqkit models use the same levels in both")
    mid_attention = "encoder.mid.attn_1.q.weight" in weights
    if ("decoder.mid.attn_1.q.weight" in weights) != mid_attention:
        raise VQKitFileError(f"{source}: only one of encoder and decoder has mid-block attention")
    return dict(in_channels=int(in_channels), out_channels=int(out_channels), base_channels=int(ch),
                channel_mult=channel_mult, num_res_blocks=num_res_blocks, attn_levels=attn_levels,
                mid_attention=mid_attention, z_channels=int(z_channels), embed_dim=int(embed_dim),
                codebook_size=int(codebook_size))


# ------------------------------------------------------------------------------------------------------ config YAML
def read_taming_config(yaml_path: str | Path) -> dict:
    """The architecture a taming / latent-diffusion model YAML describes, as VQModelConfig fields plus image_size
    and dropout."""
    path = Path(yaml_path)
    if not path.is_file():
        raise VQKitFileError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise VQKitFileError(f"{path}: not a valid YAML file ({e})") from None
    params = _vq_params(raw, path)
    dd = params["ddconfig"]
    _refuse_unsupported_options(dd, path)
    try:
        resolution = int(dd["resolution"])
        ch_mult = [int(m) for m in dd["ch_mult"]]
        attn_resolutions = {int(r) for r in dd.get("attn_resolutions", [])}
        z_channels = int(dd["z_channels"])
        return dict(
            in_channels=int(dd["in_channels"]), out_channels=int(dd["out_ch"]), base_channels=int(dd["ch"]),
            channel_mult=ch_mult, num_res_blocks=int(dd["num_res_blocks"]),
            # taming puts attention at level i when the feature map there (resolution / 2**i) is in attn_resolutions
            attn_levels=[lv for lv in range(len(ch_mult)) if resolution // 2 ** lv in attn_resolutions],
            mid_attention=dd.get("attn_type", "vanilla") != "none",
            z_channels=2 * z_channels if dd.get("double_z", False) else z_channels,
            embed_dim=int(params["embed_dim"]), codebook_size=int(params["n_embed"]),
            image_size=resolution, dropout=float(dd.get("dropout", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise VQKitFileError(f"{path}: incomplete or malformed model.params.ddconfig "
                             f"({type(e).__name__}: {e})") from None


def _dig(tree, *keys):
    """tree[k1][k2]... or None where a level is missing or not a mapping."""
    for key in keys:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _vq_params(raw, path: Path) -> dict:
    """model.params of a taming/ldm VQModel config, or of the first stage of a latent-diffusion model config."""
    params = _dig(raw, "model", "params")
    if isinstance(params, dict) and "ddconfig" not in params:
        params = _dig(params, "first_stage_config", "params")
    if not isinstance(_dig(params, "ddconfig"), dict):
        raise VQKitFileError(f"{path}: no model.params.ddconfig (or model.params.first_stage_config.params.ddconfig); "
                             f"not a taming-transformers / latent-diffusion VQModel config")
    return params


def _refuse_unsupported_options(dd: dict, path: Path) -> None:
    # These change the forward pass without leaving a trace in the weights, so only the config reveals them.
    for flag in ("tanh_out", "give_pre_end"):
        if dd.get(flag):
            raise VQKitFileError(f"{path}: ddconfig.{flag} is set; vqkit's decoder does not support it")
    if dd.get("attn_type", "vanilla") not in ("vanilla", "vanilla-xformers", "none"):
        raise VQKitFileError(f"{path}: attn_type {dd['attn_type']!r} is not supported (only softmax attention)")


def check_against_config(inferred: dict, from_config: dict, source: str) -> None:
    mismatches = [f"{k}: weights say {inferred[k]}, config says {from_config[k]}"
                  for k in inferred if inferred[k] != from_config[k]]
    if mismatches:
        raise VQKitFileError(f"{source}: the config does not describe these weights: " + "; ".join(mismatches))


# ----------------------------------------------------------------------------------------------------- conversion
def to_vqkit_state_dict(weights: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename taming keys to vqkit's (only the codebook differs) and cast to fp32."""
    if REMAP_KEY in weights:
        warnings.warn(f"{source}: the quantizer remaps indices; vqkit tokens are the codebook indices "
                      f"before that remap")
    dropped = EMA_QUANTIZER_KEYS | {REMAP_KEY}
    return {(VQKIT_CODEBOOK_KEY if k == TAMING_CODEBOOK_KEY else k): v.float()
            for k, v in weights.items() if k not in dropped}


def _load_into(model: VQModel, state: dict[str, torch.Tensor], source: str) -> None:
    # vqkit's quantizer bookkeeping (initialized, steps, last_used) has no taming counterpart: keep the fresh values
    bookkeeping = {f"quantize.{name}" for name, _ in model.quantize.named_buffers()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise VQKitFileError(f"{source}: weight shapes do not fit the inferred architecture ({e})") from None
    missing = [k for k in missing if k not in bookkeeping]
    if missing or unexpected:
        raise VQKitFileError(f"{source}: uses modules vqkit's model does not have or lacks some it needs "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]}); see the list of unsupported "
                             f"variants in vqkit.interop.taming")


def convert_taming_checkpoint(ckpt_path: str | Path, out_dir: str | Path,
                              config_yaml: str | Path | None = None, allow_globals: tuple[str, ...] = ()) -> VQModel:
    """Convert a taming-transformers / latent-diffusion VQModel checkpoint into a vqkit model saved in ``out_dir``."""
    source = str(ckpt_path)
    weights = generator_weights(load_taming_state_dict(ckpt_path, tuple(allow_globals)))
    arch = infer_architecture(weights, source)
    image_size, dropout = DEFAULT_IMAGE_SIZE, 0.0
    if config_yaml is not None:
        from_config = read_taming_config(config_yaml)
        image_size, dropout = from_config.pop("image_size"), from_config.pop("dropout")
        check_against_config(arch, from_config, f"{source} with {config_yaml}")
    config = VQModelConfig(
        **arch, image_size=image_size, dropout=dropout, norm_groups=32,  # taming: GroupNorm(32, C, eps=1e-6)
        beta=0.25, use_ema=False, kmeans_init=False, dead_code_window=0, cosine=False)
    model = VQModel(config)
    _load_into(model, to_vqkit_state_dict(weights, source), source)
    model.eval()
    model.save_pretrained(out_dir)
    return model


# ------------------------------------------------------------------------------------------------------------- CLI
def cmd_convert_taming(args) -> int:
    model = convert_taming_checkpoint(args.ckpt, args.out, args.config, tuple(args.allow_global))
    c = model.config
    h, w = c.token_grid()
    print(f"converted {args.ckpt} -> {args.out}")
    print(f"  architecture  ch={c.base_channels} ch_mult={c.channel_mult} res_blocks={c.num_res_blocks} "
          f"attention levels={c.attn_levels} mid attention={c.mid_attention} z={c.z_channels}")
    print(f"  codebook      {c.codebook_size} x {c.embed_dim} ({math.log2(c.codebook_size):.1f} bits/token)")
    print(f"  tokens        {h}x{w} for {c.image_size}x{c.image_size} images (f={c.downsample_factor})")
    print(f"load with VQModel.from_pretrained('{args.out}')")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``convert taming CKPT OUT [--config YAML]`` to the ``vqkit`` command's subparsers."""
    convert = subparsers.add_parser("convert", help="convert another library's checkpoint into a vqkit model",
                                    description="Convert another library's checkpoint into a vqkit model directory.")
    formats = convert.add_subparsers(dest="what", metavar="FORMAT")
    taming = formats.add_parser(
        "taming", help="taming-transformers / latent-diffusion VQGAN .ckpt",
        description="Convert a taming-transformers or latent-diffusion VQModel checkpoint (the discriminator is "
                    "dropped); OUT then loads with VQModel.from_pretrained(OUT).")
    taming.add_argument("ckpt", metavar="CKPT", help="the .ckpt (Lightning checkpoint or bare state dict)")
    taming.add_argument("out", metavar="OUT", help="output model directory")
    taming.add_argument("--config", metavar="YAML",
                        help="the model's config YAML: cross-checks the architecture and gives the image size")
    taming.add_argument("--allow-global", metavar="NAME", action="append", default=[],
                        help="a pickled name (module.qualname) the refusal message listed, to read as an inert "
                             "placeholder (nothing is imported or called; only tensors are kept); repeatable")
    taming.set_defaults(func=cmd_convert_taming)
    return convert
