"""A stage added through the registry trains with the engine, untouched: its own description
(a different loss mix) and a loss term of its own, with a parameter that trains and is exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from clipid.config import Params, StageParams, params_from_dict
from clipid.models.checkpoint import load_checkpoint
from clipid.stage_registry import StageInfo, register_stage, trained_stages, unregister_stage
from clipid.training.engine import Trainer
from clipid.training.objective import LossTerm, Outputs, TermContext
from clipid.training.schedule import param_groups

from conftest import prepare_data, workspace_over

CPU = torch.device("cpu")
TOY = "toy_stage5"
STARTS: list[torch.Tensor] = []  # the toy term's initial weights, one per term built


def micro_params() -> Params:
    return params_from_dict({
        "data": {"synthetic": {"items": 12, "views": 4, "image_size": 48}, "cache_size": 32,
                 "workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "pk_k": 2, "log_every": 1, "workers": 0},
    })


def toy_spec(params: Params) -> StageParams:
    """InfoNCE plus batch-hard triplet from the pretrained model: a mix no stage has."""
    return StageParams(init="stage1", loss="infonce", contrastive_weight=1.0,
                       triplet_weight=0.5, sampler="pk", epochs=2)


class SpreadTerm(LossTerm):
    """A made-up term with a learnt projection: its parameter trains under AdamW and goes
    into the checkpoint as ``heads.spread.weight``."""

    def __init__(self, weight: float, dim: int):
        super().__init__("spread", weight)
        self.proj = nn.Linear(dim, 2, bias=False)
        STARTS.append(self.proj.weight.detach().clone())

    def forward(self, out: Outputs) -> torch.Tensor:
        return (self.proj(out.feats) - 1.0).square().mean()

    def param_groups(self, lr: float, train) -> list[dict]:
        return param_groups(list(self.proj.named_parameters()), lr, 0.0, "spread")

    def exported(self) -> dict[str, torch.Tensor]:
        return {"spread.weight": self.proj.weight}


def register_toy(spread_weight: float) -> str:
    """The toy stage's registry entry, its term at ``spread_weight``."""
    def toy_terms(context: TermContext) -> tuple[list[LossTerm], dict]:
        return ([SpreadTerm(spread_weight, 128)],
                {"toy": {"identities": len(context.identities)}})

    unregister_stage(TOY)
    register_stage(StageInfo(TOY, "train", "toy stage", f"train_{TOY}", spec=toy_spec,
                             extra_terms=toy_terms))
    return TOY


@pytest.fixture
def toy_stage():
    STARTS.clear()
    yield register_toy(1.0)
    unregister_stage(TOY)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_data(micro_params(), tmp_path_factory.mktemp("toy"))


@pytest.mark.slow
def test_a_registered_stage_trains_with_its_own_loss_mix_and_term(toy_stage, prepared,
                                                                  tmp_path):
    assert toy_stage in trained_stages()
    logged: list[dict] = []
    trainer = Trainer(micro_params(), toy_stage, device=CPU,
                      workspace=workspace_over(prepared, tmp_path / "a"),
                      on_log=lambda m, s: logged.append(m))
    result = trainer.fit()
    assert result.checkpoint == tmp_path / "a" / "models" / toy_stage / "model.safetensors"
    weights, meta = load_checkpoint(result.checkpoint)
    assert meta["stage"] == toy_stage and meta["toy"] == {"identities": 6}
    # The terms in order, the description's first and the entry's own last, then their sum.
    assert [list(h) for h in result.history] == [["infonce", "triplet", "spread", "loss"]] * 2
    assert meta["history"] == result.history
    for epoch in result.history:
        parts = epoch["infonce"] + epoch["triplet"] + epoch["spread"]
        assert epoch["loss"] == pytest.approx(parts, rel=1e-6)
    assert any("train/spread" in m for m in logged)
    # The term's own parameter trained, and the checkpoint carries it apart from the model.
    assert not torch.equal(weights["heads.spread.weight"], STARTS[0])

    # Its weight is a real weight: without the term the towers learn something else.
    register_toy(0.0)
    without = Trainer(micro_params(), toy_stage, device=CPU,
                      workspace=workspace_over(prepared, tmp_path / "b")).fit()
    other, _ = load_checkpoint(without.checkpoint)
    image = [k for k in other if k.startswith("visual.")]
    assert any(not torch.equal(weights[k], other[k]) for k in image)
