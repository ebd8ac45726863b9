"""Tab. 4's FreeAnchor and EfficientDet-D1 (freeanchor.py, efficientdet.py): the
FreeAnchor loss on cases computed by hand, the BiFPN's fusion, the shapes at 600 and
640, and each detector overfitting one image with its own head and the dynamic one."""
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

import efficientdet
import freeanchor


# -- FreeAnchor's loss, by hand --------------------------------------------------------------

def test_mean_max_lies_between_the_mean_and_the_max():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 7, generator=g, dtype=torch.float64) * 0.999
    m = freeanchor.mean_max(x)
    assert (x.mean(1) <= m + 1e-12).all() and (m <= x.max(1).values + 1e-12).all()
    assert torch.allclose(freeanchor.mean_max(x[:, :1]), x[:, 0])  # one element gives itself
    # [0.5, 0.9]: weights 1/(1-x) = 2 and 10: (1 + 9) / 12
    assert freeanchor.mean_max(torch.tensor([0.5, 0.9], dtype=torch.float64)).item() == pytest.approx(10 / 12)
    # near 1 it is the max; all small, the mean
    assert freeanchor.mean_max(torch.tensor([0.1, 0.999999])).item() == pytest.approx(0.999999, abs=1e-5)
    assert freeanchor.mean_max(torch.tensor([1e-4, 3e-4])).item() == pytest.approx(2e-4, rel=1e-3)


def test_saturated_linear():
    iou = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9])
    assert freeanchor.saturated_linear(iou, 0.6, torch.tensor(0.8)).tolist() == pytest.approx([0, 0, 0.5, 1, 1])
    # an object no box reaches past t: a step at t, no division by zero
    assert freeanchor.saturated_linear(torch.tensor([0.3, 0.6]), 0.6, torch.tensor(0.3)).tolist() == [0, 0]


def test_localisation_confidence():
    # smooth-L1 (beta 0.11): 0.5 d^2 / beta below beta, |d| - beta / 2 above
    d = torch.tensor([[0.05, 0.0, 0.2, -1.0]])
    by_hand = 0.5 * 0.05 ** 2 / 0.11 + 0 + (0.2 - 0.055) + (1.0 - 0.055)
    assert freeanchor.localisation_confidence(d, torch.zeros(1, 4)).item() == pytest.approx(math.exp(-0.75 * by_hand))


def test_negative_term():
    assert freeanchor.negative_term(torch.tensor(0.3)).item() == pytest.approx(0.09 * -math.log(0.7))
    assert freeanchor.negative_term(torch.tensor(0.0)).item() == pytest.approx(0, abs=1e-20)
    assert math.isfinite(freeanchor.negative_term(torch.tensor(1.0)).item())  # clamped below 1


def test_two_anchors_by_hand():
    # one object [0, 0, 10, 10] of class 0; anchor 0 on it, anchor 1 shifted 5 px right;
    # both predict zero deltas (their own boxes): IoU with the object 1 and 1/3
    anchors = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10]])
    logits = torch.tensor([[[0.0, -1.0], [1.0, 0.5]]])
    coder = det_utils.BoxCoder(freeanchor.BOX_WEIGHTS)
    target = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}
    losses = freeanchor.free_anchor_loss(logits, torch.zeros(1, 2, 4), [anchors], [target], coder, bag_size=2)
    sig = lambda v: 1 / (1 + math.exp(-v))
    # positive: the bag holds both anchors; anchor 0 encodes the object exactly (p_loc 1),
    # anchor 1 at dx = 10 * (5 - 10) / 10 = -5: smooth-L1 5 - 0.055, p_loc exp(-0.75 * 4.945)
    x = [sig(0.0) * 1.0, sig(1.0) * math.exp(-0.75 * (5 - 0.055))]
    w = [1 / (1 - v) for v in x]
    bag = sum(a * b for a, b in zip(w, x)) / sum(w)
    assert losses["loss_positive"].item() == pytest.approx(0.5 * -math.log(bag), rel=1e-5)
    # negative: P+ of anchor 0 for class 0 is 1 (its box is the object's best), of anchor 1
    # 0 (IoU 1/3 below 0.6); class 1 has no object. FL_(p) = p^2 * -log(1 - p)
    fl = lambda p: p * p * -math.log(1 - p)
    claims = [0.0, sig(-1.0), sig(1.0), sig(0.5)]  # (anchor 0: class 0, 1), (anchor 1: class 0, 1)
    negative = sum(fl(p) for p in claims) / (1 * 2)  # over objects x bag size
    assert losses["loss_negative"].item() == pytest.approx(0.5 * negative, rel=1e-5)


def tiny(detector, head, **kw):
    torch.manual_seed(0)
    make = freeanchor.FreeAnchor if detector == "freeanchor" else efficientdet.EfficientDet
    backbone = "resnet18" if detector == "freeanchor" else "efficientnet_b1"
    return make(3, backbone=backbone, head=head, depth=1, pretrained_backbone=False, min_size=256, max_size=256,
                channels=64, **kw)


@pytest.mark.parametrize("detector", ["freeanchor", "efficientdet"])
def test_an_image_without_objects_gives_a_finite_loss_that_reaches_every_parameter(detector):
    model = tiny(detector, "dynamic")
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model([torch.rand(3, 256, 256)], [empty])
    loss = sum(losses.values())
    assert math.isfinite(loss.item())
    loss.backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None for _, p in trained), [n for n, p in trained if p.grad is None][:5]


# -- EfficientDet-D1 --------------------------------------------------------------------------

def test_the_fusion_weights_stay_normalised():
    node = efficientdet.Fusion(8, 3)
    with torch.no_grad():
        node.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))  # a weight driven below 0 is switched off
    w = node.weights()
    assert (w >= 0).all() and w[1] == 0 and w.sum().item() == pytest.approx(1, abs=1e-4)
    assert torch.allclose(w, torch.tensor([2.0, 0, 0.5]) / (2.5 + 1e-4))
    node.eval()
    xs = [torch.randn(1, 8, 5, 5) for _ in range(3)]
    fused = (xs[0] * 2 + xs[2] * 0.5) / 2.5001
    assert torch.allclose(node(*xs), node.bn(node.conv(F.silu(fused))), atol=1e-6)
    # trained for a while with updates that push its weights around, still normalised
    opt = torch.optim.SGD(node.parameters(), lr=1.0)
    node.train()
    for _ in range(5):
        opt.zero_grad()
        (node(*xs) * torch.randn(1, 8, 5, 5)).sum().backward()
        opt.step()
        w = node.weights()
        assert (w >= 0).all() and w.sum().item() <= 1 and (w.sum().item() > 0.99 or w.sum() == 0)


@pytest.mark.parametrize("size", [600, 640])
def test_the_bifpn_shapes(size):
    backbone = efficientdet.Backbone(88, pretrained=False).eval()
    with torch.no_grad():
        p = backbone(torch.zeros(1, 3, size, size))
    assert [tuple(f.shape[1:]) for f in p.values()] == [(88, math.ceil(size / s), math.ceil(size / s))
                                                       for s in efficientdet.STRIDES]


def test_the_dynamic_efficientdet_d1_builds_at_88_channels():
    model = efficientdet.EfficientDet(80, head="dynamic", depth=8, pretrained_backbone=False)
    own = efficientdet.EfficientDet(80, head="efficientdet", pretrained_backbone=False)
    count = lambda m: sum(p.numel() for p in m.parameters())
    tower = model.head.cls_tower
    assert tower.channels == 88 and tower.routers[0].depth.gn1.num_groups == 11
    print(f"EfficientDet-D1 parameters: its head {count(own) / 1e6:.2f}M, dynamic D8 head {count(model) / 1e6:.2f}M "
          f"(Tab. 4: 6.6M -> 9.4M)")
    # Tab. 4: 6.6M -> 9.4M (to 0.1M), for EfficientDet-D1 and with the dynamic D8 head
    assert round(count(own) / 1e5) == 66 and round(count(model) / 1e5) == 94


# -- each overfits one image, with its own head and the dynamic one ---------------------------

BOXES = torch.tensor([[150.0, 20, 175, 45], [100, 100, 180, 180], [10, 50, 160, 180]])  # P3, P4, P5 anchors


def one_image():
    g = torch.Generator().manual_seed(0)
    img = 0.3 + 0.1 * torch.rand(3, 192, 192, generator=g)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.9]])
    for j in (2, 1, 0):
        x1, y1, x2, y2 = BOXES[j].int().tolist()
        img[:, y1:y2, x1:x2] = colours[j][:, None, None]
    return img, {"boxes": BOXES, "labels": torch.tensor([0, 1, 2])}


def overfit(detector, head, lam, steps, lr):
    """Adam on one image from scratch; returns whether each box is found (IoU >= 0.7,
    its label, score >= 0.3), the executed/full head MACs of each step, and the
    first and last losses."""
    torch.manual_seed(0)
    make = freeanchor.FreeAnchor if detector == "freeanchor" else efficientdet.EfficientDet
    kw = dict(backbone="resnet18") if detector == "freeanchor" else {}
    model = make(3, head=head, depth=2, lam=lam, pretrained_backbone=False, min_size=192, max_size=192, channels=64,
                 **kw)
    img, target = one_image()
    images, targets = [img], [target]
    if detector == "efficientdet":  # BatchNorm per level: P7 is 2x2 here, too few values for one image's
        flipped = BOXES.clone()
        flipped[:, [0, 2]] = img.shape[-1] - BOXES[:, [2, 0]]
        images, targets = [img, img.flip(-1)], [target, {"boxes": flipped, "labels": target["labels"]}]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    first, ratios = None, []
    for _ in range(steps):
        losses = model(images, targets)
        ratios.append(model.head_mac_ratio.item())
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first or {k: v.item() for k, v in losses.items()}
    with torch.no_grad():  # BatchNorm's statistics of the final weights: its running averages
        for m in model.modules():  # (momentum 0.01) lag a hundred steps of fast-changing weights
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the passes below
        for _ in range(3):
            model(images, targets)
        model.eval()
        det = model([img])[0]
    iou = box_iou(BOXES, det["boxes"])
    found = [bool(((iou[j] >= 0.7) & (det["labels"] == j) & (det["scores"] >= 0.3)).any()) for j in range(3)]
    return found, ratios, first, {k: v.item() for k, v in losses.items()}


@pytest.mark.parametrize("detector,head,lam,steps,lr", [("freeanchor", "retinanet", 0.0, 150, 1e-3),
                                                        ("freeanchor", "dynamic", 0.1, 150, 2e-3),
                                                        ("efficientdet", "efficientdet", 0.0, 100, 1e-3),
                                                        ("efficientdet", "dynamic", 0.4, 100, 1e-3)])
def test_overfits_one_image(detector, head, lam, steps, lr):
    # FreeAnchor's boxes tighten more slowly than a matcher's (each object's loss is spread over
    # its bag of 50 anchors): more steps, and for the dynamic head a smaller budget weight
    found, ratios, first, last = overfit(detector, head, lam, steps, lr)
    assert found == [True] * 3, (found, first, last)
    if head == "dynamic":  # the budget switches gates off: against lam = 0, at step 30
        assert last["loss_budget"] < first["loss_budget"]
        free = overfit(detector, head, 0.0, 30, lr)[1]
        assert ratios[29] < 0.8 * free[-1], (ratios[29], free[-1])
