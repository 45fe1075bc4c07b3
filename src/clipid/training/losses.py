"""Loss terms of the training stages: small modules, each one formula.

The image-text contrastive losses know about distributed training, as open_clip's ``ClipLoss``
does: under DDP each process gathers the features of every process, so the loss sees the global
batch as negatives, and the gradients reaching the model are those of the global-batch loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from clipid.runtime import world_info

__all__ = ["CenterLoss", "CrossEntropyLabelSmooth", "ImageToTextCrossEntropy", "InfoNCELoss",
           "PromptContrastiveLoss", "SupConLoss", "TextImageSupConLoss", "TripletLoss",
           "gather_with_grad"]


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward returns to each process the gradient that *every*
    process's loss sends to its shard (a sum over processes), not only its own loss's part."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:
        rank, world = world_info()
        ctx.rank, ctx.rows = rank, local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Process r's keys feed the losses of all processes: summing their gradients is what
        # makes the sharded loss's gradient the global-batch loss's (see ``gather_with_grad``).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Every process's ``local`` concatenated in rank order, differentiable across processes.

    Every process must pass the same shape (the samplers and ``drop_last`` see to that).
    Process ``r`` computes ``L_r``, the mean loss of its own ``n`` anchors against all ``W * n``
    keys, so the global-batch loss is ``L = mean_r L_r``. Backward sums over processes the
    gradient each ``L_r`` sends to process ``r``'s features, so process ``r`` receives
    ``sum_q dL_q/dx_r = W * dL/dx_r``; DDP's averaging of parameter gradients over the ``W``
    processes then yields exactly ``dL/dtheta``, as on one device with the global batch.
    (Gathering without gradient and putting the local tensor back in its slice would instead
    drop the terms where ``x_r`` is a key of another process's anchors.)
    """
    _, world = world_info()
    if world == 1:
        return local
    if not local.requires_grad:
        # Labels, frozen caption features: nothing to send back, so no collective in backward.
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(local)


class InfoNCELoss(nn.Module):
    """Symmetric CLIP loss: each image against every caption of the (global) batch, its own
    caption the positive, and each caption against every image.

    ``image`` and ``text`` are this process's L2-normalised features, row ``i`` of each a pair;
    ``scale`` is the logit scale (``logit_scale.exp()``). Each process returns the mean over its
    own anchors, so the mean over processes is the loss of the global batch.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor
                ) -> torch.Tensor:
        rank, _ = world_info()
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
        targets = torch.arange(len(image), device=image.device) + rank * len(image)
        logits_image = scale * image @ all_text.T
        logits_text = scale * text @ all_image.T
        return (F.cross_entropy(logits_image, targets) + F.cross_entropy(logits_text, targets)) / 2


class SupConLoss(nn.Module):
    """Supervised image-text contrastive loss: every caption of the same identity is a positive.

    For an image anchor ``i`` with positives ``P(i) = {j : y_j = y_i}`` among the captions,

        L_i = -1/|P(i)| * sum_{j in P(i)} log( exp(s * <v_i, t_j>) / sum_k exp(s * <v_i, t_k>) )

    and symmetrically for caption anchors against images; the loss is the mean of the two
    directions' means. With all labels distinct it is exactly :class:`InfoNCELoss`. Anchors are
    this process's (L2-normalised) features, keys and labels those of the global batch, as in
    :class:`InfoNCELoss`.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
        all_labels = gather_with_grad(labels)
        positives = labels[:, None] == all_labels[None, :]  # never empty: the own pair
        per_anchor = positives.sum(1)

        def direction(anchor: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
            log_prob = F.log_softmax(scale * anchor @ keys.T, dim=1)
            picked = log_prob.masked_fill(~positives, 0.0)  # masked: no 0 * -inf = nan
            return (-picked.sum(1) / per_anchor).mean()

        return (direction(image, all_text) + direction(text, all_image)) / 2


class PromptContrastiveLoss(nn.Module):
    """CLIP-ReID's prompt-learning loss: images against the prompts of the identities in the batch.

    ``image`` is ``(N, D)``, ``text`` is ``(M, D)`` with one row per identity present in the batch
    (both L2-normalised), ``labels[i]`` the row of image ``i``'s identity, ``scale`` the logit
    scale. With ``S = scale * image @ text.T``:

        i2t = mean_i  -log softmax_m(S[i, :])[labels[i]]
        t2i = mean_m  -1/|P(m)| * sum_{i in P(m)} log softmax_i(S[:, m])[i]

    where ``P(m) = {i : labels[i] = m}`` are the images of prompt ``m``.

    Returns ``(i2t, t2i)``; the stage minimises their sum. Each prompt is encoded once per batch,
    however many of its images the batch holds (the text tower is the costly part). Prompts with
    no image in the batch (``P(m)`` empty) are left out of ``t2i``.
    """

    def forward(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        logits = scale * image @ text.T
        i2t = F.cross_entropy(logits, labels)
        positives = labels[:, None] == torch.arange(len(text), device=labels.device)[None, :]
        per_prompt = positives.sum(0)
        log_prob = F.log_softmax(logits, dim=0).masked_fill(~positives, 0.0)
        present = per_prompt > 0
        t2i = (-log_prob.sum(0)[present] / per_prompt[present]).mean()
        return i2t, t2i


class TextImageSupConLoss(nn.Module):
    """CLIP-ReID's prompt-stage loss term (their ``loss/supcontrast.py``, temperature 1): each
    anchor against every key, every key of the anchor's label a positive,

        L = mean_i  -1/|P(i)| * sum_{j in P(i)} log softmax_j(<a_i, k_j>)

    on raw (unnormalised) features. Their stage sums it both ways on the same batch: images as
    anchors with one prompt per image as keys, and the prompts as anchors with the images as
    keys, so a prompt appears once for each of its images in the batch.
    """

    def forward(self, anchors: torch.Tensor, keys: torch.Tensor, anchor_labels: torch.Tensor,
                key_labels: torch.Tensor) -> torch.Tensor:
        positives = anchor_labels[:, None] == key_labels[None, :]
        log_prob = F.log_softmax(anchors @ keys.T, dim=1).masked_fill(~positives, 0.0)
        return (-log_prob.sum(1) / positives.sum(1)).mean()


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against ``(1 - eps) * one_hot + eps / num_classes`` (Szegedy et al., 2016):
    the identity classifier stays calibrated instead of memorising the training identities."""

    def __init__(self, num_classes: int, epsilon: float = 0.1):
        super().__init__()
        self.num_classes, self.epsilon = num_classes, epsilon

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_prob = F.log_softmax(logits, dim=1)
        target = torch.full_like(log_prob, self.epsilon / self.num_classes)
        target.scatter_add_(1, labels[:, None],
                            torch.full_like(log_prob[:, :1], 1.0 - self.epsilon))
        return -(target * log_prob).sum(1).mean()


class ImageToTextCrossEntropy(nn.Module):
    """CLIP-ReID's image-stage term: fixed per-identity text features are the weights of a
    classifier, ``logits = scale * normalize(feats) @ text.T``, under label-smoothed
    cross-entropy (:class:`CrossEntropyLabelSmooth`). ``text`` ``(identities, D)`` is
    L2-normalised and never trained; row ``y`` belongs to label ``y``.

    ``raw=True`` is what their code computes (``processor_clipreid_stage2.py``): ``logits =
    feats @ text.T`` on the raw projected image feature and raw text features, no scale.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1, raw: bool = False):
        super().__init__()
        self.cross_entropy = CrossEntropyLabelSmooth(num_classes, epsilon)
        self.raw = raw

    def forward(self, feats: torch.Tensor, text: torch.Tensor, labels: torch.Tensor,
                scale: torch.Tensor | float) -> torch.Tensor:
        if self.raw:
            return self.cross_entropy(feats @ text.T, labels)
        return self.cross_entropy(scale * F.normalize(feats, dim=-1) @ text.T, labels)


class TripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al., 2017) on Euclidean distances: each anchor with
    its farthest positive and nearest negative in the batch. ``margin`` 0 is the soft margin
    ``log(1 + exp(d_ap - d_an))``. Anchors with no positive or no negative are left out."""

    def __init__(self, margin: float = 0.3):
        super().__init__()
        self.margin = margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        squared = (feats * feats).sum(1)
        d2 = squared[:, None] + squared[None, :] - 2 * feats @ feats.T
        distance = d2.clamp(min=1e-12).sqrt()  # clamped: sqrt has no gradient at 0
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive, negative = same & ~eye, ~same
        valid = positive.any(1) & negative.any(1)
        if not valid.any():
            return feats.sum() * 0.0  # keeps the graph: no triplet in this batch
        hardest_pos = distance.masked_fill(~positive, float("-inf")).amax(1)[valid]
        hardest_neg = distance.masked_fill(~negative, float("inf")).amin(1)[valid]
        if self.margin > 0:
            return F.relu(hardest_pos - hardest_neg + self.margin).mean()
        return F.softplus(hardest_pos - hardest_neg).mean()


class CenterLoss(nn.Module):
    """Center loss (Wen et al., 2016): ``mean_i ||f_i - c_{y_i}||^2 / 2``, pulling each feature
    to its identity's learnt centre. The centres are parameters with their own optimiser."""

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return ((feats - self.centers[labels]) ** 2).sum(1).mean() / 2
