"""sparse.py against the dense computation: F.conv2d times the mask, a masked
GroupNorm computed per image, and the head's dense reference kernels."""
import pytest
import torch
import torch.nn.functional as F

import dynhead
import sparse

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=["taps", "im2col"])
def gather_form(request, monkeypatch):
    """Both forms of the gather kernel on every device (sparse.GATHER picks one per
    device type; each must equal the dense conv)."""
    monkeypatch.setattr(sparse, "GATHER", {k: request.param for k in ("cpu", "cuda")})
    return request.param


@pytest.fixture
def always_sparse(monkeypatch):
    """Turn the dispatch rule off: every masked conv gathers, however dense."""
    monkeypatch.setattr(sparse, "DENSE_ABOVE", {k: 1.0 for k in sparse.DENSE_ABOVE})
    monkeypatch.setattr(sparse, "MIN_PIXELS", 0)


def random_masks(shape, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def grads(y, inputs, seed=3):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device)
    return torch.autograd.grad(y, inputs, dy)


def assert_close(a, b, rtol):
    # relative to the tensor's scale: a sum over 9C products rounds at ~1e-7 of it
    scale = b.abs().max().clamp_min(1e-12)
    assert (a - b).abs().max() <= rtol * scale, ((a - b).abs().max().item(), scale.item())


CASES = [  # (B, C_in, C_out, H, W, groups)
    (3, 8, 5, 7, 9, 1),
    (3, 16, 16, 12, 5, 1),
    (3, 12, 12, 9, 11, 12),  # depthwise
    (2, 32, 32, 1, 6, 1),    # one-row map: every tap above and below is outside
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("device", DEVICES)
def test_masked_conv_equals_dense_times_mask(always_sparse, gather_form, case, density, device):
    B, Ci, Co, H, W, groups = case
    g = torch.Generator().manual_seed(sum(case))
    x = torch.randn(B, Ci, H, W, generator=g).to(device).requires_grad_()
    w = torch.randn(Co, Ci // groups, 3, 3, generator=g).to(device).requires_grad_()
    b = torch.randn(Co, generator=g).to(device).requires_grad_()
    mask = random_masks((B, H, W), density, seed=B * H).to(device)
    mask[0] = mask[0] if density in (0.0, 1.0) else ~mask[0]  # each image its own mask
    y = sparse.masked_conv2d(x, mask, w, b, groups=groups)
    ref = F.conv2d(x, w, b, padding=1, groups=groups) * mask[:, None]
    assert_close(y, ref, 1e-5)
    for got, want in zip(grads(y, (x, w, b)), grads(ref, (x, w, b))):
        assert_close(got, want, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_masks_indexes_each_mask_as_alone(device):
    # one nonzero over all the masks, split: the same index as each mask's own nonzero
    masks = [random_masks((2, 5, 7), 0.4, 0), None, torch.zeros(3, 4, 4, dtype=torch.bool),
             random_masks((1, 9, 3), 0.7, 1), torch.ones(2, 2, 6, dtype=torch.bool)]
    masks = [None if m is None else m.to(device) for m in masks]
    for got, mask in zip(sparse.prepare_masks(masks), masks):
        if mask is None:
            assert got is None
        else:
            assert got.mask is mask
            assert torch.equal(got.index, mask.reshape(-1).nonzero().squeeze(1))
    assert [a.index.tolist() for a in sparse.prepare_masks([masks[2], masks[2]])] == [[], []]


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_masked_conv_input_layouts(always_sparse, gather_form, layout):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 16, 10, 12, generator=g)
    x = base.contiguous(memory_format=torch.channels_last) if layout == "channels_last" \
        else torch.randn(2, 12, 10, 16, generator=g).transpose(1, 3).transpose(2, 3)[:, :, :, :12]
    w = torch.randn(8, 16, 3, 3, generator=g)
    mask = random_masks((2, x.shape[2], x.shape[3]), 0.4, 1)
    assert_close(sparse.masked_conv2d(x, mask, w), F.conv2d(x, w, padding=1) * mask[:, None], 1e-5)


def test_dispatch_gives_the_same_numbers():
    # the dense fallback (high density) and the gather path (low density) agree
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, 20, 20, generator=g), torch.randn(16, 16, 3, 3, generator=g)
    for density in (0.05, 0.95):
        mask = random_masks((2, 20, 20), density, 2)
        assert sparse.use_dense(sparse.ActiveSet(mask), "conv", x) == (density > sparse.DENSE_ABOVE[("cpu", "conv")])
        assert_close(sparse.masked_conv2d(x, mask, w), F.conv2d(x, w, padding=1) * mask[:, None], 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_mask_is_not_indexed_where_dense_always_wins(monkeypatch, device):
    # threshold 0 (as for every conv on a GPU): a lone mask runs the dense conv with no
    # nonzero (no host sync); a mask indexed already still gathers when it is empty
    monkeypatch.setattr(sparse, "DENSE_ABOVE", {k: 0.0 for k in sparse.DENSE_ABOVE})
    monkeypatch.setattr(sparse, "MIN_PIXELS", 0)
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 8, 6, 7, generator=g).to(device), torch.randn(8, 8, 3, 3, generator=g).to(device)
    mask = random_masks((2, 6, 7), 0.4, 1).to(device)
    active = sparse.ActiveSet(mask)
    assert_close(sparse.masked_conv2d(x, active, w), F.conv2d(x, w, padding=1) * mask[:, None], 1e-5)
    assert not active.indexed
    empty = sparse.ActiveSet(torch.zeros_like(mask), index=torch.zeros(0, dtype=torch.long, device=device))
    assert not sparse.use_dense(empty, "conv", x)
    assert sparse.masked_conv2d(x, empty, w).abs().max() == 0
    prepared = sparse.prepare_masks([mask, mask])[0]
    assert prepared.indexed and sparse.use_dense(prepared, "conv", x)  # indexed, and dense enough


@pytest.mark.parametrize("groups", [1, 8])
def test_chunked_gather_equals_dense(always_sparse, gather_form, monkeypatch, groups):
    # chunks of at most 7 pixels (fewer where a pass needs more memory per pixel than
    # this estimate), most with border taps: values and gradients as the dense conv
    pixel_bytes = 9 * 8 * 4 + 8 * 4 if gather_form == "im2col" else 3 * 8 * 4  # as _MaskedConv.forward, dense
    monkeypatch.setattr(sparse, "CHUNK_BYTES", {**sparse.CHUNK_BYTES, "cpu": pixel_bytes * 7})
    monkeypatch.setattr(sparse, "MIN_CHUNK_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 15, 15, generator=g).requires_grad_()
    w = torch.randn(8, 8 // groups, 3, 3, generator=g).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    mask = random_masks((2, 15, 15), 0.5, 4)
    active = sparse.ActiveSet(mask)
    passes, chunks = [], sparse._chunks

    def recording(*args):  # the chunk sizes of each pass (forward, backward) as they run
        passes.append([stop - start for start, stop, _, _ in chunks(*args)])
        return chunks(*args)

    monkeypatch.setattr(sparse, "_chunks", recording)
    y = sparse.masked_conv2d(x, active, w, b, groups=groups)
    ref = F.conv2d(x, w, b, padding=1, groups=groups) * mask[:, None]
    assert_close(y, ref, 1e-5)
    for got, want in zip(grads(y, (x, w, b)), grads(ref, (x, w, b))):
        assert_close(got, want, 1e-5)
    (forward, *backward) = passes
    assert max(forward) <= 7 and len(forward) >= -(-len(active) // 7)
    assert backward and all(len(sizes) > 1 for sizes in backward)
    assert all(sum(sizes) == len(active) for sizes in passes)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_group_norm_equals_dense_reference(device):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, 7, 9, generator=g).to(device).requires_grad_()
    w = torch.randn(16, generator=g).to(device).requires_grad_()
    b = torch.randn(16, generator=g).to(device).requires_grad_()
    mask = random_masks((3, 7, 9), 0.4, 6).to(device)
    mask[1] = False  # an image with nothing active
    y = sparse.masked_group_norm(x, mask, 4, w, b)
    ref = dynhead.masked_group_norm(x, mask, 4, w, b)
    assert_close(y, ref, 1e-5)
    for got, want in zip(grads(y, (x, w, b)), grads(ref, (x, w, b))):
        assert_close(got, want, 1e-5)
    # and, all active, torch's own GroupNorm
    full = torch.ones_like(mask)
    assert_close(sparse.masked_group_norm(x, full, 4, w, b), F.group_norm(x, 4, w, b), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_group_norms_of_several_maps_equal_one_call_each(device):
    # three maps of different sizes (pyramid levels) sharing one GroupNorm, in one
    # pass: values and gradients as the dense reference run map by map
    g = torch.Generator().manual_seed(7)
    sizes = [(9, 11), (5, 6), (3, 3)]
    xs = [torch.randn(2, 16, h, w, generator=g).to(device).requires_grad_() for h, w in sizes]
    w = torch.randn(16, generator=g).to(device).requires_grad_()
    b = torch.randn(16, generator=g).to(device).requires_grad_()
    masks = [random_masks((2, h, w), 0.5, i).to(device) for i, (h, w) in enumerate(sizes)]
    masks[1][0] = False  # one image of one map with nothing active
    masks[2][1] = True   # one with everything
    got = sparse.masked_group_norms(xs, masks, 4, w, b)
    want = [dynhead.masked_group_norm(x, m, 4, w, b) for x, m in zip(xs, masks)]
    for y, ref in zip(got, want):
        assert_close(y, ref, 1e-5)
    dys = [torch.randn(y.shape, generator=g).to(device) for y in want]
    grads_got = torch.autograd.grad(got, xs + [w, b], dys)
    grads_want = torch.autograd.grad(want, xs + [w, b], dys)
    for a, r in zip(grads_got, grads_want):
        assert_close(a, r, 1e-5)
    with pytest.raises(ValueError, match="must all be"):
        sparse.masked_group_norms([xs[0], xs[1][:1]], [masks[0], masks[1][:1]], 4, w, b)


@pytest.mark.parametrize("device", DEVICES)
def test_paths_switched_off_everywhere_still_get_gradients(device):
    """DDP requires every parameter to receive a gradient at every step, even a
    path whose gate is 0 at every pixel of the batch: a zero gradient, not none."""
    head = dynhead.DynamicHead(channels=16, depth=2, gn_groups=4).to(device)
    for module in head.modules():
        if isinstance(module, dynhead.SpatialGate):
            torch.nn.init.constant_(module.conv.bias, -10.0)  # every gate off
    feats = [torch.randn(2, 16, s, s, device=device) for s in (16, 8, 4, 2, 1)]
    for dense in (True, False):
        head.dense = dense
        head.zero_grad(set_to_none=True)
        sum(o.sum() for o in head(feats)).backward()
        assert (head.cost.soft == 0).all()  # every path off: only the gate convs ran
        missing = [n for n, p in head.named_parameters() if p.grad is None]
        assert not missing, (dense, missing)


def partly_off_head(device, **kw):
    """A head whose gates are off at about half the pixels, in blobs and speckles."""
    torch.manual_seed(0)
    head = dynhead.DynamicHead(channels=16, depth=2, gn_groups=4, **kw).to(device)
    for module in head.modules():
        if isinstance(module, dynhead.SpatialGate):
            torch.nn.init.normal_(module.conv.weight, std=0.2)
            torch.nn.init.constant_(module.conv.bias, 0.1)
        if isinstance(module, dynhead.Router) and module.down is not None:
            torch.nn.init.constant_(module.alpha, 0.5)
    return head


@pytest.mark.parametrize("kw", [{}, {"paths": ("depth",)}, {"coarse": True}])
@pytest.mark.parametrize("device", DEVICES)
def test_head_sparse_equals_dense(always_sparse, gather_form, kw, device):
    head = partly_off_head(device, **kw)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 16, h, w, generator=g).to(device) for h, w in [(24, 20), (12, 10), (6, 5), (3, 3), (2, 2)]]
    results = []
    for dense in (True, False):
        head.dense = dense
        head.zero_grad()
        out = head(feats)
        loss = sum((o * torch.linspace(0, 1, o.shape[-1], device=device)).pow(2).mean() for o in out)
        (loss + head.cost.soft.mean()).backward()
        results.append(([o.detach() for o in out], {n: p.grad.clone() for n, p in head.named_parameters()},
                        head.cost))
    (out_d, grad_d, cost_d), (out_s, grad_s, cost_s) = results
    executed = (cost_s.executed / cost_s.full).mean().item()
    assert 0.2 < executed < 0.9  # the gates really are partly off
    for a, b in zip(out_s, out_d):
        assert_close(a, b, 1e-4)
    for name in grad_d:
        assert_close(grad_s[name], grad_d[name], 1e-4)
    assert torch.equal(cost_s.executed, cost_d.executed)


def test_head_uses_sparse_kernels_unless_dense():
    head = dynhead.DynamicHead(channels=16, depth=1, gn_groups=4)
    assert head.kernels() is sparse
    head.dense = True
    assert head.kernels() is dynhead.DenseKernels


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_within_bf16_tolerance(always_sparse, gather_form, device):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 32, 12, 12, generator=g), torch.randn(32, 32, 3, 3, generator=g) * 0.1
    mask = random_masks((2, 12, 12), 0.3, 0)
    x.requires_grad_(), w.requires_grad_()
    ref = F.conv2d(x, w, padding=1) * mask[:, None]
    xb, wb = x.detach().bfloat16().to(device).requires_grad_(), w.detach().bfloat16().to(device).requires_grad_()
    y = sparse.masked_conv2d(xb, mask.to(device), wb)
    assert y.dtype == torch.bfloat16
    assert_close(y.float().cpu(), ref, 2e-2)  # bf16 keeps 8 bits of mantissa
    dy = torch.randn(y.shape, generator=g)
    gx, gw = torch.autograd.grad(y, (xb, wb), dy.bfloat16().to(device))
    rx, rw = torch.autograd.grad(ref, (x, w), dy)
    assert gx.dtype == gw.dtype == torch.bfloat16
    assert_close(gx.float().cpu(), rx, 2e-2)
    assert_close(gw.float().cpu(), rw, 2e-2)


@pytest.mark.parametrize("call,match", [
    (lambda x, w: sparse.masked_conv2d(x, torch.ones(2, 5, 5, dtype=torch.bool), w), r"mask must be \(B, H, W\)"),
    (lambda x, w: sparse.masked_conv2d(x, torch.ones(2, 6, 6), w), "bool"),
    (lambda x, w: sparse.masked_conv2d(x, torch.ones(2, 6, 6, dtype=torch.bool), torch.randn(8, 8, 5, 5)), "3, 3"),
    (lambda x, w: sparse.masked_conv2d(x, torch.ones(2, 6, 6, dtype=torch.bool), torch.randn(8, 4, 3, 3)), "does not fit 8 input"),
    (lambda x, w: sparse.masked_group_norm(x, torch.ones(1, 6, 6, dtype=torch.bool), 2, None, None), r"mask must be \(B, H, W\)"),
])
def test_bad_input(call, match):
    x, w = torch.randn(2, 8, 6, 6), torch.randn(8, 8, 3, 3)
    with pytest.raises(ValueError, match=match):
        call(x, w)


def test_one_input_channel_is_a_dense_conv(always_sparse):
    # C = 1: groups=1 is both "dense" and "one group per channel"; C_out = 4 is fine
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 1, 6, 7, generator=g), torch.randn(4, 1, 3, 3, generator=g)
    mask = random_masks((2, 6, 7), 0.5, 2)
    assert_close(sparse.masked_conv2d(x, mask, w), F.conv2d(x, w, padding=1) * mask[:, None], 1e-5)


@pytest.mark.parametrize("paths", [1, 2])
def test_gate_conv_equals_conv2d(paths):
    g = torch.Generator().manual_seed(paths)
    x = torch.randn(2, 16, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(paths, 16, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(paths, generator=g, dtype=torch.float64, requires_grad=True)
    y, ref = sparse.gate_conv2d(x, w, b), F.conv2d(x, w, b, padding=1)
    assert_close(y, ref, 1e-12)
    for got, want in zip(grads(y, (x, w, b)), grads(ref, (x, w, b))):
        assert_close(got, want, 1e-12)


def test_autocast_bf16_matches_dense_autocast(always_sparse, gather_form):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 12, 12, generator=g, requires_grad=True)
    w = (torch.randn(32, 32, 3, 3, generator=g) * 0.1).requires_grad_()
    mask = random_masks((2, 12, 12), 0.3, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse.masked_conv2d(x, mask, w)
        ref = F.conv2d(x, w, padding=1) * mask[:, None]
    assert y.dtype == ref.dtype == torch.bfloat16
    assert_close(y.float(), ref.float(), 2e-2)
    (gx, gw), (rx, rw) = grads(y.float(), (x, w)), grads(ref.float(), (x, w))
    assert gw.dtype == torch.float32  # the fp32 master weight gets its gradient
    assert_close(gx, rx, 2e-2)
    assert_close(gw, rw, 2e-2)
