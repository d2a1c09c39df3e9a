"""TokenPrior (ar and mask modes, class/caption conditioning) and the byte-level caption tokenizer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from vqkit.io import VQKitFileError
from vqkit.models.prior import TokenPrior, TokenPriorConfig, halton_order, masked_counts, sample_from_logits
from vqkit.models.text import ByteTokenizer, make_text_tokenizer, split_words, word_vocabulary

K, GRID = 16, (3, 4)
CONDITIONS = {
    "none": ({}, None),
    "class": ({"num_classes": 3}, [0, 2, 1, 0]),
    "text": ({"text_vocab": "bytes", "max_text_len": 12}, ["a red circle", "", "é", "a blue square at the top"]),
    "both": ({"num_classes": 3, "text_vocab": "bytes", "max_text_len": 8},
             {"labels": [0, 1, 2, 0], "captions": ["x", "y", "z", "w"]}),
    "words": ({"text_vocab": "words", "text_words": ["a", "blue", "circle", "red"], "max_text_len": 5},
              ["a red circle", "", "Blue", "a blue circle"]),
}




def tiny(mode="ar", seed=0, **kwargs) -> TokenPrior:
    torch.manual_seed(seed)
    options = dict(mode=mode, codebook_size=K, token_grid=list(GRID), d_model=32, n_layers=2, n_heads=4)
    return TokenPrior(**{**options, **kwargs}).eval()


def grids(n=4, seed=0) -> torch.Tensor:
    return torch.randint(0, K, (n, *GRID), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("mode", ["ar", "mask"])
@pytest.mark.parametrize("kind", list(CONDITIONS))
def test_shapes(mode, kind):
    options, condition = CONDITIONS[kind]
    prior = tiny(mode, **options).train()
    x = grids()
    out = prior(x, condition)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and 0 <= out.accuracy <= 1
    out.loss.backward()
    assert prior.token_emb.weight.grad is not None
    assert prior.logits(x, condition).shape == (4, 12, K)
    assert prior.logits(x.reshape(4, 12), condition).shape == (4, 12, K)  # flattened grids work too
    log_prob = prior.log_prob(x, condition)
    assert log_prob.shape == (4, *GRID) and torch.isfinite(log_prob).all() and (log_prob <= 0).all()
    samples = prior.sample(4, condition, seed=0, steps=4)
    assert samples.shape == (4, *GRID) and samples.dtype == torch.int64
    assert samples.min() >= 0 and samples.max() < K
    assert prior.training  # sample and log_prob run in eval mode and restore the mode


def test_options_rope_swiglu_rmsnorm_untied():
    prior = tiny("ar", positions="rope", mlp="swiglu", norm="rmsnorm", tie_weights=False, num_classes=3)
    assert prior.head is not None and prior.pos_emb is None
    assert torch.isfinite(prior(grids(), [0, 1, 2, 0]).loss)


# ------------------------------------------------------------------------------------------------------ ar mode
@pytest.mark.parametrize("options, condition", [
    ({"num_classes": 3}, [0, 1, 2, 0, 1]),
    ({"num_classes": 3, "class_at_every_token": True}, [0, 1, 2, 0, 1]),
    ({"text_vocab": "bytes", "max_text_len": 6, "positions": "rope"}, ["a", "b", "cc", "", "d"]),
    ({"text_vocab": "bytes", "max_text_len": 6, "text_at_every_token": True}, ["a", "b", "cc", "", "d"]),
    ({}, None),
])
def test_kv_cache_sampling_matches_full_forward(options, condition):
    prior = tiny("ar", **options)
    samples, logits = prior.sample(5, condition, seed=3, return_logits=True)
    full = prior.logits(samples, condition)
    # The same numbers up to float32 rounding (one-token matmuls sum in another order than the full pass).
    torch.testing.assert_close(logits.reshape(5, 12, K), full, rtol=0, atol=1e-5)


def test_causal_masking():
    prior = tiny("ar", num_classes=3)
    x = grids(2)
    flat = x.reshape(2, -1).clone()
    before = prior.logits(flat, [0, 1])
    j = 5
    flat[:, j] = (flat[:, j] + 1) % K
    after = prior.logits(flat, [0, 1])
    # logits at position i predict token i from tokens < i: positions <= j must not see token j
    torch.testing.assert_close(after[:, : j + 1], before[:, : j + 1], rtol=0, atol=1e-6)
    assert (after[:, j + 1:] - before[:, j + 1:]).abs().max() > 1e-4


def test_ar_log_prob_is_the_negative_training_loss():
    prior = tiny("ar", num_classes=3)
    x, labels = grids(6), [0, 1, 2, 0, 1, 2]
    log_prob = prior.log_prob(x, labels)
    assert math.isfinite(log_prob.sum().item())
    loss = prior(x, labels).loss  # eval mode: no condition dropout; ar mode: no label smoothing by default
    torch.testing.assert_close(log_prob.mean(), -loss, rtol=1e-5, atol=1e-6)


def test_greedy_top_k_1_equals_argmax_decoding():
    prior = tiny("ar", num_classes=3)
    sampled = prior.sample(3, [2, 0, 1], top_k=1, seed=1).reshape(3, -1)
    greedy = torch.zeros(3, 12, dtype=torch.long)
    for i in range(12):  # uncached: the full forward each time
        greedy[:, i] = prior.logits(greedy, [2, 0, 1])[:, i].argmax(-1)
    assert torch.equal(sampled, greedy)
    assert torch.equal(prior.sample(3, [2, 0, 1], top_k=1, seed=7).reshape(3, -1), greedy)  # seed-free


# ---------------------------------------------------------------------------------------------------- mask mode
def test_mask_loss_counts_only_masked_positions():
    prior = tiny("mask", num_classes=3, label_smoothing=0.1)
    x, labels = grids(8), [0, 1, 2, 0, 1, 2, 0, 1]
    out = prior(x, labels, generator=torch.Generator().manual_seed(5))
    mask = prior.draw_mask(8, torch.Generator().manual_seed(5))  # eval mode: the generator only draws the mask
    assert out.num_targets == int(mask.sum()) < x.numel()
    flat = x.reshape(8, -1)
    logits = prior.logits(flat.masked_fill(mask, prior.mask_id), labels)
    per_token = F.cross_entropy(logits.transpose(1, 2), flat, label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(out.loss, per_token[mask].mean())
    assert not torch.isclose(out.loss, per_token.mean())


def test_mask_schedule_is_cosine():
    prior = tiny("mask")
    mask = prior.draw_mask(4000, torch.Generator().manual_seed(0))
    assert mask.sum(1).min() >= 1
    # E[cos(pi/2 u)] = 2/pi, and the count is rounded up
    assert abs(mask.float().mean().item() - 2 / math.pi) < 0.05


def test_mask_log_prob_is_the_single_position_pseudo_likelihood():
    prior = tiny("mask", text_vocab="bytes", max_text_len=6)
    x, captions = grids(2), ["ab", "c"]
    fast = prior.log_prob(x, captions, batch_size=5).reshape(2, -1)  # chunks that straddle grids
    flat = x.reshape(2, -1)
    for i in range(12):
        masked = flat.clone()
        masked[:, i] = prior.mask_id
        expected = prior.logits(masked, captions)[:, i].log_softmax(-1).gather(1, flat[:, i:i + 1]).squeeze(1)
        torch.testing.assert_close(fast[:, i], expected, rtol=1e-5, atol=1e-5)


def test_mask_sampling_keeps_decoded_tokens_and_uses_the_steps():
    prior = tiny("mask", num_classes=3)
    samples, logits = prior.sample(4, 1, steps=3, seed=0, return_logits=True)
    assert (samples != prior.mask_id).all()
    # every token was drawn from logits that were recorded (non-zero) at its decoding step
    assert (logits.abs().sum(-1) > 0).all()
    one_step = prior.sample(4, 1, steps=1, top_k=1, seed=0)  # a single step: all argmax at once from all-[MASK]
    all_masked = torch.full((1, 12), prior.mask_id)
    assert torch.equal(one_step[0].reshape(-1), prior.logits(all_masked, 1)[0].argmax(-1))
    assert prior.sample(2, 1, steps=50, seed=0).shape == (2, *GRID)  # more steps than tokens


@pytest.mark.parametrize("schedule", ["cosine", "cubic"])
def test_halton_training_masks_are_the_masks_halton_sampling_meets(schedule):
    steps = 4
    prior = tiny("mask", num_classes=3, train_masks="halton", train_mask_steps=steps, mask_schedule=schedule)
    drawn = prior.draw_mask(400, torch.Generator().manual_seed(0))
    train_masks = {tuple(m.tolist()) for m in drawn}
    assert len(train_masks) == len(masked_counts(12, steps, schedule))  # one mask per decoding step, each drawn
    seen = []
    image_logits = prior._image_logits

    def recording(tokens, *args):
        seen.extend(tuple(m.tolist()) for m in tokens == prior.mask_id)
        return image_logits(tokens, *args)

    prior._image_logits = recording
    prior.sample(3, [0, 1, 2], seed=0, steps=steps, order="halton")
    assert set(seen) == train_masks
    # the random masks of MaskGIT are many
    random_masks = tiny("mask", num_classes=3).draw_mask(400, torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in random_masks}) > 100
    with pytest.raises(ValueError, match="train_masks"):
        TokenPriorConfig(mode="mask", train_masks="raster")
    with pytest.warns(UserWarning, match="order='halton', steps=4"):  # sampled off the masks it learned
        prior.sample(2, [0, 1], seed=0, steps=steps, order="confidence")


def step_sizes(length: int, steps: int, schedule: str) -> list[int]:
    counts = masked_counts(length, steps, schedule) + [0]
    return [now - after for now, after in zip(counts, counts[1:])]


def test_mask_schedules_set_how_many_tokens_each_step_decodes():
    for schedule in ("cosine", "square", "cubic", "quartic", "linear"):
        for length, steps in [(49, 8), (12, 4), (5, 8), (256, 12)]:
            counts = masked_counts(length, steps, schedule)
            assert counts[0] == length and len(counts) == min(steps, length)
            assert all(a > b > 0 for a, b in zip(counts, counts[1:]))
    assert step_sizes(49, 8, "cosine") == [1, 3, 5, 6, 7, 9, 9, 9]  # MaskGIT's
    assert step_sizes(49, 8, "cubic") == [1, 1, 1, 4, 5, 9, 12, 16]  # one token at a time first, as AR draws
    assert step_sizes(49, 8, "quartic") == [1, 1, 1, 1, 4, 8, 13, 20]
    assert step_sizes(49, 8, "linear") == [7, 6, 6, 6, 6, 6, 6, 6]
    # training follows the schedule: a cubic group-causal prior's groups are the cubic step sizes
    prior = group_causal(mask_schedule="cubic", num_classes=3)
    assert [len(g) for g in prior._halton_groups()] == step_sizes(12, 4, "cubic") != step_sizes(12, 4, "cosine")
    samples, used = prior.sample(3, [0, 1, 2], seed=0, guidance_scale=2.0, return_logits=True)
    forced = prior.logits(samples, [0, 1, 2], guidance_scale=2.0)
    assert torch.allclose(forced.reshape(used.shape), used, atol=1e-5)
    random_masks = tiny("mask", mask_schedule="linear").draw_mask(2000, torch.Generator().manual_seed(0))
    assert abs(float(random_masks.float().mean()) - 0.5) < 0.05  # linear: on average half of the grid masked
    with pytest.raises(ValueError, match="mask_schedule"):
        TokenPriorConfig(mode="mask", mask_schedule="exp")
    with pytest.raises(ValueError, match="mask_schedule"):
        group_causal().sample(1, guide=group_causal(mask_schedule="cubic"))


def test_halton_trained_log_prob_is_a_normalised_likelihood():
    # Over every grid of a 2x2 grid with K=3 (81 grids), exp(sum of per-token log-probabilities) sums to 1.
    import itertools

    torch.manual_seed(0)
    prior = TokenPrior(mode="mask", codebook_size=3, token_grid=[2, 2], d_model=16, n_layers=1, n_heads=2,
                       num_classes=2, train_masks="halton", train_mask_steps=3).eval()
    for parameter in prior.parameters():  # large random weights, so that each token depends on the others
        torch.nn.init.normal_(parameter, std=0.7)
    every = torch.tensor(list(itertools.product(range(3), repeat=4))).reshape(-1, 2, 2)
    for label in (0, 1):
        log_p = prior.log_prob(every, label).double().sum((1, 2))
        assert abs(float(log_p.exp().sum()) - 1) < 1e-5
    pseudo = TokenPrior(**{**prior.config.to_dict(), "train_masks": "random"}).eval()
    pseudo.load_state_dict(prior.state_dict())
    assert abs(float(pseudo.log_prob(every, 0).double().sum((1, 2)).exp().sum()) - 1) > 1e-3  # not normalised


@pytest.mark.parametrize("mode", ["ar", "mask"])
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_keep_last_computes_only_the_last_positions(mode, positions):
    # Sampling asks the last block for the hidden states it reads only; the rest must not change them.
    prior = tiny(mode, positions=positions)
    x = torch.randn(2, 7, 32)
    full = prior._transformer(x)
    assert torch.allclose(prior._transformer(x, keep_last=3), full[:, -3:], atol=1e-6)
    mask = torch.rand(7, 7, generator=torch.Generator().manual_seed(0)) > 0.4
    mask |= torch.eye(7, dtype=torch.bool)
    masked = prior._transformer(x, attn_mask=mask)
    assert torch.allclose(prior._transformer(x, attn_mask=mask, keep_last=2), masked[:, -2:], atol=1e-6)


def group_causal(seed=0, **kwargs) -> TokenPrior:
    return tiny("mask", seed, **{"train_masks": "halton", "train_mask_steps": 4, "mask_attention": "group_causal",
                                 **kwargs})


@pytest.mark.parametrize("kind", list(CONDITIONS))
@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_group_causal_sampling_draws_from_the_teacher_forced_logits(kind, positions):
    # Sampling caches the keys of the tokens drawn so far and drops the queries'; teacher forcing runs the whole
    # [prefix, tokens, queries] sequence at once. Both must give the same logits for every token.
    options, condition = CONDITIONS[kind]
    prior = group_causal(positions=positions, **options)
    scales = [1.0] + ([2.0] if kind != "none" else [])
    for scale in scales:
        samples, used = prior.sample(4, condition, seed=0, guidance_scale=scale, return_logits=True)
        forced = prior.logits(samples, condition, guidance_scale=None if scale == 1.0 else scale)
        assert torch.allclose(forced.reshape(used.shape), used, atol=1e-5)
    out = prior.train()(samples, condition)
    assert out.num_targets == samples.numel()  # every token scored in one pass
    out.loss.backward()
    assert prior.token_emb.weight.grad is not None


def test_group_causal_logits_see_only_earlier_groups():
    prior = group_causal(num_classes=3)
    groups = prior._halton_groups()
    assert sorted(torch.cat(groups).tolist()) == list(range(12)) and len(groups) == 4
    x = grids(4, seed=1).reshape(4, 12)
    base = prior.logits(x, [0, 1, 2, 0])
    for g, group in enumerate(groups):
        later = torch.cat(groups[g:])
        changed = x.clone()
        changed[:, later] = (changed[:, later] + 1) % K  # this group's tokens and all later ones
        logits = prior.logits(changed, [0, 1, 2, 0])
        assert torch.allclose(logits[:, group], base[:, group], atol=1e-6)
        if g + 1 < len(groups):  # ... but the next group's logits do depend on this group's tokens
            following = groups[g + 1]
            assert not torch.allclose(logits[:, following], base[:, following], atol=1e-4)


def test_group_causal_log_prob_is_a_normalised_likelihood():
    import itertools

    torch.manual_seed(0)
    prior = TokenPrior(mode="mask", codebook_size=3, token_grid=[2, 2], d_model=16, n_layers=1, n_heads=2,
                       num_classes=2, train_masks="halton", train_mask_steps=3, mask_attention="group_causal").eval()
    for parameter in prior.parameters():
        torch.nn.init.normal_(parameter, std=0.7)
    every = torch.tensor(list(itertools.product(range(3), repeat=4))).reshape(-1, 2, 2)
    for label in (0, 1):
        log_p = prior.log_prob(every, label).double().sum((1, 2))
        assert abs(float(log_p.exp().sum()) - 1) < 1e-5


def test_group_causal_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="group_causal.*train_masks 'halton'"):
        TokenPriorConfig(mode="mask", mask_attention="group_causal")
    with pytest.raises(ValueError, match="group_causal.*mode 'mask'"):
        TokenPriorConfig(mode="ar", train_masks="halton", mask_attention="group_causal")
    with pytest.raises(ValueError, match="mask_attention must be one of"):
        TokenPriorConfig(mode="mask", mask_attention="sideways")
    prior = group_causal(num_classes=3)
    with pytest.raises(ValueError, match="leave order and steps out"):
        prior.sample(2, 0, order="confidence")
    with pytest.raises(ValueError, match="leave order and steps out"):
        prior.sample(2, 0, steps=8)
    prior.save_pretrained(tmp_path / "gc")
    again = TokenPrior.from_pretrained(tmp_path / "gc")
    assert again.config.group_causal
    assert torch.equal(again.sample(3, 1, seed=0), prior.sample(3, 1, seed=0))


def test_group_mixture_log_prob_is_a_normalised_likelihood_and_the_training_loss():
    import itertools

    torch.manual_seed(0)
    prior = TokenPrior(mode="mask", codebook_size=3, token_grid=[2, 2], d_model=16, n_layers=1, n_heads=2,
                       num_classes=2, train_masks="halton", train_mask_steps=2, mask_attention="group_causal",
                       group_mixture=3).eval()
    for parameter in prior.parameters():
        torch.nn.init.normal_(parameter, std=0.7)
    every = torch.tensor(list(itertools.product(range(3), repeat=4))).reshape(-1, 2, 2)
    assert max(len(g) for g in prior._halton_groups()) > 1  # so the in-group chain rule is exercised
    for label in (0, 1):
        log_p = prior.log_prob(every, label).double().sum((1, 2))
        assert abs(float(log_p.exp().sum()) - 1) < 1e-5
        # the training loss is the mean negative log-likelihood per token (eval mode: no condition dropout)
        loss = prior(every, label).loss
        assert math.isclose(float(loss.detach()), -float(log_p.mean()) / 4, rel_tol=1e-4)


def test_group_mixture_with_one_component_is_smoothed_cross_entropy():
    prior = group_causal(num_classes=3, group_mixture=1, label_smoothing=0.2)
    x, labels = grids(4, seed=2), [0, 1, 2, 0]
    marginal = prior.logits(x, labels)  # one component: the marginal is that component's log-probabilities
    expected = F.cross_entropy(marginal.reshape(-1, K), x.reshape(-1), label_smoothing=0.2)
    assert torch.allclose(prior(x, labels).loss, expected, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_group_mixture_sampling_draws_each_group_under_one_component(scale):
    # Every group's logits must be the teacher-forced logits under one component, the same for all its tokens.
    prior = group_causal(num_classes=3, group_mixture=4)
    labels = [0, 1, 2, 0, 1]
    samples, used = prior.sample(5, labels, seed=0, guidance_scale=scale, return_logits=True)
    x, used = samples.reshape(5, -1), used.reshape(5, x_len := samples[0].numel(), K)
    with torch.no_grad():
        def per_component(condition):
            hidden = prior._group_causal_hidden(x, *prior._encode_condition(condition, 5))
            return prior._head(prior.mixture.modulate(hidden))  # [B, L, Z, K]
        logits = per_component(labels)
        if scale != 1.0:
            logits = per_component(None) + scale * (logits - per_component(None))
    chosen = set()
    for group in prior._halton_groups():
        for b in range(5):
            match = [z for z in range(4) if torch.allclose(logits[b, group, z], used[b, group], atol=1e-4)]
            assert match, (b, group)
            chosen.update(match)
    assert len(chosen) > 1 and x_len == 12


def test_group_mixture_learns_what_a_group_shares():
    # One decoding step for the whole grid: a plain head draws the 12 tokens independently, so it cannot make the
    # grids of this data (all zeros or all ones); a two-component mixture can.
    def train(**options):
        prior = group_causal(train_mask_steps=1, d_model=32, cond_dropout=0.0, **options).train()
        generator = torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-2)
        for _ in range(150):
            x = (torch.rand(32, 1, 1, generator=generator) < 0.5).long().expand(32, *GRID)
            loss = prior(x, generator=generator).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        samples = prior.eval().sample(200, seed=0).reshape(200, -1)
        uniform = (samples == samples[:, :1]).all(1)
        return float(uniform.float().mean()), float(samples[uniform, 0].float().mean()), loss.item()

    plain_share, _, plain_loss = train()
    mixed_share, ones, mixed_loss = train(group_mixture=2)
    assert plain_share < 0.05 and mixed_share > 0.9, (plain_share, mixed_share)
    assert 0.3 < ones < 0.7  # both modes are drawn
    assert mixed_loss < 0.2 < plain_loss, (mixed_loss, plain_loss)  # ln 2 / 12 = 0.058 per token is the data's entropy; the plain head 0.69


def test_group_mixture_options_are_checked_and_saved(tmp_path):
    with pytest.raises(ValueError, match="group_mixture needs mask_attention 'group_causal'"):
        TokenPriorConfig(mode="mask", train_masks="halton", group_mixture=4)
    with pytest.raises(ValueError, match="group_mixture must be >= 0"):
        TokenPriorConfig(mode="mask", train_masks="halton", mask_attention="group_causal", group_mixture=-1)
    prior = group_causal(num_classes=3, group_mixture=3)
    with pytest.raises(ValueError, match="autoguidance does not combine with group_mixture"):
        prior.sample(2, 0, guidance_scale=2.0, guide=group_causal(1, num_classes=3))
    prior.save_pretrained(tmp_path / "mix")
    again = TokenPrior.from_pretrained(tmp_path / "mix")
    assert again.config.group_mixture == 3
    assert torch.equal(again.sample(3, 1, seed=0), prior.sample(3, 1, seed=0))


@pytest.mark.parametrize("options", [{}, {"revisit": True}, {"order": "halton"}, {"guidance_scale": 2.0}])
@pytest.mark.parametrize("steps", [3, 8, 20])
def test_mask_sampling_follows_the_schedule_it_counts_on_the_host(options, steps):
    # The sampler does not read the number of masked tokens back from the device (that would stall a GPU every
    # step); it relies on every grid following the cosine schedule exactly. Record what each forward pass sees.
    prior = tiny("mask", num_classes=3)
    seen = []
    image_logits = prior._image_logits

    def recording(tokens, *args):
        seen.append((tokens == prior.mask_id).sum(1))
        return image_logits(tokens, *args)

    prior._image_logits = recording
    samples = prior.sample(5, [0, 1, 2, 0, 1], seed=1, steps=steps, **options)
    L, expected = 12, [12]
    for step in range(1, steps):
        expected.append(min(math.floor(L * math.cos(math.pi / 2 * step / steps)), expected[-1] - 1))
    expected = [m for m in expected if m > 0]
    assert [int(s[0]) for s in seen] == expected
    assert all((s == s[0]).all() for s in seen)  # the same count in every grid (and both halves of guidance)
    assert (samples != prior.mask_id).all()


# ----------------------------------------------------------------------------------------- sampling and guidance
@pytest.mark.parametrize("mode", ["ar", "mask"])
def test_sampling_is_deterministic_per_seed(mode):
    prior = tiny(mode, num_classes=3)
    a = prior.sample(5, [0, 1, 2, 0, 1], seed=11, batch_size=2, top_p=0.9, temperature=1.5)
    b = prior.sample(5, [0, 1, 2, 0, 1], seed=11, batch_size=2, top_p=0.9, temperature=1.5)
    c = prior.sample(5, [0, 1, 2, 0, 1], seed=12, batch_size=2, top_p=0.9, temperature=1.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("every_token", [False, True])
@pytest.mark.parametrize("mode", ["ar", "mask"])
def test_classifier_free_guidance(mode, every_token):
    prior = tiny(mode, num_classes=3, class_at_every_token=every_token)
    x = grids(3)
    if mode == "mask":
        x = x.reshape(3, -1).masked_fill(torch.rand(3, 12, generator=torch.Generator().manual_seed(0)) < 0.5, K)
    cond, uncond = prior.logits(x, [0, 1, 2]), prior.logits(x, None)
    torch.testing.assert_close(prior.logits(x, [0, 1, 2], guidance_scale=1.0), cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(prior.logits(x, [0, 1, 2], guidance_scale=0.0), uncond, rtol=0, atol=1e-5)
    torch.testing.assert_close(prior.logits(x, [0, 1, 2], guidance_scale=3.0), uncond + 3 * (cond - uncond),
                               rtol=1e-5, atol=1e-5)
    samples, used = prior.sample(3, [0, 1, 2], guidance_scale=2.5, seed=0, return_logits=True)
    if mode == "ar":  # the cached, batched [cond; uncond] decoding matches the full guided forward
        torch.testing.assert_close(used.reshape(3, 12, K), prior.logits(samples, [0, 1, 2], guidance_scale=2.5),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ar", "group_causal", "mask"])
def test_autoguidance_draws_from_guide_plus_scaled_difference(kind):
    # A weaker prior of the same kind guides in place of the unconditional model: every token is drawn from
    # guide + s * (prior - guide), both given the condition, whatever the decoding path (cached ar, cached
    # group-causal, uncached bidirectional masked).
    make = {"ar": lambda seed: tiny("ar", seed, num_classes=3), "mask": lambda seed: tiny("mask", seed, num_classes=3),
            "group_causal": lambda seed: group_causal(seed, num_classes=3)}[kind]
    prior, guide = make(0), make(1)
    labels, s = [0, 1, 2], 2.0
    samples, used = prior.sample(3, labels, guidance_scale=s, guide=guide, seed=0, steps=4, return_logits=True)
    used = used.reshape(3, -1, K)
    if kind != "mask":  # teacher forcing gives every position's logits for exactly the context it was drawn in
        strong, weak = prior.logits(samples, labels), guide.logits(samples, labels)
        torch.testing.assert_close(used, weak + s * (strong - weak), rtol=1e-5, atol=1e-5)
    else:  # the first step decodes from the all-[MASK] grid
        everything_masked = torch.full((3, 12), K)
        strong, weak = prior.logits(everything_masked, labels), guide.logits(everything_masked, labels)
        first_step = (used - (weak + s * (strong - weak))).abs().amax(-1) < 1e-5
        assert first_step.any() and not first_step.all()
    # scale 1 is the prior alone; a guide of another kind is refused by name
    plain = prior.sample(3, labels, seed=0, steps=4)
    assert torch.equal(prior.sample(3, labels, seed=0, steps=4, guide=guide), plain)
    other = tiny("ar" if kind != "ar" else "mask", 0, num_classes=3)
    with pytest.raises(ValueError, match="mode"):
        prior.sample(3, labels, guidance_scale=s, guide=other)
    unconditional = {"ar": tiny("ar", 1), "mask": tiny("mask", 1), "group_causal": group_causal(1)}[kind]
    with pytest.raises(ValueError, match="num_classes"):
        prior.sample(3, labels, guidance_scale=s, guide=unconditional)


@pytest.mark.parametrize("mode", ["ar", "mask"])
def test_linear_guidance_schedule_ramps_the_scale(mode):
    prior = tiny(mode, num_classes=3, class_at_every_token=True)
    labels, L, s = [0, 1, 2], 12, 3.0
    samples, used = prior.sample(3, labels, guidance_scale=s, guidance_schedule="linear", seed=0, steps=4,
                                 return_logits=True)
    used = used.reshape(3, L, K)
    if mode == "ar":  # token i is drawn with scale 1 + (s - 1) (i + 1) / L: its logits match that guided forward
        for i in (0, 5, L - 1):
            scale = 1 + (s - 1) * (i + 1) / L
            expected = prior.logits(samples, labels, guidance_scale=scale)[:, i]
            torch.testing.assert_close(used[:, i], expected, rtol=0, atol=1e-5)
    else:  # the first of 4 steps decodes from the all-[MASK] grid at scale 1 + (s - 1) / 4
        everything_masked = torch.full((3, L), K)
        first = prior.logits(everything_masked, labels, guidance_scale=1 + (s - 1) / 4)
        constant = prior.logits(everything_masked, labels, guidance_scale=s)
        first_step = (used == first).all(-1)
        assert first_step.any() and not (used == constant).all(-1).any()
    _, constant_used = prior.sample(3, labels, guidance_scale=s, seed=0, steps=4, return_logits=True)
    assert (constant_used.reshape(3, L, K) - used).abs().max() > 1e-4  # the schedule changes the logits drawn from
    with pytest.raises(ValueError, match="guidance_schedule must be one of"):
        prior.sample(3, labels, guidance_scale=s, guidance_schedule="cosine")


def test_linear_tokens_guidance_ramps_by_the_share_of_tokens_decoded():
    # AR: a step is a token, so linear_tokens is linear. Group-causal with the cubic schedule: every token of a group
    # is drawn at 1 + (s - 1) * (tokens decoded once the group is done) / L, not at the step's share.
    labels, L, s = [0, 1, 2], 12, 3.0
    ar = tiny("ar", num_classes=3, class_at_every_token=True)
    by_steps = ar.sample(3, labels, guidance_scale=s, guidance_schedule="linear", seed=0, return_logits=True)
    by_tokens = ar.sample(3, labels, guidance_scale=s, guidance_schedule="linear_tokens", seed=0, return_logits=True)
    for a, b in zip(by_steps, by_tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    prior = group_causal(num_classes=3, class_at_every_token=True, mask_schedule="cubic")
    samples, used = prior.sample(3, labels, guidance_scale=s, guidance_schedule="linear_tokens", seed=0,
                                 return_logits=True)
    used, done = used.reshape(3, L, K), 0
    groups = prior._halton_groups()
    assert len({len(g) for g in groups}) > 1  # the groups differ in size, so the two ramps differ
    for step, group in enumerate(groups):
        done += len(group)
        expected = prior.logits(samples, labels, guidance_scale=1 + (s - 1) * done / L)[:, group]
        torch.testing.assert_close(used[:, group], expected, rtol=0, atol=1e-5)
        if done / L != (step + 1) / len(groups):
            by_step = prior.logits(samples, labels, guidance_scale=1 + (s - 1) * (step + 1) / len(groups))[:, group]
            assert (used[:, group] - by_step).abs().max() > 1e-4


def test_revisit_decoding_can_remask_decoded_tokens():
    prior = tiny("mask", num_classes=3, input_noise=0.2)
    labels = [0, 1, 2] * 4
    kept, revisited = (prior.sample(12, labels, seed=3, steps=6, revisit=r, return_logits=True) for r in (False, True))
    for grids_, used in (kept, revisited):  # every token is decoded, and from the logits recorded for it
        assert grids_.min() >= 0 and grids_.max() < K and (used.abs().sum(-1) > 0).all()
    # the same seed draws the same first step either way; revisiting lets later steps take decoded tokens back
    assert not torch.equal(kept[0], revisited[0])
    again = prior.sample(12, labels, seed=3, steps=6, revisit=True)
    assert torch.equal(again, revisited[0])


@pytest.mark.parametrize("shape", [(7, 7), (3, 4), (1, 5), (8, 8)])
def test_halton_order_is_a_spread_out_permutation(shape):
    order = halton_order(*shape)
    assert sorted(order.tolist()) == list(range(shape[0] * shape[1]))
    if shape == (8, 8):  # spread out: the first eight positions sit in eight different rows and columns
        rows, cols = order[:8] // 8, order[:8] % 8
        assert len(set(rows.tolist())) == 8 and len(set(cols.tolist())) == 8


def test_halton_decoding_keeps_positions_in_halton_order():
    prior = tiny("mask", num_classes=3)
    labels, L, steps = [0, 1, 2], GRID[0] * GRID[1], 4
    grids_, used = prior.sample(3, labels, seed=0, steps=steps, order="halton", return_logits=True)
    assert grids_.min() >= 0 and grids_.max() < K
    # the first step decodes from the all-[MASK] grid; the positions it keeps are the first ones of the Halton order
    # for every sample, whatever their confidence
    first = prior.logits(torch.full((3, L), K), labels).reshape(3, L, K)
    decoded_first = (used.reshape(3, L, K) == first).all(-1)
    kept_first = L - math.floor(L * math.cos(math.pi / 2 / steps))
    expected = torch.zeros(L, dtype=torch.bool)
    expected[halton_order(*GRID)[:kept_first]] = True
    assert torch.equal(decoded_first, expected.expand(3, L))
    by_confidence = prior.sample(3, labels, seed=0, steps=steps)
    assert not torch.equal(by_confidence, grids_)
    with pytest.raises(ValueError, match="order must be one of"):
        prior.sample(3, labels, order="raster")
    with pytest.raises(ValueError, match="does not combine"):
        prior.sample(3, labels, order="halton", revisit=True)


def test_class_at_every_token_conditions_every_position():
    torch.manual_seed(0)
    prefix_only, every = tiny("ar", num_classes=3), tiny("ar", num_classes=3, class_at_every_token=True)
    every.load_state_dict(prefix_only.state_dict())  # same weights: the option adds no parameters
    x = grids(2)
    same_without_class = every.logits(x, None) - prefix_only.logits(x, None)
    changed_with_class = every.logits(x, [1, 2]) - prefix_only.logits(x, [1, 2])
    # the null class is added too (it is a class embedding like the others), so both differ from prefix-only;
    # what matters is that the first position (predicted from the prefix alone) is unchanged and later ones move
    torch.testing.assert_close(changed_with_class[:, 0], torch.zeros_like(changed_with_class[:, 0]), rtol=0, atol=1e-6)
    assert changed_with_class[:, 1:].abs().max() > 1e-4 and same_without_class[:, 1:].abs().max() > 1e-4
    with pytest.raises(ValueError, match="class_at_every_token needs class conditioning"):
        TokenPrior(TokenPriorConfig(class_at_every_token=True))


def test_text_at_every_token_conditions_every_position():
    torch.manual_seed(0)
    options = dict(text_vocab="bytes", max_text_len=8)
    prefix_only, every = tiny("ar", **options), tiny("ar", text_at_every_token=True, **options)
    every.load_state_dict(prefix_only.state_dict())  # same weights: the option adds no parameters
    x, captions = grids(2), ["red", "blue"]  # short enough not to be cut at 8 tokens
    changed = every.logits(x, captions) - prefix_only.logits(x, captions)
    # the first position is predicted from the prefix alone; later ones see the caption summary as well
    torch.testing.assert_close(changed[:, 0], torch.zeros_like(changed[:, 0]), rtol=0, atol=1e-6)
    assert changed[:, 1:].abs().max() > 1e-4
    # the summary ignores PAD: the same caption padded to another length gives the same logits
    longer = tiny("ar", text_at_every_token=True, text_vocab="bytes", max_text_len=12)
    longer.text_emb.load_state_dict(every.text_emb.state_dict())
    ids8, ids12 = every._encode_condition(captions, 2)[1], longer._encode_condition(captions, 2)[1]
    torch.testing.assert_close(every._caption_summary(ids8), longer._caption_summary(ids12), rtol=0, atol=1e-6)
    # guidance: the empty caption is the null condition, batched with the given one as before
    cond, uncond = every.logits(x, captions), every.logits(x, None)
    torch.testing.assert_close(every.logits(x, captions, guidance_scale=2.0), uncond + 2 * (cond - uncond),
                               rtol=1e-5, atol=1e-5)
    samples, used = every.sample(2, captions, guidance_scale=2.0, seed=0, return_logits=True)
    torch.testing.assert_close(used.reshape(2, 12, K), every.logits(samples, captions, guidance_scale=2.0),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="text_at_every_token needs caption conditioning"):
        TokenPrior(TokenPriorConfig(text_at_every_token=True))


def test_condition_dropout_maps_to_the_null_condition():
    prior = tiny("ar", num_classes=3, text_vocab="bytes", max_text_len=6, cond_dropout=0.5)
    class_ids, text_ids = prior._encode_condition({"labels": [1] * 400, "captions": ["hi"] * 400}, 400)
    dropped_class, dropped_text = prior._drop_condition(class_ids, text_ids, torch.Generator().manual_seed(0))
    dropped = dropped_class == 3
    assert 150 < int(dropped.sum()) < 250
    empty = torch.tensor(ByteTokenizer().encode("", 6))
    assert (dropped_text[dropped] == empty).all() and (dropped_text[~dropped] == text_ids[~dropped]).all()


# ---------------------------------------------------------------------------------------------------- validation
def test_input_validation():
    prior = tiny("ar", num_classes=3)
    with pytest.raises(ValueError, match="token ids must be in"):
        prior(torch.full((1, *GRID), K), [0])
    with pytest.raises(ValueError, match="token grids"):
        prior(torch.zeros(1, 4, 4, dtype=torch.long), [0])
    with pytest.raises(ValueError, match="integer"):
        prior(torch.zeros(1, *GRID), [0])
    with pytest.raises(ValueError, match="class labels must be in"):
        prior(grids(2), [0, 3])
    with pytest.raises(ValueError, match="2 class labels for a batch of 4"):
        prior(grids(4), [0, 1])
    with pytest.raises(ValueError, match=r"without text conditioning.*class-conditional: give a class in \[0, 3\)"):
        prior(grids(1), ["a caption"])
    with pytest.raises(ValueError, match="grid"):
        prior.sample(1, 0, grid=(4, 4))
    with pytest.raises(ValueError, match="temperature"):
        prior.sample(1, 0, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        prior.sample(1, 0, top_p=0)
    with pytest.raises(ValueError, match="min_p"):
        prior.sample(1, 0, min_p=1.0)
    unconditional = tiny("mask")
    with pytest.raises(ValueError, match="without class conditioning"):
        unconditional(grids(1), [0])
    with pytest.raises(ValueError, match="guidance needs"):
        unconditional.sample(1, guidance_scale=2.0)
    assert unconditional.logits(torch.full((1, 12), K)).shape == (1, 12, K)  # [MASK] is a valid input
    with pytest.raises(ValueError, match="invalid TokenPriorConfig"):
        TokenPriorConfig(mode="diffusion")


# --------------------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("mode", ["ar", "mask"])
def test_save_load_round_trip(tmp_path, mode):
    prior = tiny(mode, num_classes=3, text_vocab="bytes", max_text_len=6, tokenizer="runs/tok/final")
    with torch.no_grad():
        prior.head_bias.normal_()  # something that init leaves at zero
    prior.save_pretrained(tmp_path / "prior")
    config = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert config["model_type"] == "vqkit.TokenPrior" and config["tokenizer"] == "runs/tok/final"
    assert config["token_grid"] == list(GRID) and config["codebook_size"] == K and config["config_version"] == 1
    loaded = TokenPrior.from_pretrained(tmp_path / "prior")
    assert loaded.config == prior.config
    condition = {"labels": [0, 1], "captions": ["a", "b"]}
    assert torch.equal(loaded.log_prob(grids(2), condition), prior.log_prob(grids(2), condition))


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(VQKitFileError, match="not a directory"):
        TokenPrior.from_pretrained(tmp_path / "missing")
    directory = tmp_path / "prior"
    tiny("ar").save_pretrained(directory)
    (directory / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(VQKitFileError, match="model.safetensors"):
        TokenPrior.from_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "vqkit.VQModel"}))
    with pytest.raises(VQKitFileError, match="not a vqkit.TokenPrior"):
        TokenPrior.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({**config, "config_version": 99}))
    with pytest.raises(VQKitFileError, match="newer vqkit"):
        TokenPrior.from_pretrained(directory)
    (directory / "config.json").write_text("{")
    with pytest.raises(VQKitFileError, match="config.json"):
        TokenPrior.from_pretrained(directory)


# -------------------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("mode", ["ar", "mask"])
def test_tiny_prior_overfits_fixed_grids(mode):
    prior = tiny(mode, d_model=64, num_classes=8, cond_dropout=0.0).train()
    generator = torch.Generator().manual_seed(0)
    x, labels = grids(8, seed=1).repeat(2, 1, 1), torch.arange(8).repeat(2)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = prior(x, labels, generator=generator).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("mode", ["ar", "mask"])
def test_input_noise_corrupts_inputs_in_training_only(mode):
    prior = tiny(mode, cond_dropout=0.0, input_noise=0.3)
    x = grids(64, seed=2).flatten(1)
    noisy, replaced = prior._noisy_inputs(x, torch.Generator().manual_seed(0))
    assert torch.equal(noisy[~replaced], x[~replaced])
    changed = (noisy != x).float().mean().item()
    # replaced with prob 0.3, and a replacement equals the old code with prob 1/K
    assert 0.3 * (1 - 1 / K) - 0.05 < changed < 0.3 * (1 - 1 / K) + 0.05, changed
    assert noisy.min() >= 0 and noisy.max() < K
    clean = tiny(mode, cond_dropout=0.0)  # same seed, same weights, no noise
    clean.load_state_dict(prior.state_dict())
    # eval mode never corrupts: the same loss as the noiseless model; training mode does (the same generator draws
    # the same mask before the noise, so only the noise can make the two losses differ)
    assert torch.allclose(prior(x, generator=torch.Generator().manual_seed(1)).loss,
                          clean(x, generator=torch.Generator().manual_seed(1)).loss)
    train_loss = prior.train()(x, generator=torch.Generator().manual_seed(1)).loss
    clean_out = clean.train()(x, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(train_loss, clean_out.loss)
    noisy_out = prior(x, generator=torch.Generator().manual_seed(1))  # training mode, the same mask
    if mode == "mask":  # the replaced visible tokens are scored as well as the masked ones
        assert noisy_out.num_targets > clean_out.num_targets
    else:
        assert noisy_out.num_targets == clean_out.num_targets == 64 * 12
    with pytest.raises(ValueError, match="input_noise"):
        TokenPriorConfig(input_noise=1.0)


# --------------------------------------------------------------------------------------------------------- text
def test_byte_tokenizer():
    tok = make_text_tokenizer("bytes")
    ids = tok.encode("a é", 8)
    assert len(ids) == 8 and ids[0] == tok.BOS and ids[ids.index(tok.EOS) + 1:] == [tok.PAD] * 2
    assert tok.decode(ids) == "a é"
    assert tok.decode(tok.encode("a long caption", 6)) == "a lo"  # cut to max_len - 2 bytes
    assert tok.encode_batch(["x", ""], 4).tolist() == [[1, ord("x") + 3, 2, 0], [1, 2, 0, 0]]
    assert max(tok.encode("\xff" * 10, 12)) < tok.vocab_size
    with pytest.raises(ValueError, match="unknown text_vocab"):
        make_text_tokenizer("gpt2")


def test_word_tokenizer():
    captions = ["a red circle at the top left", "A blue square, at the bottom", "a red circle"]
    words = word_vocabulary(captions)
    assert words == sorted(set(words)) and {"red", "square", ",", "left"} <= set(words) and "A" not in words
    tok = make_text_tokenizer("words", words)
    ids = tok.encode("a RED circle", 6)
    assert ids[0] == tok.BOS and ids[4] == tok.EOS and ids[5] == tok.PAD and len(ids) == 6
    assert tok.decode(ids) == "a red circle"
    assert tok.decode(tok.encode("a blue square, at the bottom", 5)) == "a blue square"  # cut to max_len - 2 words
    assert tok.encode("", 3) == [tok.BOS, tok.EOS, tok.PAD]
    assert split_words("top-left, it's") == ["top-left", ",", "it's"]
    with pytest.raises(ValueError, match="never saw: green, triangle"):
        tok.encode("a green triangle", 8)
    with pytest.raises(ValueError, match="needs its vocabulary"):
        make_text_tokenizer("words")
    with pytest.raises(ValueError, match="needs its vocabulary"):
        tiny("ar", text_vocab="words")


@pytest.mark.parametrize("preset", ["mnist-prior-ar", "mnist-prior-mask", "prior-ar", "prior-mask", "shapes-prior-ar"])
def test_a_prior_preset_builds_the_config_its_prior_section_says(preset):
    # The config merge starts from the defaults of TokenPriorConfig(); a default derived from another field (as
    # label smoothing's once was from the mode) must not be frozen at the default mode's value.
    from vqkit.training.config import load_yaml, preset_path, resolve_config

    section = load_yaml(preset_path(preset)).get("prior", {})
    assert resolve_config(preset=preset, kind="prior").prior == TokenPriorConfig(**section)


def test_min_p_drops_the_tokens_below_its_share_of_the_best_and_renormalises():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.05, 0.1, 0.8]])
    generator = torch.Generator().manual_seed(0)
    drawn, log_probs = zip(*(sample_from_logits(probs.log(), 1.0, None, None, generator, min_p=0.2)
                             for _ in range(3000)))
    drawn, log_probs = torch.stack(drawn), torch.stack(log_probs)
    # row 0 keeps p >= 0.1 (tokens 0-2), row 1 keeps p >= 0.16 (token 3 only)
    assert set(drawn[:, 0].tolist()) == {0, 1, 2} and set(drawn[:, 1].tolist()) == {3}
    kept = torch.tensor([0.5, 0.3, 0.15]) / 0.95
    share = torch.bincount(drawn[:, 0], minlength=3)[:3] / len(drawn)
    assert torch.allclose(share, kept, atol=0.03)
    assert torch.allclose(log_probs[:, 0], kept.log()[drawn[:, 0]])
    assert torch.allclose(log_probs[:, 1], torch.zeros(3000))
    # min_p = 0 or None cuts nothing
    for off in (0.0, None):
        assert set(sample_from_logits(probs[:1].log().expand(2000, 4), 1.0, None, None, generator,
                                      min_p=off)[0].tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------------- condition contrastive alignment
@pytest.mark.parametrize("kind", ["ar", "group_causal"])
def test_alignment_loss_makes_grids_likelier_under_their_own_class_than_under_others(kind):
    # CCA fine-tuning pushes log p(x|c) / p_ref(x|c) up and log p(x|c') / p_ref(x|c') down for a mismatched c'. On a
    # prior that has only just started learning, a few steps must widen the margin by which each training grid
    # prefers its own class, and leave the frozen reference untouched.
    make = (lambda: tiny("ar", d_model=32, num_classes=4, dropout=0.0)) if kind == "ar" else \
        (lambda: group_causal(d_model=32, num_classes=4, dropout=0.0))
    prior, reference = make(), make()
    reference.requires_grad_(False)
    x, labels = grids(8, seed=3), torch.arange(8) % 4
    wrong = (labels + 1) % 4

    def margin(model):
        with torch.no_grad():
            return float((model.log_prob(x, labels).sum((1, 2)) - model.log_prob(x, wrong).sum((1, 2))).mean())

    before, kept = margin(prior), {k: v.clone() for k, v in reference.state_dict().items()}
    # at the start (prior = reference, no dropout) every gap is zero, so each of the two terms is log 2
    out = prior.train().alignment_loss(reference, x, labels, weight=1.0, beta=0.5,
                                       generator=torch.Generator().manual_seed(0))
    assert abs(float(out.loss) - 2 * math.log(2)) < 1e-5
    optimizer = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for step in range(40):
        out = prior.alignment_loss(reference, x, labels, weight=1.0, beta=0.5,
                                   generator=torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert margin(prior.eval()) > before + 0.5, (before, margin(prior))
    assert all(torch.equal(v, kept[k]) for k, v in reference.state_dict().items())
    assert all(p.grad is None for p in reference.parameters())


def test_alignment_loss_with_captions_keeps_matching_captions_as_positives():
    # text conditions: a shuffled caption equal to the grid's own (here every caption is the same) is no negative,
    # so with the prior equal to its reference both terms are log 2 and nothing counts as a mismatch
    prior = group_causal(text_vocab="bytes", max_text_len=12, dropout=0.0)
    out = prior.train().alignment_loss(prior, grids(4), ["a red circle"] * 4, weight=1.0, beta=1.0,
                                       generator=torch.Generator().manual_seed(0))
    assert abs(float(out.loss) - 2 * math.log(2)) < 1e-5
    assert float(out.accuracy) == 1.0  # no mismatched pair to score
    mixed = prior.alignment_loss(prior, grids(4), ["a", "b", "c", "d"], weight=1.0, beta=1.0,
                                 generator=torch.Generator().manual_seed(0))
    mixed.loss.backward()
    assert float(prior.text_emb.weight.grad.abs().sum()) > 0  # the captions take part in the objective


def test_alignment_loss_refuses_priors_without_exact_likelihoods_or_conditions():
    x = grids(4)
    bidirectional = tiny("mask", num_classes=3)
    with pytest.raises(ValueError, match="ar or group-causal"):
        bidirectional.alignment_loss(bidirectional, x, [0, 1, 2, 0], weight=1.0, beta=0.1)
    unconditional = tiny("ar")
    with pytest.raises(ValueError, match="needs conditions"):
        unconditional.alignment_loss(unconditional, x, None, weight=1.0, beta=0.1)


def test_alignment_loss_linear_schedule_weights_tokens_by_decoding_progress():
    # "linear" weights each token's log-ratio by the share of decoding done once it is drawn, as linear guidance does
    ar, gc = tiny("ar", num_classes=3), group_causal(num_classes=3)
    L = GRID[0] * GRID[1]
    assert torch.allclose(ar._decoding_progress(), torch.arange(1, L + 1) / L)
    for g, positions in enumerate(gc._halton_groups()):
        assert torch.allclose(gc._decoding_progress()[positions], torch.tensor((g + 1) / len(gc._halton_groups())))
    x, labels = grids(4), [0, 1, 2, 0]
    per_token = gc.log_prob(x, labels).reshape(4, -1)
    class_ids, _ = gc._encode_condition(labels, 4)
    weighted = gc._sequence_log_prob(gc._check_tokens(x), class_ids, None, gc._decoding_progress())
    assert torch.allclose(weighted, (per_token * gc._decoding_progress()).sum(-1), atol=1e-5)
    with pytest.raises(ValueError, match="schedule must be constant or linear"):
        gc.alignment_loss(gc, x, labels, weight=1.0, beta=1.0, schedule="cosine")
