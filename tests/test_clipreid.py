"""CLIP-ReID: prompt learning touches only the prompts, the image stage only the image tower,
and the two new loss terms against values computed by hand."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clipid.config import Params, params_from_dict
from clipid.data.dataset import PreparedData
from clipid.errors import ClipidError
from clipid.models.checkpoint import load_checkpoint, save_checkpoint
from clipid.models.factory import create_model
from clipid.stages.report import describe_stage
from clipid.training.engine import Trainer
from clipid.training.losses import ImageToTextCrossEntropy, PromptContrastiveLoss
from clipid.training.prompts import (
    PromptLearner,
    encode_text_embeddings,
    learn_prompts,
    load_text_classifier,
    prompts_path,
)
from clipid.training.towers import tower_of

from conftest import Interrupt, kill_in_second_epoch, prepare_data, workspace_over

CPU = torch.device("cpu")


def micro_params(**sections: dict) -> Params:
    raw = {
        "data": {"synthetic": {"items": 12, "views": 4, "image_size": 48}, "cache_size": 32,
                 "workers": 0},
        "train": {"epochs": 1, "batch_size": 8, "pk_k": 2, "log_every": 1, "workers": 0},
        **sections,
    }
    clipreid = {"prompt_epochs": 2, "prompt_batch_size": 8, "prompt_warmup_epochs": 0.5,
                **raw.pop("clipreid", {})}
    return params_from_dict({**raw, "clipreid": clipreid})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    params = micro_params()
    return prepare_data(params, out)


@pytest.fixture(scope="module")
def learnt(prepared, tmp_path_factory):
    """Prompts learnt once on the micro data set; ``(params, workspace, result)``."""
    workspace = workspace_over(prepared, tmp_path_factory.mktemp("models"))
    params = micro_params()
    return params, workspace, learn_prompts(params, device=CPU, workspace=workspace)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------ the losses

def test_prompt_contrastive_loss_by_hand():
    # Images 0 and 2 show identity 0, image 1 identity 1; features are the axes, scale 2.
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, 0])
    e2 = math.exp(2)
    # Every image: e^2 on its prompt, e^0 on the other one.
    i2t_expected = -math.log(e2 / (e2 + 1))
    # Prompt 0 over the images (2, 0, 2): two positives of e^2 / (2 e^2 + 1) each;
    # prompt 1 over (0, 2, 0): one positive of e^2 / (e^2 + 2).
    t2i_expected = (-math.log(e2 / (2 * e2 + 1)) - math.log(e2 / (e2 + 2))) / 2
    i2t, t2i = PromptContrastiveLoss()(image, text, labels, 2.0)
    assert i2t.item() == pytest.approx(i2t_expected, rel=1e-6)
    assert t2i.item() == pytest.approx(t2i_expected, rel=1e-6)

    # A prompt with no image in the batch is a negative for i2t and no anchor of t2i.
    extra = torch.cat([text, F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)])
    i2t3, t2i3 = PromptContrastiveLoss()(image, extra, labels, 2.0)
    assert t2i3.item() == pytest.approx(t2i_expected, rel=1e-6)
    e_diag = math.exp(2 * math.sqrt(0.5))
    assert i2t3.item() == pytest.approx(-math.log(e2 / (e2 + 1 + e_diag)), rel=1e-6)


def test_image_to_text_cross_entropy_by_hand():
    # Unnormalised features (the term normalises them) against two fixed identity features.
    feats = torch.tensor([[3.0, 0.0], [0.6, 0.8]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1])
    scale, eps = 5.0, 0.2

    def smoothed(sims: list[float], target: int) -> float:
        logz = math.log(sum(math.exp(scale * s) for s in sims))
        log_p = [scale * s - logz for s in sims]
        return -sum(((1 - eps) * (k == target) + eps / 2) * lp for k, lp in enumerate(log_p))

    expected = (smoothed([1.0, 0.0], 0) + smoothed([0.6, 0.8], 1)) / 2
    got = ImageToTextCrossEntropy(2, eps)(feats, text, labels, scale)
    assert got.item() == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------ prompts

def test_text_from_embeddings_is_encode_text():
    clip = create_model("clipid-vit-tiny", "", seed=0)
    tokens = clip.tokenizer(["a photo of a red garment.", "x"])
    with torch.no_grad():
        direct = clip.model.encode_text(tokens)
        via = encode_text_embeddings(clip.model, clip.model.token_embedding(tokens), tokens)
    assert torch.equal(direct, via)


def test_prompt_learner_puts_learnt_tokens_in_the_template_slot():
    clip = create_model("clipid-vit-tiny", "", seed=0)
    learner = PromptLearner(clip, identities=3, n_ctx=4, template="a photo of a {ctx} {noun}.",
                            noun="garment")
    embeddings, tokens = learner(torch.tensor([2, 0]))
    plain = clip.tokenizer(["a photo of a X X X X garment."])
    with torch.no_grad():
        template = clip.model.token_embedding(plain)[0]
    start = learner.start  # after the start token and "a photo of a"
    assert start == 5 and torch.equal(tokens[0], plain[0])
    for row, identity in ((0, 2), (1, 0)):
        assert torch.equal(embeddings[row, :start], template[:start])
        assert torch.equal(embeddings[row, start:start + 4], learner.ctx[identity])
        assert torch.equal(embeddings[row, start + 4:], template[start + 4:])
    assert [n for n, _ in learner.named_parameters()] == ["ctx"]


@pytest.mark.parametrize(("template", "n_ctx", "message"), [
    ("a photo of a {noun}.", 4, "exactly once"),
    ("a photo of a {ctx} {colour} {noun}.", 4, "only use"),
    ("a photo of a {ctx} {noun}.", 31, "does not fit"),
])
def test_bad_templates_are_refused(template, n_ctx, message):
    clip = create_model("clipid-vit-tiny", "", seed=0)
    with pytest.raises(ClipidError, match=message):
        PromptLearner(clip, 2, n_ctx, template, "garment")


@pytest.mark.slow
def test_prompt_stage_changes_only_the_prompt_tokens(learnt, prepared):
    params, models, result = learnt
    state, meta = load_checkpoint(result.checkpoint)
    assert list(state) == ["ctx"]
    identities = len(PreparedData.load(prepared).rows("train")["item_id"].unique())
    assert state["ctx"].shape == (identities, 4, 128)
    fresh = PromptLearner(create_model("clipid-vit-tiny", "", seed=0), identities, 4,
                          params.clipreid.template, params.clipreid.noun, seed=0)
    assert not torch.equal(state["ctx"], fresh.ctx.detach()), "the prompts did not learn"
    # Both towers and the logit scale: bit-identical to the model the stage started from.
    start = create_model(params.model.name, params.model.pretrained, seed=params.train.seed)
    after = dict(result.model.named_parameters())
    for name, value in start.model.named_parameters():
        assert torch.equal(after[name], value), f"{name} changed during prompt learning"
    assert meta["stage"] == "clipreid_prompts" and len(meta["history"]) == 2
    assert meta["identities"] == sorted(meta["identities"])
    assert {"i2t", "t2i", "loss"} <= set(meta["history"][0])


@pytest.mark.slow
def test_image_stage_keeps_text_tower_and_prompts_bit_identical(learnt, prepared):
    params, workspace, _ = learnt
    prompts = prompts_path(workspace)
    before = digest(prompts)
    classifier, extra = load_text_classifier(params, CPU, workspace)
    assert classifier.features.shape == (len(classifier.identities), 128)
    trainer = Trainer(params, "clipreid", device=CPU, workspace=workspace)
    trained, meta = load_checkpoint(trainer.fit().checkpoint)
    assert digest(prompts) == before
    start = create_model(params.model.name, params.model.pretrained, seed=params.train.seed)
    initial = start.model.state_dict()
    text = {k: v for k, v in trained.items() if not k.startswith("heads.")
            and tower_of(k) != "image"}
    assert text and all(torch.equal(v, initial[k]) for k, v in text.items())
    image = [k for k in trained if not k.startswith("heads.") and tower_of(k) == "image"]
    assert any(not torch.equal(trained[k], initial[k]) for k in image)
    assert meta["stage"] == "clipreid" and meta["prompts"]["sha256"] == before
    assert {"i2t", "id", "triplet"} <= set(meta["history"][0])
    # The text features the stage used come back the same from the unchanged prompts.
    again, _ = load_text_classifier(params, CPU, workspace)
    assert torch.equal(again.features, classifier.features)


@pytest.mark.slow
def test_clipreid_from_a_stage_checkpoint_is_deterministic(prepared, tmp_path):
    # A stand-in Stage 2 checkpoint: clipreid.init names a stage, so nothing seeds torch's
    # global generator on the way (create_model only seeds for pretrained).
    start = create_model("clipid-vit-tiny", "", seed=7)
    workspace = workspace_over(prepared, tmp_path)
    save_checkpoint(start.model.state_dict(), workspace.weights("stage2"),
                    {"architecture": "clipid-vit-tiny"})
    params = micro_params(clipreid={"init": "stage2"})
    learn_prompts(params, device=CPU, workspace=workspace)
    weights = []
    for _ in range(2):
        torch.randn(5)  # the global generator is elsewhere on the second run
        trainer = Trainer(params, "clipreid", device=CPU, workspace=workspace)
        weights.append(load_checkpoint(trainer.fit().checkpoint))
    (first, meta), (second, _) = weights
    assert meta["parent"] == str(workspace.weights("stage2"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.slow
def test_prompts_of_other_params_are_refused(learnt, prepared):
    _, workspace, _ = learnt
    with pytest.raises(ClipidError, match="n_ctx=4.*rerun"):
        load_text_classifier(micro_params(clipreid={"n_ctx": 2}), CPU, workspace)
    with pytest.raises(ClipidError, match="init_model"):
        load_text_classifier(micro_params(train={"seed": 1}), CPU, workspace)


def test_fixed_prompts_learn_nothing(prepared, tmp_path):
    template = micro_params(clipreid={"prompts": "fixed", "fixed_source": "template"})
    workspace = workspace_over(prepared, tmp_path)
    result = learn_prompts(template, device=CPU, workspace=workspace)
    state, meta = load_checkpoint(result.checkpoint)
    assert state == {} and meta["prompts"] == "fixed" and meta["epochs"] == 0
    same, _ = load_text_classifier(template, CPU, workspace)
    assert torch.equal(same.features, same.features[:1].expand_as(same.features))
    captions = micro_params(clipreid={"prompts": "fixed", "fixed_source": "captions"})
    own, extra = load_text_classifier(captions, CPU, workspace)
    assert extra["prompts"]["fixed_source"] == "captions"
    assert torch.allclose(own.features.norm(dim=1), torch.ones(len(own.identities)))
    assert len({tuple(row.tolist()) for row in own.features}) > 1


def test_report_describes_the_clipreid_row():
    text = describe_stage(micro_params(clipreid={"init": "stage3"}), "clipreid")
    assert "4 learnt tokens" in text and "i2t CE + CE + triplet" in text
    assert text.endswith("from stage3")


@pytest.mark.slow
def test_a_killed_prompt_stage_resumes_to_the_same_prompts(learnt, prepared, tmp_path):
    params, _, straight = learnt  # the same params, never interrupted
    workspace = workspace_over(prepared, tmp_path)
    with pytest.raises(Interrupt):
        learn_prompts(params, device=CPU, workspace=workspace, on_log=kill_in_second_epoch())
    assert workspace.resume_dir("clipreid_prompts").is_dir()
    assert not prompts_path(workspace).exists()

    steps: list[int] = []
    resumed = learn_prompts(params, device=CPU, workspace=workspace,
                            on_log=lambda m, s: steps.append(s))
    assert min(steps) > 1, "the rerun started from scratch instead of resuming"
    (ctx, meta), (reference, reference_meta) = (load_checkpoint(resumed.checkpoint),
                                                load_checkpoint(straight.checkpoint))
    assert torch.equal(ctx["ctx"], reference["ctx"]), "resumed prompts differ"
    assert meta["history"] == reference_meta["history"]
    assert not workspace.resume_dir("clipreid_prompts").exists()


@pytest.mark.slow
def test_a_prompt_resume_state_of_other_params_is_ignored(prepared, tmp_path):
    workspace = workspace_over(prepared, tmp_path)
    with pytest.raises(Interrupt):
        learn_prompts(micro_params(), device=CPU, workspace=workspace,
                      on_log=kill_in_second_epoch())
    steps: list[int] = []
    learn_prompts(micro_params(clipreid={"prompt_lr": 1e-3}), device=CPU, workspace=workspace,
                  on_log=lambda m, s: steps.append(s))
    assert min(steps) == 1, "a state saved under other params was resumed"
