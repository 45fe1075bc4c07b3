"""Each loss against values computed by hand, and the contrastive losses under DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipid.losses import (
    CenterLoss,
    CrossEntropyLabelSmooth,
    InfoNCELoss,
    SupConLoss,
    TripletLoss,
)


def test_infonce_on_orthogonal_pairs():
    # Two images, their two captions; image i . caption j = 1 if i == j else 0, scale 2:
    # each row's softmax puts e^2 / (e^2 + 1) on the positive, in both directions.
    image = torch.eye(2)
    text = torch.eye(2)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert InfoNCELoss()(image, text, torch.tensor(2.0)).item() == pytest.approx(expected)


def test_supcon_averages_over_every_positive():
    # Images 0 and 1 share identity 7; image 2 is identity 9. Unit scale.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([7, 7, 9])
    sims_image = image @ text.T  # rows: [1,0,0], [1,0,0], [0,1,1]
    sims_text = text @ image.T   # rows: [1,1,0], [0,0,1], [0,0,1]

    def anchor_loss(row, positives):
        log_z = math.log(sum(math.exp(v) for v in row))
        return -sum(row[j] - log_z for j in positives) / len(positives)

    positives = {0: [0, 1], 1: [0, 1], 2: [2]}
    by_image = [anchor_loss(sims_image[i].tolist(), positives[i]) for i in range(3)]
    by_text = [anchor_loss(sims_text[i].tolist(), positives[i]) for i in range(3)]
    expected = (sum(by_image) / 3 + sum(by_text) / 3) / 2
    got = SupConLoss()(image, text, labels, torch.tensor(1.0)).item()
    assert got == pytest.approx(expected)


def test_supcon_with_distinct_labels_is_infonce():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(6, 8), dim=1)
    text = F.normalize(torch.randn(6, 8), dim=1)
    scale = torch.tensor(10.0)
    assert SupConLoss()(image, text, torch.arange(6), scale).item() == pytest.approx(
        InfoNCELoss()(image, text, scale).item(), rel=1e-6)


def test_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    log_p = torch.log_softmax(logits, dim=1)[0].tolist()
    eps = 0.3
    expected = -((1 - eps + eps / 3) * log_p[0] + eps / 3 * log_p[1] + eps / 3 * log_p[2])
    got = CrossEntropyLabelSmooth(3, eps)(logits, torch.tensor([0])).item()
    assert got == pytest.approx(expected)
    plain = CrossEntropyLabelSmooth(3, 0.0)(logits, torch.tensor([1]))
    assert plain.item() == pytest.approx(F.cross_entropy(logits, torch.tensor([1])).item())


def test_batch_hard_triplet_picks_the_hardest_pairs():
    # 1-D features: a0=0, a1=3 (identity 0); b0=1, b1=5 (identity 1).
    feats = torch.tensor([[0.0], [3.0], [1.0], [5.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    # anchor: hardest positive, hardest negative -> relu(dp - dn + 0.5)
    # a0: dp 3, dn 1 -> 2.5 ; a1: dp 3, dn min(2, 2) = 2 -> 1.5
    # b0: dp 4, dn min(1, 2) = 1 -> 3.5 ; b1: dp 4, dn 2 -> 2.5
    loss = TripletLoss(margin=0.5)(feats, labels)
    assert loss.item() == pytest.approx((2.5 + 1.5 + 3.5 + 2.5) / 4, rel=1e-5)
    loss.backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()
    soft = TripletLoss(margin=0.0)(feats.detach(), labels).item()
    assert soft == pytest.approx(sum(math.log1p(math.exp(v)) for v in (2, 1, 3, 2)) / 4,
                                 rel=1e-5)


def test_triplet_without_a_positive_anywhere_is_zero_but_differentiable():
    feats = torch.randn(3, 4, requires_grad=True)
    loss = TripletLoss()(feats, torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0
    loss.backward()


def test_center_loss():
    center = CenterLoss(2, 2)
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    feats = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    # squared distances 0 and 4 -> mean 2 -> / 2 = 1
    assert center(feats, torch.tensor([0, 1])).item() == pytest.approx(1.0)
    assert center(center.centers.detach(), torch.tensor([0, 1])).item() == 0.0


# ---------------------------------------------------------------------- distributed

def _features(world: int = 2, per_rank: int = 3):
    torch.manual_seed(1)
    image = F.normalize(torch.randn(world * per_rank, 8, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(world * per_rank, 8, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    return image, text, labels


def _loss(kind: str, image, text, labels):
    scale = torch.tensor(5.0, dtype=torch.float64)
    if kind == "supcon":
        return SupConLoss()(image, text, labels, scale)
    return InfoNCELoss()(image, text, scale)


def _worker(rank: int, world: int, store: str, kind: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    image, text, labels = _features(world)
    part = slice(rank * 3, rank * 3 + 3)
    local_image = image[part].clone().requires_grad_(True)
    local_text = text[part].clone().requires_grad_(True)
    loss = _loss(kind, local_image, local_text, labels[part])
    loss.backward()
    torch.save({"loss": loss.detach(), "image_grad": local_image.grad,
                "text_grad": local_text.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["infonce", "supcon"])
def test_distributed_loss_equals_the_global_batch_loss(tmp_path: Path, kind: str):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), kind, str(tmp_path / "out")),
             nprocs=world, join=True)
    image, text, labels = _features(world)
    image.requires_grad_(True)
    text.requires_grad_(True)
    whole = _loss(kind, image, text, labels)
    whole.backward()
    results = [torch.load(tmp_path / f"out.{r}") for r in range(world)]
    # Each rank's loss is the mean over its own anchors against the global batch: their
    # average is the global loss.
    assert torch.stack([r["loss"] for r in results]).mean().item() == pytest.approx(whole.item())
    # A rank's gradient flows through its own shard only (gathered keys are constants);
    # DDP's gradient averaging over ranks then combines the shards.
    for rank, r in enumerate(results):
        part = slice(rank * 3, rank * 3 + 3)
        local_image = image.detach()[part].clone().requires_grad_(True)
        local_text = text.detach()[part].clone().requires_grad_(True)
        full_image = torch.cat([image.detach()[:part.start], local_image,
                                image.detach()[part.stop:]])
        full_text = torch.cat([text.detach()[:part.start], local_text,
                               text.detach()[part.stop:]])
        own = _own_anchor_loss(kind, full_image, full_text, labels, part)
        own.backward()
        torch.testing.assert_close(r["image_grad"], local_image.grad)
        torch.testing.assert_close(r["text_grad"], local_text.grad)


def _own_anchor_loss(kind, image, text, labels, part):
    """The loss over ``part``'s anchors only, against every key, where keys outside ``part``
    are constants: what one DDP rank computes."""
    scale = 5.0
    keys_text = torch.cat([text[:part.start].detach(), text[part], text[part.stop:].detach()])
    keys_image = torch.cat([image[:part.start].detach(), image[part],
                            image[part.stop:].detach()])
    if kind == "infonce":
        targets = torch.arange(part.start, part.stop)
        return (F.cross_entropy(scale * image[part] @ keys_text.T, targets)
                + F.cross_entropy(scale * text[part] @ keys_image.T, targets)) / 2
    positives = (labels[part][:, None] == labels[None, :]).double()

    def direction(anchor, keys):
        log_prob = F.log_softmax(scale * anchor @ keys.T, dim=1)
        return (-(log_prob * positives).sum(1) / positives.sum(1)).mean()

    return (direction(image[part], keys_text) + direction(text[part], keys_image)) / 2
