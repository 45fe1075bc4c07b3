"""CLIP-ReID's training recipe against plain transcriptions of its published code (Syliz517/
CLIP-ReID): the instance-covering PK epoch, Adam with L2 decay and the bias factor, the per-epoch
warm-up + multistep and warm-up + cosine schedules, the losses of both stages, pad_crop."""

from __future__ import annotations

import copy
import math
import random
from bisect import bisect_right
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from clipid.config import params_from_dict
from clipid.models.factory import create_model
from clipid.training.objective import Objective, standard_terms
from clipid.training.samplers import InstancePKSampler, PKSampler, instance_batches
from clipid.training.schedule import (
    EpochSchedule,
    cosine_by_epoch,
    make_optimizer,
    multistep_by_epoch,
    warmup_cosine,
)
from clipid.training.towers import set_trainable

# --------------------------------------------------------------------- transcriptions


def reference_identity_sampler(pids: list[int], batch_size: int, num_instances: int
                               ) -> list[int]:
    """RandomIdentitySampler.__iter__ (datasets/sampler.py), on the global random generators."""
    index_dic = defaultdict(list)
    for index, pid in enumerate(pids):
        index_dic[pid].append(index)
    all_pids = list(index_dic.keys())
    per_batch = batch_size // num_instances
    batch_idxs_dict = defaultdict(list)
    for pid in all_pids:
        idxs = copy.deepcopy(index_dic[pid])
        if len(idxs) < num_instances:
            idxs = np.random.choice(idxs, size=num_instances, replace=True)
        random.shuffle(idxs)
        batch_idxs = []
        for idx in idxs:
            batch_idxs.append(int(idx))
            if len(batch_idxs) == num_instances:
                batch_idxs_dict[pid].append(batch_idxs)
                batch_idxs = []
    avai_pids = copy.deepcopy(all_pids)
    final_idxs: list[int] = []
    while len(avai_pids) >= per_batch:
        for pid in random.sample(avai_pids, per_batch):
            final_idxs.extend(batch_idxs_dict[pid].pop(0))
            if len(batch_idxs_dict[pid]) == 0:
                avai_pids.remove(pid)
    return final_idxs


def reference_sampler_length(pids: list[int], num_instances: int) -> int:
    """RandomIdentitySampler.__len__: what their DataLoader divides by the batch size."""
    length = 0
    for num in Counter(pids).values():
        num = max(num, num_instances)
        length += num - num % num_instances
    return length


class ReferenceWarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """solver/lr_scheduler.py WarmupMultiStepLR, linear warm-up."""

    def __init__(self, optimizer, milestones, gamma, warmup_factor, warmup_epochs):
        self.milestones, self.gamma = milestones, gamma
        self.warmup_factor, self.warmup_epochs = warmup_factor, warmup_epochs
        super().__init__(optimizer)

    def get_lr(self):
        factor = 1
        if self.last_epoch < self.warmup_epochs:
            alpha = self.last_epoch / self.warmup_epochs
            factor = self.warmup_factor * (1 - alpha) + alpha
        return [base * factor * self.gamma ** bisect_right(self.milestones, self.last_epoch)
                for base in self.base_lrs]


def reference_cosine_lr(t: int, base: float, t_initial: int, lr_min: float,
                        warmup_lr_init: float, warmup_t: int) -> float:
    """timm CosineLRScheduler._get_lr as create_scheduler builds it (t_mul 1, decay_rate 0.1,
    cycle_limit 1, no warm-up prefix)."""
    if t < warmup_t:
        return warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    i = t // t_initial
    t_i, t_curr = t_initial, t - t_initial * i
    gamma = 0.1 ** i
    if i < 1:
        low, high = lr_min * gamma, base * gamma
        return low + 0.5 * (high - low) * (1 + math.cos(math.pi * t_curr / t_i))
    return lr_min


def reference_stage2_groups(named, base_lr, weight_decay, weight_decay_bias, bias_lr_factor):
    """make_optimizer_2stage: one group per trainable parameter."""
    groups = []
    for key, value in named:
        if not value.requires_grad:
            continue
        lr, decay = base_lr, weight_decay
        if "bias" in key:
            lr, decay = base_lr * bias_lr_factor, weight_decay_bias
        groups.append({"params": [value], "lr": lr, "weight_decay": decay})
    return groups


# --------------------------------------------------------------------- the PK epoch

def market_like_labels(identities: int = 751, images: int = 12_936, seed: int = 0) -> list[int]:
    """Per-identity image counts with Market-1501's train totals (751 ids, 12,936 images; the
    real split's per-identity counts are not at hand): 2..72 images, most near the mean."""
    rng = np.random.RandomState(seed)
    counts = np.clip(rng.gamma(4.0, images / identities / 4.0, identities).round(), 2, 72)
    counts = counts.astype(int)
    while counts.sum() != images:  # nudge to the exact total, keeping every count in 2..72
        i = rng.randint(identities)
        step = 1 if counts.sum() < images else -1
        if 2 <= counts[i] + step <= 72:
            counts[i] += step
    labels = [pid for pid, n in enumerate(counts) for _ in range(n)]
    return [labels[i] for i in rng.permutation(len(labels))]


@pytest.mark.parametrize("seed", [0, 7])
def test_instance_epoch_is_the_published_sampler_index_for_index(seed):
    labels = market_like_labels()
    by_identity: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_identity.setdefault(label, []).append(index)
    random.seed(seed)
    np.random.seed(seed)
    expected = reference_identity_sampler(labels, 64, 4)
    batches = instance_batches(by_identity, 16, 4, random.Random(seed),
                               np.random.RandomState(seed))
    assert [i for batch in batches for i in batch] == expected


def test_market1501_epoch_length_instances_vs_identities():
    labels = market_like_labels()
    instances = InstancePKSampler(labels, p=16, k=4, seed=0)
    identities = PKSampler(labels, p=16, k=4, seed=0)
    assert len(identities) // 64 == 751 // 16 == 46
    # Their DataLoader reports ceil(length / 64); the epoch stops when fewer than 16
    # identities have a group left, so a few groups (at most 15 identities' worth) remain.
    groups = reference_sampler_length(labels, 4) // 4
    reported = math.ceil(reference_sampler_length(labels, 4) / 64)
    for epoch in range(3):
        instances.set_epoch(epoch)
        batches = len(instances) // 64
        assert len(instances) % 64 == 0
        assert batches <= reported and groups - 16 * batches >= 0
        assert 170 <= batches <= 190  # the ~180 of the issue, vs 46
        order = list(instances)
        sizes = Counter(labels)
        # An identity of at least 4 images gives each image at most once; one of 2 or 3
        # draws 4 with replacement.
        plenty = [i for i in order if sizes[labels[i]] >= 4]
        assert len(set(plenty)) == len(plenty)
        taken = Counter(labels[i] for i in order)
        full = [pid for pid, n in taken.items() if n == max(sizes[pid], 4) // 4 * 4]
        assert len(full) >= 751 - 15  # all but the identities left over at the end


def test_instance_epoch_is_deterministic_per_epoch_and_sharded():
    labels = market_like_labels(identities=40, images=400)
    one = InstancePKSampler(labels, p=4, k=4, seed=3)
    again = InstancePKSampler(labels, p=4, k=4, seed=3)
    one.set_epoch(2)
    again.set_epoch(2)
    assert list(one) == list(again)
    again.set_epoch(1)
    assert list(one) != list(again)
    shards = [InstancePKSampler(labels, p=4, k=4, seed=3, rank=r, world_size=2)
              for r in range(2)]
    for shard in shards:
        shard.set_epoch(2)
    whole = list(one)
    batches = [whole[b * 16:(b + 1) * 16] for b in range(len(whole) // 16)]
    per_rank = len(batches) // 2
    for rank, shard in enumerate(shards):
        assert list(shard) == [i for b in batches[rank:2 * per_rank:2] for i in b]


# --------------------------------------------------------------------- optimiser and schedules

def recipe_objective(**train):
    params = params_from_dict({"train": {"optimizer": "adam", "lr": 5e-6, "weight_decay": 1e-4,
                                         "weight_decay_bias": 1e-4, "bias_lr_factor": 2.0,
                                         "head_lr_mult": 1.0, **train},
                               "clipreid": {"id_weight": 0.25, "losses": "paper"}})
    spec = params.clipreid.image_stage()
    clip = create_model("clipid-vit-tiny", seed=0)
    set_trainable(clip.model, image=True, text=False, scale=False)
    torch.manual_seed(0)
    terms = standard_terms(spec, params.train, 5, int(clip.model.visual.output_dim), None,
                           clip.model)
    return params, Objective(clip.model, terms, spec)


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_every_parameter_learning_rate_and_decay_at_every_epoch_is_clipreids():
    params, objective = recipe_objective(schedule="multistep", warmup_epochs=10.0,
                                         milestones=[30, 50], gamma=0.1, warmup_factor=0.1)
    train = params.train
    optimizer = make_optimizer(objective.param_groups(train), train.optimizer, train.lr)
    assert isinstance(optimizer, torch.optim.Adam)
    schedule = EpochSchedule(optimizer, multistep_by_epoch(
        train.milestones, train.gamma, train.warmup_factor, train.warmup_epochs))
    named = list(objective.named_parameters())
    reference = torch.optim.Adam(reference_stage2_groups(named, 5e-6, 1e-4, 1e-4, 2.0))
    ref_schedule = ReferenceWarmupMultiStepLR(reference, [30, 50], 0.1, 0.1, 10)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trained = [(n, p) for n, p in named if p.requires_grad]
    assert len(group_of) == len(trained) == len(reference.param_groups)
    assert any("bias" in n for n, _ in trained)
    assert any("head.cls." in n for n, _ in trained) and any("head.proj." in n for n, _ in trained)
    for epoch in range(60):
        ref_schedule.step()          # their loop: scheduler.step() before each epoch
        schedule.start_epoch(epoch)  # clipid's loop: at the start of each epoch
        for (name, param), ref in zip(trained, reference.param_groups, strict=True):
            group = group_of[id(param)]
            assert group["lr"] == pytest.approx(ref["lr"], rel=1e-12), (epoch, name)
            assert group["weight_decay"] == ref["weight_decay"], name


def test_default_groups_are_adamw_without_decay_on_one_d_parameters():
    params, objective = recipe_objective(optimizer="adamw", bias_lr_factor=1.0)
    groups = objective.param_groups(params.train)
    assert [g["name"] for g in groups[:2]] == ["image", "image_no_decay"]
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in objective.named_parameters():
        if param.requires_grad:
            assert (id(param) in decayed) == (param.ndim >= 2 and "ln" not in name), name
    assert isinstance(make_optimizer(groups, "adamw", 1e-3), torch.optim.AdamW)


def test_prompt_stage_cosine_by_epoch_is_timms_as_clipreid_steps_it():
    lr_at = cosine_by_epoch(120, 5, 1e-5, 1e-6)
    for epoch in range(120):
        expected = reference_cosine_lr(epoch + 1, 3.5e-4, 120, 1e-6, 1e-5, 5)
        assert lr_at(3.5e-4, epoch) == pytest.approx(expected, rel=1e-12), epoch
    assert lr_at(3.5e-4, 119) == 1e-6


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_per_step_cosine_with_start_and_floor_and_default_unchanged():
    weight = torch.nn.Parameter(torch.zeros(1))
    plain = torch.optim.Adam([weight], lr=0.5)
    scheduler = warmup_cosine(plain, 4, 20)
    lrs = []
    for _ in range(20):
        lrs.append(plain.param_groups[0]["lr"])
        scheduler.step()
    expected = [0.5 * (s + 1) / 4 if s < 4 else
                0.5 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)) for s in range(20)]
    assert lrs == expected  # bit for bit: the default schedule did not move
    bounded = torch.optim.Adam([weight], lr=0.5)
    scheduler = warmup_cosine(bounded, 4, 20, start=0.1, floor=0.01)
    first = bounded.param_groups[0]["lr"]
    for _ in range(25):
        scheduler.step()
    assert first == pytest.approx(0.1 + 0.4 / 4)
    assert bounded.param_groups[0]["lr"] == pytest.approx(0.01)


# --------------------------------------------------------------------- pad_crop augmentation

def reference_pixel_erasing(img: torch.Tensor, probability: float, rng: random.Random
                            ) -> torch.Tensor:
    """timm RandomErasing(mode='pixel', max_count=1) on one CHW image, drawing from ``rng``."""
    chan, img_h, img_w = img.shape
    if rng.random() > probability:
        return img
    area = img_h * img_w
    for _ in range(10):
        target_area = rng.uniform(0.02, 1 / 3) * area
        aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < img_w and h < img_h:
            top, left = rng.randint(0, img_h - h), rng.randint(0, img_w - w)
            img[:, top:top + h, left:left + w] = torch.empty(chan, h, w).normal_()
            break
    return img


def reference_pad_crop(image, size, mean, std, padding, erasing, seed):
    """make_dataloader_clipreid's train_transforms: Resize (bicubic), RandomHorizontalFlip,
    Pad, RandomCrop, ToTensor, Normalize, RandomErasing; each draw as torchvision makes it,
    Python's generator seeded from torch's as clipid does for timm's erasing."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    torch.manual_seed(seed)
    x = TF.resize(image, list(size), interpolation=InterpolationMode.BICUBIC)
    if torch.rand(1) < 0.5:
        x = TF.hflip(x)
    x = TF.pad(x, padding)
    width, height = x.size
    top = int(torch.randint(0, height - size[0] + 1, size=(1,)))
    left = int(torch.randint(0, width - size[1] + 1, size=(1,)))
    x = TF.normalize(TF.to_tensor(TF.crop(x, top, left, *size)), mean, std)
    rng = random.Random(int(torch.randint(0, 2**62, (1,))))
    return reference_pixel_erasing(x, erasing, rng)


def test_pad_crop_is_clipreids_augmentation_draw_for_draw():
    from PIL import Image

    from clipid.data.loader import seeded
    from clipid.training.data import pad_crop_transform

    pixels = np.random.RandomState(0).randint(0, 256, (70, 30, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    mean, std = [0.5] * 3, [0.5] * 3
    transform = pad_crop_transform((32, 16), mean, std, flip=True, padding=10,
                                   random_erasing=0.5)
    only_flip = pad_crop_transform((32, 16), mean, std, flip=True, padding=0, random_erasing=0)
    erased = flipped = 0
    python_state = random.getstate()
    for seed in range(40):
        ours = seeded(seed, transform, image)
        expected = reference_pad_crop(image, (32, 16), mean, std, 10, 0.5, seed)
        assert ours.shape == (3, 32, 16)
        assert torch.equal(ours, expected), seed
        erased += int((ours.abs() > 1.0 + 1e-6).any())  # normal pixels leave [-1, 1]
        plain = seeded(seed, only_flip, image)
        flipped += int(torch.equal(plain, reference_pad_crop(image, (32, 16), mean, std, 0, 0,
                                                             seed)) and not torch.equal(
            plain, torch.flip(plain, dims=[2])))
    assert random.getstate() == python_state  # the caller's Python generator is untouched
    assert 5 < erased < 35 and flipped == 40


def test_pad_crop_is_what_the_engine_builds():
    from clipid.training.data import build_train_transform

    params = params_from_dict({"train": {"augment": {"policy": "pad_crop", "padding": 10}}})
    clip = create_model("clipid-vit-tiny", seed=0)
    steps = [type(t).__name__ for t in build_train_transform(clip, params).transforms]
    assert steps == ["Resize", "RandomHorizontalFlip", "Pad", "RandomCrop", "ToTensor",
                     "Normalize", "PythonSeeded"]


@pytest.mark.parametrize("train, key", [
    ({"milestones": [50, 30]}, "train.milestones"),
    ({"augment": {"policy": "pad_crop"}, "augment_device": "batch"}, "train.augment.policy"),
])
def test_recipe_knobs_that_do_not_fit_are_one_line_naming_the_key(tmp_path, train, key):
    import yaml

    from clipid.checks import load_checked_params
    from clipid.config import ConfigError

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    with pytest.raises(ConfigError, match=rf"params.yaml:\d+: '{key}'") as error:
        load_checked_params(path)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------- the losses of both stages

def reference_supcon(text_features, image_features, t_label, i_targets):
    """loss/supcontrast.py SupConLoss.forward (temperature 1)."""
    mask = torch.eq(t_label[:, None], i_targets[None, :]).float()
    logits = text_features @ image_features.T / 1.0
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def reference_text_features(model, tokenizer, ctx, labels):
    """PromptLearner.forward + TextEncoder.forward of make_model_clipreid.py, on open_clip's
    modules: prefix = SOT + 'A photo of a', the identity's 4 vectors, suffix = 'person.' ..."""
    tokens = tokenizer(["A photo of a X X X X person."])
    with torch.no_grad():
        embedding = model.token_embedding(tokens)
    count = len(labels)
    prompts = torch.cat([embedding[:, :5].expand(count, -1, -1), ctx[labels],
                         embedding[:, 9:].expand(count, -1, -1)], dim=1)
    x = prompts + model.positional_embedding
    if not model.transformer.batch_first:
        x = x.permute(1, 0, 2)
    x = model.transformer(x, attn_mask=model.attn_mask)
    if not model.transformer.batch_first:
        x = x.permute(1, 0, 2)
    x = model.ln_final(x)
    return x[torch.arange(count), tokens.argmax(dim=-1).expand(count)] @ model.text_projection


def reference_xent(inputs, targets, num_classes, epsilon=0.1):
    """loss/softmax_loss.py CrossEntropyLabelSmooth."""
    log_probs = torch.log_softmax(inputs, dim=1)
    onehot = torch.zeros_like(log_probs).scatter_(1, targets[:, None], 1)
    smoothed = (1 - epsilon) * onehot + epsilon / num_classes
    return (-smoothed * log_probs).mean(0).sum()


def reference_triplet(feat, labels, margin=0.3):
    """loss/triplet_loss.py TripletLoss()(feat, labels)[0]: no normalisation, hard mining over
    a mask that includes the anchor itself, MarginRankingLoss."""
    n = feat.size(0)
    xx = feat.pow(2).sum(1, keepdim=True).expand(n, n)
    dist = (xx + xx.t() - 2 * feat @ feat.t()).clamp(min=1e-12).sqrt()
    is_pos = labels.expand(n, n).eq(labels.expand(n, n).t())
    is_neg = labels.expand(n, n).ne(labels.expand(n, n).t())
    dist_ap = dist[is_pos].contiguous().view(n, -1).max(1).values
    dist_an = dist[is_neg].contiguous().view(n, -1).min(1).values
    return torch.nn.functional.margin_ranking_loss(dist_an, dist_ap, torch.ones_like(dist_an),
                                                   margin=margin)


def tiny_clip():
    clip = create_model("clipid-vit-tiny", seed=0)
    clip.model.eval()
    return clip


def test_learnt_prompt_text_features_are_clipreids():
    from clipid.training.prompts import PromptLearner

    clip = tiny_clip()
    learner = PromptLearner(clip, 6, 4, "a photo of a {ctx} {noun}.", "person", seed=1)
    labels = torch.tensor([3, 0, 3, 5])
    with torch.no_grad():
        ours = learner.encode(clip.model, labels, normalize=False)
        expected = reference_text_features(clip.model, clip.tokenizer, learner.ctx, labels)
        assert learner.start == 5
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
        normalised = learner.encode(clip.model, labels)
    torch.testing.assert_close(normalised, torch.nn.functional.normalize(expected, dim=-1))


def test_prompt_stage_paper_loss_and_gradient_are_clipreids():
    from clipid.training.prompts import PromptLearner, PromptObjective

    clip = tiny_clip()
    learner = PromptLearner(clip, 5, 4, "a photo of a {ctx} {noun}.", "person", seed=2)
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(12, int(clip.model.visual.output_dim), generator=generator) * 2.0
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 0, 2, 1, 4])
    objective = PromptObjective(learner, clip.model, feats, labels, torch.float32, paper=True)
    index = torch.tensor([4, 0, 5, 1, 8, 2, 6, 11])
    terms = objective(index)
    ours = terms["i2t"] + terms["t2i"]
    ours_grad, = torch.autograd.grad(ours, learner.ctx)

    ctx = learner.ctx.detach().clone().requires_grad_(True)
    target = labels[index]
    text = reference_text_features(clip.model, clip.tokenizer, ctx, target)
    image = feats[index]
    expected = reference_supcon(image, text, target, target) \
        + reference_supcon(text, image, target, target)
    expected_grad, = torch.autograd.grad(expected, ctx)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    scale = float(expected_grad.abs().max())  # float32 sums of a different order
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-3, atol=1e-3 * scale)
    assert ours_grad[:, 0].abs().sum() > 0


def test_image_stage_paper_loss_is_clipreids_on_the_same_batch():
    from clipid.models.visual import encode_image_parts
    from clipid.training.prompts import PromptTerm, TextClassifier

    params = params_from_dict({"clipreid": {"losses": "paper", "id_weight": 0.25,
                                            "triplet_weight": 1.0, "i2t_weight": 1.0},
                               "train": {"label_smoothing": 0.1, "triplet_margin": 0.3}})
    spec = params.clipreid.image_stage()
    clip = tiny_clip()
    model = clip.model
    classes = 4
    generator = torch.Generator().manual_seed(3)
    text = torch.randn(classes, int(model.visual.output_dim), generator=generator) * 3.0
    torch.manual_seed(0)
    terms = standard_terms(spec, params.train, classes, int(model.visual.output_dim), None,
                           model)
    classifier = TextClassifier([str(i) for i in range(classes)], text, 1.0)
    terms.append(PromptTerm(classifier, torch.device("cpu"), 0.1, raw=True))
    objective = Objective(model, terms, spec)
    objective.start_epoch()
    size = clip.image_size
    images = torch.randn(8, 3, size, size, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    heads = objective.terms[0].head
    weights = {name: copy.deepcopy(head) for name, head in heads.items()}
    ours = objective(images, labels, torch.zeros(8, dtype=torch.long))
    assert set(ours) == {"id", "triplet", "i2t"}

    parts = encode_image_parts(model, images)
    score = [weights[name](getattr(parts, name)) for name in ("cls", "proj")]
    id_loss = sum(reference_xent(s, labels, classes) for s in score)
    tri_loss = sum(reference_triplet(f, labels)
                   for f in (parts.last_block_cls, parts.cls, parts.proj))
    i2t_loss = reference_xent(parts.proj @ text.t(), labels, classes)
    torch.testing.assert_close(ours["id"], 0.25 * id_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["triplet"], tri_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["i2t"], i2t_loss, rtol=1e-5, atol=1e-6)
    assert heads["cls"].classifier.in_features == int(model.visual.class_embedding.shape[0])
    assert heads["proj"].classifier.in_features == int(model.visual.output_dim)


# --------------------------------------------------------------------- the whole recipe

@pytest.mark.slow
def test_both_stages_run_the_whole_recipe_and_log_its_learning_rates(tmp_path):
    from clipid.models.checkpoint import load_checkpoint
    from clipid.training.engine import Trainer
    from clipid.training.prompts import learn_prompts

    from conftest import prepare_data, workspace_over

    recipe = {
        "data": {"synthetic": {"items": 12, "views": 4, "image_size": 32}, "cache_size": 16,
                 "workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "pk_k": 2, "log_every": 1, "workers": 0,
                  "lr": 1e-4, "pk_epoch": "instances", "optimizer": "adam",
                  "weight_decay": 1e-4, "weight_decay_bias": 1e-4, "bias_lr_factor": 2.0,
                  "schedule": "multistep", "milestones": [1], "gamma": 0.1,
                  "warmup_factor": 0.1, "warmup_epochs": 1.5, "grad_clip": 0.0,
                  "head_lr_mult": 1.0, "augment": {"policy": "pad_crop",
                                                   "random_erasing": 0.5}},
        "clipreid": {"losses": "paper", "prompt_epochs": 2, "prompt_batch_size": 8,
                     "prompt_lr": 3.5e-4, "prompt_warmup_epochs": 1.5, "prompt_warmup_lr": 1e-5,
                     "prompt_lr_min": 1e-6, "prompt_schedule_unit": "epoch",
                     "id_weight": 0.25, "noun": "person"},
    }
    params = params_from_dict(recipe)
    workspace = workspace_over(prepare_data(params, tmp_path / "data"), tmp_path / "run")
    prompt_lrs: list[float] = []
    learn_prompts(params, device=torch.device("cpu"), workspace=workspace,
                  on_log=lambda m, step: prompt_lrs.append(m["train/lr"]) if "train/lr" in m
                  else None)
    lr_at = cosine_by_epoch(2, 1.5, 1e-5, 1e-6)
    assert sorted(set(prompt_lrs), reverse=True)[:1] == [lr_at(3.5e-4, 0)]
    assert prompt_lrs[-1] == pytest.approx(1e-6)

    image_lrs: dict[int, float] = {}
    epoch = {"now": 0}

    def on_log(metrics: dict, step: int) -> None:
        if "train/lr" in metrics:
            image_lrs.setdefault(epoch["now"], metrics["train/lr"])
        if any(k.startswith("epoch/") for k in metrics):
            epoch["now"] += 1

    trainer = Trainer(params, "clipreid", device=torch.device("cpu"), workspace=workspace,
                      on_log=on_log)
    weights, meta = load_checkpoint(trainer.fit().checkpoint)
    multistep = multistep_by_epoch([1], 0.1, 0.1, 1.5)
    assert image_lrs == {e: pytest.approx(multistep(1e-4, e)) for e in range(2)}
    assert {"heads.cls.classifier.weight", "heads.proj.classifier.weight"} <= set(weights)
    assert {"i2t", "id", "triplet"} <= set(meta["history"][0])
    assert len(meta["history"]) == 2


@pytest.mark.slow
def test_a_killed_recipe_stage_resumes_to_the_same_weights(tmp_path):
    """Stage 4 with CLIP-ReID's epoch, optimiser, schedule, augmentation and losses: the state
    after epoch 1 (per-epoch schedule, the epoch's own sampler draws) resumes exactly."""
    from clipid.models.checkpoint import load_checkpoint
    from clipid.training.engine import Trainer

    from conftest import Interrupt, kill_in_second_epoch, prepare_data, workspace_over

    params = params_from_dict({
        "data": {"synthetic": {"items": 12, "views": 4, "image_size": 32}, "cache_size": 16,
                 "workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "pk_k": 2, "log_every": 1, "workers": 0,
                  "pk_epoch": "instances", "optimizer": "adam", "bias_lr_factor": 2.0,
                  "weight_decay_bias": 1e-4, "schedule": "multistep", "milestones": [1],
                  "warmup_epochs": 1.5, "augment": {"policy": "pad_crop"}},
        "stage4": {"init": "stage1", "identity_losses": "paper", "center_weight": 0.0},
    })
    prepared = prepare_data(params, tmp_path / "data")

    def fit(root, **kwargs):
        trainer = Trainer(params, "stage4", device=torch.device("cpu"),
                          workspace=workspace_over(prepared, root), **kwargs)
        return trainer.fit().checkpoint

    reference, _ = load_checkpoint(fit(tmp_path / "straight"))
    with pytest.raises(Interrupt):
        fit(tmp_path / "killed", on_log=kill_in_second_epoch())
    steps: list[int] = []
    resumed, _ = load_checkpoint(fit(tmp_path / "killed", on_log=lambda m, s: steps.append(s)))
    assert min(steps) > 1, "the rerun started from scratch instead of resuming"
    assert resumed.keys() == reference.keys()
    assert {"heads.cls.classifier.weight", "heads.proj.classifier.weight"} <= set(resumed)
    for key, value in reference.items():
        assert torch.equal(resumed[key], value), f"{key} differs after resume"
