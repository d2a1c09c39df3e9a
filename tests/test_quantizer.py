"""VectorQuantizer and the chunked nearest-code search."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vqkit.quantizers import VectorQuantizer, brute_force_nearest, kmeans, nearest_code




def features(b=2, d=4, h=3, w=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, h, w, generator=g) * scale


def flat(z: torch.Tensor) -> torch.Tensor:
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def as_grid(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, d, h, w = like.shape
    return rows.view(b, h, w, d).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------- gradients, loss


def test_straight_through_gradient_reaches_the_input():
    torch.manual_seed(0)
    vq = VectorQuantizer(4, 16).train()
    z = features().requires_grad_(True)
    out = vq(z)
    # forward value is the code, not the input
    codes = vq.codes().detach()[out.indices.reshape(-1)]
    assert torch.allclose(flat(out.quantized.detach()), codes, atol=1e-6)
    assert not torch.allclose(out.quantized.detach(), z.detach())
    upstream = torch.randn_like(out.quantized)
    (out.quantized * upstream).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # identity in the backward pass: dL/dz == dL/dquantized
    assert torch.allclose(z.grad, upstream, atol=1e-6)
    # the straight-through path itself gives the codebook no gradient (only the loss does)
    assert vq.codebook.grad is None or vq.codebook.grad.abs().sum() == 0


def test_codebook_loss_with_beta_on_the_commitment_term():
    torch.manual_seed(0)
    beta = 0.3
    vq = VectorQuantizer(4, 16, beta=beta).train()
    assert vq.codebook.requires_grad
    z = features(seed=1).requires_grad_(True)
    out = vq(z)
    zf = flat(z.detach())
    q = vq.codebook.detach()[out.indices.reshape(-1)]
    mse = F.mse_loss(q, zf)
    # numerically the two MSE terms coincide: loss = codebook_mse + beta * commitment_mse
    assert torch.allclose(out.loss.detach(), mse + beta * mse, rtol=1e-5)
    assert out.stats["codebook_loss"] == pytest.approx(float(mse), rel=1e-5)
    assert out.stats["commitment_loss"] == pytest.approx(float(mse), rel=1e-5)

    out.loss.backward()
    n = zf.numel()
    # d/de ||sg[z] - e||^2 has weight 1 (codebook term) ...
    expected_cb_grad = torch.zeros_like(vq.codebook).index_add_(0, out.indices.reshape(-1), 2 * (q - zf) / n)
    assert vq.codebook.grad is not None and vq.codebook.grad.abs().sum() > 0
    assert torch.allclose(vq.codebook.grad, expected_cb_grad, atol=1e-7)
    # ... and d/dz beta * ||z - sg[e]||^2 carries beta (commitment term)
    expected_z_grad = as_grid(beta * 2 * (zf - q) / n, z)
    assert torch.allclose(z.grad, expected_z_grad, atol=1e-7)


def test_codebook_loss_trains_the_codebook_towards_the_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 4).train()
    opt = torch.optim.SGD(vq.parameters(), lr=1.0)
    z = torch.full((1, 2, 4, 4), 3.0)
    first = None
    for _ in range(30):
        out = vq(z)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = float(out.loss.detach()) if first is None else first
    assert float(vq(z).loss.detach()) < 0.01 * first


def test_wrong_input_shape_raises():
    vq = VectorQuantizer(4, 8)
    with pytest.raises(ValueError, match="expects"):
        vq(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError):
        vq(torch.zeros(4, 2, 2))
    with pytest.raises(ValueError):
        VectorQuantizer(4, 1)


# -------------------------------------------------------------------------------------------------------- EMA


def test_ema_moves_the_assigned_code_to_the_mean_of_its_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, use_ema=True, ema_decay=0.8).train()
    assert not vq.codebook.requires_grad
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0]]))
        vq.ema_sum.copy_(vq.codebook)
    # four different vectors, all nearest to code 0; their mean is (1.5, 0.5)
    rows = torch.tensor([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0], [0.0, 1.0]])
    z = rows.t().reshape(1, 2, 2, 2)
    target = rows.mean(0)
    dists = []
    for _ in range(60):
        out = vq(z)
        assert (out.indices == 0).all()
        dists.append(float((vq.codebook[0] - target).norm()))
    assert dists[0] < float(target.norm())  # the first update already moved it
    assert all(b <= a + 1e-6 for a, b in zip(dists, dists[1:]))  # monotone
    assert dists[-1] < 1e-3
    # the running count of the code tends to the number of vectors it gets per step
    assert float(vq.ema_count[0]) == pytest.approx(4.0, rel=1e-3)
    # EMA loss has only the commitment term; the codebook gets no gradient
    z2 = z.clone().requires_grad_(True)
    out = vq(z2)
    assert float(out.stats["codebook_loss"]) == 0.0
    out.loss.backward()
    assert vq.codebook.grad is None
    assert z2.grad is not None and z2.grad.abs().sum() > 0


def test_ema_identical_vectors_converge():
    torch.manual_seed(0)
    vq = VectorQuantizer(3, 8, use_ema=True, ema_decay=0.9).train()
    v = torch.tensor([0.7, -1.2, 2.0])
    z = v.view(1, 3, 1, 1).expand(4, 3, 3, 3).contiguous()
    out = vq(z)
    code = int(out.indices[0, 0, 0])
    assert (out.indices == code).all()
    for _ in range(80):
        vq(z)
    assert torch.allclose(vq.codebook[code], v, atol=1e-3)
    # in eval mode nothing moves
    vq.eval()
    before = {k: t.clone() for k, t in vq.state_dict().items()}
    vq(features(d=3, seed=5))
    for k, t in vq.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_laplace_smoothing_keeps_unused_codes_finite():
    torch.manual_seed(0)
    # a fast decay drives the counts of unused codes to exactly 0 in fp32 (0.5**150 underflows)
    vq = VectorQuantizer(2, 4, use_ema=True, ema_decay=0.5).train()
    z = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1).expand(2, 2, 2, 2).contiguous()
    idx = int(vq(z).indices[0, 0, 0])
    for _ in range(200):
        vq(z)
    unused = torch.arange(4) != idx
    assert (vq.ema_count[unused] == 0).all()  # the 0/0 case really occurs
    assert torch.isfinite(vq.codebook).all()
    assert torch.isfinite(vq.ema_sum).all()
    assert torch.allclose(vq.codebook[idx], torch.tensor([1.0, 2.0]), atol=1e-4)
    # and the quantizer keeps working
    out = vq(features(d=2, seed=3))
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.loss)


# -------------------------------------------------------------------------------------------- dead-code restarts


@pytest.mark.parametrize("use_ema", [False, True])
def test_dead_codes_are_restarted_from_batch_vectors(use_ema):
    torch.manual_seed(0)
    window = 3
    vq = VectorQuantizer(2, 8, use_ema=use_ema, dead_code_window=window).train()
    with torch.no_grad():
        far = torch.tensor([[100.0, 100.0], [-100.0, 100.0], [100.0, -100.0], [-100.0, -100.0]])
        near = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])
        vq.codebook.copy_(torch.cat([near, far]))
        if use_ema:
            vq.ema_sum.copy_(vq.codebook)
    restarted_at = None
    for step in range(window + 2):
        z = features(b=2, d=2, h=4, w=4, seed=10 + step)
        out = vq(z)
        if out.stats["restarted"] > 0:
            restarted_at = step
            break
    # nothing can be dead before it was unused for the whole window
    assert restarted_at is None or restarted_at >= window - 1, f"restart after only {restarted_at + 1} steps"
    assert restarted_at is not None, "dead codes were never restarted"
    assert out.stats["restarted"] == 4  # exactly the four far codes
    inputs = flat(z)
    # every restarted code now lies on one of the vectors of that batch
    for code in vq.codebook[4:]:
        assert (inputs - code).abs().amax(1).min() < 1e-6
    assert vq.codebook[4:].abs().max() < 100  # none of the far codes survived
    if not use_ema:  # the codes in use were not touched by the restart
        assert torch.equal(vq.codebook[:4].detach(), near)
    assert int(vq.steps) == restarted_at + 1
    assert (vq.last_used[4:] == restarted_at).all()
    if use_ema:
        # the EMA statistics were reset with the code: the next update must not pull it back to +-100
        vq(z)
        assert vq.codebook[4:].abs().max() < 10
        assert torch.isfinite(vq.ema_count).all() and (vq.ema_count[4:] > 0).all()


def test_no_restart_when_window_is_zero():
    vq = VectorQuantizer(2, 8, dead_code_window=0).train()
    for step in range(6):
        assert vq(features(d=2, seed=step)).stats["restarted"] == 0


# -------------------------------------------------------------------------------------------------------- k-means


def clusters(n_per=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[10.0, 10.0], [-10.0, 10.0], [10.0, -10.0], [-10.0, -10.0]])
    points = torch.cat([c + 0.1 * torch.randn(n_per, 2, generator=g) for c in centres])
    return centres, points[torch.randperm(len(points), generator=g)]


def test_kmeans_init_places_codes_on_cluster_centres():
    torch.manual_seed(0)
    centres, points = clusters()
    vq = VectorQuantizer(2, 32, kmeans_init=True).train()
    assert int(vq.initialized) == 0
    # eval mode never initialises
    vq.eval()
    vq(points.t().reshape(1, 2, 16, 16))
    assert int(vq.initialized) == 0
    vq.train()
    vq(points.t().reshape(1, 2, 16, 16))
    assert int(vq.initialized) == 1
    cb = vq.codebook.detach()
    d = torch.cdist(cb, centres)
    assert d.min(1).values.max() < 0.5  # every code sits on a cluster
    assert (d.argmin(1).bincount(minlength=4) > 0).all()  # every cluster has codes
    # initialised once only: a second batch from elsewhere does not re-run k-means
    before = cb.clone()
    vq(torch.full((1, 2, 4, 4), 3.0))
    moved = (vq.codebook.detach() != before).any(1).sum()
    assert moved == 0  # non-EMA codebook: only the optimizer may move it


def test_kmeans_init_with_ema_resets_statistics():
    torch.manual_seed(0)
    centres, points = clusters()
    vq = VectorQuantizer(2, 4, kmeans_init=True, use_ema=True, ema_decay=0.99).train()
    vq(points.t().reshape(1, 2, 16, 16))
    assert int(vq.initialized) == 1
    assert torch.cdist(vq.codebook.detach(), centres).min(1).values.max() < 15  # near the data, not at ~0
    assert vq.ema_count.sum() > 0 and torch.isfinite(vq.ema_sum).all()
    # the EMA sum/count ratio is consistent with the codebook after the update
    ratio = vq.ema_sum / vq.ema_count.unsqueeze(1)
    assert torch.allclose(ratio, vq.codebook, rtol=1e-3, atol=1e-3)


def test_kmeans_function_separates_clusters():
    torch.manual_seed(0)
    centres, points = clusters()
    got = kmeans(points, 16, iters=10)
    assert got.shape == (16, 2)
    assert torch.cdist(got, centres).min(1).values.max() < 0.5
    # fewer vectors than codes still gives K finite codes near the data
    few = kmeans(points[:5], 8, iters=3)
    assert few.shape == (8, 2) and torch.isfinite(few).all()
    assert torch.cdist(few, points[:5]).min(1).values.max() < 0.1


# ------------------------------------------------------------------------------------------ chunked nearest search


@pytest.mark.parametrize("block_elements", [1, 10, 36, 37, 38, 100, 1000, 1 << 24])
def test_chunked_nearest_code_matches_brute_force(block_elements):
    g = torch.Generator().manual_seed(block_elements % 97)
    x = torch.randn(257, 6, generator=g)
    cb = torch.randn(37, 6, generator=g)
    idx, dist = nearest_code(x, cb, block_elements=block_elements)
    assert idx.dtype == torch.int64 and idx.shape == (257,)
    assert dist.dtype == torch.float32 and dist.shape == (257,)
    assert torch.equal(idx, brute_force_nearest(x, cb))
    true_d = (x.double() - cb.double()[idx]).pow(2).sum(1)
    assert torch.allclose(dist.double(), true_d, rtol=1e-4, atol=1e-4)
    assert (dist >= 0).all()


def test_nearest_code_low_precision_input_and_errors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 8, generator=g).bfloat16()
    cb = torch.randn(20, 8, generator=g).bfloat16()
    idx, dist = nearest_code(x, cb, block_elements=50)
    assert dist.dtype == torch.float32
    assert torch.equal(idx, brute_force_nearest(x.float(), cb.float()))
    with pytest.raises(ValueError):
        nearest_code(torch.randn(3, 4), torch.randn(5, 3))
    # precomputed squared norms give the same answer
    idx2, _ = nearest_code(x, cb, codebook_sq_norm=cb.float().pow(2).sum(1))
    assert torch.equal(idx, idx2)


def test_quantizer_block_elements_does_not_change_results():
    torch.manual_seed(0)
    a = VectorQuantizer(4, 64).eval()
    b = VectorQuantizer(4, 64, block_elements=7).eval()
    b.load_state_dict(a.state_dict())
    z = features(b=3, h=6, w=7, seed=2)
    oa, ob = a(z), b(z)
    assert torch.equal(oa.indices, ob.indices)
    assert torch.equal(oa.quantized, ob.quantized)


# -------------------------------------------------------------------------------------- cosine, low-dim codes


@pytest.mark.parametrize("use_ema", [False, True])
def test_cosine_codes_and_outputs_have_unit_norm(use_ema):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, cosine=True, use_ema=use_ema, dead_code_window=2).train()
    for step in range(5):
        out = vq(features(d=8, seed=step, scale=5.0))
    assert torch.allclose(vq.codes().norm(dim=1), torch.ones(16), atol=1e-5)
    if use_ema:  # the stored EMA codebook itself is normalised
        assert torch.allclose(vq.codebook.detach().norm(dim=1), torch.ones(16), atol=1e-5)
    assert torch.allclose(out.quantized.norm(dim=1), torch.ones(out.quantized.shape[0], 3, 5), atol=1e-5)
    # the chosen code is the one with the largest cosine similarity
    z = features(d=8, seed=42, scale=5.0)
    vq.eval()
    out = vq(z)
    sims = F.normalize(flat(z), dim=1) @ vq.codes().t()
    assert torch.equal(out.indices.reshape(-1), sims.argmax(1))


def test_low_dimensional_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 32, codebook_dim=4).train()
    assert vq.codebook.shape == (32, 4)
    z = features(b=2, d=16, h=3, w=3).requires_grad_(True)
    out = vq(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (2, 3, 3)
    (out.quantized.pow(2).sum() + out.loss).backward()
    for name, p in [("input", z), ("codebook", vq.codebook), ("in_proj", vq.in_proj.weight),
                    ("out_proj", vq.out_proj.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the search happens in the 4-d space: indices are the nearest codes of the projected vectors
    zp = vq.in_proj(flat(z.detach()))
    assert torch.equal(out.indices.reshape(-1), brute_force_nearest(zp.detach(), vq.codebook.detach()))


# --------------------------------------------------------------------------------------------------- lookup


@pytest.mark.parametrize("kwargs", [{}, {"codebook_dim": 3}, {"cosine": True}, {"use_ema": True},
                                    {"codebook_dim": 3, "cosine": True}])
def test_lookup_equals_forward_output(kwargs):
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 16, **kwargs).train()
    for step in range(2):  # move the codebook away from its initial values
        vq(features(d=8, seed=step))
    vq.eval()
    z = features(b=2, d=8, h=3, w=4, seed=7)
    out = vq(z)
    looked_up = vq.lookup(out.indices)
    assert looked_up.shape == out.quantized.shape
    assert torch.allclose(looked_up, out.quantized, atol=1e-6)
    assert torch.equal(vq.lookup(out.indices.int()), looked_up)


def test_lookup_rejects_invalid_indices():
    vq = VectorQuantizer(4, 8)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        vq.lookup(torch.tensor([[[0, 8]]]))
    with pytest.raises(ValueError):
        vq.lookup(torch.tensor([[[-1, 0]]]))
    with pytest.raises(TypeError):
        vq.lookup(torch.zeros(1, 2, 2))
    assert vq.lookup(torch.tensor([[[0, 7]]])).shape == (1, 4, 1, 2)


# ------------------------------------------------------------------------------------------------ precision


@pytest.mark.parametrize("kwargs", [{}, {"codebook_dim": 4}, {"use_ema": True}])
def test_autocast_bf16_keeps_fp32_and_the_same_indices(kwargs):
    torch.manual_seed(0)
    ref = VectorQuantizer(8, 64, **kwargs).train()
    with torch.no_grad():  # a spread-out codebook so that the indices are not decided by rounding
        ref.codebook.copy_(torch.randn(64, ref.codebook_dim))
        if ref.use_ema:
            ref.ema_sum.copy_(ref.codebook)
    amp = VectorQuantizer(8, 64, **kwargs).train()
    amp.load_state_dict(ref.state_dict())
    z = features(b=2, d=8, h=4, w=4, seed=3)
    out_ref = ref(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_amp = amp(z)
    assert out_amp.quantized.dtype == torch.float32
    assert out_amp.loss.dtype == torch.float32
    assert torch.equal(out_amp.indices, out_ref.indices)
    assert torch.allclose(out_amp.quantized, out_ref.quantized, atol=1e-6)
    for k, t in ref.state_dict().items():  # EMA statistics updated identically
        assert torch.allclose(amp.state_dict()[k].float(), t.float(), atol=1e-6), k
        assert amp.state_dict()[k].dtype == t.dtype, k
    # bf16 features (as an autocast encoder produces) are quantized in fp32 too
    ref.eval()
    zb = z.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_b = ref(zb)
    assert out_b.quantized.dtype == torch.float32
    assert torch.equal(out_b.indices, ref(zb.float()).indices)
