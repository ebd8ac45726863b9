"""
Gather-scatter masked convolutions: the gate sparsity of the dynamic head turned
into wall-clock speed (Song et al., NeurIPS 2020, §2.2.3 and Fig. 3).

A gate that is exactly 0 at a pixel means the path's conv is not needed there.
The paper counts the saving in FLOPs; the authors' code never shipped a fast
masked conv. Here it is, in pure PyTorch, for training and inference, any batch,
CPU and GPU, dense (3x3, C -> C') and depthwise convs:

    1. index the mask once (`prepare_masks`): the flat positions of the active
       pixels, and for each of them the 9 neighbours of a 3x3 window -- clamped
       to the image, with the taps that fall outside it marked to be zeroed
       (no padding of the whole map);
    2. over chunks of n pixels, on the CPU for each of the 9 taps (dy, dx) of the
       window: gather the (n, C) rows of the active pixels' neighbours at that
       offset from the channels-last map, and add rows @ W_tap, a (C, C') GEMM,
       into an (n, C') accumulator -- or a multiply-add per channel for
       depthwise; on a GPU gather the (n, 9C) windows at once and run one GEMM;
    3. scatter the (n, C') rows back into a zero map.

Nine GEMMs of K = C rather than one im2col GEMM of K = 9C: the same arithmetic,
but a chunk needs 2-3 rows per pixel of working memory (forward, backward) instead
of 10, so that within the same budget each GEMM runs on 3x more pixels in fp32
(1.5x in bf16) -- on the CPU, 5-15% faster. On a GPU, where the time goes into
launching kernels, the one GEMM of im2col wins (GATHER).

Backward is the same gather -> GEMM -> scatter-add in reverse, so gradients are
exact: the gate activation has zero value and zero gradient where it is 0 (Eq. 3),
so the skipped pixels contribute nothing to any gradient (DESIGN §4).

Where gathering loses to the dense conv (high density, tiny maps), `masked_conv2d`
runs the dense conv and masks it: same numbers either way. The thresholds come
from bench.py, per device type.

Map:
    ActiveSet, prepare_masks  the indexed masks, shared by every conv and GN on them
    masked_conv2d             gather -> GEMM -> scatter (or the dense fallback)
    masked_group_norm(s)      GroupNorm statistics over the active pixels only (of several maps at once)
    gate_conv2d               the gates' dense 3x3 conv C -> 1-2, fast on the CPU
    DENSE_ABOVE, use_dense    the dispatch rule
"""
import functools

import torch
import torch.nn.functional as F

# The dispatch rule: above these densities (fraction of active pixels) the dense
# conv is faster than gather-scatter, as measured by `python bench.py` (README).
# CPU (fp32): the conv gathers faster up to density 0.7, ties at 0.8, and loses at
# 1.0, in inference and training alike. The memory-bound depthwise conv gathers
# faster alone only at 5-10% density (by up to 1.8x on a P3 map), and in the whole
# head not at all (levels are small, 1262 ms dense against 1344 ms gathered at 10%
# executed MACs), so it always runs dense. CUDA (H100, bf16, batch 1 and 8, P3 map):
# cuDNN's dense conv (0.07 ms at batch 1, 0.33 ms at batch 8) beat gathering at
# every density down to 0.05. The im2col kernel alone, the mask already indexed,
# takes 0.47 ms at density 0.1 and 0.28 ms at 0.05 (batch 8): the unfused gather ->
# GEMM -> scatter moves ~9x the active input through memory. Indexing a mask for
# it (`nonzero` and the 3x3 taps, some 20 small ops) costs another 0.35-0.4 ms. So
# on CUDA every masked conv runs dense (the gather kernel stays exact there and is
# tested; a fused kernel would be needed to win); the GroupNorms still run over the
# active pixels only, which is where the head saves time on a GPU.
DENSE_ABOVE = {
    ("cpu", "conv"): 0.7,
    ("cpu", "depthwise"): 0.0,
    ("cuda", "conv"): 0.0,
    ("cuda", "depthwise"): 0.0,
}
MIN_PIXELS = 64  # maps with fewer pixels per image run dense: nothing to gain
# The form of the gather kernel, per device type (_MaskedConv): nine shifted GEMMs
# on the CPU (less memory per pixel, so larger GEMMs: faster there), one im2col
# GEMM on a GPU (a handful of kernel launches per chunk instead of ~30: on an H100,
# batch 8, density 0.1, 0.47 ms against 1.29 ms, and 2.9 ms against 5.6 ms for a
# training step).
GATHER = {"cpu": "taps", "cuda": "im2col"}
# The working memory of one chunk of pixels (see _chunks): at most CHUNK_BYTES, and
# at most the output map's size over CHUNK_SHARE (so that gathering needs less
# memory than the dense conv), but never below MIN_CHUNK_BYTES. CPU: chunks of a few
# MB stay in cache (1.5x to 4x larger ones measured no faster in the head, 2x smaller
# ones 5% slower). CUDA: every chunk costs kernel launches, so fewer, larger ones (on
# an H100, the im2col kernel forced on a batch-8 bf16 P3 conv at density 0.1: chunks
# of a quarter of the output map 0.63 ms, half 0.47 ms, the whole map 0.39 ms; half
# keeps the sparse path's memory below the dense conv's and its mask's).
CHUNK_BYTES = {"cpu": 8 * 2 ** 20, "cuda": 256 * 2 ** 20}
CHUNK_SHARE = {"cpu": 4, "cuda": 2}
MIN_CHUNK_BYTES = 2 * 2 ** 20  # smaller chunks make GEMMs too small to run fast


def _check_mask(mask):
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a (B, H, W) bool tensor, got {tuple(mask.shape)} {mask.dtype}")


class ActiveSet:
    """A (B, H, W) bool mask, indexed once -- when first needed -- and reused by
    every conv and GroupNorm that shares it. Indexing a mask costs a host sync on a
    GPU (`nonzero`'s size is data-dependent): `prepare_masks` indexes all the masks
    of a router phase with one `nonzero`. The 3x3 neighbours (`taps`) cost no sync;
    the CPU kernel's per-chunk lists of border taps (`cuts`) one per mask."""

    def __init__(self, mask, index=None):
        _check_mask(mask)
        self.mask = mask
        if index is not None:  # else the mask is indexed when first needed
            self.index = index
        self._taps = None
        self._cuts = {}  # chunk size -> outside taps per chunk

    @functools.cached_property
    def index(self):
        """(N,) the active pixels' flat positions b*H*W + y*W + x."""
        return self.mask.reshape(-1).nonzero().squeeze(1)

    @property
    def indexed(self):
        return "index" in self.__dict__

    @property
    def density(self):
        return self.index.numel() / max(1, self.mask.numel())

    @functools.cached_property
    def batch(self):
        """(N,) the image of each active pixel."""
        B, H, W = self.mask.shape
        return torch.div(self.index, H * W, rounding_mode="floor")

    def __len__(self):
        return self.index.numel()

    def taps(self):
        """(9, N) flat index of each active pixel's 3x3 neighbours, tap by tap (tap
        t = 3 * (dy + 1) + (dx + 1)), clamped into the image; and (9, N) bool, the
        taps that fall outside it. No host sync: the sizes are known."""
        if self._taps is None:
            B, H, W = self.mask.shape
            yx = self.index % (H * W)
            y, x = torch.div(yx, W, rounding_mode="floor"), yx % W
            d = torch.arange(-1, 2, device=y.device)
            ny = y[None, None, :] + d[:, None, None]  # (3, 1, N): dy
            nx = x[None, None, :] + d[None, :, None]  # (1, 3, N): dx
            outside = (ny < 0) | (ny >= H) | (nx < 0) | (nx >= W)  # (3, 3, N)
            flat = self.batch * H * W + ny.clamp(0, H - 1) * W + nx.clamp(0, W - 1)  # (3, 3, N)
            self._taps = flat.reshape(9, -1), outside.reshape(9, -1)
        return self._taps

    def cuts(self, step):
        """For each chunk of `step` pixels and each tap, the chunk's pixels (counted
        from the chunk's first) whose tap falls outside the image: one host sync per
        mask and chunk size, not one per chunk."""
        if step not in self._cuts:
            outside = self.taps()[1].reshape(-1).nonzero().squeeze(1)  # positions in (9, N) laid flat
            n = max(1, len(self))
            num_chunks = -(-n // step)
            tap, pixel = torch.div(outside, n, rounding_mode="floor"), outside % n
            chunk = torch.div(pixel, step, rounding_mode="floor")
            # `outside` runs tap by tap, pixel by pixel: sorted by (tap, chunk)
            sizes = torch.bincount(tap * num_chunks + chunk, minlength=9 * num_chunks).tolist()
            parts = (pixel - chunk * step).split(sizes)
            self._cuts[step] = [[parts[t * num_chunks + c] for t in range(9)] for c in range(num_chunks)]
        return self._cuts[step]


def prepare_mask(mask):
    """Wrap a bool mask as an ActiveSet, indexed when first needed and then shared;
    None (compute everything) passes through."""
    if mask is None or isinstance(mask, ActiveSet):
        return mask
    return ActiveSet(mask)


def prepare_masks(masks):
    """Index several bool masks (None passes through) with one `nonzero` over all of
    them: on a GPU, the host waits once for the work queued before (then twice
    more, briefly, for the masks' shares) instead of once per mask. A router phase
    that indexed each of its 8-10 masks (5 levels) on its own would stall the GPU
    as many times. A lone mask is only wrapped (indexed when first needed)."""
    todo = [m for m in masks if m is not None and not isinstance(m, ActiveSet)]
    if len(todo) < 2:
        return [prepare_mask(m) for m in masks]
    for m in todo:
        _check_mask(m)
    index = torch.cat([m.reshape(-1) for m in todo]).nonzero().squeeze(1)  # (N,) into the masks laid end to end
    starts = [0]
    for m in todo:
        starts.append(starts[-1] + m.numel())
    # each mask's share of `index` (its queue drained by `nonzero`, the GPU answers at once)
    cuts = torch.searchsorted(index, torch.tensor(starts, device=index.device)).tolist()
    prepared = iter([ActiveSet(m, index[cuts[i]:cuts[i + 1]] - starts[i]) for i, m in enumerate(todo)])
    return [m if m is None or isinstance(m, ActiveSet) else next(prepared) for m in masks]


def use_dense(active, kind, x):
    """The dispatch rule: run the dense conv where gathering would be slower. Where
    it would be slower at any density (a threshold of 0: every conv on a GPU), a
    mask not yet indexed is not indexed for it (on a GPU, a host sync that alone
    costs as much as the conv); an indexed empty mask still costs nothing."""
    B, H, W = active.mask.shape
    threshold = DENSE_ABOVE.get((x.device.type, kind), 0.0)
    if H * W < MIN_PIXELS or (threshold <= 0 and not active.indexed):
        return True
    return active.density > threshold


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


def _chunks(active, pixel_bytes, out_bytes, cut_lists):
    """Yield (start, stop, taps, border) over the active pixels: the chunk's (9, n)
    neighbour indices and the taps to zero -- per tap, the chunk's pixels whose tap
    is outside the image (cut_lists, the CPU's nine GEMMs: few rows to zero, one
    host sync per mask) or the (9, n) bool map of them (im2col: one masked fill,
    no sync). A chunk's working set, `pixel_bytes` per pixel, stays under
    CHUNK_BYTES and, on large maps, under a share of the output map, so that the
    sparse path needs no more memory than the dense conv and its mask."""
    taps, outside = active.taps()
    n, device = len(active), taps.device.type
    cap = CHUNK_BYTES.get(device, CHUNK_BYTES["cuda"])
    share = CHUNK_SHARE.get(device, CHUNK_SHARE["cuda"])
    step = max(1, min(cap, max(out_bytes // share, MIN_CHUNK_BYTES)) // pixel_bytes)
    num_chunks = max(1, -(-n // step))
    step = max(1, -(-n // num_chunks))  # chunks of near-equal size, not a small GEMM left at the end
    cuts = active.cuts(step) if cut_lists else None
    for i, start in enumerate(range(0, max(n, 1), step)):  # an empty set still makes one (empty) pass
        stop = min(n, start + step)
        yield start, stop, taps[:, start:stop], cuts[i] if cut_lists else outside[:, start:stop]


def _gather(rows, taps, cut):
    """(n, C): the rows of one tap of n pixels; taps beyond the border read zero."""
    g = rows.index_select(0, taps)
    if cut.numel():
        g.index_fill_(0, cut, 0)
    return g


def _windows(rows, taps, outside):
    """(n, 9, C): the 3x3 windows of n pixels, gathered at once (im2col); taps
    beyond the border zeroed."""
    n = taps.shape[1]
    cols = rows.index_select(0, taps.t().reshape(-1)).view(n, 9, rows.shape[1])
    return cols.masked_fill_(outside.t()[:, :, None], 0)


def _accumulate(acc, y):
    """acc + y, in place once acc exists, kept in fp32 at least: sums of many bf16
    terms (9 taps, many chunks) would otherwise add up their roundings."""
    return y.to(torch.promote_types(y.dtype, torch.float32)) if acc is None else acc.add_(y)


def _multiply_add(acc, a, b, depthwise):
    """acc + a @ b (depthwise: a * b), as `_accumulate`, with no temporary in fp32."""
    if acc is not None and acc.dtype == a.dtype:
        return acc.addcmul_(a, b) if depthwise else acc.addmm_(a, b)
    return _accumulate(acc, a * b if depthwise else a @ b)


def _rows(t):
    """(B, C, H, W) -> (B*H*W, C) pixel rows; a view when t is channels_last."""
    B, C, H, W = t.shape
    return t.permute(0, 2, 3, 1).reshape(B * H * W, C)


def _tap_weights(weight, depthwise):
    """(C_out, C_in, 3, 3) -> per tap t = 3 * ky + kx: (9, C_in, C_out) matrices,
    or (9, C) per-channel factors for a depthwise conv."""
    if depthwise:
        return weight.reshape(weight.shape[0], 9).t()
    w = weight.permute(2, 3, 1, 0).reshape(9, weight.shape[1], weight.shape[0])  # a view if channels_last
    return w if 1 in w.stride()[1:] else w.contiguous()  # GEMMs read a matrix with a unit stride


class _MaskedConv(torch.autograd.Function):
    """Gather -> GEMM -> scatter over chunks of active pixels, in one of two forms
    that do the same arithmetic (GATHER picks one per device type):

    - "taps", nine shifted GEMMs: for each tap t of the 3x3 window, gather the
      (n, C) rows of the neighbours at that offset and add rows @ W_t into an
      (n, C_out) accumulator. 2 rows per pixel of working memory (3 in backward)
      where im2col needs 9 + 1, so 3x larger GEMMs in the same budget (fp32): on
      the CPU, one conv ran 5-15% faster than with im2col, and the D8 head 5%
      (inference) and 11% (training) faster at 25%.
    - "im2col": gather the (n, 9C) windows at once and run one GEMM with the
      (9C, C_out) weights. A handful of kernel launches per chunk instead of ~30:
      on a GPU, where each launch costs the host more than a small GEMM costs
      the device, that is what counts.

    Backward gathers again rather than saving anything gathered."""

    @staticmethod
    def forward(ctx, x, weight, bias, active, depthwise):
        B, C, H, W = x.shape
        C_out = weight.shape[0]
        im2col = GATHER.get(x.device.type, "im2col") == "im2col"
        rows, w = _rows(x), _tap_weights(weight, depthwise)
        out = x.new_zeros(B * H * W, C_out)
        # working memory per pixel: the windows (and, depthwise, their product with the
        # weights) and the fp32 result; or, nine GEMMs, one tap's rows and the accumulator
        pixel_bytes = ((2 if depthwise else 1) * 9 * C * x.element_size() + C_out * 4) if im2col else \
            3 * max(C, C_out) * 4
        for start, stop, taps, border in _chunks(active, pixel_bytes, out.numel() * out.element_size(), not im2col):
            if im2col:
                cols = _windows(rows, taps, border)  # (n, 9, C)
                acc = (cols * w).sum(1) if depthwise else cols.view(len(cols), 9 * C) @ w.reshape(9 * C, C_out)
                del cols
            else:
                acc = None
                for t in range(9):
                    acc = _multiply_add(acc, _gather(rows, taps[t], border[t]), w[t], depthwise)
            if bias is not None:
                acc += bias
            out.index_copy_(0, active.index[start:stop], acc.to(out.dtype))  # scatter this chunk at once
            del acc  # free this chunk before the next one is gathered
        ctx.save_for_backward(x, weight)
        ctx.active, ctx.depthwise, ctx.has_bias, ctx.im2col = active, depthwise, bias is not None, im2col
        return out.view(B, H, W, C_out).permute(0, 3, 1, 2)  # channels_last

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        active, depthwise, im2col = ctx.active, ctx.depthwise, ctx.im2col
        B, C, H, W = x.shape
        C_out = weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        rows, grad_rows = _rows(x), (x.new_zeros(B * H * W, C) if need_x else None)
        grad_y_all = _rows(grad_out)
        w = _tap_weights(weight, depthwise)
        grad_w = [None] * 9  # per tap (im2col: all taps in [0]), fp32 at least
        grad_b = None
        pixel_bytes = (2 * 9 * C + C_out) * x.element_size() if im2col else 3 * max(C, C_out) * 4
        for start, stop, taps, border in _chunks(active, pixel_bytes, grad_out.numel() * x.element_size(),
                                                 not im2col):
            gy = grad_y_all.index_select(0, active.index[start:stop])  # (n, C_out)
            if need_b:
                grad_b = _accumulate(grad_b, gy.sum(0))
            if im2col:
                n = len(gy)
                if need_w:  # dL/dW = cols^T @ gy, or per channel and tap sum(cols * gy)
                    cols = _windows(rows, taps, border)
                    grad_w[0] = _accumulate(grad_w[0], (cols * gy[:, None]).sum(0)) if depthwise else \
                        _multiply_add(grad_w[0], cols.view(n, 9 * C).t(), gy, False)
                    del cols
                if need_x:  # dL/dcols = gy @ W^T, added back where the windows came from
                    gcols = gy[:, None] * w if depthwise else (gy @ w.reshape(9 * C, C_out).t()).view(n, 9, C)
                    gcols.masked_fill_(border.t()[:, :, None], 0)  # clamped border taps received nothing
                    grad_rows.index_add_(0, taps.t().reshape(-1), gcols.reshape(n * 9, C))
                    del gcols
                continue
            for t in range(9):
                if need_w:  # dL/dW_t = rows_t^T @ gy, or per channel sum(rows_t * gy)
                    g = _gather(rows, taps[t], border[t])
                    grad_w[t] = _accumulate(grad_w[t], (g * gy).sum(0)) if depthwise else \
                        _multiply_add(grad_w[t], g.t(), gy, False)
                    del g
                if need_x:  # dL/drows_t = gy @ W_t^T, added back where the rows came from
                    gx = gy * w[t] if depthwise else gy @ w[t].t()  # (n, C)
                    if border[t].numel():
                        gx.index_fill_(0, border[t], 0)  # clamped border taps received nothing
                    grad_rows.index_add_(0, taps[t], gx)  # the transpose of the gather
                    del gx
        grad_x = grad_rows.view(B, H, W, C).permute(0, 3, 1, 2) if need_x else None
        grad_weight = grad_bias = None
        if need_w:
            grad_w = grad_w[0].reshape(9, C, -1) if im2col else torch.stack(grad_w)  # (9, C_in, C_out); (9, C) depthwise
            if depthwise:  # -> (C, 1, 3, 3)
                grad_weight = grad_w.reshape(9, C).t().reshape(C, 1, 3, 3)
            else:  # -> (C_out, C_in, 3, 3)
                grad_weight = grad_w.reshape(3, 3, C, C_out).permute(3, 2, 0, 1)
            grad_weight = grad_weight.to(weight.dtype)
        if need_b and ctx.has_bias:
            grad_bias = grad_b.to(weight.dtype)
        return grad_x, grad_weight, grad_bias, None, None


def masked_conv2d(x, mask, weight, bias=None, groups=1):
    """3x3 conv, stride 1, padding 1, computed only where `mask` is true (each
    image its own mask) and 0 elsewhere. groups=1 (dense) or groups=C (depthwise).

    x (B, C, H, W); mask (B, H, W) bool, an ActiveSet, or None (everywhere).
    Returns (B, C_out, H, W), channels_last when gathered.
    """
    if mask is None:
        return F.conv2d(x, weight, bias, padding=1, groups=groups)
    active = prepare_mask(mask)
    _check(x, active, weight, groups)
    depthwise = groups > 1
    if use_dense(active, "depthwise" if depthwise else "conv", x):
        y = F.conv2d(x, weight, bias, padding=1, groups=groups)
        return y * active.mask[:, None].to(y.dtype)
    if torch.is_autocast_enabled(x.device.type):  # AMP: compute in its dtype, as F.conv2d would
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return _MaskedConv.apply(x, weight, bias, active, depthwise)


def gate_conv2d(x, weight, bias):
    """The gates' 3x3 conv C -> P (P = 1 or 2 paths), run on every pixel. CPU conv
    kernels are slow for so few output channels: a 1x1 conv to 9P channels, then
    the sum of the 9 shifted taps, computes the same about 4x faster here."""
    if x.device.type != "cpu":
        return F.conv2d(x, weight, bias, padding=1)
    B, C, H, W = x.shape
    P = weight.shape[0]
    taps = F.conv2d(x, weight.permute(2, 3, 0, 1).reshape(9 * P, C, 1, 1))  # (B, 9P, H, W)
    taps = F.pad(taps, (1, 1, 1, 1))  # a small map: 9P channels
    out = bias.view(1, P, 1, 1).expand(B, P, H, W)
    for t in range(9):  # tap (dy, dx) of output pixel (y, x) was computed at (y + dy - 1, x + dx - 1)
        dy, dx = divmod(t, 3)
        out = out + taps[:, t * P:(t + 1) * P, dy:dy + H, dx:dx + W]
    return out


def masked_group_norm(x, mask, num_groups, weight, bias, eps=1e-5):
    """GroupNorm whose statistics are taken over the active pixels of each image
    and group only (DESIGN §4); 0 outside the mask.

    All images at once, with no per-image loop and no host sync: per-(image, group)
    sums are scattered with `index_add_` by each pixel's image, then each pixel is
    normalised with its own image's statistics. Statistics in fp32 at least, two
    passes (mean, then the mean square deviation) for accuracy. The output stays
    in the autograd graph of x, weight and bias even when the mask is empty, so
    DDP sees every parameter used."""
    return masked_group_norms([x], [mask], num_groups, weight, bias, eps)[0]


def masked_group_norms(xs, masks, num_groups, weight, bias, eps=1e-5):
    """masked_group_norm of several maps that share one GroupNorm's weights -- the
    levels of a pyramid, as the head's paths share theirs -- in one pass: the
    active pixels of every map are gathered into one matrix, and each (map, image)
    is a segment with statistics of its own. The same numbers as one call per map,
    in about a third of the kernel launches for five levels: on a GPU, where the
    head's time goes into launching small kernels, that is what counts."""
    if len(xs) != len(masks):
        raise ValueError(f"{len(xs)} maps but {len(masks)} masks; give one mask (or None) per map")
    if not xs:
        return []
    if any(m is None for m in masks):  # fixed mode: plain GroupNorm, map by map
        return [F.group_norm(x, num_groups, weight, bias, eps) if m is None else
                masked_group_norm(x, m, num_groups, weight, bias, eps) for x, m in zip(xs, masks)]
    actives = [prepare_mask(m) for m in masks]
    B, C = xs[0].shape[:2]
    for x, active in zip(xs, actives):
        if x.dim() != 4 or x.shape[:2] != (B, C) or x.dtype != xs[0].dtype or x.device != xs[0].device:
            raise ValueError(f"maps normalised together must all be (B, C, H, W) with (B, C) = {(B, C)}, "
                             f"of one dtype and device; got {tuple(x.shape)} {x.dtype} on {x.device}")
        if tuple(active.mask.shape) != (B, *x.shape[2:]):
            raise ValueError(f"mask must be (B, H, W) = {(B, *x.shape[2:])} to match x, got {tuple(active.mask.shape)}")
    if C % num_groups:
        raise ValueError(f"{C} channels are not divisible into {num_groups} groups")
    G, dtype = num_groups, torch.promote_types(xs[0].dtype, torch.float32)
    parts = [_rows(x).index_select(0, active.index) for x, active in zip(xs, actives)]  # active pixels only
    rows = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype).view(-1, G, C // G)
    del parts
    segment = actives[0].batch if len(actives) == 1 else \
        torch.cat([active.batch + i * B for i, active in enumerate(actives)])  # (N,) map * B + image
    S, N = len(actives) * B, len(rows)
    count = rows.new_zeros(S).index_add_(0, segment, rows.new_ones(1).expand(N)).clamp_min_(1)[:, None]

    def segment_mean(values):  # (N, G) per pixel -> (N, G) the mean over the pixel's segment, per group
        sums = values.new_zeros(S, G).index_add_(0, segment, values)
        return (sums / count).index_select(0, segment)

    centred = rows - segment_mean(rows.mean(2))[:, :, None]  # the mean of the pixels' channel means
    del rows  # each temporary goes as soon as it is used, to keep the peak memory down
    var = segment_mean(centred.square().mean(2))
    normed = centred * torch.rsqrt(var + eps)[:, :, None]
    del centred
    y = torch.addcmul(bias, normed.view(N, C), weight).to(xs[0].dtype)
    del normed
    outs, start = [], 0
    for x, active in zip(xs, actives):  # scatter each map's rows into a zero map: in place, one map each
        _, _, H, W = x.shape
        out = x.new_zeros(B * H * W, C).index_copy_(0, active.index, y[start:start + len(active)])
        outs.append(out.view(B, H, W, C).permute(0, 3, 1, 2))
        start += len(active)
    return outs
