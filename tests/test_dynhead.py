"""dynhead.py against independent references: Eq. 3's formula, hand-counted MACs,
torch's FLOP counter, the gate-free fixed head, and a dense masked GroupNorm."""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import dynhead
from dynhead import DynamicHead, gate_activation

C, GROUPS = 16, 4
SIZES = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # P3..P7 of a 128x160 image


def pyramid(batch=2, channels=C, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, h, w, generator=g) for h, w in sizes]


def head(**kw):
    kw = {"channels": C, "depth": 2, "gn_groups": GROUPS, **kw}
    return DynamicHead(**kw)


# -- Eq. 3 -------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.5, 2.0])
def test_gate_activation_matches_eq3(tau):
    v = torch.linspace(-6, 6, 2401, dtype=torch.float64)
    expected = [max(0.0, (math.tanh(x - tau) + math.tanh(tau)) / (1 + math.tanh(tau))) for x in v.tolist()]
    got = gate_activation(v, tau)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert got.min() >= 0 and got.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_gate_activation_far_from_zero_is_finite(dtype):
    # logits far below 0 (gates the budget switched off) or far above: 0 and 1,
    # with finite (zero) gradients
    v = torch.tensor([-1e4, -500.0, -100.0, 100.0, 500.0, 1e4], dtype=dtype, requires_grad=True)
    g = gate_activation(v, 1.5)
    g.sum().backward()
    assert g.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.isfinite(v.grad).all() and (v.grad >= 0).all() and v.grad.max() < 1e-30  # e^(2 (tau - v)) scale


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.5, 2.0])
def test_gate_activation_fp32_value_and_gradient_match_eq3_in_fp64(tau):
    # value in [0, 1] and gradient >= 0 everywhere (delta is monotone), both close
    # to Eq. 3's in float64, from far below 0 to far above tau
    v64 = torch.linspace(-50, 50, 200001, dtype=torch.float64)
    t = math.tanh(tau)
    exact = ((torch.tanh(v64 - tau) + t) / (1 + t)).clamp_min(0)
    slope = torch.where(v64 > 0, (1 - torch.tanh(v64 - tau) ** 2) / (1 + t), torch.zeros_like(v64))
    v = v64.float().requires_grad_()
    g = gate_activation(v, tau)
    g.sum().backward()
    assert g.min() >= 0 and g.max() <= 1 and v.grad.min() >= 0
    assert (g.double() - exact).abs().max() < 1e-6 and (v.grad.double() - slope).abs().max() < 1e-6


def test_tau_zero_is_restricted_tanh():
    v = torch.linspace(-5, 5, 1001, dtype=torch.float64)
    assert torch.allclose(gate_activation(v, 0.0), torch.tanh(v).clamp_min(0), rtol=1e-15, atol=0)


@pytest.mark.parametrize("tau", [0.0, 1.0, 1.5])
def test_slope_at_zero_and_zero_gradient_below(tau):
    v = torch.tensor([1e-7, 0.0, -1e-7, -0.5, -3.0], dtype=torch.float64, requires_grad=True)
    gate_activation(v, tau).sum().backward()
    slope = (1 - math.tanh(tau) ** 2) / (1 + math.tanh(tau))
    assert v.grad[0].item() == pytest.approx(slope, rel=1e-5)
    assert torch.equal(v.grad[1:], torch.zeros(4, dtype=torch.float64))
    if tau == 1.5:
        assert slope == pytest.approx(0.0949, abs=1e-4)  # docs/DESIGN.md §3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gate_activation_in_low_precision_is_eq3_rounded_once(dtype):
    # Near v = 0, tanh(v - tau) + tanh(tau) cancels: in bf16 arithmetic gates of
    # small positive v came out exactly 0 (computed pixels with a dead gradient).
    v = torch.linspace(-0.1, 0.1, 2001).to(dtype)
    v.requires_grad_()
    got = gate_activation(v, 1.5)
    t = math.tanh(1.5)
    expected = [max(0.0, (math.tanh(x - 1.5) + t) / (1 + t)) for x in v.tolist()]
    assert got.dtype == dtype
    expected = torch.tensor(expected, dtype=torch.float64)
    # rounded once, at the end: within half an ulp of Eq. 3 (fp32 evaluation error aside;
    # below the smallest normal number the ulp stops shrinking)
    finfo = torch.finfo(dtype)
    assert ((got.double() - expected).abs() <= (finfo.eps / 2 + 1e-6) * expected.clamp_min(finfo.tiny)).all()
    assert torch.equal(got > 0, v > 0)  # a gate is on exactly where its pixel is computed
    got.sum().backward()
    assert (v.grad[v > 0] > 0).all()

# -- init and gradients ---------------------------------------------------------

@pytest.mark.parametrize("activation,tau", [("proposed", 1.5), ("proposed", 0.5), ("restricted_tanh", 0.0)])
def test_gate_bias_gives_0_99(activation, tau):
    b = dynhead.gate_init_bias(activation, tau)
    assert gate_activation(torch.tensor(b, dtype=torch.float64), tau).item() == pytest.approx(0.99, abs=1e-9)
    if activation == "proposed" and tau == 1.5:
        assert b == pytest.approx(3.822, abs=1e-3)  # docs/DESIGN.md §3


@pytest.mark.parametrize("coarse", [False, True])
def test_gates_start_near_0_99(coarse):
    # The bias puts every gate at 0.99; the N(0, 0.01) gate weights over a 3x3xC
    # field spread it a little (std ~0.01 * sqrt(9C) * |x| before the activation).
    h = head(depth=3, coarse=coarse)
    h(pyramid())
    gates = torch.cat([g.flatten() for step in h.gates for levels in step.values()
                       for g in levels if g is not None])
    assert gates.mean().item() == pytest.approx(0.99, abs=0.01)
    assert gates.min().item() > 0.95 and gates.max().item() < 1.0


@pytest.mark.parametrize("kw", [{}, {"gated": ()}, {"activation": "softmax"}, {"coarse": True},
                                {"gated": ("depth",)}, {"gated": ("scale",)}])
def test_gradients_reach_every_parameter(kw):
    h = head(**kw)
    for r in h.routers:  # alpha starts at 0, which would zero the scale paths' gradients
        if r.alpha is not None:
            torch.nn.init.constant_(r.alpha, 0.5)
    out = h(pyramid())
    (sum((o ** 2).mean() for o in out) + h.cost.soft.mean()).backward()
    for name, p in h.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_every_parameter_in_graph_at_init():
    # DDP needs a gradient (zero or not) for every parameter, also at init (alpha = 0)
    h = head()
    out = h(pyramid())
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in h.parameters())


# -- costs -----------------------------------------------------------------------

def hand_count(channels, depth, sizes, gated):
    """MACs per image by hand (docs/DESIGN.md §5's per-pixel costs summed over the
    pyramid): the depth paths, the scale paths, and the gate convs of the gated ones."""
    conv, dw = 9 * channels * channels + channels, 9 * channels + channels
    counts = dict(depth=0, scale=0, gates=0)
    for i, (h, w) in enumerate(sizes):
        scale_paths = (i > 0) + (i < len(sizes) - 1)  # up to a finer, down to a coarser level
        counts["depth"] += depth * h * w * 2 * conv
        counts["scale"] += depth * h * w * scale_paths * dw
        # one gate conv channel per gated path: the depth gate, one per scale path
        counts["gates"] += depth * h * w * 9 * channels * (("depth" in gated) + ("scale" in gated) * scale_paths)
    return counts


@pytest.mark.parametrize("gated", [("depth", "scale"), ()])
def test_full_cost_by_hand(gated):
    h = head(depth=3, gated=gated)
    h(pyramid(batch=3))
    expected = sum(hand_count(C, 3, SIZES, gated).values())
    assert h.cost.full.shape == (3,)
    assert torch.equal(h.cost.full, torch.full((3,), float(expected), dtype=torch.float64))
    assert torch.equal(h.cost.executed, h.cost.full)  # at init every gate is on


@pytest.mark.parametrize("gated", [(), ("scale",), ("depth",), ("depth", "scale")])
def test_tab3_settings_are_the_fixed_head_with_some_paths_gated(gated):
    # Tab. 3 switches which path types are gated; every router keeps all three paths.
    # Full MACs: the fixed head's plus the gate convs; with the gates switched off,
    # executed MACs: the ungated paths' full cost (they run on every pixel) and the gates
    h = head(depth=2, gated=gated)
    counts = hand_count(C, 2, SIZES, gated)
    fixed = counts["depth"] + counts["scale"]
    h(pyramid())
    assert h.cost.full.tolist() == [fixed + counts["gates"]] * 2
    for module in h.modules():
        if isinstance(module, dynhead.SpatialGate):
            torch.nn.init.constant_(module.conv.bias, -10.0)  # every gate off
    for dense in (True, False):  # the reference and sparse.py
        h.dense = dense
        h(pyramid())
        ungated = sum(counts[p] for p in ("depth", "scale") if p not in gated)
        assert h.cost.executed.tolist() == [ungated + counts["gates"]] * 2
        assert h.cost.soft.tolist() == ([0.0, 0.0] if gated else [1.0, 1.0])
        assert set(h.gates[0]) if gated else h.gates is None  # Fig. 4's gates: of the gated paths only
        if gated:
            assert set(h.gates[0]) == ({"depth"} if gated == ("depth",) else {"down", "up"} if gated == ("scale",)
                                       else {"depth", "down", "up"})


def test_ungated_scale_paths_run_on_every_pixel():
    # gated=("depth",) with every depth gate off: each step's output is relu(a), a the
    # aggregation of scale paths computed densely (plain GroupNorm) on every pixel
    h = head(depth=1, gated=("depth",))
    r = h.routers[0]
    torch.nn.init.constant_(r.depth_gate.conv.bias, -10.0)
    torch.nn.init.constant_(r.alpha, 0.7)
    for path in (r.down, r.up):
        torch.nn.init.normal_(path.conv.bias, std=0.3)
    feats = [f.double() for f in pyramid()]
    h.double()

    def sent(path, x):
        y = F.conv2d(x, path.conv.weight, path.conv.bias, padding=1, groups=C)
        return F.group_norm(y, path.gn.num_groups, path.gn.weight, path.gn.bias, path.gn.eps)

    L = len(feats)
    for dense in (True, False):
        h.dense = dense
        out = h(feats)
        for n, x in enumerate(feats):
            arrivals = 0
            if n > 0:
                arrivals = arrivals + dynhead.resize(sent(r.down, feats[n - 1]), x.shape[-2:])
            if n < L - 1:
                arrivals = arrivals + dynhead.resize(sent(r.up, feats[n + 1]), x.shape[-2:])
            assert torch.allclose(out[n], F.relu(r.alpha * arrivals + r.beta * x), atol=1e-10)


def test_scale_path_bias_is_trained_and_changes_the_output():
    # the depthwise convs carry a bias (the authors' model): GroupNorm over 4 channels
    # per group does not absorb a per-channel bias, so it changes the output
    h = head(depth=1)
    torch.nn.init.constant_(h.routers[0].alpha, 0.5)
    feats = pyramid()
    before = [o.detach() for o in h(feats)]
    bias = h.routers[0].down.conv.bias
    assert bias.shape == (C,) and torch.equal(bias, torch.zeros(C))  # init 0, as the authors
    with torch.no_grad():
        bias.copy_(torch.linspace(-1, 1, C))
    after = h(feats)
    assert max((a - b).abs().max().item() for a, b in zip(after, before)) > 1e-3
    sum(o.square().mean() for o in after).backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_full_cost_matches_flop_counter():
    channels, sizes = 64, [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    h = DynamicHead(channels=channels, depth=2, gated=(), gn_groups=16)
    feats = pyramid(batch=1, channels=channels, sizes=sizes)
    with FlopCounterMode(display=False) as counter:
        h(feats)
    macs = counter.get_total_flops() / 2  # the counter counts a multiply-add as 2 FLOPs
    # the counter sees the convs only; our count adds GroupNorm's C MACs per pixel
    assert h.cost.full.item() == pytest.approx(macs, rel=0.02)


def test_executed_and_soft_cost_by_hand():
    # the depth gate's logit is channel 0 at the centre tap, less 0.5; channel 0 is 1
    # at one pixel of each level and 0 elsewhere: the gate is on there alone. The
    # scale paths are ungated (they run everywhere, silent at alpha = 0)
    h = head(depth=1, gated=("depth",))
    conv = h.routers[0].depth_gate.conv
    torch.nn.init.zeros_(conv.weight)
    torch.nn.init.constant_(conv.bias, -0.5)
    with torch.no_grad():
        conv.weight[0, 0, 1, 1] = 1.0
    feats = pyramid()
    corners = [(min(1, hh - 1), min(1, ww - 1)) for hh, ww in SIZES]
    for f, (y, x) in zip(feats, corners):
        f[:, 0] = 0
        f[:, 0, y, x] = 1.0
    g = gate_activation(torch.tensor(0.5, dtype=torch.float64), 1.5).item()
    unit, dw = 9 * C * C + C, 9 * C + C
    # conv2 runs at the one pixel, conv1 on its 3x3 neighbourhood clipped at the border
    field = [sum(1 for dy in (-1, 0, 1) for dx in (-1, 0, 1) if 0 <= y + dy < hh and 0 <= x + dx < ww)
             for (hh, ww), (y, x) in zip(SIZES, corners)]
    gates = sum(9 * C * hh * ww for hh, ww in SIZES)
    scale = sum(((i > 0) + (i < len(SIZES) - 1)) * hh * ww * dw for i, (hh, ww) in enumerate(SIZES))
    executed = gates + scale + sum((1 + n) * unit for n in field)
    soft = sum(g * (1 + n) * unit for n in field) / sum(2 * hh * ww * unit for hh, ww in SIZES)
    for dense in (True, False):  # the reference and sparse.py
        h.dense = dense
        out = h(feats)
        assert h.cost.executed.tolist() == [executed, executed]
        assert h.cost.soft[0].item() == pytest.approx(soft, rel=1e-6)
        # where the depth gate is 0 the block is skipped: the output is relu(input) (alpha = 0)
        for f, o, (y, x) in zip(feats, out, corners):
            skipped = torch.ones(f.shape[-2:], dtype=torch.bool)
            skipped[y, x] = False
            assert torch.equal(o[:, :, skipped], F.relu(f[:, :, skipped]))
            assert not torch.equal(o[:, :, y, x], F.relu(f[:, :, y, x]))


# -- modes, ablations, budget ----------------------------------------------------------

@pytest.mark.parametrize("gated", [("depth", "scale"), ("depth",), ("scale",)])
def test_fixed_equals_dynamic_with_gates_at_one_and_alpha_one(gated):
    # the fixed head sums the arrivals with weight 1 (the authors' fixed head): the
    # dynamic head with every gate exactly 1 and alpha = 1 is the same network
    dyn, fixed = head(gated=gated), head(gated=())
    for r in fixed.routers:
        assert r.alpha is None and r.depth_gate is None and r.scale_gate is None
        torch.nn.init.constant_(r.beta, 0.8)
    state = {k: v for k, v in fixed.state_dict().items()}
    dyn.load_state_dict(state, strict=False)  # the fixed head has no gate convs and no alpha
    for r in dyn.routers:
        for gate in (r.depth_gate, r.scale_gate):
            if gate is not None:  # 1 - e^-40 is 1.0 even in float64: every gate exactly 1
                torch.nn.init.zeros_(gate.conv.weight)
                torch.nn.init.constant_(gate.conv.bias, 20.0)
        torch.nn.init.constant_(r.alpha, 1.0)
        for path in (r.down, r.up):
            torch.nn.init.normal_(path.conv.bias, std=0.3)
    fixed.load_state_dict({k: v for k, v in dyn.state_dict().items() if k in state})
    dyn, fixed = dyn.double(), fixed.double()  # float64: no rounding to hide a difference
    feats = [f.double() for f in pyramid()]
    for dense in (True, False):  # the reference and sparse.py
        dyn.dense = dense
        for a, b in zip(dyn(feats), fixed(feats)):
            assert torch.allclose(a, b, rtol=0, atol=1e-10)
        gate_macs = dyn.cost.full - fixed.cost.full
        assert torch.all(gate_macs > 0) and torch.equal(fixed.cost.executed, fixed.cost.full)


def test_budget_alone_switches_gates_off():
    torch.manual_seed(0)
    h = head()
    feats = pyramid()
    opt = torch.optim.Adam(h.parameters(), lr=0.05)
    h(feats)
    start, start_exec = h.cost.soft.mean().item(), (h.cost.executed / h.cost.full).mean().item()
    for _ in range(30):
        h(feats)
        opt.zero_grad()
        h.cost.soft.mean().backward()
        opt.step()
    h(feats)
    assert start > 0.95
    assert h.cost.soft.mean().item() < 0.2 * start
    assert (h.cost.executed / h.cost.full).mean().item() < 0.5 * start_exec


def test_softmax_gates_sum_below_one_and_never_zero():
    h = head(activation="softmax")
    h(pyramid())
    for step in h.gates:
        down, up = step["down"], step["up"]
        for level in range(1, len(SIZES) - 1):  # levels with both scale paths
            total = down[level] + up[level]
            assert torch.all(total < 1) and torch.all(total > 0.98)
        assert torch.all(torch.cat([g.flatten() for g in step["depth"]]) > 0)


def test_coarse_gates_are_constant_per_image():
    h = head(coarse=True)
    h(pyramid())
    for step in h.gates:
        for levels in step.values():
            for g in levels:
                if g is not None:
                    assert torch.equal(g, g[:, :, :1, :1].expand_as(g))


# -- the masked-computation seam ----------------------------------------------------

def test_masked_group_norm_matches_per_image_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, 6, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 6, 7, generator=g) > 0.6
    mask[2] = False  # an image with nothing to compute
    w, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    got = dynhead.masked_group_norm(x, mask, 2, w, b)
    for i in range(3):
        ref = torch.zeros(8, 6, 7, dtype=torch.float64)
        for grp in range(2):
            ch = slice(4 * grp, 4 * grp + 4)
            vals = x[i, ch][:, mask[i]]  # (4, n) the computed pixels of this group
            if vals.numel():
                normed = (vals - vals.mean()) / torch.sqrt(vals.var(unbiased=False) + 1e-5)
                ref[ch][:, mask[i]] = normed * w[ch, None] + b[ch, None]
        assert torch.allclose(got[i], ref, atol=1e-10)
    assert torch.allclose(dynhead.masked_group_norm(x, None, 2, w, b), F.group_norm(x, 2, w, b))


def test_masked_conv_zeroes_outside_mask():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 3, 3)
    mask = torch.rand(2, 5, 5) > 0.5
    got = dynhead.masked_conv2d(x, mask, w)
    assert torch.equal(got, F.conv2d(x, w, padding=1) * mask[:, None])


# -- errors ------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"activation": "sigmoid"}, "unknown activation"),
    ({"gated": ("depth", "diagonal")}, "unknown gated paths"),
    ({"gated": "depth"}, "unknown gated paths"),
    ({"channels": 30, "gn_groups": 4}, "divisible by gn_groups"),
    ({"num_levels": 1}, r"num_levels >= 2 \(scale paths go between levels\)"),
    ({"tau": 40.0}, r"tau must lie in \[0, 10\]"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        head(**kw)


@pytest.mark.parametrize("feats,match", [
    (pyramid()[:4], "expected a list of 5 pyramid levels"),
    (pyramid(channels=8), r"expected \(B, 16, H, W\)"),
    (pyramid(sizes=[(16, 20), (16, 20), (4, 5), (2, 3), (1, 2)]), "about 2x apart"),
    (pyramid(sizes=list(reversed(SIZES))), "about 2x apart"),
    (torch.randn(2, C, 8, 8), "expected a list of 5"),
])
def test_bad_features(feats, match):
    with pytest.raises(ValueError, match=match):
        head()(feats)


# -- copied alone ------------------------------------------------------------------

def test_dynhead_runs_when_copied_alone(tmp_path):
    shutil.copy(dynhead.__file__, tmp_path / "dynhead.py")
    script = textwrap.dedent("""
        import torch, dynhead
        head = dynhead.DynamicHead(channels=32, depth=2, gn_groups=8)
        feats = [torch.randn(1, 32, s, s) for s in (16, 8, 4, 2, 1)]
        out = head(feats)
        (sum(o.mean() for o in out) + head.cost.soft.mean()).backward()
        print("ok", dynhead.__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert str(tmp_path) in res.stdout
