"""sparse_gpu.py: the device-side compaction against `nonzero`; the masked 3x3 conv
-- Triton's kernels (on the CPU through Triton's interpreter, TRITON_INTERPRET=1,
set by conftest.py where there is no GPU) and their PyTorch twins -- against
F.conv2d on the masked output and its autograd; the head's static-shape dataflow
against the per-level reference, values and gradients; and a training step of
it traced whole by torch.compile (fullgraph: no graph break, hence no host sync
and no shape that depends on the data)."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import sparse
import sparse_gpu
from test_sparse import HEAD_KINDS, SIZES, assert_close, engine_against_reference, partly_off_head

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = importlib.util.find_spec("triton") is not None and sparse_gpu.triton is not None
needs_triton = pytest.mark.skipif(not TRITON, reason="Triton is not installed (a CPU build of torch)")


class NoHostReads(TorchDispatchMode):
    """Fails on the ops that read a tensor's value back to the host or give a shape
    that depends on the data."""
    BANNED = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique",
              "aten::_unique2", "aten::item"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func._schema.name not in self.BANNED, f"{func._schema.name} reads the device"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("density", [0.0, 0.003, 0.1, 0.5, 1.0])
def test_compaction_equals_nonzero_and_reads_nothing_back(density):
    g = torch.Generator().manual_seed(int(density * 1000))
    for shape in [(2, 9, 11), (3, 1, 17), (1, 40)]:
        mask = (torch.rand(shape, generator=g) < density).to(DEVICE)
        with NoHostReads():
            index, count = sparse_gpu.compact(mask)
        assert index.shape == (mask.numel(),) and count.shape == (1,) and index.dtype == torch.int32
        expected = mask.reshape(-1).nonzero().squeeze(1)
        assert count.item() == len(expected) and torch.equal(index[:count.item()].long(), expected)
        assert torch.equal(sparse_gpu.active_mask(index, count, mask.shape), mask)


def masks_for(B, H, W, seed):
    """Each density the issue names: none, one pixel, 0.1, 0.5, all; and blobs."""
    g = torch.Generator().manual_seed(seed)
    one = torch.zeros(B, H, W, dtype=torch.bool)
    one[1, H - 1, 0] = True  # a corner: every neighbour but three outside the map
    yield "none", torch.zeros(B, H, W, dtype=torch.bool)
    yield "one pixel", one
    for density in (0.1, 0.5):
        yield f"{density}", torch.rand(B, H, W, generator=g) < density
    yield "all", torch.ones(B, H, W, dtype=torch.bool)


def dense_reference(x, w, mask):
    """F.conv2d, masked, and its autograd: the values and gradients to match."""
    x, w = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y = F.conv2d(x, w, padding=1) * mask[:, None].double()
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    dx, dw = torch.autograd.grad(y, (x, w), g)
    return y, g, dx, dw


CASES = [(2, 8, 5, 7, 9), (2, 16, 24, 9, 11), (2, 20, 16, 1, 6)]  # B, C, C_out, H, W: odd sizes, one-row maps


@pytest.mark.parametrize("case", CASES)
def test_torch_twins_equal_dense_conv_and_autograd(case):
    B, C, C_out, H, W = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, H, W, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C_out, C, 3, 3, generator=g)
    for name, mask in masks_for(B, H, W, 2):
        ref, gy, ref_dx, ref_dw = dense_reference(x, w, mask)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = sparse_gpu.masked_conv3x3(xr, wr, *sparse_gpu.compact(mask))  # the operator, autograd included
        dx, dw = torch.autograd.grad(y, (xr, wr), gy.float())
        assert_close(y.double(), ref, 1e-5)
        assert_close(dx.double(), ref_dx, 1e-5)
        assert_close(dw.double(), ref_dw, 1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # the interpreter's bf16 is wrong: not here
@pytest.mark.parametrize("case", CASES)
def test_triton_kernels_equal_dense_conv_and_autograd(case, dtype):
    B, C, C_out, H, W = case
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, H, W, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(C_out, C, 3, 3, generator=g).to(dtype)
    rtol = 1e-5 if dtype == torch.float32 else 3e-3  # fp16 inputs and outputs, fp32 sums
    for name, mask in masks_for(B, H, W, 4):
        ref, gy, ref_dx, ref_dw = dense_reference(x.float(), w.float(), mask)
        xd, wd, maskd = x.to(DEVICE), w.to(DEVICE), mask.to(DEVICE)
        y = sparse_gpu.conv_triton(xd, wd, *sparse_gpu.compact(maskd))
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y.double().cpu(), ref, rtol)
        # the input gradient: the same kernel on dy (0 off the mask), W flipped and transposed,
        # over the mask dilated by 3x3; the weight gradient: the split sum over the active pixels
        gm = (gy.to(dtype).to(DEVICE) * maskd[:, None]).contiguous(memory_format=torch.channels_last)
        dx = sparse_gpu.conv_triton(gm, sparse_gpu._flip_transpose(wd).contiguous(),
                                    *sparse_gpu.compact(sparse_gpu.dilate3x3(maskd)))
        dw = sparse_gpu.wgrad_triton(xd, gm, *sparse_gpu.compact(maskd), split=3)
        assert_close(dx.double().cpu(), ref_dx, rtol)
        assert_close(dw.double().cpu(), ref_dw, rtol)


@needs_triton
def test_triton_kernels_at_level_borders_of_the_canvas():
    # every pixel of P7 and P6 on a canvas (their borders touch the frame), through the
    # kernels against the dense conv of the canvas
    cv = sparse.Canvas(SIZES, 2, torch.device("cpu"))
    mask = (cv.level >= 3)[None].expand(2, -1, -1).clone()
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 16, cv.H, cv.W, generator=g) * (cv.level >= 0)).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 16, 3, 3, generator=g)
    ref, gy, ref_dx, ref_dw = dense_reference(x, w, mask)
    y = sparse_gpu.conv_triton(x.to(DEVICE), w.to(DEVICE), *sparse_gpu.compact(mask.to(DEVICE)))
    assert_close(y.double().cpu(), ref, 1e-5)
    gm = (gy.float() * mask[:, None]).contiguous(memory_format=torch.channels_last).to(DEVICE)
    dw = sparse_gpu.wgrad_triton(x.to(DEVICE), gm, *sparse_gpu.compact(mask.to(DEVICE)))
    assert_close(dw.double().cpu(), ref_dw, 1e-5)


# -- the head on the static-shape engine --------------------------------------------------

@pytest.fixture
def static_engine(monkeypatch):
    monkeypatch.setattr(sparse, "STATIC", {"cpu", "cuda"})


@pytest.mark.parametrize("kw", HEAD_KINDS)
def test_static_head_equals_the_reference(static_engine, kw):
    cost = engine_against_reference(partly_off_head(DEVICE, **kw), DEVICE)
    if not kw:
        assert 0.2 < (cost.executed / cost.full).mean().item() < 0.9  # the gates really are partly off


def test_a_training_step_of_the_head_compiles_whole(static_engine):
    # fullgraph=True: a graph break -- a value read by the host, a shape that depends on
    # the gates -- fails the trace; the backward is traced with it (AOTAutograd)
    head = partly_off_head("cpu")
    feats = [torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(1)).requires_grad_()
             for h, w in SIZES]

    def step(features):
        out = head(features)
        return sum(o.pow(2).mean() for o in out) + 0.4 * head.cost.soft.mean()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(feats)
    grads = torch.autograd.grad(loss, list(head.parameters()) + feats)
    eager = step(feats)
    eager_grads = torch.autograd.grad(eager, list(head.parameters()) + feats)
    assert torch.allclose(loss, eager, rtol=1e-5)
    for a, b in zip(grads, eager_grads):  # the traced graph orders some sums otherwise: fp32 rounding
        assert_close(a, b, 1e-4)


def test_the_operators_pass_torch_library_opcheck():
    # the shapes and strides their fake implementations give for tracing are the real
    # ones; autograd is registered; the ops trace through AOTAutograd
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 8, 7, 9, generator=g).contiguous(memory_format=torch.channels_last).to(DEVICE)
    w = torch.randn(5, 8, 3, 3, generator=g).to(DEVICE)
    index, count = sparse_gpu.compact((torch.rand(2, 7, 9, generator=g) < 0.4).to(DEVICE))
    torch.library.opcheck(sparse_gpu.masked_conv3x3, (x.requires_grad_(), w.requires_grad_(), index, count))
    dy = torch.randn(2, 5, 7, 9, generator=g).contiguous(memory_format=torch.channels_last).to(DEVICE)
    torch.library.opcheck(sparse_gpu.masked_conv3x3_wgrad, (x.detach(), dy, index, count))
