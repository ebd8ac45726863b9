"""
FCOS with the fine-grained dynamic head: the detector of the paper's experiments
(Song et al., NeurIPS 2020, §3, Tab. 1-3), in three parts as DETR has them: the
model, the criterion (targets and losses, plus Eq. 6's budget term) and the
post-processing (detections).

FCOS itself is Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection"
(ICCV 2019); the details follow the authors' FCOS configuration (docs/DESIGN.md §6).
Torchvision provides the ResNet, frozen BatchNorm, the FPN, the focal and GIoU
losses and NMS; the head and everything FCOS-specific is written here.

The authors' conventions (docs/DESIGN.md §8), where they differ from this project's,
are one switch, `style="authors"`: their released COCO models (convert.py) run
with it. Each is a small branch at the line it changes, marked "DESIGN §8 (n)".

Map:
    build_backbone        ResNet (frozen BN, stem + stage 1 frozen), FPN P3-P7
    msra_strides          the authors' ResNet: res3-5 strided in the first 1x1 conv
    ConvTower, Predictors FCOS's 4-conv tower; the shared 3x3 predictors
    locations             the image point of every feature cell
    assign_targets        center sampling, size ranges, smallest-area tie-break
    assign_targets_atss   ATSS: IoU above mean + std of the nearest anchors, per box
    FCOS                  the model: preprocess (normalise, resize, pad), backbone,
                          one tower per branch ("fcos" | "fixed" | "dynamic"),
                          predictors, the head's MACs; in train mode the losses
                          of its Criterion, in eval mode its PostProcess's detections
    Criterion             focal + GIoU + centerness + lambda * budget (Eq. 6)
    PostProcess           candidates, class-wise NMS, boxes mapped back
    clip, authors_size    boxes clipped to an image; the authors' resize rounding
    build_model           the model a run's arguments describe
"""
import math
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import batched_nms, box_iou, generalized_box_iou_loss, sigmoid_focal_loss
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms.v2 import functional as TF

from dynhead import DynamicHead, HeadCost

STRIDES = (8, 16, 32, 64, 128)  # P3..P7
SIZE_RANGES = ((0, 64), (64, 128), (128, 256), (256, 512), (512, math.inf))  # max regression distance
CENTER_RADIUS = 1.5  # center sampling, in strides
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
HEADS = ("fcos", "fixed", "dynamic")
ASSIGNERS = ("fcos", "atss")
STYLES = ("torchvision", "authors")  # this project's conventions, or the authors' (DESIGN §8)
ATSS_TOP_K, ATSS_ANCHOR_SCALE = 9, 8  # candidates per level; anchor side in strides (Zhang et al., 2020)
# the arguments of a run that the model is built from (checkpoints record them)
MODEL_KEYS = ("detector", "backbone", "head", "assigner", "depth", "lam", "tau", "activation", "coarse", "gated",
              "min_size", "max_size", "channels", "style")


# -----------------------------------------------------------------------------
# Backbone and FPN (§3.1)

def build_backbone(name, pretrained, channels, style="torchvision"):
    """ResNet with frozen BatchNorm, stem and first stage frozen, FPN on C3-C5, and
    P6 / P7 by stride-2 3x3 convs on C5 and relu(P6) (docs/DESIGN.md §6; torchvision's
    LastLevelP6P7 starts from P5 instead where C5 has as many channels as the FPN:
    resnet18/34 with channels=512).

    Without pretrained weights nothing is frozen and BatchNorm trains, as in
    torchvision's detectors: frozen random layers would only hold training back."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES}")
    norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm)
    if style == "authors":
        msra_strides(resnet)
    if pretrained:
        resnet.load_state_dict(imagenet_weights(name, pretrained))
        for part in (resnet.conv1, resnet.layer1):  # stem and first stage stay frozen (§3.1)
            part.requires_grad_(False)
    c5 = resnet.fc.in_features  # 512 (resnet18/34) or 2048
    in_channels = [c5 // 4, c5 // 2, c5]
    return BackboneWithFPN(resnet, {"layer2": "c3", "layer3": "c4", "layer4": "c5"}, in_channels, channels,
                           extra_blocks=LastLevelP6P7(c5, channels))


def msra_strides(resnet):
    """DESIGN §8 (1): the authors' ResNet is MSRA's (Caffe2's, detectron2's): the first
    block of res3-5 strides in its 1x1 conv1; torchvision's ("ResNet v1.5") in the 3x3
    conv2. The weights have the same shapes either way, but not the same features.
    A basic block (resnet18/34) has no 1x1 conv: nothing moves."""
    for stage in (resnet.layer2, resnet.layer3, resnet.layer4):
        block = stage[0]
        if hasattr(block, "conv3"):  # a bottleneck block
            block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)


def imagenet_weights(name, pretrained):
    """ImageNet weights: torchvision's own (downloaded once), a local file, or a
    state dict already loaded (train.py loads and checks it before a run)."""
    if isinstance(pretrained, dict):
        return pretrained
    if isinstance(pretrained, (str, os.PathLike)):
        if not os.path.isfile(pretrained):
            raise FileNotFoundError(f"pretrained_backbone={pretrained!r}: no such file; pass the path of a "
                                    f"torchvision {name} state dict, True to download it, or False")
        return torch.load(pretrained, map_location="cpu", weights_only=True)
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as error:  # no network, proxy, ...
        target = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise RuntimeError(f"could not download the ImageNet weights of {name} ({error}). Download "
                           f"{weights.url} on a machine with network and put it at {target}, or pass "
                           f"pretrained_backbone='/path/to/{os.path.basename(weights.url)}'") from error


# -----------------------------------------------------------------------------
# The head: one tower per branch, shared predictors (FCOS, §3.1)

class ConvTower(nn.Module):
    """FCOS's own tower: 4 x (3x3 conv, GN, ReLU); FLOP-equivalent to a D2 routing tower."""

    def __init__(self, channels, num_convs=4, gn_groups=32):
        super().__init__()
        layers = []
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, channels, 3, padding=1)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.GroupNorm(gn_groups, channels), nn.ReLU()]
        self.tower = nn.Sequential(*layers)
        self.macs_per_pixel = num_convs * (9 * channels * channels + channels)  # + GN, as dynhead counts
        self.cost = None

    def forward(self, features):
        outs = [self.tower(f) for f in features]
        full = sum(f.shape[-2] * f.shape[-1] for f in features) * self.macs_per_pixel
        full = torch.full((features[0].shape[0],), float(full), dtype=torch.float64, device=features[0].device)
        self.cost = HeadCost(torch.ones_like(full, dtype=torch.float32), full, full)  # it computes everything
        return outs


class Predictors(nn.Module):
    """3x3 predictors shared across levels: class logits (cls branch), box distances
    and centerness (reg branch), and one learnable scale per level."""

    def __init__(self, channels, num_classes, num_levels):
        super().__init__()
        self.cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.box = nn.Conv2d(channels, 4, 3, padding=1)
        self.ctr = nn.Conv2d(channels, 1, 3, padding=1)
        for conv in (self.cls, self.box, self.ctr):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.cls.bias, -math.log((1 - 0.01) / 0.01))  # focal loss prior 0.01
        # Every cell starts with a box one stride to each side (the authors: bias 0). With
        # bias 0 about half the distances start at relu(.) = 0, and a box of zero width
        # gets no GIoU gradient to grow, only to shrink: from scratch the branch can die.
        nn.init.constant_(self.box.bias, 1.0)
        self.scales = nn.Parameter(torch.ones(num_levels))
        self.macs_per_pixel = 9 * channels * (num_classes + 4 + 1)

    def forward(self, cls_feats, reg_feats):
        """Returns (B, P, K) logits, (B, P, 4) distances in pixels, (B, P) centerness
        logits, all levels concatenated, finest first, cells in row-major order."""
        flat = lambda t: t.flatten(2).transpose(1, 2)  # (B, k, H, W) -> (B, H*W, k)
        cls, box, ctr = [], [], []
        for level, (c, r) in enumerate(zip(cls_feats, reg_feats)):
            cls.append(flat(self.cls(c)))
            # the authors' FCOS: relu(scale_l * conv(x)) * stride_l
            box.append(flat(F.relu(self.scales[level] * self.box(r)) * STRIDES[level]))
            ctr.append(flat(self.ctr(r))[..., 0])
        return torch.cat(cls, 1), torch.cat(box, 1), torch.cat(ctr, 1)


# -----------------------------------------------------------------------------
# Locations and targets (FCOS §3.1-3.3, docs/DESIGN.md §6)

def locations(sizes, device, centred=True):
    """Image points (P, 2) of every cell, (x*s + s//2, y*s + s//2), finest level
    first, and the level index (P,) of each. centred=False: (x*s, y*s), the
    authors' (DESIGN §8 (3))."""
    points, levels = [], []
    for level, ((h, w), s) in enumerate(zip(sizes, STRIDES)):
        y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        points.append(torch.stack([x.reshape(-1), y.reshape(-1)], 1) * s + (s // 2 if centred else 0))
        levels.append(torch.full((h * w,), level, device=device))
    return torch.cat(points).float(), torch.cat(levels)


def assign_targets(points, levels, boxes, labels):
    """For one image: the box matched to each location, or -1 (background).

    A location is positive for a box if it lies inside the box and within 1.5
    strides of its centre (center sampling), and its largest distance to the box
    sides falls in its level's range; among several boxes the smallest wins.
    points (P, 2); levels (P,); boxes (M, 4) xyxy; labels (M,). Returns the
    matched index (P,) and the regression targets (P, 4) = (l, t, r, b).
    """
    P = points.shape[0]
    if boxes.numel() == 0:
        return torch.full((P,), -1, dtype=torch.long, device=points.device), points.new_zeros(P, 4)
    x, y = points[:, 0, None], points[:, 1, None]                       # (P, 1)
    x1, y1, x2, y2 = boxes.unbind(1)                                     # (M,)
    ltrb = torch.stack([x - x1, y - y1, x2 - x, y2 - y], 2)              # (P, M, 4)
    stride = torch.tensor(STRIDES, device=points.device, dtype=points.dtype)[levels][:, None]
    radius = stride * CENTER_RADIUS
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    # the centre region, clipped to the box: inside it means inside both
    in_center = ((x > torch.maximum(x1, cx - radius)) & (x < torch.minimum(x2, cx + radius)) &
                 (y > torch.maximum(y1, cy - radius)) & (y < torch.minimum(y2, cy + radius)))
    ranges = torch.tensor(SIZE_RANGES, device=points.device, dtype=points.dtype)[levels]  # (P, 2)
    reach = ltrb.max(2).values
    in_range = (reach > ranges[:, :1]) & (reach <= ranges[:, 1:])
    area = ((x2 - x1) * (y2 - y1))[None].expand(P, -1)
    area = torch.where(in_center & in_range, area, torch.full_like(area, math.inf))
    best_area, matched = area.min(1)                                     # smallest box wins
    matched = torch.where(torch.isinf(best_area), torch.full_like(matched, -1), matched)
    return matched, ltrb[torch.arange(P, device=points.device), matched.clamp_min(0)]


def assign_targets_atss(points, levels, boxes, labels, k=ATSS_TOP_K):
    """ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free
    Detection via Adaptive Training Sample Selection", CVPR 2020) as FCOS's other
    assigner, for one image. Each location has one square anchor of side 8 strides.
    For each box, the k locations of each level whose points lie nearest the box
    centre are its candidates; a candidate is positive where its anchor's IoU with
    the box is at least the mean + std of the candidates' IoUs and its point lies
    inside the box; a location positive for several boxes takes the one of largest
    IoU. Same inputs and outputs as assign_targets."""
    P = points.shape[0]
    if boxes.numel() == 0:
        return torch.full((P,), -1, dtype=torch.long, device=points.device), points.new_zeros(P, 4)
    half = torch.tensor(STRIDES, device=points.device, dtype=points.dtype)[levels][:, None] * ATSS_ANCHOR_SCALE / 2
    ious = box_iou(torch.cat([points - half, points + half], 1), boxes)              # (P, M)
    distance = torch.cdist(points, (boxes[:, :2] + boxes[:, 2:]) / 2)                 # (P, M)
    candidates = []
    for level in range(len(STRIDES)):
        at = (levels == level).nonzero()[:, 0]
        if len(at):
            candidates.append(at[distance[at].topk(min(k, len(at)), dim=0, largest=False).indices])  # (k, M)
    candidates = torch.cat(candidates)                                                # (L*k, M)
    candidate_ious = ious.gather(0, candidates)
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)                        # (M,): unbiased, as ATSS
    positive = torch.zeros_like(ious, dtype=torch.bool).scatter_(0, candidates, candidate_ious >= threshold)
    x, y = points[:, 0, None], points[:, 1, None]
    x1, y1, x2, y2 = boxes.unbind(1)
    ltrb = torch.stack([x - x1, y - y1, x2 - x, y2 - y], 2)                          # (P, M, 4)
    positive &= ltrb.min(2).values > 0                                                # the point inside the box
    best, matched = torch.where(positive, ious, torch.full_like(ious, -1)).max(1)      # largest IoU wins
    matched = torch.where(best < 0, torch.full_like(matched, -1), matched)
    return matched, ltrb[torch.arange(P, device=points.device), matched.clamp_min(0)]


def centerness_target(ltrb):
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)), FCOS Eq. 3."""
    lr, tb = ltrb[:, 0::2], ltrb[:, 1::2]
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


def ltrb_to_boxes(points, ltrb):
    return torch.cat([points - ltrb[:, :2], points + ltrb[:, 2:]], 1)


def mean_over_ranks(value):
    """A loss normaliser averaged over all processes, as FCOS does under DDP."""
    value = value.detach().float()
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


# -----------------------------------------------------------------------------
# The model

class FCOS(nn.Module):
    """FCOS with a choice of head. Images: a list of float (3, H, W) tensors in
    [0, 1]. Train mode: model(images, targets) -> dict of losses. Eval mode:
    model(images) -> one dict per image: boxes (xyxy, in the image's own
    coordinates), scores, labels, the head's executed and full MACs, and the
    padded input size (for the backbone's MACs).

    head: "fcos" (4-conv towers), "fixed" (routing towers, all paths on, no gates:
        Tab. 1) or "dynamic"; depth, tau, activation, coarse, gated: as in
        dynhead.DynamicHead (gated: the path types with gates, Tab. 3).
    lam: lambda of Eq. 6, the weight of the budget loss.
    pretrained_backbone: True (torchvision's ImageNet weights), False, a file, or a state dict.
    channels: FPN and head width (the paper: 256).
    assigner: "fcos" (center sampling and size ranges) or "atss" (Tab. 4's ATSS).
    style: "torchvision" (this project's conventions) or "authors" (those of the
        authors' code and released models, DESIGN §8: MSRA ResNet, locations at
        x*s, the scale paths' GroupNorm over all pixels, their candidates and
        clipping, their resize).
    """

    def __init__(self, num_classes, backbone="resnet50", head="dynamic", depth=8, lam=0.4, tau=1.5,
                 activation="proposed", coarse=False, gated=("depth", "scale"), pretrained_backbone=True,
                 min_size=800, max_size=1333, channels=256, assigner="fcos", style="torchvision"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r}; expected one of {HEADS}")
        if assigner not in ASSIGNERS:
            raise ValueError(f"unknown assigner {assigner!r}; expected one of {ASSIGNERS}")
        if style not in STYLES:
            raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.head, self.style = num_classes, head, style
        self.min_size, self.max_size = min_size, max_size
        self.backbone = build_backbone(backbone, pretrained_backbone, channels, style)
        if head == "fcos":
            self.cls_tower, self.reg_tower = ConvTower(channels), ConvTower(channels)
        else:
            gated = () if head == "fixed" else tuple(gated)
            make = lambda: DynamicHead(channels, depth, len(STRIDES), gated=gated, activation=activation, tau=tau,
                                       coarse=coarse, dense_scale_norm=style == "authors")  # DESIGN §8 (4)
            self.cls_tower, self.reg_tower = make(), make()
        self.predictors = Predictors(channels, num_classes, len(STRIDES))
        self.dynamic = head == "dynamic" and self.cls_tower.dynamic
        self.criterion = Criterion(num_classes, lam if self.dynamic else 0.0, assigner)
        self.postprocess = PostProcess(authors=style == "authors")
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self.head_mac_ratio = None  # executed / full head MACs of the last batch: a tensor, read when logged
        # channels-last weights and inputs: oneDNN's and cuDNN's convs run faster so
        self.to(memory_format=torch.channels_last)

    @property
    def towers(self):
        """The two towers by branch (eval.py draws their gates, Fig. 4)."""
        return {"cls": self.cls_tower, "reg": self.reg_tower}

    # -- input -------------------------------------------------------------------

    def preprocess(self, images, targets=None):
        """Normalise, resize (shorter side min_size, longer at most max_size), pad
        to a multiple of 32. Returns the batch, each image's resized size and scale,
        and the targets in resized coordinates."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("images must be a non-empty list of (3, H, W) float tensors in [0, 1]")
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets; pass one target dict per image")
        resized, sizes, scales = [], [], []
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point() or 0 in img.shape:
                raise ValueError(f"image {i}: expected a float (3, H, W) tensor in [0, 1], H and W > 0, "
                                 f"got {img.dtype} {tuple(img.shape)}")
            h, w = img.shape[-2:]
            if self.style == "authors":  # DESIGN §8 (6): their sizes, PIL's bilinear on the 8-bit image
                size = authors_size(h, w, self.min_size, self.max_size)
                img = TF.resize(img.mul(255).round_().clamp_(0, 255).to(torch.uint8), list(size),
                                antialias=True).float() / 255  # torchvision's uint8 resize: PIL's filter
                img = (img.to(self.mean) - self.mean) / self.std
            else:
                scale = min(self.min_size / min(h, w), self.max_size / max(h, w))
                size = (max(1, round(h * scale)), max(1, round(w * scale)))
                img = (img.to(self.mean) - self.mean) / self.std  # the model's device and dtype
                img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False)[0]
            resized.append(img), sizes.append(size), scales.append((size[1] / w, size[0] / h))
        H = math.ceil(max(s[0] for s in sizes) / 32) * 32
        W = math.ceil(max(s[1] for s in sizes) / 32) * 32
        batch = torch.empty((len(images), 3, H, W), dtype=resized[0].dtype, device=resized[0].device,
                            memory_format=torch.channels_last).zero_()
        for img, b in zip(resized, batch):
            b[:, :img.shape[1], :img.shape[2]].copy_(img)
        if targets is not None:
            targets = [self.check_target(t, i, s) for i, (t, s) in enumerate(zip(targets, scales))]
        return batch, sizes, scales, targets

    def check_target(self, target, i, scale):
        if not isinstance(target, dict) or not {"boxes", "labels"} <= target.keys():
            raise ValueError(f"target {i}: expected a dict with 'boxes' (N, 4) xyxy and 'labels' (N,), "
                             f"got {type(target).__name__} {list(target) if isinstance(target, dict) else ''}")
        boxes, labels = target["boxes"].to(self.mean.device).float(), target["labels"].to(self.mean.device)
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: expected boxes (N, 4) xyxy and labels (N,), "
                             f"got {tuple(boxes.shape)} and {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"target {i}: labels must lie in [0, {self.num_classes}), "
                             f"got {labels.min().item()}..{labels.max().item()}")
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            warnings.warn(f"target {i}: dropped {degenerate.sum().item()} degenerate box(es) "
                          f"of zero or negative width/height")
        keep = ~degenerate
        if "iscrowd" in target:  # crowd regions are not targets
            keep &= target["iscrowd"].to(keep.device) == 0
        sx, sy = scale
        return {"boxes": boxes[keep] * boxes.new_tensor([sx, sy, sx, sy]), "labels": labels[keep].long()}

    # -- forward -----------------------------------------------------------------

    def forward(self, images, targets=None):
        if self.training and targets is None:
            raise ValueError("in training mode, pass targets: one dict with 'boxes' and 'labels' per image")
        batch, sizes, scales, targets = self.preprocess(images, targets)
        features = list(self.backbone(batch).values())  # P3..P7, each (B, C, H_l, W_l)
        cls, box, ctr = self.predictors(self.cls_tower(features), self.reg_tower(features))
        cost = self.head_cost(features)
        self.head_mac_ratio = (cost.executed.sum() / cost.full.sum()).detach()  # no host sync here
        points, levels = locations([f.shape[-2:] for f in features], batch.device, centred=self.style != "authors")
        if self.training:
            return self.criterion(cls, box, ctr, points, levels, targets, cost.soft)
        originals = [tuple(img.shape[-2:]) for img in images]
        results = self.postprocess(cls, box, ctr, points, levels, sizes, scales, originals)
        for r, e, f in zip(results, cost.executed.tolist(), cost.full.tolist()):
            r.update(head_macs=e, head_macs_full=f, input_size=tuple(batch.shape[-2:]))
        return results

    def head_cost(self, features):
        """The HeadCost of the whole head, per image: both towers and the predictors
        (which run everywhere); soft is Eq. 5 over both towers, which have the same
        full cost, so their ratios' mean."""
        pixels = sum(f.shape[-2] * f.shape[-1] for f in features)
        pred = pixels * self.predictors.macs_per_pixel
        c, r = self.cls_tower.cost, self.reg_tower.cost
        return HeadCost((c.soft + r.soft) / 2, c.executed + r.executed + pred, c.full + r.full + pred)



# -----------------------------------------------------------------------------
# The criterion: targets and losses (FCOS §3, Eq. 6 of the paper)

class Criterion(nn.Module):
    """FCOS's losses and Eq. 6's budget term, for the predictions of a batch: focal
    (alpha .25, gamma 2) over the number of positives, GIoU weighted by the
    centerness target over its sum, centerness BCE over the positives (each
    normaliser averaged over all processes, as FCOS does under DDP), and
    lam * L_budget, Eq. 5's soft budget of the head, mean over images."""

    def __init__(self, num_classes, lam, assigner="fcos"):
        super().__init__()
        self.num_classes, self.lam = num_classes, lam
        self.assign = assign_targets_atss if assigner == "atss" else assign_targets

    def targets(self, points, levels, targets):
        """(B, P) class of each location's matched box, -1 for background; (B, P, 4)
        its regression targets."""
        labels, reg_targets = [], []
        for t in targets:
            matched, ltrb = self.assign(points, levels, t["boxes"], t["labels"])
            if t["labels"].numel():  # class of the matched box, -1 for background
                matched = torch.where(matched >= 0, t["labels"][matched.clamp_min(0)], matched)
            labels.append(matched)
            reg_targets.append(ltrb)
        return torch.stack(labels), torch.stack(reg_targets)

    def forward(self, cls, box, ctr, points, levels, targets, soft_budget):
        labels, reg_targets = self.targets(points, levels, targets)
        pos = labels >= 0
        num_pos = mean_over_ranks(pos.sum()).clamp_min(1.0)
        onehot = torch.zeros_like(cls)
        onehot[pos] = F.one_hot(labels[pos], self.num_classes).to(cls.dtype)
        loss_cls = sigmoid_focal_loss(cls, onehot, alpha=0.25, gamma=2.0, reduction="sum") / num_pos
        p_points = points[None].expand(len(targets), -1, -1)[pos]
        ctr_target = centerness_target(reg_targets[pos])
        # every process joins this all-reduce, positives or not: one that skipped it
        # would pair its next collective (DDP's gradient all-reduce) with this one
        ctr_sum = mean_over_ranks(ctr_target.sum()).clamp_min(1e-6)
        if pos.any():
            giou = generalized_box_iou_loss(ltrb_to_boxes(p_points, box[pos].float()),
                                            ltrb_to_boxes(p_points, reg_targets[pos]), reduction="none")
            loss_box = (giou * ctr_target).sum() / ctr_sum
            loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos].float(), ctr_target, reduction="sum") / num_pos
        else:  # no positives: zero losses that keep the predictors in the graph (DDP)
            loss_box, loss_ctr = box.sum() * 0, ctr.sum() * 0
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box, "loss_centerness": loss_ctr,
                "loss_budget": self.lam * soft_budget.mean() if self.lam else cls.new_zeros(())}


# -----------------------------------------------------------------------------
# Post-processing: detections (FCOS §3, docs/DESIGN.md §6)

class PostProcess(nn.Module):
    """Per image, as FCOS: candidates whose class probability is > score_thresh (the
    authors' code too), the best top_per_level per level by score
    sqrt(cls * centerness) (the authors' code: by class probability), boxes clipped
    to the image, class-wise NMS at nms_iou, the best max_detections, mapped back to
    the input image's coordinates.

    authors=True: the authors' order (DESIGN §8 (5)): per level the top_per_level
    (at most the level's cells) by class probability, then > score_thresh; NMS on
    the boxes as predicted; the best max_detections mapped back to the input
    image, clipped to it there, and empty boxes dropped."""

    def __init__(self, score_thresh=0.05, top_per_level=1000, nms_iou=0.6, max_detections=100, authors=False):
        super().__init__()
        self.score_thresh, self.top_per_level = score_thresh, top_per_level
        self.nms_iou, self.max_detections, self.authors = nms_iou, max_detections, authors

    @torch.no_grad()
    def forward(self, cls, box, ctr, points, levels, sizes, scales, originals=None):
        results = []
        for i in range(cls.shape[0]):
            pick = self.by_probability if self.authors else self.candidates
            boxes, scores, labels = pick(cls[i], box[i], ctr[i], points, levels)
            if not self.authors:
                boxes = clip(boxes, *sizes[i])
            keep = batched_nms(boxes, scores, labels, self.nms_iou)[:self.max_detections]
            sx, sy = scales[i]
            boxes, scores, labels = boxes[keep] / boxes.new_tensor([sx, sy, sx, sy]), scores[keep], labels[keep]
            if self.authors:  # DESIGN §8 (5): clipped in the input image after NMS, empty boxes dropped
                boxes = clip(boxes, *originals[i])
                kept = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
            results.append({"boxes": boxes, "scores": scores, "labels": labels})
        return results

    def candidates(self, cls, box, ctr, points, levels):
        """One image's candidates: boxes (n, 4), scores (n,), labels (n,)."""
        probs = torch.sigmoid(cls.float())  # (P, K)
        scores = torch.sqrt(probs * torch.sigmoid(ctr.float())[:, None])  # (P, K)
        boxes_all, scores_all, labels_all = [], [], []
        for level in range(len(STRIDES)):
            at = levels == level
            keep = (probs[at] > self.score_thresh).nonzero()  # (n, 2): cell, class
            s = scores[at][keep[:, 0], keep[:, 1]]
            top = s.topk(min(self.top_per_level, len(keep)))
            keep = keep[top.indices]
            boxes_all.append(ltrb_to_boxes(points[at][keep[:, 0]], box[at][keep[:, 0]].float()))
            scores_all.append(top.values), labels_all.append(keep[:, 1])
        return torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)

    def by_probability(self, cls, box, ctr, points, levels):
        """The authors' candidates (DESIGN §8 (5)): per level the top_per_level
        (cell, class) pairs by class probability -- at most as many as the level has
        cells, as their code counts them -- then those above score_thresh; score
        sqrt(cls * centerness)."""
        K = cls.shape[1]
        boxes_all, scores_all, labels_all = [], [], []
        for level in range(len(STRIDES)):
            at = levels == level
            probs = torch.sigmoid(cls[at].float()).flatten()  # (cells * K,), cell-major
            top = probs.topk(min(self.top_per_level, int(at.sum())))
            kept = top.values > self.score_thresh
            index = top.indices[kept]
            cell, label = index // K, index % K
            boxes_all.append(ltrb_to_boxes(points[at][cell], box[at][cell].float()))
            scores_all.append(torch.sqrt(top.values[kept] * torch.sigmoid(ctr[at][cell].float())))
            labels_all.append(label)
        return torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)


def clip(boxes, h, w):
    """Boxes (n, 4) xyxy clipped to an image of h x w."""
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                        boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)


def authors_size(h, w, min_size, max_size):
    """The authors' resized size (DESIGN §8 (6), detectron2's ResizeShortestEdge): the
    shorter side to min_size, scaled down where the longer passes max_size, each
    side rounded as int(x + 0.5)."""
    scale = min_size / min(h, w)
    new_h, new_w = (min_size, scale * w) if h < w else (scale * h, min_size)
    if max(new_h, new_w) > max_size:
        shrink = max_size / max(new_h, new_w)
        new_h, new_w = new_h * shrink, new_w * shrink
    return int(new_h + 0.5), int(new_w + 0.5)


# Tab. 4's detectors and the name of each one's own head (the baseline's towers)
OWN_HEADS = {"fcos": "fcos", "retinanet": "retinanet", "freeanchor": "retinanet", "efficientdet": "efficientdet"}


def build_model(run, num_classes, pretrained_backbone=None):
    """The model a run's arguments (a dict with MODEL_KEYS) describe: FCOS; or
    torchvision's RetinaNet (retinanet.py), FreeAnchor (freeanchor.py) or
    EfficientDet-D1 (efficientdet.py) with the same choice of heads."""
    kw = {k: run[k] for k in MODEL_KEYS if k in run}
    kw["gated"] = tuple(kw["gated"])
    detector, assigner = kw.pop("detector", "fcos"), kw.pop("assigner", "fcos")
    kw["pretrained_backbone"] = run["pretrained_backbone"] if pretrained_backbone is None else pretrained_backbone
    own = OWN_HEADS[detector]
    if kw["head"] in OWN_HEADS.values() and kw["head"] != own:
        raise ValueError(f"head {kw['head']!r} is another detector's own; {detector}'s own is {own!r}")
    if detector == "fcos":
        return FCOS(num_classes, assigner=assigner, **kw)
    if assigner != "fcos":
        raise ValueError(f"assigner {assigner!r} is FCOS's; {detector} matches its anchors by IoU")
    if kw.pop("style", "torchvision") != "torchvision":
        raise ValueError(f"style 'authors' is the conventions of the authors' FCOS; {detector} has none")
    if detector == "efficientdet":
        import efficientdet
        return efficientdet.EfficientDet(num_classes, **kw)
    import retinanet  # torchvision's detector; only its towers are this project's
    if detector == "freeanchor":
        import freeanchor
        return freeanchor.FreeAnchor(num_classes, **kw)
    return retinanet.RetinaNet(num_classes, **kw)
