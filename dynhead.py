"""
Fine-grained dynamic head: the routing space, spatial gates and resource budget of
Song et al., "Fine-Grained Dynamic Head for Object Detection", NeurIPS 2020 (§2).

An FPN detector normally runs one static head per pyramid level. This module
replaces that head with a small routing network over the pyramid (Fig. 2): at
every depth step and every level a *router* decides, per pixel, which *paths* the
feature takes next -- deeper at the same scale (depth path), to the finer level
(scale-up path) or to the coarser one (scale-down path). Each decision is a
*spatial gate* in [0, 1]; where a gate is exactly 0 the path is not computed, and
a budget loss teaches the gates to switch off as much as the task allows.

This file depends on torch alone, so it can be copied into another detector.
When sparse.py (gather-scatter kernels) sits beside it, the gated convolutions
run there and the sparsity becomes wall-clock speed; otherwise the dense
reference below computes the very same numbers.

Map, in the paper's order:
    gate_activation        Eq. 3, the gate activation delta(v)
    SpatialGate            §2.2.1, Fig. 3c: 3x3 conv -> (GAP) -> activation
    masked_conv2d,         the one seam for masked computation (§2.2.3, §2.3):
    masked_group_norm(s),    dense references with GN over the computed pixels
    gate_conv2d, prepare_masks
    DepthPath, ScalePath   §2.2.3: the paths a router can send a pixel along
    Router                 §2.1, Eq. 2: one depth step of the routing space
    HeadCost               Eq. 4-5: soft budget, executed and full MACs
    DynamicHead            the routing tower over the pyramid (one per branch)
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # sparse.py beside this file turns the gates' zeros into speed (§2.2.3); optional
    import sparse as _sparse
    if not hasattr(_sparse, "masked_conv2d"):  # some other package called "sparse"
        _sparse = None
except ImportError:
    _sparse = None

MODES = ("dynamic", "fixed")
ACTIVATIONS = ("proposed", "restricted_tanh", "softmax")
PATHS = ("depth", "scale")
INIT_GATE = 0.99  # every gate starts almost fully on; the budget turns them off (§2.4)


# -----------------------------------------------------------------------------
# Gate activation (§2.2.2, Eq. 3)

def gate_activation(v, tau=1.5):
    """Eq. 3: delta(v) = max(0, (tanh(v - tau) + tanh(tau)) / (1 + tanh(tau))).

    Values lie in [0, 1]; tau = 0 gives the restricted tanh max(0, tanh(v)). For
    v <= 0 both the value and the gradient are exactly 0, which is what lets a
    masked-out pixel be skipped in training as well as inference (§2.2.3).

    Near v = 0 the sum tanh(v - tau) + tanh(tau) cancels: in bf16, gates of v up
    to ~0.004 came out exactly 0 (pixels computed with a dead gradient). Written
    with exponentials (tanh x = (1 - e^-2x) / (1 + e^-2x)), Eq. 3 is

        delta(v) = (1 - e^-2v) / (1 + e^(2 (tau - v)))      for v > 0,

    with no cancellation anywhere: 1 - e^-2v is expm1, exact near 0, so every v > 0
    gives a gate > 0; the value never passes 1, and both terms of the gradient are
    >= 0. In fp32 at least; rounded back to fp16, only the gates of v up to ~3e-7
    underflow to 0.
    """
    # v <= 0 is clamped to 0, where the formula gives 0: large negative v would make
    # inf / inf, and even in the branch that torch.where discards a NaN reaches the gradient
    vf = v.to(torch.promote_types(v.dtype, torch.float32)).clamp_min(0)
    g = -torch.expm1(-2 * vf) / (1 + torch.exp(2 * (tau - vf)))
    # torch.where so that v <= 0 gives an exact 0 with an exact 0 gradient
    return torch.where(vf > 0, g, torch.zeros_like(g)).to(v.dtype)


def gate_init_bias(activation, tau, num_paths=1):
    """The gate conv's bias that makes every gate start at INIT_GATE (authors' code)."""
    if activation == "proposed":  # solve delta(b) = 0.99 for b
        t = math.tanh(tau)
        return tau + math.atanh(INIT_GATE * (1 + t) - t)
    if activation == "restricted_tanh":
        return math.atanh(INIT_GATE)
    # softmax: the paths share 0.99 and the "no path" option (logit 0) keeps 0.01
    return math.log(INIT_GATE / num_paths / (1 - INIT_GATE))


# -----------------------------------------------------------------------------
# Spatial gate (§2.2.1, Fig. 3c)

class SpatialGate(nn.Module):
    """The gates of one router input: a 3x3 conv C -> P (one gate per path), then
    the gate activation. Returns gates (B, P, H, W) in [0, 1] and the boolean
    `active` map of where each path must be computed.

    activation: "proposed" (Eq. 3 with tau), "restricted_tanh" (tau = 0), or
        "softmax" (Tab. 2's soft attention: per pixel, a softmax across the
        paths this gate conv decides -- the depth gate and the scale gates are
        separate convs on different inputs (§2.1), so they do not compete -- and
        one fixed "no path" logit 0, so a lone path is not stuck at 1; never
        exactly 0, so nothing is ever skipped).
    coarse: global average pooling between the conv and the activation -- one
        gate per image and path, Tab. 1's coarse-grained baseline.
    """

    def __init__(self, channels, num_paths, activation="proposed", tau=1.5, coarse=False):
        super().__init__()
        if not 0 <= tau <= 10:
            raise ValueError(f"tau must lie in [0, 10] (Tab. 2 tries 0.5-2; 0 is the restricted tanh; "
                             f"e^(2 tau) stays finite in fp32), got {tau}")
        self.activation, self.tau, self.coarse = activation, tau, coarse
        self.conv = nn.Conv2d(channels, num_paths, 3, padding=1)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.constant_(self.conv.bias, gate_init_bias(activation, tau, num_paths))

    def forward(self, x, paths=None, kernels=None):
        # paths: a slice of the output channels needed here (a level at the top or
        # bottom of the pyramid has no finer or coarser neighbour); default all. A
        # slice, not a list: indexing a GPU tensor with a Python list copies the list
        # to the GPU, and the host waits for the GPU to finish all its queued work.
        w, b = self.conv.weight, self.conv.bias
        if paths is not None:
            w, b = w[paths], b[paths]
        v = (kernels or DenseKernels).gate_conv2d(x, w, b)  # (B, C, H, W) -> (B, P, H, W)
        if self.coarse:  # Tab. 1 "DY" without "FG": one value per image and path
            v = v.mean((2, 3), keepdim=True)
        if self.activation == "softmax":
            v0 = torch.zeros_like(v[:, :1])
            gate = torch.softmax(torch.cat([v, v0], 1), dim=1)[:, :-1]
            active = torch.ones_like(gate, dtype=torch.bool)
        else:
            tau = self.tau if self.activation == "proposed" else 0.0
            gate = gate_activation(v, tau)
            active = v > 0  # exactly where delta(v) may be non-zero
        size = (x.shape[0], v.shape[1], x.shape[2], x.shape[3])
        return gate.expand(size), active.expand(size)


# -----------------------------------------------------------------------------
# Masked computation: the seam between the head and its kernels (§2.2.3, §2.3)
#
# Every gated conv and its GroupNorm goes through these functions. `mask` is a
# (B, H, W) bool map of the pixels to compute, or None for "all of them". The
# dense references here compute everywhere and zero the rest; sparse.py has the
# same signatures and computes only the masked pixels. GroupNorm's statistics
# are taken over the computed pixels only (a decision of this project, see the
# README), so the two agree to float tolerance in training and inference alike.

def gate_conv2d(x, weight, bias):
    """The gate conv: 3x3, every pixel (the gates decide what is skipped, §2.2.1)."""
    return F.conv2d(x, weight, bias, padding=1)


def prepare_masks(masks):
    """Turn bool masks into what the kernels take (sparse.py indexes them, all at once)."""
    return list(masks)


def masked_conv2d(x, mask, weight, bias=None, groups=1):
    """3x3 conv, stride 1, padding 1, kept where `mask` is true and 0 elsewhere."""
    y = F.conv2d(x, weight, bias, padding=1, groups=groups)
    return y if mask is None else y * mask[:, None].to(y.dtype)


def masked_group_norm(x, mask, num_groups, weight, bias, eps=1e-5):
    """GroupNorm with statistics over the masked pixels of each image and group."""
    if mask is None:
        return F.group_norm(x, num_groups, weight, bias, eps)
    B, C, H, W = x.shape
    acc = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 at least (AMP)
    m = mask[:, None, None].to(acc)                                 # (B, 1, 1, H, W)
    xg = x.to(acc).reshape(B, num_groups, C // num_groups, H, W)    # (B, G, C/G, H, W)
    count = (m.sum((2, 3, 4), keepdim=True) * (C // num_groups)).clamp_min(1)
    mean = (xg * m).sum((2, 3, 4), keepdim=True) / count
    var = ((xg - mean) ** 2 * m).sum((2, 3, 4), keepdim=True) / count
    y = ((xg - mean) * torch.rsqrt(var + eps) * m).reshape(B, C, H, W)
    y = (y * weight[:, None, None] + bias[:, None, None]) * mask[:, None]
    return y.to(x.dtype)


def masked_group_norms(xs, masks, num_groups, weight, bias, eps=1e-5):
    """masked_group_norm of several maps (the levels of a pyramid) that share one
    GroupNorm's weights; sparse.py runs them all in one pass."""
    return [masked_group_norm(x, m, num_groups, weight, bias, eps) for x, m in zip(xs, masks)]


class DenseKernels:
    """The dense reference kernels, as one namespace like the sparse module."""
    gate_conv2d = staticmethod(gate_conv2d)
    prepare_masks = staticmethod(prepare_masks)
    masked_conv2d = staticmethod(masked_conv2d)
    masked_group_norm = staticmethod(masked_group_norm)
    masked_group_norms = staticmethod(masked_group_norms)


# -----------------------------------------------------------------------------
# Paths (§2.2.3)

def conv_macs(channels, depthwise=False):
    """Per-pixel MACs of a 3x3 conv C -> C (or depthwise) plus its GroupNorm,
    which the authors count too (DESIGN §5)."""
    return (9 * channels if depthwise else 9 * channels * channels) + channels


class DepthPath(nn.Module):
    """The depth path: a residual block of two 3x3 convs C -> C with GN after each
    (the paper says "bottleneck"; the authors' code and FLOPs use this block).

        x_out = relu(m * GN(conv(relu(GN(conv(a))))) + a)

    With a gate m, conv2 is needed where m > 0 (M2) and conv1 on M2 dilated by
    conv2's 3x3 receptive field (M1 = maxpool3x3(M2), Fig. 3).
    """

    def __init__(self, channels, gn_groups):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(gn_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(gn_groups, channels)
        for conv in (self.conv1, self.conv2):
            nn.init.normal_(conv.weight, std=0.01)
        self.unit_macs = conv_macs(channels)  # per conv, per pixel

    def masks(self, active):
        """(B, H, W) active -> the masks of conv1 and conv2: M2 = active, and M1 =
        M2 dilated by conv2's 3x3 receptive field (Fig. 3). None: compute everywhere."""
        if active is None:
            return [None, None]
        return [F.max_pool2d(active[:, None].float(), 3, 1, 1)[:, 0] > 0, active]

    def forward(self, xs, gates, masks, kernels=DenseKernels):
        # Every level at once: xs[n] (B, C, H_n, W_n); gates[n] (B, 1, H_n, W_n) or None
        # (fixed mode); masks[n] = (M1, M2) from self.masks, prepared. The convs run
        # level by level; each GroupNorm, its weights shared by the levels, runs once
        # for all of them (on a GPU, one set of kernel launches instead of five).
        M1, M2 = zip(*masks)
        gn1, gn2 = self.gn1, self.gn2
        ys = [kernels.masked_conv2d(a, m, self.conv1.weight) for a, m in zip(xs, M1)]
        ys = kernels.masked_group_norms(ys, M1, gn1.num_groups, gn1.weight, gn1.bias, gn1.eps)
        ys = [kernels.masked_conv2d(F.relu(y, inplace=True), m, self.conv2.weight) for y, m in zip(ys, M2)]
        ys = kernels.masked_group_norms(ys, M2, gn2.num_groups, gn2.weight, gn2.bias, gn2.eps)
        # Eq. 2: the path's output weighted by its gate, plus the residual
        return [F.relu(a + y if g is None else torch.addcmul(a, g, y), inplace=True)
                for a, g, y in zip(xs, gates, ys)]

    def full_macs(self, hw):
        return 2 * hw * self.unit_macs

    def costs(self, gate, active):
        """Per image (B,): the soft (Eq. 4) and executed MACs of this path on one level."""
        soft_m1 = F.max_pool2d(gate, 3, 1, 1)  # Eq. 4: the gate max-pooled over conv1's field
        M1, M2 = self.masks(active)  # the pixels conv1 and conv2 really compute
        soft = (gate.sum((1, 2, 3)) + soft_m1.sum((1, 2, 3))) * self.unit_macs
        executed = (M2.sum((1, 2)) + M1.sum((1, 2))) * self.unit_macs
        return soft, executed


class ScalePath(nn.Module):
    """A scale path (up or down): depthwise 3x3 conv + GN at the source level,
    weighted by its gate; the router resizes it to the neighbour level."""

    def __init__(self, channels, gn_groups):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.gn = nn.GroupNorm(gn_groups, channels)
        nn.init.normal_(self.conv.weight, std=0.01)
        self.unit_macs = conv_macs(channels, depthwise=True)

    def masks(self, active):
        """The mask of the one conv: where the gate is on (None: everywhere)."""
        return [active]

    def forward(self, xs, gates, masks, kernels=DenseKernels):
        # The levels this path leaves from, at once, as DepthPath.forward; masks[n] = (M,)
        M = [m for m, in masks]
        ys = [kernels.masked_conv2d(x, m, self.conv.weight, groups=self.conv.groups) for x, m in zip(xs, M)]
        ys = kernels.masked_group_norms(ys, M, self.gn.num_groups, self.gn.weight, self.gn.bias, self.gn.eps)
        return [y if g is None else g * y for g, y in zip(gates, ys)]

    def full_macs(self, hw):
        return hw * self.unit_macs

    def costs(self, gate, active):
        soft = gate.sum((1, 2, 3)) * self.unit_macs  # Eq. 4 as in the paper: not detached
        executed = active.sum((1, 2)) * self.unit_macs
        return soft, executed


def resize(x, size):
    """Bilinear, align_corners=True, to a level's exact size (not always a half)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


# -----------------------------------------------------------------------------
# Router: one depth step over all levels (§2.1, Fig. 2, Eq. 2)

class Router(nn.Module):
    """One depth step of the routing space, its weights shared across levels (as
    FCOS shares its tower, and as the authors' code does). For every level n:

      1. scale paths at the source level, on the step input x[n]:
         s_down[n] = m_down(x[n]) * GN(dwconv(x[n]))  -> level n+1
         s_up[n]   = m_up(x[n])   * GN(dwconv(x[n]))  -> level n-1
      2. element-wise accumulation (the router input of Fig. 2):
         a[n] = alpha * (resize(s_down[n-1]) + resize(s_up[n+1])) + beta * x[n]
      3. depth path: x[n] = relu(m_depth(a[n]) * block(a[n]) + a[n]).

    Several paths may be on at one pixel: each gate is independent (Eq. 2).
    Each phase computes the gates of every level first, then hands all their masks
    to the kernels at once (sparse.py indexes them with one `nonzero`, so that the
    host waits for a GPU once per phase, not once per mask), then runs each path
    once over all its levels (its GroupNorms normalise all the levels in one pass).
    """

    def __init__(self, channels, mode, paths, activation, tau, coarse, gn_groups):
        super().__init__()
        self.dynamic = mode == "dynamic"
        self.depth = DepthPath(channels, gn_groups) if "depth" in paths else None
        self.down = self.up = None
        if "scale" in paths:
            self.down = ScalePath(channels, gn_groups)
            self.up = ScalePath(channels, gn_groups)
            self.alpha = nn.Parameter(torch.zeros(1))  # scale paths start silent
            self.beta = nn.Parameter(torch.ones(1))
        if self.dynamic:
            gate = lambda p: SpatialGate(channels, p, activation, tau, coarse)
            self.depth_gate = gate(1) if self.depth is not None else None
            self.scale_gate = gate(2) if self.down is not None else None  # (down, up)
        self.gate_macs = 9 * channels  # per pixel and per gate channel

    def forward(self, xs, kernels, tally):
        L = len(xs)
        a = xs
        if self.down is not None:
            # the gates of every level first, then every mask of them indexed at once
            # (kernels.prepare_masks: one `nonzero` for all of them, not one per mask)
            plans = []  # per level: [(name, gate, active)] of the paths that exist there
            for n, x in enumerate(xs):
                # no coarser level above P7, no finer below P3
                names = [p for p, ok in (("down", n < L - 1), ("up", n > 0)) if ok]
                gates = actives = None
                if self.dynamic:
                    wanted = slice(0 if "down" in names else 1, 2 if "up" in names else 1)  # of (down, up)
                    gates, actives = self.scale_gate(x, wanted, kernels)
                    tally.add_gate(self.gate_macs * len(names), x)
                plans.append([(name, None if gates is None else gates[:, i:i + 1],
                               None if actives is None else actives[:, i]) for i, name in enumerate(names)])
            masks = iter(self.prepare(kernels, [(self.down, act) for plan in plans for _, _, act in plan]))
            runs = {"down": [], "up": []}  # per path, the levels it leaves from: (n, x, gate, active, masks)
            for n, (x, plan) in enumerate(zip(xs, plans)):
                for name, g, act in plan:
                    runs[name].append((n, x, g, act, next(masks)))
            sent_down, sent_up = [None] * L, [None] * L
            for name, path, sent in (("down", self.down, sent_down), ("up", self.up, sent_up)):
                if not runs[name]:
                    continue
                levels, ins, gs, acts, ms = zip(*runs[name])
                for n, x, g, act, out in zip(levels, ins, gs, acts, path(ins, gs, ms, kernels)):
                    tally.add_path(path, g, act, x, name, n)
                    sent[n] = out
            a = []
            for n, x in enumerate(xs):
                arriving = [resize(s, x.shape[-2:]) for s in
                            (sent_down[n - 1] if n > 0 else None,
                             sent_up[n + 1] if n < L - 1 else None) if s is not None]
                a.append(torch.addcmul(self.beta * x, self.alpha, sum(arriving)))  # alpha * arriving + beta * x
        if self.depth is None:
            return a
        gates = [(None, None)] * L
        if self.dynamic:
            gates = [self.depth_gate(an, kernels=kernels) for an in a]
            gates = [(g, act[:, 0]) for g, act in gates]
            for an in a:
                tally.add_gate(self.gate_macs, an)
        masks = self.prepare(kernels, [(self.depth, act) for _, act in gates])
        outs = self.depth(a, [g for g, _ in gates], masks, kernels)
        for n, (an, (g, act)) in enumerate(zip(a, gates)):
            tally.add_path(self.depth, g, act, an, "depth", n)
        return outs

    @staticmethod
    def prepare(kernels, uses):
        """[(path, active)] -> each path's masks, all prepared by one call."""
        wanted = [path.masks(act) for path, act in uses]
        flat = iter(kernels.prepare_masks([m for ms in wanted for m in ms]))
        return [[next(flat) for _ in ms] for ms in wanted]


# -----------------------------------------------------------------------------
# Resource budget (§2.3-2.4, Eq. 4-5)

class HeadCost(NamedTuple):
    """Per image, shape (B,): Eq. 5's differentiable budget ratio in [0, 1]; the
    MACs really needed with binary masks (gate convs included); and the MACs
    with every path on (gate convs included in the dynamic mode)."""
    soft: torch.Tensor
    executed: torch.Tensor
    full: torch.Tensor


class _Tally:
    """Accumulates the costs of one forward, and the gates for visualisation."""

    def __init__(self, batch, device, dtype, depth, num_levels):
        f64 = dict(device=device, dtype=torch.float64)
        self.soft = torch.zeros(batch, device=device, dtype=torch.promote_types(dtype, torch.float32))
        self.soft_total = 0.0  # Eq. 5's denominator: the gated paths' full cost
        self.executed, self.full = torch.zeros(batch, **f64), torch.zeros(batch, **f64)
        self.gates = [dict() for _ in range(depth)]
        self.step, self.num_levels = 0, num_levels

    def add_gate(self, macs, x):
        hw = x.shape[-2] * x.shape[-1]
        self.executed += macs * hw
        self.full += macs * hw

    def add_path(self, path, gate, active, x, name, level):
        full = path.full_macs(x.shape[-2] * x.shape[-1])
        self.full += full
        if gate is None:  # fixed mode: every path fully computed
            self.executed += full
            return
        soft, executed = path.costs(gate, active)
        self.soft = self.soft + soft.to(self.soft.dtype)
        self.soft_total += full
        self.executed += executed.double()
        levels = self.gates[self.step].setdefault(name, [None] * self.num_levels)
        levels[level] = gate.detach()

    def result(self):
        if self.soft_total == 0:  # fixed mode: nothing can be switched off
            soft = torch.ones_like(self.soft)
        else:
            soft = self.soft / self.soft_total
        return HeadCost(soft, self.executed, self.full)


# -----------------------------------------------------------------------------
# The head

class DynamicHead(nn.Module):
    """A routing tower of `depth` routers over the pyramid; a detector builds one
    per branch (classification, regression), as FCOS builds two towers.

    head(features): a list of num_levels tensors, finest first, each (B, C, H_l, W_l),
    adjacent levels about 2x apart. Returns a list of the same shapes. After each
    forward, `head.cost` is a HeadCost and `head.gates[step][path][level]` holds
    the gates (B, 1, H_l, W_l) of that forward, detached (Fig. 4).

    mode="fixed" removes every gate (all paths on): Tab. 1's static baseline.
    paths=("depth",) or ("scale",): Tab. 3's path ablations.
    activation, tau: Tab. 2's gate activations; coarse=True: Tab. 1's coarse gates.
    """

    def __init__(self, channels=256, depth=8, num_levels=5, mode="dynamic",
                 paths=("depth", "scale"), activation="proposed", tau=1.5,
                 coarse=False, gn_groups=32):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        paths = tuple(paths)
        if not paths or any(p not in PATHS for p in paths):
            raise ValueError(f"unknown paths {paths!r}; expected a non-empty subset of {PATHS}")
        if channels % gn_groups:
            raise ValueError(f"channels ({channels}) must be divisible by gn_groups ({gn_groups}); "
                             f"pick gn_groups among the divisors of {channels}")
        if depth < 1 or num_levels < 1:
            raise ValueError(f"depth and num_levels must be >= 1, got {depth} and {num_levels}")
        if num_levels < 2 and "scale" in paths:
            raise ValueError("scale paths go between levels and need num_levels >= 2; "
                             "with one level use paths=('depth',)")
        if activation == "proposed" and tau < 0:
            raise ValueError(f"tau must be >= 0 (Eq. 3), got {tau}")
        self.channels, self.num_levels, self.mode = channels, num_levels, mode
        self.routers = nn.ModuleList(
            Router(channels, mode, paths, activation, tau, coarse, gn_groups) for _ in range(depth))
        self.dense = False  # True: the dense reference kernels even where sparse.py is present
        self.cost = None
        self.gates = None

    def kernels(self):
        """The masked-computation kernels: sparse.py's gather-scatter when it sits
        beside this file, else (or with head.dense = True) the dense reference."""
        return DenseKernels if self.dense or _sparse is None else _sparse

    def check(self, features):
        if not isinstance(features, (list, tuple)) or len(features) != self.num_levels:
            n = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"expected a list of {self.num_levels} pyramid levels (finest first), got {n}")
        for i, f in enumerate(features):
            if f.dim() != 4 or f.shape[1] != self.channels:
                raise ValueError(f"level {i}: expected (B, {self.channels}, H, W), got {tuple(f.shape)}")
            if f.shape[0] != features[0].shape[0]:
                raise ValueError(f"level {i}: batch {f.shape[0]} differs from level 0's {features[0].shape[0]}")
        for i in range(1, len(features)):
            (h0, w0), (h1, w1) = features[i - 1].shape[-2:], features[i].shape[-2:]
            if abs(h0 - 2 * h1) > 1 or abs(w0 - 2 * w1) > 1:
                raise ValueError(f"levels {i - 1} and {i} are {h0}x{w0} and {h1}x{w1}; adjacent "
                                 f"levels must be about 2x apart (finest first)")

    def forward(self, features):
        self.check(features)
        x = features[0]
        tally = _Tally(x.shape[0], x.device, x.dtype, len(self.routers), self.num_levels)
        kernels = self.kernels()
        xs = list(features)
        for step, router in enumerate(self.routers):
            tally.step = step
            xs = router(xs, kernels, tally)
        self.cost = tally.result()
        self.gates = tally.gates if self.mode == "dynamic" else None
        return xs


if __name__ == "__main__":
    # A one-minute demo: the budget loss alone (Eq. 5) switches the gates off.
    torch.manual_seed(0)
    head = DynamicHead(channels=64, depth=4, gn_groups=16)
    features = [torch.randn(2, 64, 64 // 2 ** i, 96 // 2 ** i) for i in range(5)]
    optimizer = torch.optim.Adam(head.parameters(), lr=0.02)
    for step in range(31):
        head(features)
        if step % 5 == 0:
            ratio = (head.cost.executed / head.cost.full).mean().item()
            print(f"step {step:2d}  soft budget {head.cost.soft.mean().item():.3f}  "
                  f"executed/full MACs {ratio:.3f}  full {head.cost.full[0].item() / 1e9:.3f} GMACs")
        optimizer.zero_grad()
        head.cost.soft.mean().backward()
        optimizer.step()
