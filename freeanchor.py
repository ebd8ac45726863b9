"""
FreeAnchor with the fine-grained dynamic head: Tab. 4's second row (Song et al.,
NeurIPS 2020: FreeAnchor R50 38.3 -> 39.0 mAP). FreeAnchor (Zhang et al., "FreeAnchor:
Learning to Match Anchors for Visual Object Detection", NeurIPS 2019) is RetinaNet with
another loss: no anchor is assigned to an object by an IoU threshold; each object keeps
a bag of candidate anchors and the loss lets the network pick the best of them, as the
maximum likelihood of a detection, as the FreeAnchor paper writes its loss:

    L = -alpha / |objects| * sum_i log MeanMax(X_i)                      (recall)
        + (1 - alpha) / (n |objects|) * sum_j,k FL_(p_jk (1 - P+_jk))     (precision)

X_i: for object i and each anchor j of its bag (the n = 50 anchors of highest IoU),
the class confidence times the localisation confidence; P+_jk: how much anchor j's
predicted box belongs to an object of class k; FL_(p) = p^2 * -log(1 - p), a focal
term on what the anchor claims for class k that no object backs.

So the dynamic head changes nothing here: retinanet.py's RetinaNet, its anchors,
towers ("retinanet": its own, without GroupNorm as FreeAnchor's; "fixed",
"dynamic") and post-processing, with this loss in place of the matcher's and with
FreeAnchor's box coder weights and class prior; the budget term is added as there.

Map:
    mean_max                  the bag's likelihood: between the mean and the max
    saturated_linear          P(anchor's box -> object) from its IoU
    localisation_confidence   exp(-0.75 * smooth-L1), the box's likelihood
    negative_term             FL_(p), the precision term
    free_anchor_loss          both terms over a batch
    FreeAnchor                the detector
"""
import math

import torch
import torch.nn.functional as F
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import box_iou

import retinanet

BAG_SIZE = 50  # anchors per object (n)
ALPHA = 0.5  # weight of the recall term; 1 - ALPHA the precision term's
IOU_THRESHOLD = 0.6  # t of the saturated linear
LOC_WEIGHT, SMOOTH_L1_BETA = 0.75, 0.11  # localisation confidence exp(-0.75 * smooth-L1(beta 0.11))
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # the box coder's: deltas (dx, dy) x 10, (dw, dh) x 5
PRIOR = 0.02  # initial class probability (RetinaNet: 0.01)
EPS = 1e-12


def mean_max(x):
    """Mean-max over the last dimension (FreeAnchor's): sum x / (1 - x) over sum
    1 / (1 - x). A weighted mean whose weights grow with x, so it lies between the
    mean (all x small) and the max (one x near 1); one element gives itself. Early
    in training, when every confidence is low, it is the mean and every anchor of
    the bag learns; later it is the max and the best anchor takes the object.
    1 - x is kept at EPS at least so that the weights stay finite."""
    w = 1 / (1 - x).clamp_min(EPS)
    return (w * x).sum(-1) / w.sum(-1)


def saturated_linear(iou, t, best):
    """P(box -> object) from the IoU of an anchor's predicted box with the object:
    0 up to t, then linear, 1 from `best` (the object's best IoU over all boxes) on.
    The span best - t is kept at 1e-6 at least (t + 1e-12 is t itself in fp32): an
    object that no box reaches past t gives 0 everywhere, not 0 / 0."""
    return ((iou - t) / (best - t).clamp_min(1e-6)).clamp(0, 1)


def localisation_confidence(deltas, target_deltas):
    """exp(-0.75 * sum over the 4 coordinates of smooth-L1 (beta 0.11)): 1 for a
    perfect box, falling as it misses."""
    loss = F.smooth_l1_loss(deltas, target_deltas, beta=SMOOTH_L1_BETA, reduction="none").sum(-1)
    return torch.exp(-LOC_WEIGHT * loss)


def negative_term(p, gamma=2.0):
    """FL_(p) = p^gamma * -log(1 - p): a detection that no object backs costs its
    confidence, focal-weighted. 1 - p is kept at EPS at least for the log (a
    saturated sigmoid is exactly 1 in fp32, and 1 - EPS would round to 1)."""
    return p ** gamma * -torch.log((1 - p).clamp_min(EPS))


def free_anchor_loss(cls_logits, deltas, anchors, targets, coder, bag_size=BAG_SIZE):
    """The two terms of FreeAnchor's loss over a batch. cls_logits (B, A, K);
    deltas (B, A, 4), the box coder's; anchors: per image (A, 4) xyxy; targets: per
    image boxes (M, 4) xyxy and labels (M,). Returns {"loss_positive",
    "loss_negative"}: the recall term over the batch's objects, the precision term
    over bag_size x objects (1 where the batch has none)."""
    cls_prob = torch.sigmoid(cls_logits.float())
    positive, negative, objects = [], [], 0
    for probs, d, a, t in zip(cls_prob, deltas.float(), anchors, targets):
        boxes, labels = t["boxes"], t["labels"]
        M = len(boxes)
        objects += M
        # P+ (A, K): per anchor and class, max over the objects of that class of the
        # saturated linear of the predicted box's IoU with it; no gradient (a target)
        backed = torch.zeros_like(probs)
        if M:
            with torch.no_grad():
                iou = box_iou(boxes, coder.decode_single(d, a))                      # (M, A)
                p_object = saturated_linear(iou, IOU_THRESHOLD, iou.max(1, keepdim=True).values)
                for k in labels.unique():
                    backed[:, k] = p_object[labels == k].max(0).values
            # the recall term: each object's bag, the anchors of highest IoU with it
            bag = box_iou(boxes, a).topk(min(bag_size, len(a)), dim=1).indices       # (M, n)
            p_cls = probs[bag, labels[:, None]]                                       # (M, n)
            target_deltas = coder.encode_single(boxes[:, None].expand(-1, bag.shape[1], -1).reshape(-1, 4),
                                                a[bag].reshape(-1, 4)).view(M, -1, 4)
            p_loc = localisation_confidence(d[bag], target_deltas)                    # (M, n)
            positive.append(-torch.log(mean_max(p_cls * p_loc).clamp_min(EPS)))       # (M,)
        # the precision term: what each anchor claims for each class, less what objects back
        negative.append(negative_term(probs * (1 - backed)).sum())
    positive = torch.cat(positive).sum() / max(objects, 1) if positive else cls_logits.sum() * 0
    negative = torch.stack(negative).sum() / max(objects * bag_size, 1)
    # every image without objects still puts the box branch in the graph (DDP's gradients)
    return {"loss_positive": ALPHA * positive + deltas.sum() * 0, "loss_negative": (1 - ALPHA) * negative}


class FreeAnchor(retinanet.RetinaNet):
    """retinanet.RetinaNet trained with FreeAnchor's loss: the same arguments and
    conventions. head: "retinanet" (RetinaNet's 4-conv towers, without GroupNorm as
    FreeAnchor has them), "fixed" or "dynamic"."""

    def __init__(self, num_classes, **kw):
        super().__init__(num_classes, tower_norm=False, **kw)
        self.box_coder = det_utils.BoxCoder(weights=BOX_WEIGHTS)  # post-processing decodes with it too
        torch.nn.init.constant_(self.head.head.classification_head.cls_logits.bias, -math.log((1 - PRIOR) / PRIOR))

    def compute_loss(self, targets, head_outputs, anchors):
        losses = free_anchor_loss(head_outputs["cls_logits"], head_outputs["bbox_regression"], anchors, targets,
                                  self.box_coder)
        soft = self.head.cost.soft
        losses["loss_budget"] = self.lam * soft.mean() if self.lam else soft.new_zeros(())
        return losses
