"""
EfficientDet-D1 with the fine-grained dynamic head: Tab. 4's last row (Song et al.,
NeurIPS 2020: 38.2 -> 38.8 mAP, FLOPs at 600x600). EfficientDet (Tan, Pang and Le,
"EfficientDet: Scalable and Efficient Object Detection", CVPR 2020) changes
everything around the head: an EfficientNet backbone, a BiFPN of 88 channels in
place of the FPN, BatchNorm per level in a head of depthwise-separable convs. The
dynamic head drops in unchanged at 88 channels, with GroupNorms of 11 groups (8
channels each, as at 256 channels with 32 groups).

torchvision gives EfficientNet-B1 (and its ImageNet weights), the anchors, the IoU
matcher, the box coder, the focal loss and the post-processing (its RetinaNet,
which EfficientDet is in its detection parts); the BiFPN, P6/P7 and the head are
written here (docs/DESIGN.md §9).

Map:
    separable_conv, Fusion       a BiFPN node: fast normalised fusion, swish, separable conv + BN
    BiFPN                        one layer: top-down, then bottom-up (the paper's Fig. 2d)
    Backbone                     EfficientNet-B1 -> P3-P5 -> P6, P7 -> 4 BiFPN layers
    SeparableTower               EfficientDet's own tower: shared separable convs, BN per level
    Head                         towers and predictors over all levels, the head's MACs
    EfficientDet                 the detector: anchors 4 x 2^(k/3) x stride, focal loss
                                 (gamma 1.5), Huber box loss, the budget term
"""
import collections
import functools
import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection import retinanet as tv
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import box_iou, sigmoid_focal_loss

import retinanet
from dynhead import DynamicHead, HeadCost

HEADS = ("efficientdet", "fixed", "dynamic")
STRIDES = (8, 16, 32, 64, 128)
TAPS = (3, 5, 7)  # EfficientNet-B1's feature blocks that end at strides 8, 16, 32 (40, 112, 320 channels)
BIFPN_LAYERS, HEAD_CONVS = 4, 3  # D1
FOCAL_GAMMA, HUBER_DELTA, BOX_WEIGHT = 1.5, 0.1, 50.0
BN = functools.partial(nn.BatchNorm2d, momentum=0.01, eps=1e-3)  # EfficientDet's BatchNorm


def separable_conv(channels, out_channels=None, bias=True):
    """A depthwise 3x3 conv, then a pointwise 1x1: EfficientDet's conv."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                         nn.Conv2d(channels, out_channels or channels, 1, bias=bias))


# -----------------------------------------------------------------------------
# The BiFPN

class Fusion(nn.Module):
    """One BiFPN node: the fast normalised fusion of its inputs,
    sum_i relu(w_i) I_i / (sum_j relu(w_j) + 1e-4) -- weights that stay >= 0 and sum
    to about 1 whatever the raw parameters become, without a softmax -- then swish,
    a separable conv and BatchNorm."""

    def __init__(self, channels, inputs):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(inputs))
        self.conv = separable_conv(channels)
        self.bn = BN(channels)

    def weights(self):
        w = F.relu(self.weight)
        return w / (w.sum() + 1e-4)

    def forward(self, *inputs):
        fused = sum(w * x for w, x in zip(self.weights(), inputs))
        return self.bn(self.conv(F.silu(fused)))


def up(x, like):
    return F.interpolate(x, size=like.shape[-2:], mode="nearest")


def down(x, like):
    x = F.max_pool2d(x, 3, 2, 1)  # ceil(n / 2): the sizes P6 and P7 are made with
    return x if x.shape[-2:] == like.shape[-2:] else F.interpolate(x, size=like.shape[-2:], mode="nearest")


class BiFPN(nn.Module):
    """One layer over P3-P7: a top-down path (each level fused with the one above,
    upsampled), then a bottom-up path (each level fused with its input, its
    top-down node and the one below, max-pooled); the ends have two inputs."""

    def __init__(self, channels, levels=5):
        super().__init__()
        self.top_down = nn.ModuleList(Fusion(channels, 2) for _ in range(levels - 1))  # P6td .. P3out
        self.bottom_up = nn.ModuleList(Fusion(channels, 3 if n < levels - 1 else 2) for n in range(1, levels))

    def forward(self, p):
        L = len(p)
        td = [None] * L
        td[-1] = p[-1]
        for i, n in enumerate(range(L - 2, -1, -1)):  # P6, P5, ..., P3
            td[n] = self.top_down[i](p[n], up(td[n + 1], p[n]))
        out = [td[0]]
        for i, n in enumerate(range(1, L)):  # P4, ..., P7
            below = down(out[-1], p[n])
            out.append(self.bottom_up[i](p[n], td[n], below) if n < L - 1 else self.bottom_up[i](p[n], below))
        return out


class Backbone(nn.Module):
    """EfficientNet-B1's blocks up to stride 32; P3-P5 projected to `channels` (1x1
    conv + BN), P6 = maxpool(BN(1x1 conv(C5))), P7 = maxpool(P6); then the BiFPN
    layers. Returns an ordered dict of P3..P7, as torchvision's detectors take it.
    The projections are made once, before the first layer (the official model
    makes a second set for the first layer's bottom-up inputs: a few 1x1 convs)."""

    def __init__(self, channels, pretrained):
        super().__init__()
        net = torchvision.models.efficientnet_b1(weights=None)
        if pretrained:
            state = pretrained if isinstance(pretrained, dict) else \
                torch.load(pretrained, map_location="cpu", weights_only=True) if isinstance(pretrained, str) else \
                torchvision.models.EfficientNet_B1_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
            net.load_state_dict(state)
        self.body = net.features[:TAPS[-1] + 1]
        widths = [self.body[t][-1].out_channels for t in TAPS]  # 40, 112, 320
        project = lambda c: nn.Sequential(nn.Conv2d(c, channels, 1), BN(channels))
        self.lateral = nn.ModuleList(project(c) for c in widths)
        self.p6 = project(widths[-1])
        self.layers = nn.Sequential(*[BiFPN(channels) for _ in range(BIFPN_LAYERS)])
        self.out_channels = channels

    def forward(self, x):
        taps = []
        for i, block in enumerate(self.body):
            x = block(x)
            if i in TAPS:
                taps.append(x)
        p = [lateral(c) for lateral, c in zip(self.lateral, taps)]
        p.append(F.max_pool2d(self.p6(taps[-1]), 3, 2, 1))
        p.append(F.max_pool2d(p[-1], 3, 2, 1))
        p = self.layers(p)
        return collections.OrderedDict((f"p{n + 3}", f) for n, f in enumerate(p))


# -----------------------------------------------------------------------------
# The head

class SeparableTower(nn.Module):
    """EfficientDet's own tower: HEAD_CONVS separable convs shared across levels,
    each followed by a BatchNorm of the level's own (the levels' statistics differ)
    and swish; its cost reported as DynamicHead reports its own."""

    def __init__(self, channels, levels=5):
        super().__init__()
        self.convs = nn.ModuleList(separable_conv(channels) for _ in range(HEAD_CONVS))
        self.bns = nn.ModuleList(nn.ModuleList(BN(channels) for _ in range(levels)) for _ in range(HEAD_CONVS))
        self.macs_per_pixel = HEAD_CONVS * (9 * channels + channels * channels + channels)
        self.cost = None

    def forward(self, features):
        outs = []
        for level, x in enumerate(features):
            for conv, bns in zip(self.convs, self.bns):
                x = F.silu(bns[level](conv(x)))
            outs.append(x)
        full = float(sum(f.shape[-2] * f.shape[-1] for f in features) * self.macs_per_pixel)
        full = torch.full((features[0].shape[0],), full, dtype=torch.float64, device=features[0].device)
        self.cost = HeadCost(torch.ones_like(full, dtype=torch.float32), full, full)
        return outs


class Head(nn.Module):
    """Two towers (classification, box) over all levels, then the predictors shared
    across levels: separable convs with EfficientDet's own towers, dense 3x3 convs
    with the routing towers (the parameter counts of Tab. 4 fit those). Returns
    torchvision's RetinaNet outputs, (B, sum H*W*A, K) logits and (B, sum H*W*A, 4)
    box deltas; `cost` the HeadCost of towers and predictors, `input_size` the
    padded input's."""

    def __init__(self, cls_tower, reg_tower, channels, num_anchors, num_classes, separable):
        super().__init__()
        self.cls_tower, self.reg_tower = cls_tower, reg_tower
        self.num_anchors, self.num_classes = num_anchors, num_classes
        conv = (lambda c: separable_conv(channels, c)) if separable else (lambda c: nn.Conv2d(channels, c, 3, padding=1))
        self.cls, self.box = conv(num_anchors * num_classes), conv(num_anchors * 4)
        for p in (self.cls, self.box):
            for m in p.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, std=0.01)
        self.cls_bias.data.fill_(-math.log((1 - 0.01) / 0.01))  # class prior 0.01
        self.box_bias.data.zero_()
        k = num_anchors * (num_classes + 4)
        self.predictor_macs = (9 * channels * 2 + channels * k) if separable else 9 * channels * k
        self.cost = self.input_size = None

    @property
    def cls_bias(self):
        return (self.cls[-1] if isinstance(self.cls, nn.Sequential) else self.cls).bias

    @property
    def box_bias(self):
        return (self.box[-1] if isinstance(self.box, nn.Sequential) else self.box).bias

    def flat(self, maps, k):
        """(B, A*k, H, W) per level -> (B, sum H*W*A, k), anchors per location innermost."""
        return torch.cat([m.view(m.shape[0], self.num_anchors, k, *m.shape[-2:]).permute(0, 3, 4, 1, 2)
                          .reshape(m.shape[0], -1, k) for m in maps], 1)

    def forward(self, features):
        cls = self.flat([self.cls(x) for x in self.cls_tower(features)], self.num_classes)
        box = self.flat([self.box(x) for x in self.reg_tower(features)], 4)
        pred = sum(f.shape[-2] * f.shape[-1] for f in features) * self.predictor_macs
        c, r = self.cls_tower.cost, self.reg_tower.cost
        self.cost = HeadCost((c.soft + r.soft) / 2, c.executed + r.executed + pred, c.full + r.full + pred)
        self.input_size = (features[0].shape[-2] * 8, features[0].shape[-1] * 8)
        return {"cls_logits": cls, "bbox_regression": box}


# -----------------------------------------------------------------------------
# The detector

class EfficientDet(retinanet.RetinaNet):
    """EfficientDet-D1 in this project's conventions (those of retinanet.RetinaNet:
    images a list of float (3, H, W) in [0, 1]; losses in training, detections with
    head_macs in eval). head: "efficientdet" (its own separable towers), "fixed" or
    "dynamic" (routing towers at `channels`, GroupNorms of 8 channels each);
    pretrained_backbone: EfficientNet-B1's ImageNet weights (True, a file, a state
    dict) or False. Input 640 (min_size = max_size: the longer side to 640)."""

    def __init__(self, num_classes, backbone="efficientnet_b1", head="dynamic", depth=8, lam=0.4, tau=1.5,
                 activation="proposed", coarse=False, gated=("depth", "scale"), pretrained_backbone=True,
                 min_size=640, max_size=640, channels=88):
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        if backbone != "efficientnet_b1":
            raise ValueError(f"EfficientDet-D1's backbone is efficientnet_b1, got {backbone!r}")
        if channels % 8:
            raise ValueError(f"channels ({channels}) must be a multiple of 8: GroupNorms of 8 channels per group")
        # anchors: 3 octave scales (4 x 2^(k/3) x stride) x 3 aspect ratios per location
        anchors = AnchorGenerator(tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in STRIDES),
                                  ((0.5, 1.0, 2.0),) * len(STRIDES))
        if head == "efficientdet":
            towers = [SeparableTower(channels), SeparableTower(channels)]
        else:
            gated = () if head == "fixed" else tuple(gated)
            towers = [DynamicHead(channels, depth, len(STRIDES), gated=gated, activation=activation, tau=tau,
                                  coarse=coarse, gn_groups=channels // 8) for _ in range(2)]
        head_module = Head(*towers, channels, anchors.num_anchors_per_location()[0], num_classes,
                           separable=head == "efficientdet")
        tv.RetinaNet.__init__(self, Backbone(channels, pretrained_backbone), num_classes, min_size=min_size,
                              max_size=max_size, anchor_generator=anchors, head=head_module)
        # IoU >= 0.5 positive, below negative, and every object its best anchor
        self.proposal_matcher = det_utils.Matcher(0.5, 0.5, allow_low_quality_matches=True)
        self.num_classes = num_classes
        self.dynamic = head == "dynamic" and towers[0].dynamic
        self.lam = lam if self.dynamic else 0.0
        self.head_mac_ratio = None

    def compute_loss(self, targets, head_outputs, anchors):
        """EfficientDet's losses: focal (alpha 0.25, gamma 1.5) over all anchors and
        Huber (delta 0.1) on the positives' box deltas, x 50, each over the number of
        positives (the box loss per coordinate); plus Eq. 6's budget term."""
        cls, box = head_outputs["cls_logits"], head_outputs["bbox_regression"]
        onehots, box_losses, positives = [], [], 0
        for logits, deltas, a, t in zip(cls, box, anchors, targets):
            onehot = torch.zeros_like(logits, dtype=torch.float32)
            if len(t["boxes"]):
                matched = self.proposal_matcher(box_iou(t["boxes"], a))  # (A,): object, or < 0
                fg = matched >= 0
                onehot[fg, t["labels"][matched[fg]]] = 1
                target = self.box_coder.encode_single(t["boxes"][matched[fg]], a[fg])
                box_losses.append(F.huber_loss(deltas[fg].float(), target, delta=HUBER_DELTA, reduction="sum"))
                positives += int(fg.sum())
            onehots.append(onehot)
        n = max(positives, 1)
        loss_cls = sigmoid_focal_loss(cls.float(), torch.stack(onehots), alpha=0.25, gamma=FOCAL_GAMMA,
                                      reduction="sum") / n
        loss_box = sum(box_losses) / (4 * n) * BOX_WEIGHT if box_losses else box.sum() * 0
        soft = self.head.cost.soft
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box + box.sum() * 0,
                "loss_budget": self.lam * soft.mean() if self.lam else soft.new_zeros(())}
