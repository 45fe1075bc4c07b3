"""Each loss against values computed by hand, and the contrastive losses under DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipid.training.losses import (
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


def test_infonce_by_hand_on_asymmetric_pairs():
    # sims[i][j] = image_i . caption_j is not symmetric, so the two directions differ.
    image = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    sims = [[0.0, 1.0], [0.8, 0.6]]
    scale = 3.0

    def ce(row: list[float], target: int) -> float:
        return -(scale * row[target] - math.log(sum(math.exp(scale * v) for v in row)))

    by_image = sum(ce(sims[i], i) for i in range(2)) / 2
    by_text = sum(ce([sims[i][j] for i in range(2)], j) for j in range(2)) / 2
    got = InfoNCELoss()(image, text, torch.tensor(scale)).item()
    assert got == pytest.approx((by_image + by_text) / 2, rel=1e-6)


@pytest.mark.parametrize("kind", ["infonce", "supcon"])
def test_contrastive_gradients_reach_both_towers_and_the_scale(kind: str):
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(4, 5, generator=gen), dim=1).requires_grad_(True)
    text = F.normalize(torch.randn(4, 5, generator=gen), dim=1).requires_grad_(True)
    scale = torch.tensor(4.0, requires_grad=True)
    if kind == "supcon":
        loss = SupConLoss()(image, text, torch.tensor([0, 0, 1, 2]), scale)
    else:
        loss = InfoNCELoss()(image, text, scale)
    loss.backward()
    for grad in (image.grad, text.grad, scale.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


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


def test_triplet_leaves_out_anchors_without_a_positive():
    # Identity 0 at 0 and 2, identity 1 alone at 5: only the two identity-0 anchors count.
    feats = torch.tensor([[0.0], [2.0], [5.0]])
    labels = torch.tensor([0, 0, 1])
    # margin 1.5: a0: dp 2, dn 5 -> relu(2 - 5 + 1.5) = 0 ; a1: dp 2, dn 3 -> 0.5.
    # The mean is over the 2 valid anchors (not 3): 0.25.
    assert TripletLoss(margin=1.5)(feats, labels).item() == pytest.approx(0.25, rel=1e-5)


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
    # d/dc_y of ||f - c_y||^2 / (2B) = (c_y - f) / B, with B = 2.
    center(feats, torch.tensor([0, 1])).backward()
    torch.testing.assert_close(center.centers.grad, torch.tensor([[0.0, 0.0], [0.0, -1.0]]))


# ---------------------------------------------------------------------- distributed

WORLD, PER_RANK = 2, 3
SCALE = 5.0
# (loss, whether the text features train): frozen captions are what Stage 2 feeds in.
CASES = [("infonce", True), ("supcon", True), ("supcon", False)]


def _features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(WORLD * PER_RANK, 8, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(WORLD * PER_RANK, 8, generator=gen, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])  # identities 0 and 1 span both ranks
    return image, text, labels


def _run(kind: str, train_text: bool, image: torch.Tensor, text: torch.Tensor,
         labels: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The loss and the gradients wrt the given features and the scale."""
    image = image.clone().requires_grad_(True)
    text = text.clone().requires_grad_(train_text)
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    if kind == "supcon":
        loss = SupConLoss()(image, text, labels, scale)
    else:
        loss = InfoNCELoss()(image, text, scale)
    loss.backward()
    return {"loss": loss.detach(), "image": image.grad, "text": text.grad, "scale": scale.grad}


class _Towers(torch.nn.Module):
    """Two linear towers and a logit scale: the shape of what the trainer wraps in DDP."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.image = torch.nn.Parameter(torch.randn(6, 4, generator=gen, dtype=torch.float64))
        self.text = torch.nn.Parameter(torch.randn(5, 4, generator=gen, dtype=torch.float64))
        self.logit_scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return (F.normalize(x @ self.image, dim=1), F.normalize(y @ self.text, dim=1),
                self.logit_scale.exp())


def _model_loss(model: torch.nn.Module, rows: slice) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(WORLD * PER_RANK, 6, generator=gen, dtype=torch.float64)[rows]
    y = torch.randn(WORLD * PER_RANK, 5, generator=gen, dtype=torch.float64)[rows]
    image, text, scale = model(x, y)
    labels = _features()[2][rows]
    return SupConLoss()(image, text, labels, scale) + 0.5 * InfoNCELoss()(image, text, scale)


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        image, text, labels = _features()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results: list = [_run(kind, train_text, image[part], text[part], labels[part])
                         for kind, train_text in CASES]
        ddp = torch.nn.parallel.DistributedDataParallel(_Towers())
        for _ in range(2):  # the backward collectives and DDP's must not hang across steps
            ddp.zero_grad()
            _model_loss(ddp, part).backward()
        results.append({n: p.grad for n, p in ddp.module.named_parameters()})
        torch.save(results, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_losses_match_the_global_batch(tmp_path: Path):
    # Every case in one spawn: starting processes is most of the cost.
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path / "out")), nprocs=WORLD,
             join=True)
    per_rank = [torch.load(tmp_path / f"out.{r}") for r in range(WORLD)]
    image, text, labels = _features()
    for c, (kind, train_text) in enumerate(CASES):
        whole = _run(kind, train_text, image, text, labels)
        ranks = [results[c] for results in per_rank]
        # Rank r's loss L_r is the mean over its own anchors against every key, and the
        # global loss L is the mean over all anchors: L = mean_r L_r.
        mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
        torch.testing.assert_close(mean_loss, whole["loss"])
        # Rank r's features receive sum_q dL_q/dx_r = W * dL/dx_r (its shard is a key of every
        # rank's anchors); DDP then averages parameter gradients over W ranks: exactly dL/dθ.
        for rank, r in enumerate(ranks):
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            torch.testing.assert_close(r["image"], WORLD * whole["image"][part])
            if train_text:
                torch.testing.assert_close(r["text"], WORLD * whole["text"][part])
            else:
                assert r["text"] is None
        # The scale is replicated, not sharded: each rank's gradient is dL_r/ds, whose DDP
        # average is dL/ds.
        mean_scale = torch.stack([r["scale"] for r in ranks]).mean()
        torch.testing.assert_close(mean_scale, whole["scale"])
    # End to end: under DDP every rank's parameter gradients are the global-batch gradients.
    model = _Towers()
    _model_loss(model, slice(None)).backward()
    for results in per_rank:
        for name, param in model.named_parameters():
            torch.testing.assert_close(results[-1][name], param.grad)
