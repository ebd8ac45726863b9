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

This file depends on torch alone, so it can be copied into another detector. It
is the reference: every level is computed on its own, every conv densely, and the
gates zero what they switch off. When sparse.py sits beside it, the dynamic head
runs there instead -- the five levels packed into one map, each conv computed
only where its gate is on -- and gives the same numbers (tests/test_sparse.py).

Map, in the paper's order:
    gate_activation        Eq. 3, the gate activation delta(v)
    SpatialGate            §2.2.1, Fig. 3c: 3x3 conv -> (GAP) -> activation
    masked_conv2d,         masked computation, dense: a conv and a GroupNorm
    masked_group_norm        whose statistics are taken over the computed pixels
    DepthPath, ScalePath   §2.2.3: the paths a router can send a pixel along
    Router                 §2.1, Eq. 2: one depth step, in three methods
    HeadCost, Tally        Eq. 4-5: soft budget, executed and full MACs
    DynamicHead            the routing tower over the pyramid (one per branch)
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = ("proposed", "restricted_tanh", "softmax")
PATH_TYPES = ("depth", "scale")
INIT_GATE = 0.99  # every gate starts almost fully on; the budget turns them off (§2.4)


# -----------------------------------------------------------------------------
# Gate activation (§2.2.2, Eq. 3)

def gate_activation(v, tau=1.5):
    """Eq. 3: delta(v) = max(0, (tanh(v - tau) + tanh(tau)) / (1 + tanh(tau))).

    Values lie in [0, 1]; tau = 0 gives the restricted tanh max(0, tanh(v)). For
    v <= 0 both the value and the gradient are exactly 0, which is what lets a
    masked-out pixel be skipped in training as well as inference (§2.2.3).

    Near v = 0 the sum tanh(v - tau) + tanh(tau) cancels (in bf16, gates of v up
    to ~0.004 would round to 0: pixels computed with a dead gradient). Written
    with exponentials (tanh x = (1 - e^-2x) / (1 + e^-2x)), Eq. 3 is

        delta(v) = (1 - e^-2v) / (1 + e^(2 (tau - v)))      for v > 0,

    with no cancellation anywhere: 1 - e^-2v is expm1, exact near 0, so every v > 0
    gives a gate > 0; the value never passes 1, and both terms of the gradient are
    >= 0. In fp32 at least; rounded back to fp16, only the gates of v up to ~3e-7
    underflow to 0.
    """
    # relu(v): v <= 0 gives 0 with a zero gradient (relu's gradient at 0 is 0), and
    # large negative v never reaches exp (inf / inf would send a NaN into the gradient)
    vf = F.relu(v.float() if v.dtype in (torch.float16, torch.bfloat16) else v)
    m = -2 * vf
    return (torch.expm1(m) / (-1 - torch.exp(m + 2 * tau))).to(v.dtype)  # -0.0 / -x: an exact +0 at v <= 0


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

    def forward(self, x, paths=slice(None)):
        # paths: the slice of the output channels needed here (a level at the top or
        # bottom of the pyramid has no coarser or finer neighbour)
        v = F.conv2d(x, self.conv.weight[paths], self.conv.bias[paths], padding=1)  # (B, P, H, W)
        if self.coarse:  # Tab. 1 "DY" without "FG": one value per image and path
            v = v.mean((2, 3), keepdim=True).expand_as(v)
        return self.activate(v)

    def activate(self, v):
        """Logits (B, P, ...) -> (gates, active): a path is computed at the pixels
        where its gate is not 0 (Eq. 3: where v > 0; the softmax: everywhere)."""
        if self.activation == "softmax":
            gate = torch.softmax(F.pad(v, (0, 0) * (v.dim() - 2) + (0, 1)), dim=1)[:, :-1]  # + "no path" logit 0
        else:
            gate = gate_activation(v, self.tau if self.activation == "proposed" else 0.0)
        return gate, gate > 0


# -----------------------------------------------------------------------------
# Masked computation, dense (§2.2.3, §2.3)
#
# `mask` is a (B, H, W) bool map of the pixels a path computes, or None for "all
# of them". These references compute everywhere and zero the rest; sparse.py
# computes only the masked pixels. GroupNorm's statistics are taken over the
# computed pixels only (a decision of this project, see the README), so the two
# agree to float tolerance in training and inference alike.

def masked_conv2d(x, mask, weight, bias=None, groups=1):
    """3x3 conv, stride 1, padding 1, kept where `mask` is true and 0 elsewhere."""
    y = F.conv2d(x, weight, bias, padding=1, groups=groups)
    return y if mask is None else y * mask[:, None].to(y.dtype)


def masked_group_norm(x, mask, num_groups, weight, bias, eps=1e-5):
    """GroupNorm with statistics over the masked pixels of each image and group."""
    if mask is None:
        return F.group_norm(x, num_groups, weight, bias, eps)
    B, C, H, W = x.shape
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # statistics in fp32 at least
    m = mask[:, None, None].to(acc)                                 # (B, 1, 1, H, W)
    xg = x.to(acc).reshape(B, num_groups, C // num_groups, H, W)    # (B, G, C/G, H, W)
    count = (m.sum((2, 3, 4), keepdim=True) * (C // num_groups)).clamp_min(1)
    mean = (xg * m).sum((2, 3, 4), keepdim=True) / count
    var = ((xg - mean) ** 2 * m).sum((2, 3, 4), keepdim=True) / count
    y = ((xg - mean) * torch.rsqrt(var + eps) * m).reshape(B, C, H, W)
    y = (y * weight[:, None, None] + bias[:, None, None]) * mask[:, None]
    return y.to(x.dtype)


# -----------------------------------------------------------------------------
# Paths (§2.2.3)

def conv_macs(channels, depthwise=False):
    """Per-pixel MACs of a 3x3 conv C -> C (or depthwise) plus its GroupNorm,
    which the authors count too (docs/DESIGN.md §5)."""
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
        self.convs = 2

    def forward(self, a, gate=None, active=None):
        """One level: a (B, C, H, W); gate (B, 1, H, W) and active (B, H, W), or None
        (ungated: computed everywhere)."""
        M2 = active
        M1 = None if M2 is None else F.max_pool2d(M2[:, None].float(), 3, 1, 1)[:, 0] > 0
        y = masked_conv2d(a, M1, self.conv1.weight)
        y = F.relu(masked_group_norm(y, M1, self.gn1.num_groups, self.gn1.weight, self.gn1.bias, self.gn1.eps))
        y = masked_conv2d(y, M2, self.conv2.weight)
        y = masked_group_norm(y, M2, self.gn2.num_groups, self.gn2.weight, self.gn2.bias, self.gn2.eps)
        return F.relu(a + y if gate is None else torch.addcmul(a, gate, y))  # Eq. 2: gated output + residual

    @staticmethod
    def soft_and_executed(gate, active):
        """Per image (B,): Eq. 4's soft count of computed pixels over both convs --
        conv2 weighted by the gate, conv1 by the gate max-pooled over conv2's
        field -- and the pixels really computed (M2 and M1)."""
        soft = gate.sum((1, 2, 3)) + F.max_pool2d(gate, 3, 1, 1).sum((1, 2, 3))
        M1 = F.max_pool2d(active[:, None].float(), 3, 1, 1) > 0
        return soft, active.sum((1, 2)) + M1.sum((1, 2, 3))


class ScalePath(nn.Module):
    """A scale path (up or down): depthwise 3x3 conv + GN at the source level,
    weighted by its gate; the router resizes it to the neighbour level. The
    depthwise conv has a bias, as in the authors' model: a GroupNorm of several
    channels per group does not absorb a per-channel bias.

    dense_norm: the GroupNorm's statistics over every pixel of the level, then the
    gate -- how the authors' code computes a scale path (their released models
    were trained so); this project's default takes them over the computed pixels."""

    def __init__(self, channels, gn_groups, dense_norm=False):
        super().__init__()
        self.dense_norm = dense_norm
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.gn = nn.GroupNorm(gn_groups, channels)
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.zeros_(self.conv.bias)
        self.unit_macs = conv_macs(channels, depthwise=True)
        self.convs = 1

    def forward(self, x, gate=None, active=None):
        if self.dense_norm:
            active = None  # computed everywhere; the gate zeroes what it switches off
        y = masked_conv2d(x, active, self.conv.weight, self.conv.bias, groups=self.conv.groups)
        y = masked_group_norm(y, active, self.gn.num_groups, self.gn.weight, self.gn.bias, self.gn.eps)
        return y if gate is None else gate * y

    @staticmethod
    def soft_and_executed(gate, active):
        return gate.sum((1, 2, 3)), active.sum((1, 2))  # Eq. 4 as in the paper: not detached


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
    `gated` names the path types that have gates (Tab. 3); the others run on
    every pixel. With no gates at all (the fixed head of Tab. 1) the arrivals are
    summed with weight 1, as in the authors' fixed head (alpha is then no
    parameter); a dynamic head learns alpha from 0, so its scale paths start silent.
    """

    def __init__(self, channels, gated, activation, tau, coarse, gn_groups, dense_scale_norm=False):
        super().__init__()
        self.depth = DepthPath(channels, gn_groups)
        self.down = ScalePath(channels, gn_groups, dense_scale_norm)
        self.up = ScalePath(channels, gn_groups, dense_scale_norm)
        self.alpha = nn.Parameter(torch.zeros(1)) if gated else None
        self.beta = nn.Parameter(torch.ones(1))
        gate = lambda p: SpatialGate(channels, p, activation, tau, coarse)
        self.depth_gate = gate(1) if "depth" in gated else None
        self.scale_gate = gate(2) if "scale" in gated else None  # (down, up)
        self.gate_macs = 9 * channels  # per pixel and per gate channel

    def forward(self, xs, tally):
        s_down, s_up = self.scale_paths(xs, tally)
        a = self.aggregate(xs, s_down, s_up)
        return self.depth_path(a, tally)

    def scale_paths(self, xs, tally):
        """Step 1: what each level sends down (to the coarser level) and up (to the
        finer), at the source level's resolution; None where no neighbour exists."""
        L = len(xs)
        sent = {"down": [None] * L, "up": [None] * L}
        for n, x in enumerate(xs):
            names = [p for p, ok in (("down", n < L - 1), ("up", n > 0)) if ok]  # none above P7, below P3
            gates = actives = None
            if self.scale_gate is not None:
                wanted = slice(0 if "down" in names else 1, 2 if "up" in names else 1)  # of (down, up)
                gates, actives = self.scale_gate(x, wanted)
                tally.gate_conv(self.gate_macs, len(names) * x.shape[-2] * x.shape[-1])
            for i, name in enumerate(names):
                g, act = (None, None) if gates is None else (gates[:, i:i + 1], actives[:, i])
                path = getattr(self, name)
                sent[name][n] = path(x, g, act)
                tally.path(name, n, path, x, g, act)
        return sent["down"], sent["up"]

    def aggregate(self, xs, s_down, s_up):
        """Step 2: a[n] = alpha * (arrivals from n-1 and n+1, resized to n) + beta * x[n]."""
        L, a = len(xs), []
        for n, x in enumerate(xs):
            arrivals = sum(resize(s, x.shape[-2:]) for s in (s_down[n - 1] if n > 0 else None,
                                                              s_up[n + 1] if n < L - 1 else None) if s is not None)
            a.append((arrivals if self.alpha is None else self.alpha * arrivals) + self.beta * x)
        return a

    def depth_path(self, a, tally):
        """Step 3: the gated residual block on each level's router input."""
        outs = []
        for n, an in enumerate(a):
            g = act = None
            if self.depth_gate is not None:
                g, act = self.depth_gate(an)
                act = act[:, 0]
                tally.gate_conv(self.gate_macs, an.shape[-2] * an.shape[-1])
            outs.append(self.depth(an, g, act))
            tally.path("depth", n, self.depth, an, g, act)
        return outs


# -----------------------------------------------------------------------------
# Resource budget (§2.3-2.4, Eq. 4-5)

class HeadCost(NamedTuple):
    """Per image, shape (B,): Eq. 5's differentiable budget ratio in [0, 1] (1 for
    a head without gates); the MACs really needed with binary masks (gate convs
    included); and the MACs with every path on (gate convs included)."""
    soft: torch.Tensor
    executed: torch.Tensor
    full: torch.Tensor


class Tally:
    """The costs of one forward, in one place (Eq. 4-5), and its gates (Fig. 4).

    A path's cost is counted in pixel-convs -- one conv of the path at one pixel
    -- times the path's MACs per pixel-conv (a 3x3 conv and its GroupNorm): `full`
    at every pixel of every conv; `executed` where the masks say the conv runs;
    `soft`, Eq. 4, with the gates in place of the binary masks. Eq. 5's budget
    is the soft cost over the full cost of the gated paths. What depends only on
    the shapes (the full costs, the gate convs, the ungated paths) is summed as
    numbers; the per-image counts of the gated paths are combined once, at the end
    (a forward on a GPU then launches a few kernels for its costs, not hundreds)."""

    def __init__(self, batch, device, dtype, depth, num_levels):
        self.batch, self.device = batch, device
        self.dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.full = self.always = 0.0  # per image: every MAC, and those that run whatever the gates
        self.soft_total = 0.0  # Eq. 5's denominator: the gated paths' full cost
        self.units, self.softs, self.counts = [], [], []  # per gated path: MACs per pixel-conv, (B,) sums
        self.gates = [dict() for _ in range(depth)]
        self.step, self.num_levels = 0, num_levels

    def gate_conv(self, macs_per_pixel, pixels):
        """A gate conv runs at every pixel: executed and full alike."""
        self.full += macs_per_pixel * pixels
        self.always += macs_per_pixel * pixels

    def add(self, path, pixels, soft=None, executed=None):
        """One path over `pixels` pixels per image; soft and executed (B,) pixel-convs,
        or None for an ungated path, which runs at every pixel."""
        full = path.unit_macs * path.convs * pixels
        self.full += full
        if executed is None:
            self.always += full
            return
        self.units.append(path.unit_macs), self.softs.append(soft), self.counts.append(executed)
        self.soft_total += full

    def path(self, name, level, path, x, gate, active):
        """One path on one level map, as the reference computes it."""
        soft = executed = None
        if gate is not None:
            soft, executed = path.soft_and_executed(gate, active)
            self.record(name, level, gate)
        self.add(path, x.shape[-2] * x.shape[-1], soft, executed)

    def record(self, name, level, gate):
        self.gates[self.step].setdefault(name, [None] * self.num_levels)[level] = gate.detach()

    def result(self):
        f64 = dict(device=self.device, dtype=torch.float64)
        full = torch.full((self.batch,), float(self.full), **f64)
        if not self.units:  # no gates: nothing can be switched off
            return HeadCost(torch.ones(self.batch, device=self.device, dtype=self.dtype), full, full)
        units = torch.tensor(self.units, **f64)
        executed = torch.stack(self.counts, 1).double() @ units + self.always  # exact: integers below 2^53
        soft = torch.stack(self.softs, 1).to(self.dtype) @ units.to(self.dtype) / self.soft_total
        return HeadCost(soft, executed, full)


# -----------------------------------------------------------------------------
# The head

class DynamicHead(nn.Module):
    """A routing tower of `depth` routers over the pyramid; a detector builds one
    per branch (classification, regression), as FCOS builds two towers.

    head(features): a list of num_levels tensors, finest first, each (B, C, H_l, W_l),
    adjacent levels about 2x apart. Returns a list of the same shapes. After each
    forward, `head.cost` is a HeadCost and `head.gates[step][path][level]` holds
    the gates (B, 1, H_l, W_l) of that forward, detached (Fig. 4).

    gated: the path types that have spatial gates (Tab. 3: "depth", "scale", both
        -- the default -- or none, which is the fixed head of Tab. 1: every path
        on, no gates, the arrivals weighted 1). An ungated path runs everywhere.
    activation, tau: Tab. 2's gate activations; coarse=True: Tab. 1's coarse gates.
    dense_scale_norm: the scale paths' GroupNorm statistics over every pixel, as
        the authors' code takes them (ScalePath); executed MACs still count the
        gated pixels, as theirs do.
    """

    def __init__(self, channels=256, depth=8, num_levels=5, gated=PATH_TYPES, activation="proposed",
                 tau=1.5, coarse=False, gn_groups=32, dense_scale_norm=False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        if isinstance(gated, str) or any(p not in PATH_TYPES for p in gated):
            raise ValueError(f"unknown gated paths {gated!r}; expected a subset of {PATH_TYPES}, "
                             f"e.g. ('depth', 'scale'), ('depth',), or () for the fixed head")
        if channels % gn_groups:
            raise ValueError(f"channels ({channels}) must be divisible by gn_groups ({gn_groups}); "
                             f"pick gn_groups among the divisors of {channels}")
        if depth < 1 or num_levels < 2:
            raise ValueError(f"depth must be >= 1 and num_levels >= 2 (scale paths go between levels), "
                             f"got {depth} and {num_levels}")
        self.channels, self.num_levels = channels, num_levels
        self.gated = tuple(p for p in PATH_TYPES if p in gated)
        self.routers = nn.ModuleList(
            Router(channels, self.gated, activation, tau, coarse, gn_groups, dense_scale_norm) for _ in range(depth))
        self.dense = False  # True: the per-level reference even where sparse.py is present
        self.cost = None
        self.gates = None

    @property
    def dynamic(self):
        return bool(self.gated)

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
        tally = Tally(x.shape[0], x.device, x.dtype, len(self.routers), self.num_levels)
        packed = _sparse()
        if self.dynamic and not self.dense and packed is not None:
            xs = packed.run_head(self, list(features), tally)
        else:
            xs = list(features)
            for step, router in enumerate(self.routers):
                tally.step = step
                xs = router(xs, tally)
        self.cost = tally.result()
        self.gates = tally.gates if self.dynamic else None
        return xs


def _sparse():
    """sparse.py, when it lies beside this file (imported on first use), whose
    run_head executes the dynamic head on its packed canvas; else None."""
    global _SPARSE
    if _SPARSE is False:
        try:
            import sparse
            _SPARSE = sparse if hasattr(sparse, "run_head") else None  # not some other package "sparse"
        except ImportError:
            _SPARSE = None
    return _SPARSE


_SPARSE = False


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
