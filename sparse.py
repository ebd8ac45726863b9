"""
Gather-scatter masked convolutions, and the dynamic head run on them: the gate
sparsity of Song et al., NeurIPS 2020 (§2.2.3, Fig. 3) turned into wall-clock
speed, in pure PyTorch, for training and inference, any batch, CPU and GPU.

A gate that is exactly 0 at a pixel means the path's conv is not needed there
(the paper counts the saving in FLOPs; the authors' code never shipped a fast
masked conv). A 3x3 conv at N chosen pixels is computed here as

    1. the flat positions of the N pixels, and for each the positions of its 9
       neighbours (a neighbour table, (9, N));
    2. over chunks of pixels: gather the (n, 9C) windows of the channels-last map
       (im2col) and run one GEMM with the (9C, C') weights -- on the CPU through
       oneDNN, as a 1x1 conv -- or a multiply-add per channel for a depthwise conv;
    3. the (N, C') rows, scattered back into a map, or kept as rows.

Backward is the same gather -> GEMM -> scatter-add in reverse, so the gradients
are exact: the gate activation has zero value and zero gradient where it is 0
(Eq. 3), so the skipped pixels contribute nothing to any gradient.

The dynamic head (`run_head`, called by dynhead.DynamicHead) runs on a *canvas*:
the five levels packed into one map, each framed by zeros. A 3x3 conv of the
canvas is then the conv of every level with its zero padding, so each gate conv
and depthwise conv of a router runs once over all levels (the router's weights
are shared across levels), and a pixel's 3x3 neighbours lie at fixed offsets in
the canvas, with no border to handle. The active pixels of a mask come as rows
ordered by image and level, so that the GroupNorm statistics of each (image,
level) are those of one block of rows. The depth path stays in rows of active
pixels from conv1 to conv2, its gate and residual are applied on those rows
only, and everything else runs on whole canvases. On the CPU one pass over a
256-channel canvas takes 1-6 ms with the machine's load, the time of a conv's
GEMM at hundreds of pixels, so the head makes as few as it can: no canvas filled
with zeros for a few rows, the up path's depthwise conv only on the part of the
canvas that has the path, and without autograd each step overwriting the canvas
it reads.

Where gathering loses to the dense conv (high density, tiny maps, every conv on a
GPU: see BENCHMARKS.md) the dense conv runs and is masked; same numbers either way.
On a GPU the head itself runs sparse_gpu.py's engine (STATIC): static shapes, no
host sync, Triton's masked convs.

Map:
    DENSE_ABOVE, use_dense      the dispatch rule; STATIC, the devices of sparse_gpu.py
    _GatherConv                 the gather -> GEMM kernel, forward and backward
    group_norm_rows             GroupNorm of rows, statistics per segment
    ActiveSet, masked_conv2d,   one masked conv (or GroupNorm) on a map of its own
      masked_group_norm
    gate_conv2d                 the gates' dense 3x3 conv C -> 1-2, fast on the CPU
    max3x3                      the depth gate over conv1's field (Eq. 4), fast on the CPU
    Canvas, ActiveRows          the packed pyramid and its active pixels
    _ScaleConvs, _Aggregate,    the router's steps on the canvas
      _Residual
    run_head                    §2.1's three steps of every router, on the canvas
"""
import contextlib
import functools
import math

import torch
import torch.nn.functional as F

# The dispatch rule: above these densities (fraction of active pixels) the dense
# conv is faster than gathering (`python bench.py --part conv`, BENCHMARKS.md). The
# memory-bound depthwise conv never gathers faster (the head runs its depthwise
# convs dense, _ScaleConvs); on CUDA cuDNN's dense conv beats the unfused gather at
# every density.
DENSE_ABOVE = {
    ("cpu", "conv"): 0.7,
    ("cpu", "depthwise"): 0.0,
    ("cuda", "conv"): 0.0,
    ("cuda", "depthwise"): 0.0,
}
# Where group_norm_rows runs PyTorch's GroupNorm block by block (one call per image
# and level): on the CPU, where its fused kernel wins once the blocks hold
# BLOCK_ROWS rows on average (below, the calls cost more than they save); on a GPU
# the few ops of normalise_rows, whatever the number of blocks, launch fewer kernels.
BLOCK_NORM = {"cpu": True, "cuda": False}
BLOCK_ROWS = 64
MIN_PIXELS = 64  # a lone map with fewer pixels per image runs dense: nothing to gain
# The devices whose dynamic head runs sparse_gpu.py's static-shape engine: there a step
# must not wait for the device (torch.compile, CUDA graphs); its speed on a GPU is
# bench.py --part gpu's to measure
STATIC = {"cuda"}
# A chunk of pixels holds at most CHUNK_BYTES of working memory (CPU: one GEMM of
# 4-9 thousand rows runs 10-20% faster than two of half as many; CUDA: few large
# chunks, few launches) and at most CHUNK_OF_DENSE times the output of the dense
# conv it replaces (the peak memory against the fixed tower's: BENCHMARKS.md), but
# never less than MIN_CHUNK_BYTES (small GEMMs run slowly).
CHUNK_BYTES = {"cpu": 64 * 2 ** 20, "cuda": 256 * 2 ** 20}
CHUNK_OF_DENSE = {"cpu": 4, "cuda": 0.5}
MIN_CHUNK_BYTES = 8 * 2 ** 20


def use_dense(density, kind, device):
    """The dispatch rule: the dense conv where gathering would be slower."""
    return density > DENSE_ABOVE.get((device.type, kind), 0.0)


# -----------------------------------------------------------------------------
# The gather kernel

class Neighbours:
    """The 3x3 neighbours of N pixels: taps (9, N), tap t = 3 * (dy + 1) + (dx + 1),
    flat row indices into the source rows; and the (9, N) bool map of the taps to
    read as zero, or None where the source holds a zero at every such position.
    `lefts` (3, N), where the taps of each row dy are three consecutive source
    rows: the first of them (tap 3 * (dy + 1)), so that a window is gathered as
    three runs of 3C values rather than nine of C (20% faster on the CPU)."""

    def __init__(self, taps, outside=None, lefts=None):
        self.taps, self.outside, self.lefts = taps, outside, lefts

    def __len__(self):
        return self.taps.shape[1]

    def part(self, start, stop):
        cut = lambda t: None if t is None else t[:, start:stop]
        return Neighbours(cut(self.taps), cut(self.outside), cut(self.lefts))


def _chunks(nb, pixel_bytes, dense_bytes, device):
    """Yield (start, stop, neighbours) over the pixels of `nb`, chunks of near-equal
    size whose working set, `pixel_bytes` per pixel, stays under CHUNK_BYTES and
    under a multiple of the dense conv's output `dense_bytes`."""
    n, kind = len(nb), device.type
    cap = CHUNK_BYTES.get(kind, CHUNK_BYTES["cuda"])
    of_dense = CHUNK_OF_DENSE.get(kind, CHUNK_OF_DENSE["cuda"])
    step = max(1, min(cap, max(int(dense_bytes * of_dense), MIN_CHUNK_BYTES)) // pixel_bytes)
    step = max(1, -(-n // max(1, -(-n // step))))  # near-equal chunks: no small GEMM left at the end
    for start in range(0, max(n, 1), step):  # an empty set still makes one (empty) pass
        stop = min(n, start + step)
        yield start, stop, nb.part(start, stop)


def _windows(rows, nb):
    """(n, 9, C): the 3x3 windows of the n pixels of `nb`, gathered at once (im2col);
    the taps beyond the border zeroed."""
    n, C = len(nb), rows.shape[1]
    if nb.lefts is not None and rows.is_contiguous():  # row q of `runs`: rows q, q + 1, q + 2 (a view)
        runs = rows.as_strided((rows.shape[0] - 2, 3 * C), (C, 1))
        return runs.index_select(0, nb.lefts.t().reshape(-1)).view(n, 9, C)
    cols = rows.index_select(0, nb.taps.t().reshape(-1)).view(n, 9, C)
    return cols if nb.outside is None else cols.masked_fill_(nb.outside.t()[:, :, None], 0)


def _matmul(a, w):
    """a (n, K) @ w.t(), w (M, K) contiguous: on the CPU as a 1x1 conv of a
    channels-last (1, K, 1, n) view of a, so that oneDNN runs it (its GEMMs here ran
    at up to twice the speed of the BLAS behind `@`, BENCHMARKS.md)."""
    if a.device.type != "cpu" or a.dtype == torch.float64 or not len(a):  # oneDNN: no fp64, no empty map
        return a @ w.t()
    image = a.view(1, 1, a.shape[0], a.shape[1]).permute(0, 3, 1, 2)
    return _rows(F.conv2d(image, w.view(w.shape[0], w.shape[1], 1, 1)))


def _fp32_at_least(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _accumulate(acc, y):
    """acc + y, in place once acc exists, kept in fp32 at least: sums of many bf16
    terms (many chunks) would otherwise add up their roundings."""
    return y.to(_fp32_at_least(y.dtype)) if acc is None else acc.add_(y)


def _rows(t):
    """(B, C, H, W) -> (B*H*W, C) pixel rows; a view when t is channels_last."""
    B, C, H, W = t.shape
    return t.permute(0, 2, 3, 1).reshape(B * H * W, C)


class _GatherConv(torch.autograd.Function):
    """out[i] = sum_t src[taps[t, i]] @ W_t (+ bias): a 3x3 conv at N pixels from
    the rows of its source: per chunk of pixels, gather the (n, 9C) windows
    (im2col) and run one GEMM with the (9C, C_out) weights (a multiply-add per
    channel for a depthwise conv). Backward gathers again rather than keeping
    anything gathered."""

    @staticmethod
    def forward(ctx, src, weight, bias, nb, depthwise, dense_pixels):
        C, C_out = src.shape[1], weight.shape[0]
        # (C_out, 9C): column (3 * ky + kx) * C + c, as the windows; (9, C) per channel
        w = weight.reshape(C, 9).t() if depthwise else weight.permute(0, 2, 3, 1).reshape(C_out, 9 * C)
        dense_bytes = dense_pixels * C_out * src.element_size()  # the output of the dense conv it replaces
        pixel_bytes = (2 if depthwise else 1) * 9 * C * src.element_size() + C_out * 4  # windows, result
        chunks = list(_chunks(nb, pixel_bytes, dense_bytes, src.device))
        out = None if len(chunks) == 1 else src.new_empty(len(nb), C_out)  # one chunk: its result is the output
        for start, stop, part in chunks:
            cols = _windows(src, part)  # (n, 9, C)
            acc = (cols * w).sum(1) if depthwise else _matmul(cols.view(len(cols), 9 * C), w)
            del cols  # free this chunk's windows before the next are gathered
            acc = acc if bias is None else acc.add_(bias)
            if out is None:
                out = acc
            else:
                out[start:stop] = acc
        ctx.save_for_backward(src, weight)
        ctx.nb, ctx.depthwise, ctx.has_bias, ctx.dense_bytes = nb, depthwise, bias is not None, dense_bytes
        return out

    @staticmethod
    def backward(ctx, grad_out):
        src, weight = ctx.saved_tensors
        nb, depthwise = ctx.nb, ctx.depthwise
        C, C_out = src.shape[1], weight.shape[0]
        need_src, need_w, need_b = ctx.needs_input_grad[:3]
        grad_src = src.new_zeros(src.shape) if need_src else None
        if depthwise:
            w = weight.reshape(C, 9).t()  # (9, C)
        else:  # dL/dwindows = gy @ W: a GEMM with the (9C, C_out) transpose
            w_t = weight.permute(2, 3, 1, 0).reshape(9 * C, C_out).contiguous()
        grad_w = None  # (C_out, 9C), or (9, C) depthwise; fp32 at least
        grad_b = _accumulate(None, grad_out.sum(0)) if need_b else None
        pixel_bytes = 2 * 9 * C * src.element_size() + C_out * 4
        for start, stop, part in _chunks(nb, pixel_bytes, ctx.dense_bytes, src.device):
            gy, n, taps, outside = grad_out[start:stop], stop - start, part.taps, part.outside
            if need_w:  # dL/dW = windows^T @ gy, or per channel and tap sum(windows * gy)
                cols = _windows(src, part)
                grad_w = _accumulate(grad_w, (cols * gy[:, None]).sum(0) if depthwise else
                                     gy.t() @ cols.view(n, 9 * C))
                del cols
            if need_src:  # dL/dwindows, added back where the windows came from
                gcols = (gy[:, None] * w) if depthwise else _matmul(gy, w_t).view(n, 9, C)
                if outside is not None:
                    gcols.masked_fill_(outside.t()[:, :, None], 0)  # clamped border taps received nothing
                grad_src.index_add_(0, taps.t().reshape(-1), gcols.reshape(n * 9, C))
                del gcols
        grad_weight = grad_bias = None
        if need_w:
            if depthwise:  # (9, C) -> (C, 1, 3, 3)
                grad_weight = grad_w.t().reshape(C, 1, 3, 3)
            else:  # (C_out, 9C) -> (C_out, C_in, 3, 3), channels_last as the head's weights (no copy)
                grad_weight = grad_w.view(C_out, 3, 3, C).permute(0, 3, 1, 2)
            grad_weight = grad_weight.to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_bias = grad_b.to(weight.dtype)
        return grad_src, grad_weight, grad_bias, None, None, None


def _autocast(*tensors):
    """The tensors in autocast's dtype where it is on (None stays None), as F.conv2d
    would cast them, for a conv run with autocast off."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def gather_conv(src, nb, weight, bias, depthwise, dense_pixels):
    """The rows (N, C_out) of a 3x3 conv at the pixels of `nb`, read from the rows
    `src` (S, C), in place of a dense conv over `dense_pixels` pixels (which bounds
    the working memory); under autocast in its dtype, as F.conv2d would."""
    src, weight, bias = _autocast(src, weight, bias)
    with torch.autocast(src.device.type, enabled=False):
        return _GatherConv.apply(src, weight, bias, nb, depthwise, dense_pixels)


# -----------------------------------------------------------------------------
# GroupNorm over active pixels (docs/DESIGN.md §4)

class _NormaliseRows(torch.autograd.Function):
    """GroupNorm without its affine, over pixel rows (N, C): each group of each row
    less its segment's mean, over its segment's standard deviation, where a segment
    (an image, or one level of an image) holds the rows given for it and no other
    pixel. All segments at once, no loop and no host sync: per-segment sums are
    scattered with `index_add_`. Statistics in fp32 at least, in two passes (the
    mean, then the mean square deviation: E[x^2] - E[x]^2 would lose the variance
    of values far from 0). Backward is GroupNorm's, by hand:
    dx = rstd * (dy - mean(dy) - y * mean(dy * y)), the means over the segment
    and group (a third of the passes autograd would make)."""

    @staticmethod
    def forward(ctx, rows, segments, num_groups, eps):
        N, C = rows.shape
        G = num_groups
        segment, count = segments.index, (segments.count * (C // G))[:, None]  # values per segment and group

        def segment_mean(values):  # (N, G) per-row sums -> (N, G) the mean over each row's segment
            sums = values.new_zeros(segments.num, G).index_add_(0, segment, values)
            return (sums / count).index_select(0, segment)

        r = rows.to(_fp32_at_least(rows.dtype)).view(N, G, C // G)
        centred = r - segment_mean(r.sum(2))[:, :, None]
        rstd = torch.rsqrt(segment_mean(torch.einsum("ngc,ngc->ng", centred, centred)) + eps)  # (N, G)
        y = centred * rstd[:, :, None]
        ctx.save_for_backward(y, rstd, segment, count)
        ctx.num_segments, ctx.dtype = segments.num, rows.dtype
        return y.view(N, C)

    @staticmethod
    @torch.autocast("cpu", enabled=False)
    @torch.autocast("cuda", enabled=False)
    def backward(ctx, grad):
        y, rstd, segment, count = ctx.saved_tensors
        N, G, Cg = y.shape
        dy = grad.to(y.dtype).view(N, G, Cg)
        moments = torch.stack([dy.sum(2), torch.einsum("ngc,ngc->ng", dy, y)], 1)  # (N, 2, G)
        means = (moments.new_zeros(ctx.num_segments, 2, G).index_add_(0, segment, moments) /
                 count[:, :, None]).index_select(0, segment)
        dx = torch.addcmul(dy, y, -means[:, 1, :, None])  # dy - y * mean(dy * y)
        dx = torch.addcmul(-means[:, 0, :, None] * rstd[:, :, None], dx, rstd[:, :, None])
        return dx.view(N, G * Cg).to(ctx.dtype), None, None, None


class Segments:
    """The GroupNorm segment of each of N rows (an image, or one level of an
    image), index (N,) in 0..num - 1, and the number of rows in each segment (at
    least 1). `shared`: Segments of more rows whose segments include these and no
    other rows of them, whose counts serve (counted once for several GroupNorms).
    `blocks`: where the rows come as consecutive blocks, one segment each, the
    number of rows of each block (a list, on the host)."""

    def __init__(self, index, num, shared=None, blocks=None):
        self.index, self.num, self.shared, self.blocks = index, num, shared, blocks

    @functools.cached_property
    def count(self):
        if self.shared is not None:
            return self.shared.count
        return torch.bincount(self.index, minlength=self.num).clamp_min_(1)


def normalise_rows(rows, segments, num_groups, eps=1e-5):
    """GroupNorm without its affine over pixel rows, statistics per segment and
    group (_NormaliseRows). Returns fp32 at least. Autocast stays out: it would
    run the per-row sums of squares as bf16 matmuls of a few channels each, 20x
    slower on the CPU than in fp32 (and the statistics are fp32 anyway)."""
    with torch.autocast(rows.device.type, enabled=False):
        return _NormaliseRows.apply(rows, segments, num_groups, eps)


def _by_blocks(rows, segments):
    """Whether group_norm_rows runs block by block (BLOCK_NORM, BLOCK_ROWS)."""
    blocks = segments.blocks
    return (blocks is not None and len(rows) > 0 and BLOCK_NORM.get(rows.device.type, False)
            and len(rows) >= BLOCK_ROWS * sum(n > 0 for n in blocks))


def group_norm_rows(rows, segments, num_groups, weight, bias, eps=1e-5, zero_row=False):
    """GroupNorm of pixel rows (N, C), statistics per segment and group. Where the
    rows come in blocks, one segment each, and BLOCK_NORM and BLOCK_ROWS allow it,
    each block is a (1, C, 1, n) channels-last map for PyTorch's own GroupNorm: one
    fused pass for the statistics and one for the output, 2-3x faster on the CPU
    at hundreds of rows per block than the all-segments-at-once normalise_rows,
    which runs otherwise (a few ops however many segments: fewer launches on a
    GPU, fewer calls for small blocks). An empty set of rows still keeps
    weight and bias in the autograd graph (DDP needs every gradient). `zero_row`:
    one row of zeros more, at the end (what conv_from_rows reads outside the rows),
    made in the same pass as the blocks' concatenation."""
    blocks = segments.blocks
    if _by_blocks(rows, segments):
        C = rows.shape[1]
        # torch.group_norm: F.group_norm refuses a block of one value per group in training
        out = [_rows(torch.group_norm(r.view(1, 1, n, C).permute(0, 3, 1, 2), num_groups, weight, bias, eps))
               for r, n in zip(rows.split(blocks), blocks) if n]
        out = [o.to(rows.dtype) for o in out] + ([rows.new_zeros(1, C)] if zero_row else [])
        return out[0] if len(out) == 1 else torch.cat(out)
    y = torch.addcmul(bias, normalise_rows(rows, segments, num_groups, eps), weight).to(rows.dtype)
    return F.pad(y, (0, 0, 0, 1)) if zero_row else y


# -----------------------------------------------------------------------------
# One masked conv on a map of its own (the same signatures as dynhead.py's)

def _check_mask(mask):
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, H, W) bool tensor, got {tuple(mask.shape)} {mask.dtype}")


class ActiveSet:
    """A (B, H, W) bool mask of a map, indexed when first needed and reused by every
    conv and GroupNorm that shares it. Its pixels' 3x3 neighbours are clamped into
    the image, the taps beyond it marked to read zero (no padding of the map)."""

    def __init__(self, mask):
        _check_mask(mask)
        self.mask = mask

    @functools.cached_property
    def index(self):
        """(N,) the active pixels' flat positions b*H*W + y*W + x."""
        return self.mask.reshape(-1).nonzero().squeeze(1)

    @property
    def indexed(self):
        return "index" in self.__dict__

    def __len__(self):
        return self.index.numel()

    @property
    def density(self):
        return self.index.numel() / max(1, self.mask.numel())

    @functools.cached_property
    def batch(self):
        """(N,) the image of each active pixel."""
        B, H, W = self.mask.shape
        return torch.div(self.index, H * W, rounding_mode="floor")

    @functools.cached_property
    def neighbours(self):
        B, H, W = self.mask.shape
        yx = self.index % (H * W)
        y, x = torch.div(yx, W, rounding_mode="floor"), yx % W
        d = torch.arange(-1, 2, device=y.device)
        ny = y[None, None, :] + d[:, None, None]  # (3, 1, N): dy
        nx = x[None, None, :] + d[None, :, None]  # (1, 3, N): dx
        outside = (ny < 0) | (ny >= H) | (nx < 0) | (nx >= W)  # (3, 3, N)
        flat = self.batch * H * W + ny.clamp(0, H - 1) * W + nx.clamp(0, W - 1)  # (3, 3, N)
        return Neighbours(flat.reshape(9, -1), outside.reshape(9, -1))


def _check(x, active, weight, groups):
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    B, C, H, W = x.shape
    if tuple(active.mask.shape) != (B, H, W):
        raise ValueError(f"mask must be (B, H, W) = {(B, H, W)} to match x, got {tuple(active.mask.shape)}")
    if active.mask.device != x.device:
        raise ValueError(f"mask is on {active.mask.device} but x on {x.device}; move them to one device")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (C_out, C_in/groups, 3, 3), got {tuple(weight.shape)}")
    if groups not in (1, C) or weight.shape[1] * groups != C or (groups > 1 and weight.shape[0] != C):
        raise ValueError(f"weight {tuple(weight.shape)} with groups={groups} does not fit {C} input "
                         f"channels; expected (C_out, {C}, 3, 3) or depthwise ({C}, 1, 3, 3) with groups={C}")


def _scatter(rows, index, B, H, W):
    """(N, C) rows at flat positions -> a (B, C, H, W) channels-last map, 0 elsewhere."""
    out = rows.new_zeros(B * H * W, rows.shape[1]).index_copy_(0, index, rows)
    return out.view(B, H, W, -1).permute(0, 3, 1, 2)


def masked_conv2d(x, mask, weight, bias=None, groups=1):
    """3x3 conv, stride 1, padding 1, computed only where `mask` is true (each
    image its own mask) and 0 elsewhere. groups=1 (dense) or groups=C (depthwise).

    x (B, C, H, W); mask (B, H, W) bool, an ActiveSet, or None (everywhere).
    Returns (B, C_out, H, W), channels_last when gathered.
    """
    if mask is None:
        return F.conv2d(x, weight, bias, padding=1, groups=groups)
    active = mask if isinstance(mask, ActiveSet) else ActiveSet(mask)
    _check(x, active, weight, groups)
    B, C, H, W = x.shape
    kind = "depthwise" if groups > 1 else "conv"
    # where the dense conv wins at any density (a GPU), a mask not yet indexed is not
    # indexed for it: `nonzero` makes the host wait for the device
    never = DENSE_ABOVE.get((x.device.type, kind), 0.0) <= 0 and not active.indexed
    if H * W < MIN_PIXELS or never or use_dense(active.density, kind, x.device):
        y = F.conv2d(x, weight, bias, padding=1, groups=groups)
        return y * active.mask[:, None].to(y.dtype)
    rows = gather_conv(_rows(x), active.neighbours, weight, bias, groups > 1, B * H * W)
    return _scatter(rows, active.index, B, H, W)


def masked_group_norm(x, mask, num_groups, weight, bias, eps=1e-5):
    """GroupNorm whose statistics are taken over the active pixels of each image
    and group only (docs/DESIGN.md §4); 0 outside the mask."""
    if mask is None:
        return F.group_norm(x, num_groups, weight, bias, eps)
    active = mask if isinstance(mask, ActiveSet) else ActiveSet(mask)
    B, C, H, W = x.shape
    if tuple(active.mask.shape) != (B, H, W):
        raise ValueError(f"mask must be (B, H, W) = {(B, H, W)} to match x, got {tuple(active.mask.shape)}")
    if C % num_groups:
        raise ValueError(f"{C} channels are not divisible into {num_groups} groups")
    rows = _rows(x).index_select(0, active.index)
    return _scatter(group_norm_rows(rows, Segments(active.batch, B), num_groups, weight, bias, eps),
                    active.index, B, H, W)


def gate_conv2d(x, weight, bias):
    """The gates' 3x3 conv C -> P (P = 1 or 2 paths), run on every pixel. CPU conv
    kernels are slow for so few output channels: a GEMM to 9P channels, then the
    sum of the 9 shifted taps, computes the same several times faster. The GEMM
    runs on the rows of a channels_last map (the BLAS beats oneDNN's 1x1 conv by
    20-30% at so few columns), as a 1x1 conv otherwise."""
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias, padding=1)
    B, C, H, W = x.shape
    P = weight.shape[0]
    w = weight.permute(2, 3, 0, 1).reshape(9 * P, C)
    if x.is_contiguous(memory_format=torch.channels_last):
        taps = F.linear(_rows(x), w).view(B, H, W, 9 * P).permute(0, 3, 1, 2)  # (B, 9P, H, W)
    else:
        taps = F.conv2d(x, w.view(9 * P, C, 1, 1))
    taps = F.pad(taps, (1, 1, 1, 1))  # a small map: 9P channels
    out = bias.view(1, P, 1, 1).expand(B, P, H, W)
    for t in range(9):  # tap (dy, dx) of output pixel (y, x) was computed at (y + dy - 1, x + dx - 1)
        dy, dx = divmod(t, 3)
        out = out + taps[:, t * P:(t + 1) * P, dy:dy + H, dx:dx + W]
    return out


def max3x3(gate):
    """The 3x3 max (stride 1, padding 1) of a (B, P, H, W) gate map: the gate over
    conv1's field (Eq. 4). On the CPU max_pool2d's kernel takes ~1.5 ms for a
    one-channel canvas; the maxima along rows, then along columns, take 0.2 ms. Where
    equal values tie, torch.maximum shares the gradient between them (max_pool2d
    gives it to one): the same sum, and gates tie at 0 or 1, where the gate's own
    gradient is 0."""
    if gate.device.type != "cpu":
        return F.max_pool2d(gate, 3, 1, 1)
    p = F.pad(gate, (1, 1, 1, 1), value=-math.inf)
    across = torch.maximum(torch.maximum(p[..., :-2], p[..., 1:-1]), p[..., 2:])
    return torch.maximum(torch.maximum(across[..., :-2, :], across[..., 1:-1, :]), across[..., 2:, :])


# -----------------------------------------------------------------------------
# The pyramid packed into one canvas

def layout(sizes):
    """The canvas of levels of these (h, w) sizes (Canvas's drawing): its height and
    width, the first row of the band below level 0, and each level's region
    (y, x, h, w)."""
    (h0, w0), rest = sizes[0], sizes[1:]
    corners, x = [(1, 1)], 1
    for h, w in rest:
        corners.append((h0 + 2, x))
        x += w + 1
    H = h0 + 2 + (max(h for h, _ in rest) + 1 if rest else 0)
    band = h0 + 1  # the rows from here down hold the levels below level 0 (and their frame)
    return H, max(w0 + 2, x), band, [(y, x, h, w) for (y, x), (h, w) in zip(corners, sizes)]


class Canvas:
    """The levels of a pyramid packed into one map, each framed by zeros: level 0
    on top, the others side by side below it (for an 800x1333 input, 153x170
    pixels for 100x168 + 50x84 + 25x42 + 13x21 + 7x11: 16% more than the levels).

        +--------------------+
        |      level 0       |     every level has a zero row or column on each
        +--------------------+     side, so a 3x3 conv with padding 1 of the
        | level 1 | 2 |3|4|  |     canvas is the conv of each level with its own
        +--------------------+     zero padding, and a pixel's neighbour (dy, dx)
                                   lies dy * W + dx rows away in the flat canvas

    Every canvas the head makes holds zeros outside the levels: what gathers or
    convolves reads the frame as padding."""

    def __init__(self, sizes, batch, device):
        self.H, self.W, self.band, self.regions = layout(sizes)
        self.B, self.sizes, self.device = batch, list(sizes), device
        level = torch.full((self.H, self.W), -1, dtype=torch.long)
        for n, (y, x, h, w) in enumerate(self.regions):
            level[y:y + h, x:x + w] = n
        self.level = level.to(device)  # (H, W): each pixel's level, -1 on the frame
        self.num_segments = len(sizes) * batch
        # (B * level pixels,) the canvas positions of the levels' pixels grouped by
        # image, then level (row-major within a level), and the GroupNorm segment of
        # each, image * L + level: rows indexed in this order hold each segment as
        # one block, the blocks in the order of their segments (group_norm_rows)
        flat = self.level.reshape(-1)
        per_level = [(flat == n).nonzero().squeeze(1) for n in range(len(sizes))]
        self.order = torch.cat([p + b * self.H * self.W for b in range(batch) for p in per_level])
        self.order_segment = torch.cat([torch.full((h * w,), b * len(sizes) + n, dtype=torch.long)
                                        for b in range(batch) for n, (h, w) in enumerate(sizes)]).to(device)
        self.deltas = torch.tensor([dy * self.W + dx for dy in (-1, 0, 1) for dx in (-1, 0, 1)], device=device)
        self.pixels = [h * w for h, w in sizes]  # per image and level
        # where each path exists: depth everywhere, down below the top, up above the bottom
        L = len(sizes)
        self.on = [self.within(range(L)), self.within(range(L - 1)), self.within(range(1, L))]
        self.depth_on = self.on[0].to(torch.get_default_dtype())
        # added to a gate's logits: 0 where the level has the path, -inf elsewhere
        off = lambda m: torch.zeros(m.shape, device=device).masked_fill_(~m, -math.inf)
        self.depth_valid, self.scale_valid = off(self.on[0]), off(torch.cat(self.on[1:], 1))  # (down, up)
        self.depth_pixels = sum(self.pixels)
        self.path_pixels = [sum(self.pixels[:-1]), sum(self.pixels[1:])]  # down, up
        self.scale_pixels = sum(self.path_pixels)  # the scale gate's channels, over the levels that have them

    @staticmethod
    @functools.lru_cache(maxsize=16)  # COCO's padded sizes repeat; each canvas holds a few small tables
    def of(sizes, batch, device):
        return Canvas(list(sizes), batch, device)

    @functools.lru_cache(maxsize=4)
    def segments(self, k):
        """(k * len(order),) the segment of each pixel of k masks taken in the
        canvas order: mask i's are offset by i * num_segments, so that the k masks'
        segments are disjoint."""
        return torch.cat([self.order_segment + i * self.num_segments for i in range(k)])

    def within(self, levels):
        """(1, 1, H, W) bool: the pixels of the given levels."""
        return (sum(self.level == n for n in levels) > 0)[None, None]

    @functools.cached_property
    def depth_set(self):
        """Every pixel of every level, as ActiveRows: an ungated depth path."""
        return index_masks([self.on[0].expand(self.B, -1, -1, -1)[:, 0]], self)[0][0]

    @functools.cached_property
    def scale_sets(self):
        """Every pixel that has a scale-down and a scale-up path: ungated scale paths."""
        return index_masks([m.expand(self.B, -1, -1, -1)[:, 0] for m in self.on[1:]], self)[0]

    def region(self, canvas, n):
        y, x, h, w = self.regions[n]
        return canvas[:, :, y:y + h, x:x + w]

    def zeros(self, like):
        """A zero canvas, channels_last, of the dtype, device and channels of `like`."""
        return like.new_zeros(self.B, self.H, self.W, like.shape[1]).permute(0, 3, 1, 2)

    def empty(self, like):
        """An uninitialised canvas, channels_last, as `like`, for what writes every value it reads."""
        return like.new_empty(self.B, self.H, self.W, like.shape[1]).permute(0, 3, 1, 2)


_ZEROS = {}  # (device, dtype, channels) -> a flat zero buffer, lent by _lent_zeros


@contextlib.contextmanager
def _lent_zeros(B, H, W, rows, index):
    """A zero (B, C, H, W) map, channels_last, holding `rows` (N, C) at the flat
    positions `index` for the duration of the `with`: lent from a buffer kept per
    device, dtype and width, whose rows are zeroed again on leaving, so that a whole
    map (a pass over memory, 2-9 ms for a 256-channel canvas on the CPU) is not
    filled with zeros for a few thousand rows. One buffer, the largest map asked
    for, serves every size."""
    key, n = (rows.device, rows.dtype, rows.shape[1]), B * H * W * rows.shape[1]
    if key not in _ZEROS or _ZEROS[key].numel() < n:
        _ZEROS[key] = rows.new_zeros(n)
    flat = _ZEROS[key][:n].view(B * H * W, rows.shape[1])
    try:
        yield flat.index_copy_(0, index, rows).view(B, H, W, -1).permute(0, 3, 1, 2)
    finally:
        flat.index_fill_(0, index, 0)


class _Pack(torch.autograd.Function):
    """Levels -> canvas, and back: copies into and out of the regions, with the
    gradient copied the other way (no autograd bookkeeping per region)."""

    @staticmethod
    def forward(ctx, canvas_geometry, *levels):
        ctx.cv = canvas_geometry
        out = canvas_geometry.zeros(levels[0])
        for n, level in enumerate(levels):
            canvas_geometry.region(out, n).copy_(level)
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, *[ctx.cv.region(grad, n).contiguous(memory_format=torch.channels_last)
                        for n in range(len(ctx.cv.regions))])


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, canvas_geometry, canvas):
        ctx.cv = canvas_geometry
        return tuple(canvas_geometry.region(canvas, n).contiguous(memory_format=torch.channels_last)
                     for n in range(len(canvas_geometry.regions)))

    @staticmethod
    def backward(ctx, *grads):
        out = None
        for n, g in enumerate(grads):
            if g is not None:
                out = ctx.cv.zeros(g) if out is None else out
                ctx.cv.region(out, n).copy_(g)
        return None, out


class _Aggregate(torch.autograd.Function):
    """§2.1 step 2 on a canvas: a = alpha * arrivals + beta * x, where a level's
    arrivals are the scale-down paths of the level below it and the scale-up paths
    of the level above it, each resized (bilinear, align_corners=True) to this
    level's size. The paths come as rows of their active pixels (0 elsewhere), and
    only the rows are kept for backward. One pass writes beta * x, and each resized
    arrival is added into its region; the gradients are moved back by hand, region
    by region (resizing is linear: <g, alpha * U s> = alpha * <U^T g, s>, so
    alpha's gradient comes from the resize backward that s's gradient needs).
    alpha None: the arrivals weighted 1 (the fixed head). `in_place`: without
    autograd, x is overwritten by a (half the memory traffic of a new map)."""

    @staticmethod
    def forward(ctx, cv, x, down, at_down, up, at_up, alpha, beta, in_place):
        ctx.cv, ctx.sets, ctx.fixed = cv, {"down": at_down, "up": at_up}, alpha is None
        if in_place:
            ctx.mark_dirty(x)
        a = x.mul_(beta) if in_place else x * beta
        for name, rows, at in (("down", down, at_down), ("up", up, at_up)):
            with _lent_zeros(cv.B, cv.H, cv.W, rows, at.index) as sent:  # the path's canvas, 0 off its rows
                for source, target, _ in filter(lambda move: move[2] == name, _moves(cv)):
                    resized = F.interpolate(cv.region(sent, source), size=cv.sizes[target], mode="bilinear",
                                            align_corners=True)
                    region = cv.region(a, target)
                    region.add_(resized) if alpha is None else region.addcmul_(resized, alpha)
        ctx.save_for_backward(x, down, up, alpha, beta)
        return a

    @staticmethod
    def backward(ctx, grad):
        cv = ctx.cv
        x, down, up, alpha, beta = ctx.saved_tensors
        # with respect to the sent canvases: every source region is written, and the
        # paths' active pixels lie in their source regions only, so no zeros are needed
        grads = {"down": cv.empty(grad), "up": cv.empty(grad)}
        for source, target, name in _moves(cv):
            g = cv.region(grad, target).contiguous(memory_format=torch.channels_last)
            B, C = g.shape[:2]
            cv.region(grads[name], source).copy_(torch.ops.aten.upsample_bilinear2d_backward(
                g, list(cv.sizes[target]), [B, C, *cv.sizes[source]], True))  # U^T g
        g_down, g_up = ctx.sets["down"].gather(grads["down"]), ctx.sets["up"].gather(grads["up"])
        grad_alpha = None
        if not ctx.fixed:
            # under autocast an ungated scale path's rows (Tab. 3's depth-only row) may be
            # bf16 while the gradient is fp32: each dot in the promoted dtype
            grad_alpha = (_dot(g_down, down) + _dot(g_up, up)).reshape(alpha.shape).to(alpha.dtype)
            g_down, g_up = g_down * alpha, g_up * alpha
        # under autocast x may be bf16, a (and grad) fp32; the rows' dot needs no temporary map
        grad_beta = _dot(_rows(grad), _rows(x)).reshape(beta.shape).to(beta.dtype)
        return None, grad * beta, g_down, None, g_up, None, grad_alpha, grad_beta, None


def _dot(a, b):
    """<a, b> over all elements, in the dtype both promote to (einsum would copy a transpose)."""
    dtype = torch.promote_types(a.dtype, b.dtype)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


def _moves(cv):
    """(source level, target level, path): every level's scale-down path to the level
    above it, then every scale-up path to the level below."""
    L = len(cv.regions)
    return [(n, n + 1, "down") for n in range(L - 1)] + [(n, n - 1, "up") for n in range(1, L)]


class ActiveRows:
    """The active pixels of a canvas mask as rows: their flat positions in the
    canvas (b*H*W + y*W + x), each one's GroupNorm segment, and its neighbours."""

    def __init__(self, index, canvas, segments, together):
        self.index, self.cv, self.segments, self.together = index, canvas, segments, together

    def __len__(self):
        return self.index.numel()

    @property
    def density(self):
        return len(self) / max(1, self.cv.B * sum(self.cv.pixels))

    def neighbours(self, through=None):
        """The 3x3 neighbours as rows of the canvas; or, `through` another set that
        holds the 3x3 field of these pixels, as rows of that set's rows, row
        len(through) standing for the zeros outside it."""
        taps = self.index[None] + self.cv.deltas[:, None]  # (9, N): fixed offsets, the frame reads 0
        if through is not None:
            return Neighbours(through.inverse.index_select(0, taps.reshape(-1)).view(9, -1))
        return Neighbours(taps, lefts=taps[0::3])  # a row's three taps: consecutive canvas rows

    @functools.cached_property
    def inverse(self):
        """(B*H*W,) each canvas position's row in this set, len(self) elsewhere."""
        n = self.cv.B * self.cv.H * self.cv.W
        inverse = torch.full((n,), len(self), dtype=torch.long, device=self.index.device)
        return inverse.index_copy_(0, self.index, torch.arange(len(self), device=self.index.device))

    @functools.cached_property
    def band_index(self):
        """(N,) the flat positions in the band of the canvas below level 0 (canvas
        rows cv.band to the end), for pixels that lie in it."""
        shift = self.cv.band * self.cv.W  # b*H*W + y*W + x -> b*(H - band)*W + (y - band)*W + x
        return self.index - (torch.div(self.index, self.cv.H * self.cv.W, rounding_mode="floor") + 1) * shift

    def gather(self, canvas):
        """(N, C) the rows of a canvas at these pixels."""
        return _rows(canvas).index_select(0, self.index)

    def scatter(self, rows):
        """(N, C) rows -> a canvas, channels_last, 0 elsewhere."""
        return _scatter(rows, self.index, self.cv.B, self.cv.H, self.cv.W)


def index_masks(masks, canvas):
    """Several (B, H, W) canvas masks -> their ActiveRows and their (k, B) pixel
    counts per image, with one `nonzero` for all of them: on a GPU the host waits
    for the device once per router phase, not once per mask. Each mask's pixels
    come in the canvas order (by image, then level), so that each GroupNorm segment
    is a block of rows; the masks' segments are disjoint (mask i's are i * S ..
    i * S + S - 1), so that the rows of several masks can be normalised in one pass."""
    k, P = len(masks), len(canvas.order)
    ordered = torch.stack(masks).reshape(k, -1).index_select(1, canvas.order)  # (k, P): the frame is never on
    flat = ordered.reshape(-1).nonzero().squeeze(1)  # sorted by mask, then canvas order
    index = canvas.order.index_select(0, flat % P)
    together = Segments(canvas.segments(k).index_select(0, flat), k * canvas.num_segments)  # all k masks' rows
    blocks = torch.bincount(together.index, minlength=together.num).view(k, -1)  # (k, B * L): rows per block
    sizes = blocks.tolist()  # the one wait for the device
    totals = [sum(b) for b in sizes]
    parts = zip(index.split(totals), together.index.split(totals), sizes)
    sets = [ActiveRows(i, canvas, Segments(s, together.num, together, b), together) for i, s, b in parts]
    return sets, blocks.view(k, canvas.B, -1).sum(2)


# -----------------------------------------------------------------------------
# The dynamic head on the canvas: the steps of dynhead.Router, all levels at once

def conv_at(x, at, weight):
    """(N, C_out): a 3x3 conv of the canvas x at the pixels `at`; gathered, or the
    dense conv of the whole canvas where the dispatch rule says it is faster."""
    if use_dense(at.density, "conv", x.device):
        return at.gather(F.conv2d(x, weight, padding=1))
    return gather_conv(_rows(x), at.neighbours(), weight, None, False, at.cv.B * at.cv.H * at.cv.W)


class _ScaleConvs(torch.autograd.Function):
    """Step 1's depthwise convs of the canvas x, the down path's and the up path's,
    as rows at the pixels where each runs. Dense (gathering a depthwise conv loses
    to oneDNN's and cuDNN's at every density, BENCHMARKS.md); the up path's conv
    runs on the band below level 0 only (level 0, two thirds of the canvas, has no
    up path). Backward: each path's row gradients in a lent zero map (no map filled
    with zeros for them), one conv backward each, the band's input gradient added
    into the down path's."""

    @staticmethod
    def forward(ctx, x, w_down, b_down, w_up, b_up, at_down, at_up):
        C, band = x.shape[1], at_down.cv.band
        down = _rows(F.conv2d(x, w_down, b_down, padding=1, groups=C)).index_select(0, at_down.index)
        up = _rows(F.conv2d(x[:, :, band:], w_up, b_up, padding=1, groups=C)).index_select(0, at_up.band_index)
        ctx.save_for_backward(x, w_down, w_up)
        ctx.sets, ctx.biases = (at_down, at_up), (b_down is not None, b_up is not None)
        return down, up

    @staticmethod
    def backward(ctx, g_down, g_up):
        x, w_down, w_up = ctx.saved_tensors
        (at_down, at_up), (B, C, H, W), band = ctx.sets, x.shape, ctx.sets[0].cv.band
        need = ctx.needs_input_grad
        grads = []
        for g, src, w, index, has_bias, mask in (
                (g_down, x, w_down, at_down.index, ctx.biases[0], [need[0], need[1], need[2]]),
                (g_up, x[:, :, band:], w_up, at_up.band_index, ctx.biases[1], [need[0], need[3], need[4]])):
            with _lent_zeros(B, src.shape[2], W, g.to(x.dtype), index) as g_map:
                grads.append(torch.ops.aten.convolution_backward(
                    g_map, src, w, [C] if has_bias else None, [1, 1], [1, 1], [1, 1], False, [0, 0], C, mask))
        (gx, gw_down, gb_down), (gx_up, gw_up, gb_up) = grads
        if gx is not None:
            gx[:, :, band:] += gx_up
        return gx, gw_down, gb_down if ctx.biases[0] else None, gw_up, gb_up if ctx.biases[1] else None, None, None


def scale_convs(x, sets, paths):
    """The depthwise convs of the down and up paths (_ScaleConvs): their rows at the
    ActiveRows `sets`, under autocast in its dtype."""
    (down, up), (at_down, at_up) = paths, sets
    tensors = _autocast(x, down.conv.weight, down.conv.bias, up.conv.weight, up.conv.bias)
    with torch.autocast(x.device.type, enabled=False):
        return _ScaleConvs.apply(*tensors, at_down, at_up)


def conv_from_rows(rows, source, at, weight):
    """(N, C_out): a 3x3 conv at the pixels `at` of a map that is `rows` on the
    pixels `source` (which hold the 3x3 field of `at`) and 0 elsewhere: the depth
    path's conv2 reads conv1's output without a canvas in between. `rows` may hold
    one row more, of zeros (group_norm_rows' zero_row): what the gather reads
    outside `source`, made here otherwise."""
    if use_dense(at.density, "conv", rows.device):
        return at.gather(F.conv2d(source.scatter(rows[:len(source)]), weight, padding=1))
    padded = rows if len(rows) > len(source) else F.pad(rows, (0, 0, 0, 1))  # row len(source): zeros
    return gather_conv(padded, at.neighbours(through=source), weight, None, False, at.cv.B * at.cv.H * at.cv.W)


def gate_logits(gate, x, cv, valid):
    """A gate conv over the whole canvas: (B, P, H, W) logits, -inf where a level
    has no such path (and on the frame), so that the gate there is exactly 0."""
    v = gate_conv2d(x, gate.conv.weight, gate.conv.bias)
    if gate.coarse:  # Tab. 1's coarse gates: one value per image, level and path
        v = v.clone()
        for n in range(len(cv.regions)):
            region = cv.region(v, n)
            region.copy_(region.mean((2, 3), keepdim=True).expand_as(region))
    return v + valid  # `valid`: 0 where the path exists, -inf elsewhere


def scale_paths(router, x, cv, tally):
    """Step 1 on the canvas: the down and up paths of every level, each computed
    where its gate is on, their GroupNorms in one pass. Returns what each sends:
    its rows and their ActiveRows."""
    paths = (router.down, router.up)
    gate = None
    if router.scale_gate is not None:
        gate, active = router.scale_gate.activate(gate_logits(router.scale_gate, x, cv, cv.scale_valid))
        tally.gate_conv(router.gate_macs, cv.scale_pixels)
        sets, counts = index_masks([active[:, 0], active[:, 1]], cv)
        soft = gate.sum((2, 3))  # (B, 2): Eq. 4, not detached
        if router.down.dense_norm:  # the authors' statistics: every pixel computed, the gate zeroes the rest
            sets = cv.scale_sets
    else:
        sets = cv.scale_sets  # ungated (Tab. 3): every pixel that has the path
    ys = scale_convs(x, sets, paths)
    sent = []
    for i, (name, path, at, y) in enumerate(zip(("down", "up"), paths, sets, group_norm_paths(ys, sets, paths))):
        if gate is None:
            tally.add(path, cv.path_pixels[i])
        else:
            g = gate[:, i:i + 1]
            y = y.mul_(at.gather(g)) if _in_place() else y * at.gather(g)  # y: this step's own rows
            tally.add(path, cv.path_pixels[i], soft[:, i], counts[i])
            for n in (range(len(cv.regions) - 1) if name == "down" else range(1, len(cv.regions))):
                tally.record(name, n, cv.region(g, n))
        sent.append((y, at))
    return sent


def group_norm_paths(ys, sets, paths):
    """The GroupNorms of the down and up paths' rows: block by block where both
    may (_by_blocks), else the statistics of both in one pass (their segments are
    disjoint), each path's affine after."""
    gns = [path.gn for path in paths]
    if all(_by_blocks(y, at.segments) for y, at in zip(ys, sets)):
        return [group_norm_rows(y, at.segments, gn.num_groups, gn.weight, gn.bias, gn.eps)
                for y, at, gn in zip(ys, sets, gns)]
    normed = normalise_rows(torch.cat(ys), sets[0].together, gns[0].num_groups, gns[0].eps)
    return [torch.addcmul(gn.bias, n, gn.weight).to(y.dtype)
            for y, n, gn in zip(ys, normed.split([len(at) for at in sets]), gns)]


def aggregate(router, x, sent, cv):
    """Step 2 on the canvas: a = alpha * (arrivals) + beta * x; `sent`: the rows of
    the scale-down and scale-up paths, and their ActiveRows."""
    (down, at_down), (up, at_up) = sent
    in_place = _in_place() and torch.result_type(x, router.beta) == x.dtype  # a in x's dtype (not so under autocast)
    return _Aggregate.apply(cv, x, down, at_down, up, at_up, router.alpha, router.beta, in_place)


def depth_path(router, a, cv, tally):
    """Step 3 on the canvas: the gated residual block. Conv1 runs on M1 (M2 dilated
    by conv2's field), conv2 on M2, each GroupNorm over its own rows; the gate and
    the residual apply on M2's rows, and elsewhere the output is relu(a)."""
    path = router.depth
    gate = None
    if router.depth_gate is not None:
        gate, active = router.depth_gate.activate(gate_logits(router.depth_gate, a, cv, cv.depth_valid))
        tally.gate_conv(router.gate_macs, cv.depth_pixels)
        pooled = max3x3(gate) * cv.depth_on  # Eq. 4: the gate over conv1's field
        M1, M2 = pooled[:, 0] > 0, active[:, 0]  # M1: M2 dilated by conv2's 3x3 field (Fig. 3)
        (R1, R2), counts = index_masks([M1, M2], cv)
        tally.add(path, cv.depth_pixels, (gate + pooled).sum((1, 2, 3)), counts.sum(0))
        for n in range(len(cv.regions)):
            tally.record("depth", n, cv.region(gate, n))
    else:
        R1 = R2 = cv.depth_set
        tally.add(path, cv.depth_pixels)
    gn1, gn2 = path.gn1, path.gn2
    y = conv_at(a, R1, path.conv1.weight)
    zero_row = not use_dense(R2.density, "conv", a.device)  # conv2 gathers: it reads a zero row outside R1
    y = group_norm_rows(y, R1.segments, gn1.num_groups, gn1.weight, gn1.bias, gn1.eps, zero_row)
    y = conv_from_rows(F.relu(y, inplace=True), R1, R2, path.conv2.weight)
    y = group_norm_rows(y, R2.segments, gn2.num_groups, gn2.weight, gn2.bias, gn2.eps)
    if gate is not None:
        y = y.mul_(R2.gather(gate)) if _in_place() else y * R2.gather(gate)
    return _Residual.apply(a, y, R2, _in_place())  # Eq. 2: relu(a + gate * block) on M2, relu(a) elsewhere


def _in_place():
    """Whether a step of the head may overwrite the canvas it is given: without
    autograd nothing keeps a canvas (each is made by the head, and no step reads
    it after the one that overwrites it)."""
    return not torch.is_grad_enabled()


class _Residual(torch.autograd.Function):
    """relu(a + r) for a canvas `a` and rows `r` at the pixels `at` (0 elsewhere):
    the depth path's output. One pass over the canvas; backward is ReLU's, whose
    gradient is a's whole and r's at the pixels `at` (no map of r is made).
    `in_place`: without autograd, a is overwritten by the output (and r used up)."""

    @staticmethod
    def forward(ctx, a, r, at, in_place):
        a_rows = _rows(a).index_select(0, at.index)
        # r: rows the head made for this; under autocast r may be bf16 and a fp32: the sum in a's dtype
        rows = (r.add_(a_rows) if in_place and r.dtype == a.dtype else a_rows + r).clamp_min_(0)
        if in_place:  # `a` itself returned: a view of its rows could carry odd strides that make convs copy it
            ctx.mark_dirty(a)
            _rows(a).clamp_min_(0).index_copy_(0, at.index, rows)
            return a
        out = _rows(a).clamp_min(0).index_copy_(0, at.index, rows)
        ctx.save_for_backward(out)
        ctx.at = at
        return out.view(at.cv.B, at.cv.H, at.cv.W, -1).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(_rows(grad), out, 0)  # the gradient where the output is positive
        cv = ctx.at.cv
        return g.view(cv.B, cv.H, cv.W, -1).permute(0, 3, 1, 2), g.index_select(0, ctx.at.index), None, None


def run_head(head, features, tally):
    """The routers of a dynamic head (dynhead.DynamicHead) over a pyramid, on one
    canvas: the same numbers as the per-level reference, values and gradients. On
    the devices of STATIC, sparse_gpu.py's engine runs it (static shapes, no host
    sync, Triton's masked convs)."""
    if features[0].device.type in STATIC:
        import sparse_gpu
        return sparse_gpu.run_head(head, features, tally)
    sizes = tuple(tuple(f.shape[-2:]) for f in features)
    cv = Canvas.of(sizes, features[0].shape[0], features[0].device)
    x = _Pack.apply(cv, *features)
    for step, router in enumerate(head.routers):
        tally.step = step
        a = aggregate(router, x, scale_paths(router, x, cv, tally), cv)
        x = depth_path(router, a, cv, tally)
    return list(_Unpack.apply(cv, x))
