"""
RetinaNet with the fine-grained dynamic head: the first row of Tab. 4 (Song et al.,
NeurIPS 2020: RetinaNet R50 35.8 -> 38.2 mAP), and the example of putting
dynhead.py into a detector you do not own. Only dynhead.py needs to lie beside it.

torchvision's RetinaNet (Lin et al., ICCV 2017) keeps everything but its towers:
the anchors (9 per location, P3-P7), the IoU matcher, the focal and box losses,
the post-processing. Its head runs two 4-conv towers level by level; here each
becomes a DynamicHead, which needs all levels at once. The adapter:

    class TowerHead(nn.Module):
        def __init__(self, head, cls_tower, reg_tower):     # head: torchvision's RetinaNetHead
            super().__init__()
            head.classification_head.conv = nn.Identity()   # its predictors stay, per level
            head.regression_head.conv = nn.Identity()
            self.head, self.cls_tower, self.reg_tower = head, cls_tower, reg_tower

        def forward(self, features):                        # all levels at once
            return {"cls_logits": self.head.classification_head(self.cls_tower(features)),
                    "bbox_regression": self.head.regression_head(self.reg_tower(features))}

        def compute_loss(self, *args):                      # torchvision's losses
            return self.head.compute_loss(*args)

and lam * L_budget joins torchvision's loss dict as "loss_budget" (Eq. 6).

Map:
    build_backbone     ResNet + FPN P3-P7 (P6, P7 from C5), as fcos.py builds it
    StaticTower        torchvision's own tower, level by level, its cost reported
    TowerHead          the adapter above, with the head's MACs per image
    RetinaNet          torchvision's RetinaNet: towers "retinanet" | "fixed" | "dynamic"
"""
import functools
import os

import torch
import torchvision
from torch import nn
from torchvision.models.detection import retinanet as tv
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from dynhead import DynamicHead, HeadCost

HEADS = ("retinanet", "fixed", "dynamic")
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def build_backbone(name, pretrained, channels):
    """ResNet (BatchNorm frozen, stem and first stage frozen when ImageNet-pretrained;
    everything trained from scratch otherwise) and an FPN on C3-C5 with P6 / P7 by
    stride-2 convs on C5 and relu(P6): fcos.py's backbone, written again here so that
    this file needs only dynhead.py. pretrained: True, False, a state dict, or its file."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
    if pretrained:
        weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        state = pretrained if isinstance(pretrained, dict) else \
            torch.load(pretrained, map_location="cpu", weights_only=True) \
            if isinstance(pretrained, (str, os.PathLike)) else weights.get_state_dict(progress=False)
        resnet.load_state_dict(state)
        for part in (resnet.conv1, resnet.layer1):
            part.requires_grad_(False)
    c5 = resnet.fc.in_features
    return BackboneWithFPN(resnet, {"layer2": "c3", "layer3": "c4", "layer4": "c5"}, [c5 // 4, c5 // 2, c5],
                           channels, extra_blocks=LastLevelP6P7(c5, channels))


class StaticTower(nn.Module):
    """A tower of torchvision's (4 x conv, GroupNorm if `norm`, ReLU) run level by
    level, with its cost in the form DynamicHead reports it (it computes every pixel)."""

    def __init__(self, tower, channels, norm=True):
        super().__init__()
        self.tower = tower
        self.macs_per_pixel = len(tower) * (9 * channels * channels + channels * norm)  # each conv (and GroupNorm)
        self.cost = None

    def forward(self, features):
        full = float(sum(f.shape[-2] * f.shape[-1] for f in features) * self.macs_per_pixel)
        full = torch.full((features[0].shape[0],), full, dtype=torch.float64, device=features[0].device)
        self.cost = HeadCost(torch.ones_like(full, dtype=torch.float32), full, full)
        return [self.tower(f) for f in features]


class TowerHead(nn.Module):
    """torchvision's RetinaNetHead with its towers run over all levels at once (see
    the module's docstring); after each forward `cost` is the HeadCost of both towers
    and the predictors, per image, and `input_size` the padded input's size."""

    def __init__(self, head, cls_tower, reg_tower):
        super().__init__()
        head.classification_head.conv = nn.Identity()
        head.regression_head.conv = nn.Identity()
        self.head, self.cls_tower, self.reg_tower = head, cls_tower, reg_tower
        c = head.classification_head
        channels = c.cls_logits.in_channels
        self.predictor_macs = 9 * channels * (c.cls_logits.out_channels + head.regression_head.bbox_reg.out_channels)
        self.cost = self.input_size = None

    def forward(self, features):
        out = {"cls_logits": self.head.classification_head(self.cls_tower(features)),
               "bbox_regression": self.head.regression_head(self.reg_tower(features))}
        pred = sum(f.shape[-2] * f.shape[-1] for f in features) * self.predictor_macs
        c, r = self.cls_tower.cost, self.reg_tower.cost
        self.cost = HeadCost((c.soft + r.soft) / 2, c.executed + r.executed + pred, c.full + r.full + pred)
        self.input_size = (features[0].shape[-2] * 8, features[0].shape[-1] * 8)  # P3 is stride 8 of the padded batch
        return out

    def compute_loss(self, *args):
        return self.head.compute_loss(*args)


class RetinaNet(tv.RetinaNet):
    """torchvision's RetinaNet with a choice of towers, in this project's conventions:
    images a list of float (3, H, W) tensors in [0, 1]; targets dicts of boxes (N, 4)
    xyxy and labels (N,) in 0..K-1 (boxes marked iscrowd are not targets). Train mode:
    torchvision's losses plus "loss_budget" (Eq. 6); eval mode: one dict per image,
    boxes, scores, labels, and head_macs / head_macs_full / input_size as FCOS gives.

    head: "retinanet" (torchvision's 4-conv towers, with GroupNorm as its v2 head),
        "fixed" (routing towers, all paths on) or "dynamic"; depth, tau, activation,
        coarse, gated: as in dynhead.DynamicHead. lam: lambda of Eq. 6.
    tower_norm: whether torchvision's towers have their GroupNorm (freeanchor.py's have none).
    """

    def __init__(self, num_classes, backbone="resnet50", head="dynamic", depth=8, lam=0.4, tau=1.5,
                 activation="proposed", coarse=False, gated=("depth", "scale"), pretrained_backbone=True,
                 min_size=800, max_size=1333, channels=256, tower_norm=True):
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        anchors = tv._default_anchorgen()  # 3 sizes x 3 aspect ratios per location, 32..512 px over P3-P7
        # GroupNorm of 8 channels per group: 32 groups at 256 channels, as torchvision's v2 head
        norm = functools.partial(nn.GroupNorm, max(1, channels // 8)) if tower_norm else None
        tv_head = tv.RetinaNetHead(channels, anchors.num_anchors_per_location()[0], num_classes, norm_layer=norm)
        if head == "retinanet":
            towers = [StaticTower(tv_head.classification_head.conv, channels, tower_norm),
                      StaticTower(tv_head.regression_head.conv, channels, tower_norm)]
        else:
            gated = () if head == "fixed" else tuple(gated)
            towers = [DynamicHead(channels, depth, 5, gated=gated, activation=activation, tau=tau, coarse=coarse)
                      for _ in range(2)]
        super().__init__(build_backbone(backbone, pretrained_backbone, channels), num_classes, min_size=min_size,
                         max_size=max_size, anchor_generator=anchors, head=TowerHead(tv_head, *towers))
        self.num_classes = num_classes
        self.dynamic = head == "dynamic" and towers[0].dynamic
        self.lam = lam if self.dynamic else 0.0
        self.head_mac_ratio = None  # executed / full head MACs of the last batch: a tensor, read when logged

    @property
    def towers(self):
        """The two towers by branch, as FCOS names them (eval.py draws their gates)."""
        return {"cls": self.head.cls_tower, "reg": self.head.reg_tower}

    def compute_loss(self, targets, head_outputs, anchors):
        losses = super().compute_loss(targets, head_outputs, anchors)
        soft = self.head.cost.soft
        losses["loss_budget"] = self.lam * soft.mean() if self.lam else soft.new_zeros(())
        return losses

    def forward(self, images, targets=None):
        if targets is not None:  # crowd regions are not targets; labels as torchvision takes them
            targets = [{"boxes": t["boxes"][t["iscrowd"] == 0] if "iscrowd" in t else t["boxes"],
                        "labels": (t["labels"][t["iscrowd"] == 0] if "iscrowd" in t else t["labels"]).long()}
                       for t in targets]
        out = super().forward(images, targets)
        cost = self.head.cost
        self.head_mac_ratio = (cost.executed.sum() / cost.full.sum()).detach()
        if not self.training:
            for r, e, f in zip(out, cost.executed.tolist(), cost.full.tolist()):
                r.update(head_macs=e, head_macs_full=f, input_size=self.head.input_size)
        return out
