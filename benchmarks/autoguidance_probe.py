"""Autoguidance (Karras et al., NeurIPS 2024) on a class-conditional prior: a weaker prior of the same kind (the same
recipe trained for fewer steps) guides it. Three ways of combining them, each setting's guidance scale s applied as
in ``benchmarks/sampling_sweep.py`` (chosen by FD against TRAIN, TEST printed beside):

- ``cond``: logits = guide + s * (prior - guide), both given the class (``TokenPrior.sample(..., guide=...)``);
- ``null``: the guide unconditional, logits = guide(null) + s * (prior - guide(null)): CFG whose negative is weaker;
- ``both``: each model first guided by its own CFG (``--cfg``, linear with ``--cfg-linear``), then autoguidance with
  s between the two guided logits (s = 1 is the prior's plain CFG, the baseline).

    python benchmarks/autoguidance_probe.py --prior runs/bench-generation/prior-mask --guide runs/guide/mask-750 \
        --variant both --cfg 2.0 --cfg-linear --settings 1.0:20:1.0 1.0:20:1.25
"""

from __future__ import annotations

import argparse

import torch
from sampling_sweep import class_sweep, parse_setting


class _CFGDecoder:
    """A decoder of stacked [conditional; unconditional] rows whose steps return the CFG-combined hidden states.
    The output head is affine and guidance's weights (1 - s and s) sum to one, so guiding the hidden states is
    guiding the logits."""

    def __init__(self, inner, scale: float, linear: bool, groups: int):
        self.inner, self.scale, self.linear, self.groups, self.done = inner, scale, linear, groups, 0
        self.prior = inner.prior

    def step(self, previous):
        from vqkit.models.prior import combine_guidance, scheduled_guidance

        hidden = self.inner.step(previous)
        self.done += 1
        share = self.done / self.groups  # by steps ("linear"); the token share is not used here
        return combine_guidance(hidden, scheduled_guidance(self.scale, "linear" if self.linear else "constant",
                                                           share, share))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prior", required=True)
    ap.add_argument("--guide", required=True, help="the weaker prior (same mode, tokenizer and conditioning)")
    ap.add_argument("--variant", choices=["cond", "null", "both"], default="cond")
    ap.add_argument("--cfg", type=float, default=2.0, help="both: each model's own classifier-free guidance scale")
    ap.add_argument("--cfg-linear", action="store_true", help="both: ramp that scale linearly over the decoding")
    ap.add_argument("--settings", nargs="+", required=True, help="temperature:top_k:scale[:top_p[:schedule]]")
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    from vqkit.apps.generate import load_generator
    from vqkit.apps.sample_eval import prior_generator
    from vqkit.models.prior import TokenPrior

    prior, tokenizer, sampling = load_generator(args.prior)
    guide = load_generator(args.guide)[0]
    if prior.config.mode == "mask" and not prior.config.group_causal:
        raise SystemExit("this probe replaces cached decoders: use an ar or group-causal prior")
    if args.variant == "null":
        def null_decoder(batch, class_ids, text_ids, copies=1):
            return TokenPrior._decoder(guide, batch, *guide._encode_condition(None, batch), copies)
        guide._decoder = null_decoder
    elif args.variant == "both":
        for model in (prior, guide):
            def cfg_decoder(batch, class_ids, text_ids, copies=1, model=model):
                inner = TokenPrior._decoder(model, batch, *model._with_null(class_ids, text_ids), copies=2)
                return _CFGDecoder(inner, args.cfg, args.cfg_linear, len(model._decode_groups()))
            model._decoder = cfg_decoder

    def generator_for(text: str):
        setting = {**sampling, **parse_setting(text)}
        return prior_generator(prior, tokenizer, setting, guide), setting

    args.name = args.name or f"autoguidance_{args.variant}"
    class_sweep(args, generator_for)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
