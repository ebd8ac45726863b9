"""sparse.py against the dense computation: F.conv2d times the mask, a masked
GroupNorm computed per image, the per-level reference head of dynhead.py, and the
number of ops a forward dispatches against the plain fixed tower's."""
import pytest
import torch
import torch.nn.functional as F

import bench
import dynhead
import sparse

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [(24, 20), (12, 10), (6, 5), (3, 3), (2, 2)]


@pytest.fixture(params=["gather", "dense"])
def dispatch(request, monkeypatch):
    """Every conv gathered, however dense, each GroupNorm block by block; or, as on a
    GPU, every conv dense and the GroupNorms' statistics of all segments at once:
    both must give the dense computation's numbers. (The head's depthwise scale
    convs run dense either way; the gathered depthwise conv is tested on maps of
    their own.)"""
    monkeypatch.setattr(sparse, "DENSE_ABOVE", {k: 1.0 if request.param == "gather" else 0.0
                                                for k in sparse.DENSE_ABOVE})
    monkeypatch.setattr(sparse, "BLOCK_NORM", {k: request.param == "gather" for k in sparse.BLOCK_NORM})
    monkeypatch.setattr(sparse, "BLOCK_ROWS", 0)
    monkeypatch.setattr(sparse, "MIN_PIXELS", 0)
    return request.param


@pytest.fixture
def always_sparse(monkeypatch):
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


# -- one masked conv ------------------------------------------------------------------

CASES = [  # (B, C_in, C_out, H, W, groups)
    (3, 8, 5, 7, 9, 1),
    (3, 16, 16, 12, 5, 1),
    (3, 12, 12, 9, 11, 12),  # depthwise
    (2, 32, 32, 1, 6, 1),    # one-row map: every tap above and below is outside
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("device", DEVICES)
def test_masked_conv_equals_dense_times_mask(always_sparse, case, density, device):
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


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
def test_masked_conv_input_layouts(always_sparse, layout):
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
        active = sparse.ActiveSet(mask)
        assert sparse.use_dense(active.density, "conv", x.device) == (density > sparse.DENSE_ABOVE[("cpu", "conv")])
        assert_close(sparse.masked_conv2d(x, active, w), F.conv2d(x, w, padding=1) * mask[:, None], 1e-5)


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
    empty = sparse.ActiveSet(torch.zeros_like(mask))
    assert len(empty.index) == 0 and empty.indexed
    assert not sparse.use_dense(empty.density, "conv", x.device)
    assert sparse.masked_conv2d(x, empty, w).abs().max() == 0


@pytest.mark.parametrize("groups", [1, 8])
def test_chunked_gather_equals_dense(always_sparse, monkeypatch, groups):
    # chunks of 7 pixels (13 in a dense conv's forward, which needs less memory per
    # pixel), many with border taps: values and gradients as the dense conv, every
    # pixel in exactly one chunk of every pass (forward, backward)
    monkeypatch.setattr(sparse, "CHUNK_BYTES", {**sparse.CHUNK_BYTES, "cpu": 7 * (2 * 9 * 8 * 4 + 8 * 4)})
    monkeypatch.setattr(sparse, "MIN_CHUNK_BYTES", 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 15, 15, generator=g).requires_grad_()
    w = torch.randn(8, 8 // groups, 3, 3, generator=g).requires_grad_()
    b = torch.randn(8, generator=g).requires_grad_()
    mask = random_masks((2, 15, 15), 0.5, 4)
    active = sparse.ActiveSet(mask)
    passes, chunks = [], sparse._chunks

    def recording(*args):  # the chunk sizes of each pass as they run
        passes.append([stop - start for start, stop, _ in chunks(*args)])
        return chunks(*args)

    monkeypatch.setattr(sparse, "_chunks", recording)
    y = sparse.masked_conv2d(x, active, w, b, groups=groups)
    ref = F.conv2d(x, w, b, padding=1, groups=groups) * mask[:, None]
    assert_close(y, ref, 1e-5)
    for got, want in zip(grads(y, (x, w, b)), grads(ref, (x, w, b))):
        assert_close(got, want, 1e-5)
    forward, *backward = passes
    assert max(forward) <= (13 if groups == 1 else 7) and len(forward) > 1
    assert backward and all(max(sizes) <= 7 and len(sizes) > 1 for sizes in backward)
    assert all(sum(sizes) == len(active) for sizes in passes)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_within_bf16_tolerance(always_sparse, device):
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


def test_autocast_bf16_matches_dense_autocast(always_sparse):
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


def test_max3x3_equals_max_pool():
    # values and gradients against max_pool2d, with a ReLU-like gate (zeros, ties
    # among them) on a channels_last map, as the head's gates come
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2, 5, 7, 1, generator=g, dtype=torch.float64).permute(0, 3, 1, 2).requires_grad_()
    gate = F.relu(v)
    y, ref = sparse.max3x3(gate), F.max_pool2d(gate, 3, 1, 1)
    assert torch.equal(y, ref)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)  # a gradient from above
    got, want = (torch.autograd.grad((m * w).sum(), v, retain_graph=True)[0] for m in (y, ref))
    assert_close(got, want, 1e-12)


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


# -- GroupNorm over active pixels -------------------------------------------------------

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


def test_group_norm_rows_keeps_its_digits_far_from_zero():
    # E[x^2] - E[x]^2 in fp32 would lose the variance of values 1000 std from 0: in two
    # passes, fp32 rows still normalise as in fp64
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(500, 16, generator=g) + 1000).requires_grad_()
    segments = sparse.Segments(torch.randint(0, 3, (500,), generator=g), 3)
    w, b = torch.ones(16), torch.zeros(16)
    y = sparse.group_norm_rows(rows, segments, 4, w, b)
    r64 = rows.detach().double().view(500, 4, 4)
    ref = torch.empty_like(r64)
    for s in range(3):
        part = r64[segments.index == s]  # (n, G, C/G)
        mean = part.mean((0, 2), keepdim=True)
        var = part.var((0, 2), unbiased=False, keepdim=True)
        ref[segments.index == s] = (part - mean) / torch.sqrt(var + 1e-5)
    assert (y.double() - ref.view(500, 16)).abs().max() < 1e-3
    # the hand-written backward against autograd through the fp64 formula
    dy = torch.randn(500, 16, generator=g)
    rows64 = rows.detach().double().requires_grad_()
    want = torch.empty(500, 4, 4, dtype=torch.float64)
    for s in range(3):
        part = rows64.view(500, 4, 4)[segments.index == s]
        want[segments.index == s] = (part - part.mean((0, 2), keepdim=True)) / torch.sqrt(
            part.var((0, 2), unbiased=False, keepdim=True) + 1e-5)
    assert_close(torch.autograd.grad(y, rows, dy)[0].double(),
                 torch.autograd.grad(want.view(500, 16), rows64, dy.double())[0], 1e-3)


@pytest.mark.parametrize("block_norm", [True, False])
def test_group_norm_rows_in_blocks_equals_the_formula(monkeypatch, block_norm):
    # rows in blocks of one segment each (one empty): PyTorch's GroupNorm block by block,
    # and the statistics of all segments at once, against the fp64 formula per segment
    monkeypatch.setattr(sparse, "BLOCK_NORM", {"cpu": block_norm})
    monkeypatch.setattr(sparse, "BLOCK_ROWS", 0)
    g = torch.Generator().manual_seed(1)
    blocks, ids = [40, 0, 25, 7], [2, 0, 3, 1]
    index = torch.cat([torch.full((n,), s) for n, s in zip(blocks, ids)])
    rows = (torch.randn(72, 16, generator=g) * 3 + 1).requires_grad_()
    w, b = torch.randn(16, generator=g).requires_grad_(), torch.randn(16, generator=g).requires_grad_()
    y = sparse.group_norm_rows(rows, sparse.Segments(index, 4, blocks=blocks), 4, w, b)
    r64, w64, b64 = (t.detach().double().requires_grad_() for t in (rows, w, b))
    parts = []
    for part in filter(len, r64.split(blocks)):
        p = part.view(-1, 4, 4)
        n = (p - p.mean((0, 2), keepdim=True)) / torch.sqrt(p.var((0, 2), unbiased=False, keepdim=True) + 1e-5)
        parts.append(n.reshape(-1, 16) * w64 + b64)
    ref = torch.cat(parts)
    assert_close(y.double(), ref, 1e-5)
    dy = torch.randn(72, 16, generator=g)
    for got, want in zip(torch.autograd.grad(y, (rows, w, b), dy),
                         torch.autograd.grad(ref, (r64, w64, b64), dy.double())):
        assert_close(got.double(), want, 1e-5)


def test_group_norm_rows_of_one_value_per_group_train(monkeypatch):
    # a one-pixel level with as many groups as channels: each value is its group's
    # mean, so the output is the bias, and no gradient reaches the rows
    monkeypatch.setattr(sparse, "BLOCK_ROWS", 0)
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(3, 8, generator=g).requires_grad_()
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    y = sparse.group_norm_rows(rows, sparse.Segments(torch.tensor([0, 1, 1]), 2, blocks=[1, 2]), 8, w, b)
    # x - mean rounds to ~1e-7 of x, then is divided by sqrt(eps) ~ 3e-3: fp32 gives ~1e-5
    assert_close(y[0], b, 1e-4)
    assert torch.autograd.grad(y[0].sum(), rows)[0].abs().max() < 1e-4


# -- the canvas ----------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [SIZES, [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)], [(5, 40), (3, 20)]])
def test_canvas_frames_every_level_with_zeros(sizes):
    # every level pixel's 3x3 neighbours lie in its own level or on the zero frame, so
    # a conv of the canvas is each level's conv with its own zero padding
    cv = sparse.Canvas(sizes, 2, torch.device("cpu"))
    level = cv.level
    for n, (y, x, h, w) in enumerate(cv.regions):
        assert (level[y:y + h, x:x + w] == n).all()
        ring = level[y - 1:y + h + 1, x - 1:x + w + 1].clone()
        ring[1:-1, 1:-1] = -1
        assert (ring == -1).all()
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, h, w, generator=g, requires_grad=True) for h, w in sizes]
    weight = torch.randn(3, 4, 3, 3, generator=g)
    canvas = sparse._Pack.apply(cv, *feats)
    outs = sparse._Unpack.apply(cv, F.conv2d(canvas, weight, padding=1))
    for f, out in zip(feats, outs):
        assert_close(out, F.conv2d(f, weight, padding=1), 1e-6)
    # and the gradients come back to their levels
    got = torch.autograd.grad(sum((o ** 2).sum() for o in outs), feats)
    want = torch.autograd.grad(sum((F.conv2d(f, weight, padding=1) ** 2).sum() for f in feats), feats)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-6)


def test_canvas_neighbours_are_fixed_offsets():
    cv = sparse.Canvas(SIZES, 1, torch.device("cpu"))
    y, x, h, w = cv.regions[2]
    index = torch.tensor([(y + 1) * cv.W + x + 2])
    taps = sparse.ActiveRows(index, cv, None, None).neighbours().taps[:, 0]
    expected = [(y + 1 + dy) * cv.W + x + 2 + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert taps.tolist() == expected


def test_index_masks_gives_each_segment_one_block():
    # the rows of a mask come image by image, level by level: each block holds the
    # mask's pixels of one (image, level) segment, as many as the mask has there
    cv = sparse.Canvas(SIZES, 2, torch.device("cpu"))
    masks = [random_masks((2, cv.H, cv.W), d, seed) & (cv.level >= 0) for seed, d in ((0, 0.4), (1, 0.7))]
    sets, counts = sparse.index_masks(masks, cv)
    for i, (mask, at, count) in enumerate(zip(masks, sets, counts)):
        assert sorted(at.index.tolist()) == mask.reshape(-1).nonzero().squeeze(1).tolist()
        assert count.tolist() == mask.reshape(2, -1).sum(1).tolist()
        image, position = at.index // (cv.H * cv.W), at.index % (cv.H * cv.W)
        level = cv.level.reshape(-1)[position]
        segment = i * cv.num_segments + image * len(SIZES) + level  # mask i's segments after the masks' before it
        assert at.segments.index.tolist() == segment.tolist()
        want, start = [], 0
        for b in range(2):
            for n in range(len(SIZES)):
                want.append(int(cv.region(mask[:, None], n)[b].sum()))
                assert (image[start:start + want[-1]] == b).all() and (level[start:start + want[-1]] == n).all()
                start += want[-1]
        assert at.segments.blocks == want


# -- the head: packed and sparse, against the per-level reference ----------------------------

def partly_off_head(device, **kw):
    """A head whose gates are off at about half the pixels, in blobs and speckles,
    its scale paths audible (alpha 0.5) and their biases non-zero."""
    torch.manual_seed(0)
    head = dynhead.DynamicHead(channels=16, depth=2, gn_groups=4, **kw).to(device)
    for module in head.modules():
        if isinstance(module, dynhead.SpatialGate):
            torch.nn.init.normal_(module.conv.weight, std=0.2)
            torch.nn.init.constant_(module.conv.bias, 0.1)
        if isinstance(module, dynhead.Router) and module.alpha is not None:
            torch.nn.init.constant_(module.alpha, 0.5)
        if isinstance(module, dynhead.ScalePath):
            torch.nn.init.normal_(module.conv.bias, std=0.5)
    return head


def engine_against_reference(head, device):
    """The head on its engine (head.dense False) against the per-level reference
    (head.dense True): outputs, the gradients of every parameter and input, the
    costs and Fig. 4's gates. Returns the engine's HeadCost."""
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 16, h, w, generator=g).to(device).requires_grad_() for h, w in SIZES]
    results = []
    for dense in (True, False):
        head.dense = dense
        out = head(feats)
        loss = sum((o * torch.linspace(0, 1, o.shape[-1], device=device)).pow(2).mean() for o in out)
        grad = torch.autograd.grad(loss + head.cost.soft.mean(), list(head.parameters()) + feats)
        results.append(([o.detach() for o in out], grad, head.cost, head.gates))
    (out_d, grad_d, cost_d, gates_d), (out_s, grad_s, cost_s, gates_s) = results
    for a, b in zip(out_s, out_d):
        assert_close(a, b, 1e-4)
    for a, b in zip(grad_s, grad_d):
        assert_close(a, b, 1e-4)
    assert torch.equal(cost_s.executed, cost_d.executed) and torch.equal(cost_s.full, cost_d.full)
    assert torch.allclose(cost_s.soft, cost_d.soft, rtol=1e-5)
    for step_s, step_d in zip(gates_s, gates_d):  # Fig. 4's gates, level by level
        assert step_s.keys() == step_d.keys()
        for name in step_d:
            for a, b in zip(step_s[name], step_d[name]):
                assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, atol=1e-6))
    return cost_s


HEAD_KINDS = [{}, {"gated": ("depth",)}, {"gated": ("scale",)}, {"coarse": True}, {"activation": "softmax"},
              {"dense_scale_norm": True}]  # the last: the authors' scale-path statistics (fcos.py's style)


@pytest.mark.parametrize("kw", HEAD_KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_head_sparse_equals_dense(dispatch, kw, device):
    cost = engine_against_reference(partly_off_head(device, **kw), device)
    executed = (cost.executed / cost.full).mean().item()
    if kw.get("activation") != "softmax":  # the gates really are partly off (ungated depth paths: most MACs)
        assert 0.2 < executed < 0.9 if not kw else executed < 0.99


@pytest.mark.parametrize("kw", [{}, {"gated": ("depth",)}, {"gated": ("scale",)}, {"coarse": True},
                                {"activation": "softmax"}, {"activation": "restricted_tanh"}])
def test_head_under_bf16_autocast_trains_as_the_fp32_reference(kw):
    # every gating of Tab. 1-3 through a backward under bf16 autocast (the depth-only
    # row once met fp32 gradients against bf16 rows there); the outputs as near the
    # fp32 reference as the reference's own bf16 run is, the whole gradient within
    # bf16's reach of it (a missing or wrong term would be off by its own size, ~1)
    head = partly_off_head("cpu", **kw)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 16, h, w, generator=g).requires_grad_() for h, w in SIZES]
    runs = {}
    for name, dense, amp in (("fp32", True, False), ("reference bf16", True, True), ("sparse bf16", False, True)):
        head.dense = dense
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = head(feats)
            loss = sum((o.float() * torch.linspace(0, 1, o.shape[-1])).pow(2).mean() for o in out)
        grad = torch.autograd.grad(loss + head.cost.soft.mean(), list(head.parameters()) + feats)
        runs[name] = [torch.cat([t.detach().float().flatten() for t in ts]) for ts in (out, grad)]
    error = lambda name, k: ((runs[name][k] - runs["fp32"][k]).norm() / runs["fp32"][k].norm()).item()
    assert error("sparse bf16", 0) <= 1.5 * error("reference bf16", 0) + 1e-3
    assert error("sparse bf16", 1) < 0.15 and error("reference bf16", 1) < 0.15


@pytest.mark.parametrize("kw", [{}, {"gated": ("scale",)}])
@pytest.mark.parametrize("device", DEVICES)
def test_head_without_autograd_equals_dense_and_leaves_its_inputs(dispatch, kw, device):
    """Without autograd the head overwrites its own canvases step by step: the same
    numbers as the reference, the caller's features untouched, and a second run
    (the lent zero buffers cleaned after the first) the same again."""
    head = partly_off_head(device, **kw)
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 16, h, w, generator=g).to(device) for h, w in SIZES]
    kept = [f.clone() for f in feats]
    with torch.no_grad():
        head.dense = True
        reference = head(feats)
        head.dense = False
        first, second = head(feats), head(feats)
    for a, b, c in zip(first, second, reference):
        assert_close(a, c, 1e-4)
        assert torch.equal(a, b)
    assert all(torch.equal(f, k) for f, k in zip(feats, kept))


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


def test_head_runs_sparse_unless_dense(monkeypatch):
    calls, run_head = [], sparse.run_head
    monkeypatch.setattr(sparse, "run_head", lambda *a: calls.append(1) or run_head(*a))
    head = dynhead.DynamicHead(channels=16, depth=1, gn_groups=4)
    feats = [torch.randn(1, 16, s, s) for s in (8, 4, 2, 1, 1)]
    head(feats)
    assert calls == [1]
    head.dense = True
    head(feats)
    dynhead.DynamicHead(channels=16, depth=1, gn_groups=4, gated=())(feats)  # the fixed head: the plain tower
    assert calls == [1]


# -- launches: the ops a forward dispatches, as a GPU runs it ------------------------------

@pytest.mark.parametrize("train", [False, True])
def test_dynamic_head_dispatches_at_most_twice_the_fixed_towers_ops(train):
    # on a GPU each dispatched op is a kernel launch, and the head is launch-bound:
    # both D8 towers, the dynamic ones at most twice the plain fixed towers' ops
    fixed, _, _ = bench.count_ops((), train)
    dynamic, ops, executed = bench.count_ops(("depth", "scale"), train)
    assert 0.25 < executed < 0.75
    assert dynamic <= 2 * fixed, (dynamic, fixed, ops.most_common(10))
