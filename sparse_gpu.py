"""
The dynamic head on GPUs: masked 3x3 convs as Triton kernels over a device-side
list of active pixels, and the head run with static shapes -- no host-device
synchronisation in a training step, so that torch.compile traces it whole and
CUDA graphs can replay it (Song et al., NeurIPS 2020, §2.2.3, Fig. 3).

On a GPU the CPU engine's plan (sparse.py: index the masks with `nonzero`, gather
the active rows, normalise, scatter) costs a host wait per router phase and a
kernel launch per small op. Here every buffer has the size of the whole canvas,
whatever the gates say:

    1. a mask is compacted on the device into an index buffer with a slot for
       every pixel, the first `count` slots holding the active pixels' flat
       positions, `count` a one-element tensor on the device (`compact`);
    2. a masked conv launches a grid sized for every pixel; each program reads
       `count` and exits past it (vLLM's fused MoE does so for CUDA graphs), and
       the others run an implicit GEMM: a block of active pixels by a block of
       output channels, their 3x3 neighbours' rows loaded from the channels-last
       map while it multiplies, fp32 accumulation, the result stored at the
       pixels' own positions of a zero map (`masked_conv3x3`);
    3. its input gradient is the same kernel on the output gradient, with the
       weights flipped and transposed, over the mask dilated by 3x3; its weight
       gradient sums x-window^T @ dy over the active pixels, the pixels split
       among programs into fp32 partials summed in a fixed order (deterministic);
    4. everything else -- gate convs, depthwise convs, GroupNorms over the active
       pixels, resizes, gating, residuals -- is a dense op on the canvas, as the
       fixed tower's are, which torch.compile fuses.

The kernels are PyTorch operators (torch.library: shapes for tracing, autograd
formulas); each has a plain PyTorch implementation with the same static shapes
for the CPU, which the tests hold the Triton kernels against (run on the CPU by
Triton's interpreter, TRITON_INTERPRET=1) and on which a training step of the
head compiles on any machine. Without Triton (or on the CPU) nothing here is
needed: sparse.py runs the head.

Map:
    compact                    a mask -> (index, count) on the device, static shapes
    _conv_kernel, _wgrad_kernel  the Triton kernels (their launch grids beside them)
    masked_conv3x3             the operator: Triton on CUDA, PyTorch elsewhere;
      masked_conv3x3_wgrad       autograd by the two kernels
    group_norm_masked          GroupNorm over the active pixels of each image and level
    run_head                   §2.1's three steps of every router on the canvas
"""
import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch: the operators' PyTorch implementations serve
    triton = tl = None


# -----------------------------------------------------------------------------
# Compaction: a mask -> the flat positions of its pixels, without a host sync

def compact(mask):
    """(index, count) of a bool mask of any shape: index (N,) int32 holds the flat
    positions of the true elements in order in its first count slots (as
    mask.flatten().nonzero() would), and N - count slots of filler (N, never a
    position); count is a (1,) int32 tensor on the mask's device. No value is read
    back: the sizes depend on the mask's shape alone."""
    flat = mask.reshape(-1)
    n = flat.numel()
    slot = torch.cumsum(flat, 0, dtype=torch.int32) - 1  # each true element's slot
    slot = torch.where(flat, slot, n)  # the others write slot n, cut off below
    positions = torch.arange(n, dtype=torch.int32, device=mask.device)
    index = torch.full((n + 1,), n, dtype=torch.int32, device=mask.device).scatter_(0, slot.long(), positions)
    return index[:n], flat.sum(dtype=torch.int32).reshape(1)


def dilate3x3(mask):
    """(B, H, W) bool -> the pixels within a 3x3 window of one (zero padding)."""
    return F.max_pool2d(mask[:, None].to(torch.float16 if mask.is_cuda else torch.float32), 3, 1, 1)[:, 0] > 0


def _flip_transpose(weight):
    """(C_out, C, 3, 3) -> (C, C_out, 3, 3): the weights of the conv whose output is
    the input gradient, dx = conv(dy, W flipped and transposed)."""
    return weight.flip(2, 3).transpose(0, 1)


def _weight_rows(weight):
    """(C_out, C, 3, 3) -> (9C, C_out), row (3 ky + kx) C + c: tap by tap, as the
    kernels read a pixel's neighbours."""
    C_out, C = weight.shape[:2]
    return weight.permute(2, 3, 1, 0).reshape(9 * C, C_out).contiguous()


# -----------------------------------------------------------------------------
# The Triton kernels

if triton is not None:
    @triton.jit
    def _conv_kernel(x_ptr, w_ptr, y_ptr, index_ptr, count_ptr, H, W, C, C_OUT,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """y[p] = sum_t sum_c x[p + d_t, c] w[t C + c, :] for the active pixels p =
        index[0 .. count - 1], zero padding at the map's borders. x (B*H*W, C) and y
        (B*H*W, C_OUT) are channels-last maps as rows; w (9C, C_OUT). One program: a
        block of BLOCK_M active pixels by BLOCK_N output channels, accumulated in
        fp32 over the 9 taps and C in steps of BLOCK_K (an implicit GEMM: the
        neighbours' rows are loaded, never gathered into memory)."""
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        count = tl.load(count_ptr)
        if pid_m * BLOCK_M < count:  # the grid covers every pixel; programs past the count exit
            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < count
            p = tl.load(index_ptr + offs_m, mask=m_ok, other=0)
            yx = p % (H * W)
            py, px = yx // W, yx % W
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = offs_n < C_OUT
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for t in tl.static_range(9):
                dy, dx = t // 3 - 1, t % 3 - 1
                inside = m_ok & (py + dy >= 0) & (py + dy < H) & (px + dx >= 0) & (px + dx < W)
                rows = (p + dy * W + dx).to(tl.int64)
                for k in range(0, C, BLOCK_K):
                    offs_k = k + tl.arange(0, BLOCK_K)
                    k_ok = offs_k < C
                    a = tl.load(x_ptr + rows[:, None] * C + offs_k[None, :], mask=inside[:, None] & k_ok[None, :],
                                other=0.0)
                    b = tl.load(w_ptr + (t * C + offs_k[:, None]).to(tl.int64) * C_OUT + offs_n[None, :],
                                mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                    if IEEE:
                        acc += tl.dot(a, b, input_precision="ieee")
                    else:
                        acc += tl.dot(a, b)
            out = y_ptr + p.to(tl.int64)[:, None] * C_OUT + offs_n[None, :]
            tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _wgrad_kernel(x_ptr, g_ptr, part_ptr, index_ptr, count_ptr, H, W, C, C_OUT, SPLIT,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        """part[s, t C + c, o] = sum over the active pixels p of split s of
        x[p + d_t, c] g[p, o]: the weight gradient, the active pixels' blocks of
        BLOCK_K dealt to the SPLIT programs of the third grid axis in turn, each
        program a (BLOCK_M channels of one tap) x (BLOCK_N outputs) tile in fp32."""
        pid_r, pid_n, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        blocks_c = tl.cdiv(C, BLOCK_M)
        t, c0 = pid_r // blocks_c, (pid_r % blocks_c) * BLOCK_M
        dy, dx = t // 3 - 1, t % 3 - 1
        offs_c = c0 + tl.arange(0, BLOCK_M)
        c_ok = offs_c < C
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < C_OUT
        count = tl.load(count_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in range(s, tl.cdiv(count, BLOCK_K), SPLIT):
            offs_p = j * BLOCK_K + tl.arange(0, BLOCK_K)
            p_ok = offs_p < count
            p = tl.load(index_ptr + offs_p, mask=p_ok, other=0)
            yx = p % (H * W)
            py, px = yx // W, yx % W
            inside = p_ok & (py + dy >= 0) & (py + dy < H) & (px + dx >= 0) & (px + dx < W)
            rows = (p + dy * W + dx).to(tl.int64)
            a = tl.load(x_ptr + rows[None, :] * C + offs_c[:, None], mask=c_ok[:, None] & inside[None, :],
                        other=0.0)  # (BLOCK_M, BLOCK_K): x^T
            b = tl.load(g_ptr + p.to(tl.int64)[:, None] * C_OUT + offs_n[None, :],
                        mask=p_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        out = part_ptr + ((s * 9 * C + t * C + offs_c[:, None]).to(tl.int64) * C_OUT + offs_n[None, :])
        tl.store(out, acc, mask=c_ok[:, None] & n_ok[None, :])


def _blocks(C, C_out, interpreted):
    """Block sizes: tensor-core tiles on a GPU; the interpreter runs the smallest
    that tl.dot takes (16), fast enough for the tests' small maps."""
    if interpreted:
        return 16, 16, 16
    return 64, (128 if C_out >= 128 else 64), (64 if C >= 64 else 32)


def _interpreted():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _ieee(dtype):
    """fp32 inputs multiply in fp32 where PyTorch's convs would (TF32 off)."""
    return dtype == torch.float32 and not torch.backends.cudnn.allow_tf32


def conv_triton(x, weight, index, count):
    """masked_conv3x3 by _conv_kernel: x (B, C, H, W) channels-last."""
    B, C, H, W = x.shape
    C_out = weight.shape[0]
    BM, BN, BK = _blocks(C, C_out, _interpreted())
    x = x.contiguous(memory_format=torch.channels_last)
    y = x.new_zeros(B, H, W, C_out).permute(0, 3, 1, 2)  # channels-last
    grid = (triton.cdiv(index.numel(), BM), triton.cdiv(C_out, BN))  # every pixel: static, for CUDA graphs
    _conv_kernel[grid](x, _weight_rows(weight.to(x.dtype)), y, index, count, H, W, C, C_out,
                       BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, IEEE=_ieee(x.dtype))
    return y


def wgrad_triton(x, g, index, count, split=None):
    """masked_conv3x3_wgrad by _wgrad_kernel: (C_out, C, 3, 3) in x's dtype."""
    B, C, H, W = x.shape
    C_out = g.shape[1]
    BM, BN, BK = _blocks(C, C_out, _interpreted())
    split = split or max(1, min(64, triton.cdiv(index.numel(), 8 * BK)))  # static: from the map's size
    x = x.contiguous(memory_format=torch.channels_last)
    g = g.contiguous(memory_format=torch.channels_last)
    part = torch.empty(split, 9 * C, C_out, dtype=torch.float32, device=x.device)
    grid = (9 * triton.cdiv(C, BM), triton.cdiv(C_out, BN), split)
    _wgrad_kernel[grid](x, g, part, index, count, H, W, C, C_out, split,
                        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, IEEE=_ieee(x.dtype))
    grad = part.sum(0).view(3, 3, C, C_out).permute(3, 2, 0, 1)  # the splits summed in a fixed order
    return grad.to(x.dtype).contiguous()


# -----------------------------------------------------------------------------
# The same in PyTorch, with the same static shapes (the CPU, and the reference)

def _windows(x, index, count):
    """(N, 9C) the 3x3 windows of the pixels in index's slots (zero beyond the map's
    border, and for the slots past count), and the slots' positions."""
    B, C, H, W = x.shape
    n = B * H * W
    valid = torch.arange(index.numel(), device=x.device) < count
    p = torch.where(valid, index, 0).long()
    yx = p % (H * W)
    py, px = yx // W, yx % W
    rows = x.permute(0, 2, 3, 1).reshape(n, C)
    taps = []
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            inside = valid & (py + dy >= 0) & (py + dy < H) & (px + dx >= 0) & (px + dx < W)
            neighbour = torch.where(inside, p + dy * W + dx, 0)
            taps.append(rows.index_select(0, neighbour) * inside[:, None].to(x.dtype))
    return torch.cat(taps, 1), p, valid


def conv_torch(x, weight, index, count):
    B, C, H, W = x.shape
    cols, p, valid = _windows(x, index, count)
    out_rows = (cols.float() @ _weight_rows(weight).float()).to(x.dtype)  # fp32 accumulation
    n = B * H * W
    y = x.new_zeros(n + 1, weight.shape[0]).index_copy_(0, torch.where(valid, p, n), out_rows)[:n]
    return y.view(B, H, W, -1).permute(0, 3, 1, 2)


def wgrad_torch(x, g, index, count):
    B, C, H, W = x.shape
    cols, p, valid = _windows(x, index, count)
    g_rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).index_select(0, p) * valid[:, None].to(g.dtype)
    grad = cols.float().t() @ g_rows.float()  # (9C, C_out)
    return grad.view(3, 3, C, -1).permute(3, 2, 0, 1).to(x.dtype).contiguous()


# -----------------------------------------------------------------------------
# The operators

@torch.library.custom_op("dynhead::masked_conv3x3", mutates_args=())
def masked_conv3x3(x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv (stride 1, padding 1, no bias) of the map x (B, C, H, W) at the
    pixels that compact() lists in (index, count), 0 elsewhere: (B, C_out, H, W),
    channels-last."""
    return conv_torch(x, weight, index, count).contiguous(memory_format=torch.channels_last)


@masked_conv3x3.register_fake
def _(x, weight, index, count):
    B, _, H, W = x.shape
    return x.new_empty(B, weight.shape[0], H, W).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("dynhead::masked_conv3x3_wgrad", mutates_args=())
def masked_conv3x3_wgrad(x: torch.Tensor, g: torch.Tensor, index: torch.Tensor,
                         count: torch.Tensor) -> torch.Tensor:
    """The weight gradient of masked_conv3x3 for the output gradient g:
    (C_out, C, 3, 3), accumulated in fp32 over the active pixels."""
    return wgrad_torch(x, g, index, count)


@masked_conv3x3_wgrad.register_fake
def _(x, g, index, count):
    return x.new_empty(g.shape[1], x.shape[1], 3, 3)


if triton is not None:
    masked_conv3x3.register_kernel("cuda")(conv_triton)
    masked_conv3x3_wgrad.register_kernel("cuda")(wgrad_triton)


def _setup(ctx, inputs, output):
    x, weight, index, count = inputs
    ctx.save_for_backward(x, weight, index, count)


def _backward(ctx, g):
    """dx: the conv of g (0 off the active pixels) with the weights flipped and
    transposed, at the pixels within a 3x3 window of an active one; dW: the
    wgrad operator."""
    x, weight, index, count = ctx.saved_tensors
    B, _, H, W = x.shape
    mask = active_mask(index, count, (B, H, W))
    g = (g * mask[:, None].to(g.dtype)).contiguous(memory_format=torch.channels_last)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = masked_conv3x3(g, _flip_transpose(weight).contiguous(), *compact(dilate3x3(mask)))
    if ctx.needs_input_grad[1]:
        dw = masked_conv3x3_wgrad(x, g, index, count).to(weight.dtype)
    return dx, dw, None, None


masked_conv3x3.register_autograd(_backward, setup_context=_setup)


def active_mask(index, count, shape):
    """(index, count) -> the bool mask of that shape again (the inverse of compact)."""
    n = math.prod(shape)
    valid = torch.arange(index.numel(), device=index.device) < count
    slots = torch.where(valid, index.long(), n)
    return torch.zeros(n + 1, dtype=torch.bool, device=index.device).index_fill_(0, slots, True)[:n].view(shape)


def conv3x3_at(x, weight, mask):
    """The masked conv of a canvas at a (B, H, W) mask, under autocast in its dtype
    (as F.conv2d would run)."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return masked_conv3x3(x.contiguous(memory_format=torch.channels_last), weight, *compact(mask))


# -----------------------------------------------------------------------------
# GroupNorm over the active pixels (docs/DESIGN.md §4), dense ops on the canvas

def group_norm_masked(y, mask, geometry, gn):
    """GroupNorm of a canvas y (B, C, H, W) with statistics per image, level and
    group over the pixels of mask (B, H, W) only, in fp32 (two passes: the mean,
    then the squared deviations); 0 off the mask. Per-level sums by index_add_ of
    every pixel into its level's slot (the frame into a slot of its own): no
    shape depends on the mask. fp32 out, as GroupNorm under autocast."""
    B, C, H, W = y.shape
    G, slots, level = gn.num_groups, geometry.levels + 1, geometry.level
    m = mask.reshape(B, H * W).float()
    rows = y.permute(0, 2, 3, 1).reshape(B, H * W, G, C // G).float()
    count = (rows.new_zeros(B, slots).index_add_(1, level, m) * (C // G)).clamp_min(1)[:, :, None]  # (B, L+1, 1)
    mean = rows.new_zeros(B, slots, G).index_add_(1, level, rows.sum(3) * m[:, :, None]) / count
    centred = (rows - mean.index_select(1, level)[:, :, :, None]) * m[:, :, None, None]
    var = rows.new_zeros(B, slots, G).index_add_(1, level, centred.square().sum(3)) / count
    out = centred * torch.rsqrt(var + gn.eps).index_select(1, level)[:, :, :, None]
    out = torch.addcmul(gn.bias.float(), out.reshape(B, H * W, C), gn.weight.float()) * m[:, :, None]
    return out.view(B, H, W, C).permute(0, 3, 1, 2)


# -----------------------------------------------------------------------------
# The dynamic head on the canvas, static shapes throughout

class Geometry:
    """The canvas of sparse.layout (the levels packed into one map, each framed by
    zeros) as small device maps made by slice fills: each pixel's level (`levels`
    on the frame), where each path exists, and the gate logits' offsets (0 where a
    level has the path, -inf elsewhere). Python numbers otherwise, so that nothing
    here is data for a trace to guard on."""

    def __init__(self, sizes, batch, device):
        import sparse
        self.H, self.W, self.band, self.regions = sparse.layout(sizes)
        self.B, self.sizes, self.levels = batch, list(sizes), len(sizes)
        L = self.levels
        level = torch.full((self.H, self.W), L, dtype=torch.long, device=device)
        for n, (y, x, h, w) in enumerate(self.regions):
            level[y:y + h, x:x + w] = n
        self.level = level.reshape(-1)  # (H*W,)
        on = lambda first, last: ((level >= first) & (level <= last))[None, None]  # (1, 1, H, W)
        self.depth_on = on(0, L - 1)
        self.scale_on = torch.cat([on(0, L - 2), on(1, L - 1)], 1)  # (down, up): none above P7, below P3
        off = lambda m: torch.zeros(m.shape, device=device).masked_fill_(~m, -math.inf)
        self.depth_valid, self.scale_valid = off(self.depth_on), off(self.scale_on)
        self.pixels = [h * w for h, w in sizes]
        self.depth_pixels = sum(self.pixels)
        self.path_pixels = [sum(self.pixels[:-1]), sum(self.pixels[1:])]
        self.scale_pixels = sum(self.path_pixels)

    def region(self, canvas, n):
        y, x, h, w = self.regions[n]
        return canvas[:, :, y:y + h, x:x + w]


def _gate(gate_module, x, geometry, valid):
    """A router's gates on the canvas: the dense gate conv (C -> 1 or 2), coarse
    means per image and level (Tab. 1), -inf where a level has no such path."""
    v = F.conv2d(x, gate_module.conv.weight, gate_module.conv.bias, padding=1)
    if gate_module.coarse:
        v = v.clone()
        for n in range(geometry.levels):
            region = geometry.region(v, n)
            region.copy_(region.mean((2, 3), keepdim=True).expand_as(region))
    return gate_module.activate(v + valid)


def scale_paths(router, x, geometry, tally):
    """Step 1: each scale path's depthwise conv and GroupNorm on the canvas, the
    GroupNorm over the pixels its gate keeps on, then weighted by the gate."""
    paths = (router.down, router.up)
    if router.scale_gate is not None:
        gate, active = _gate(router.scale_gate, x, geometry, geometry.scale_valid)
        tally.gate_conv(router.gate_macs, geometry.scale_pixels)
    else:
        gate, active = None, geometry.scale_on.expand(x.shape[0], -1, -1, -1)
    sent = []
    for i, (name, path) in enumerate(zip(("down", "up"), paths)):
        y = F.conv2d(x, path.conv.weight, path.conv.bias, padding=1, groups=x.shape[1])  # dense: cuDNN's
        # the GroupNorm over the pixels the gate keeps on, or over all of them (the authors')
        on = geometry.scale_on.expand(x.shape[0], -1, -1, -1)[:, i] if path.dense_norm else active[:, i]
        y = group_norm_masked(y, on, geometry, path.gn)
        if gate is None:
            tally.add(path, geometry.path_pixels[i])
        else:
            g = gate[:, i:i + 1]
            y = y * g
            tally.add(path, geometry.path_pixels[i], g.sum((1, 2, 3)), active[:, i].sum((1, 2)))
            for n in (range(geometry.levels - 1) if name == "down" else range(1, geometry.levels)):
                tally.record(name, n, geometry.region(g, n))
        sent.append(y)
    return sent


def aggregate(router, x, sent, geometry):
    """Step 2: a = beta * x, and each level's arrivals, resized to it (bilinear,
    align_corners=True), added into its region (weighted by alpha, or 1 in the
    fixed head)."""
    a = x * router.beta
    L = geometry.levels
    for source, target, path in [(n, n + 1, 0) for n in range(L - 1)] + [(n, n - 1, 1) for n in range(1, L)]:
        resized = F.interpolate(geometry.region(sent[path], source), size=geometry.sizes[target], mode="bilinear",
                                align_corners=True)
        region = geometry.region(a, target)
        region.add_(resized if router.alpha is None else resized * router.alpha)
    return a


def depth_path(router, a, geometry, tally):
    """Step 3: the gated residual block, its two 3x3 convs masked (conv1 on M2
    dilated by conv2's field, conv2 on M2), each GroupNorm over its own pixels."""
    path = router.depth
    if router.depth_gate is not None:
        gate, active = _gate(router.depth_gate, a, geometry, geometry.depth_valid)
        tally.gate_conv(router.gate_macs, geometry.depth_pixels)
        pooled = F.max_pool2d(gate, 3, 1, 1) * geometry.depth_on  # Eq. 4: the gate over conv1's field
        M1, M2 = pooled[:, 0] > 0, active[:, 0]
        tally.add(path, geometry.depth_pixels, (gate + pooled).sum((1, 2, 3)), M1.sum((1, 2)) + M2.sum((1, 2)))
        for n in range(geometry.levels):
            tally.record("depth", n, geometry.region(gate, n))
    else:
        gate, M1 = None, geometry.depth_on[:, 0].expand(a.shape[0], -1, -1)
        M2 = M1
        tally.add(path, geometry.depth_pixels)
    y = F.relu(group_norm_masked(conv3x3_at(a, path.conv1.weight, M1), M1, geometry, path.gn1))
    y = group_norm_masked(conv3x3_at(y, path.conv2.weight, M2), M2, geometry, path.gn2)
    return F.relu(a + (y if gate is None else gate * y))  # Eq. 2; 0 on the frame, relu(a) off M2


def run_head(head, features, tally):
    """The routers of a dynamic head (dynhead.DynamicHead) over a pyramid on one
    canvas, every shape fixed by the input's: the per-level reference's numbers,
    values and gradients, with no host sync."""
    B = features[0].shape[0]
    geometry = Geometry([tuple(f.shape[-2:]) for f in features], B, features[0].device)
    x = features[0].new_zeros(B, features[0].shape[1], geometry.H, geometry.W).contiguous(
        memory_format=torch.channels_last)
    for n, f in enumerate(features):
        geometry.region(x, n).copy_(f)
    for step, router in enumerate(head.routers):
        tally.step = step
        a = aggregate(router, x, scale_paths(router, x, geometry, tally), geometry)
        x = depth_path(router, a, geometry, tally)
    return [geometry.region(x, n).contiguous(memory_format=torch.channels_last) for n in range(geometry.levels)]
