"""`clipid check-params` and every command reject params that cannot run, before reading data:
one line on stderr naming the file, line and key, exit code 2."""

from pathlib import Path

import pytest

from clipid import cli
from clipid.checks import architectures
from clipid.errors import ClipidError


def run(tmp_path: Path, text: str, command: tuple[str, ...] = ("check-params",),
        capsys=None) -> tuple[int, str]:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    code = cli.main([*command, "--params", str(path)])
    err = capsys.readouterr().err if capsys else ""
    return code, err


def assert_error(code: int, err: str, where: str, *parts: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("clipid ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert where in lines[0]
    for part in parts:
        assert part in lines[0], lines[0]


@pytest.mark.parametrize("text, line, parts", [
    ("stage3:\n  init: stage5\n", 2, ("'stage3.init' is 'stage5'", "names no stage",
                                      "allowed: stage1, stage2, stage3, stage4, clipreid")),
    # The pretrained model has one name, stage1: the old spelling is pointed at it.
    ("stage2:\n  train_text: false\n  init: pretrained\n", 3,
     ("'stage2.init' is 'pretrained'", "the pretrained model is 'stage1'")),
])
def test_init_naming_no_stage(tmp_path, capsys, text, line, parts):
    code, err = run(tmp_path, text, capsys=capsys)
    assert_error(code, err, f"params.yaml:{line}:", *parts)


@pytest.mark.parametrize("text, line, cycle", [
    # stage3 starts from stage2 by default: stage2 from stage3 closes the loop.
    ("stage2:\n  init: stage3\n", 2, "stage2.init is stage3, stage3.init is stage2"),
    ("stage4:\n  init: stage4\n", 2, "stage4.init is stage4"),
    ("stage2:\n  init: clipreid\nclipreid:\n  init: stage2\n", 2,
     "stage2.init is clipreid, clipreid.init is stage2"),
    ("stage2:\n  init: stage1\nstage3:\n  init: stage4\n", 4,
     "stage3.init is stage4, stage4.init is stage3"),
])
def test_cycle_of_inits(tmp_path, capsys, text, line, cycle):
    code, err = run(tmp_path, text, capsys=capsys)
    assert_error(code, err, f"params.yaml:{line}:", "cycle of inits", cycle)


def test_chain_of_inits_without_cycle_passes(tmp_path, capsys):
    code, err = run(tmp_path, "stage4:\n  init: stage2\nclipreid:\n  init: stage3\n",
                    capsys=capsys)
    assert (code, err) == (0, "")


def test_unknown_model_name_is_one_line_not_a_traceback(tmp_path, capsys):
    code, err = run(tmp_path, "data:\n  seed: 1\nmodel:\n  name: ViT-B-17\n", capsys=capsys)
    assert_error(code, err, "params.yaml:4:", "'model.name' is 'ViT-B-17'",
                 "did you mean 'ViT-B-16'")


def test_architectures_are_open_clips_list(tmp_path):
    import open_clip

    import clipid.models  # noqa: F401 - registers clipid's own configs with open_clip

    assert architectures() == sorted(open_clip.list_models())
    assert "clipid-vit-tiny" in architectures() and "ViT-B-16" in architectures()


def test_missing_weight_file(tmp_path, capsys):
    code, err = run(tmp_path, "model:\n  pretrained: weights/ViT-B-16.safetensors\n",
                    capsys=capsys)
    assert_error(code, err, "params.yaml:2:", "'model.pretrained' is "
                 "'weights/ViT-B-16.safetensors', a weight file that does not exist")


def test_unknown_tag(tmp_path, capsys):
    code, err = run(tmp_path, "model:\n  name: RN50\n  pretrained: opneai\n", capsys=capsys)
    assert_error(code, err, "params.yaml:3:", "'opneai', neither a pretrained tag of RN50",
                 "openai")


def test_existing_weight_file_and_known_tag_pass(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert run(tmp_path, "model:\n  pretrained: w.safetensors\n", capsys=capsys) == (0, "")
    # A tag is checked against open_clip's registry only: nothing is downloaded.
    assert run(tmp_path, "model:\n  name: ViT-B-16\n  pretrained: openai\n",
               capsys=capsys) == (0, "")


@pytest.mark.parametrize("text, parts", [
    ("train:\n  batch_size: 30\n", ("'train.batch_size' (30) is not a multiple of "
                                    "'train.pk_k' (4)", "stage4, clipreid")),
    ("train:\n  batch_size: 32\n  nproc: 3\n", ("'train.batch_size' (32) is not a multiple of "
                                                "'train.nproc' (3)",)),
    # 24 is a multiple of 8 but each of the 2 processes gets 12 images: not P x 8.
    ("train:\n  batch_size: 24\n  nproc: 2\n  pk_k: 8\n",
     ("'train.batch_size' (24) / 'train.nproc' (2) is not a multiple of 'train.pk_k' (8)",)),
])
def test_batch_size_must_split(tmp_path, capsys, text, parts):
    code, err = run(tmp_path, text, capsys=capsys)
    assert_error(code, err, "params.yaml:2:", *parts)


def test_default_params_pass(tmp_path, capsys):
    assert run(tmp_path, "", capsys=capsys) == (0, "")


@pytest.mark.parametrize("command", [("prepare",), ("train", "stage2"), ("evaluate", "stage3"),
                                     ("clipreid-prompts",), ("evaluate", "stage1")])
def test_every_stage_checks_before_reading_data(tmp_path, capsys, monkeypatch, command):
    # An empty folder: without the check each stage would fail on data it cannot find (or, for
    # prepare, draw the synthetic data set first).
    monkeypatch.chdir(tmp_path)
    code, err = run(tmp_path, "stage3:\n  init: stage5\n", command, capsys=capsys)
    assert_error(code, err, "params.yaml:2:", "'stage3.init' is 'stage5'")
    assert not (tmp_path / "data").exists()


def test_synthetic_data_that_cannot_be_drawn_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = run(tmp_path, "data:\n  synthetic:\n    views: 2\n    query_views: 2\n",
                    ("prepare",), capsys=capsys)
    assert_error(code, err, "error: data.synthetic.query_views (2) must be below "
                 "data.synthetic.views (2)")


def test_multi_line_messages_are_printed_on_one_line(tmp_path, capsys, monkeypatch):
    def fail(args):
        raise ClipidError("could not get the weights\nOn a machine with internet, do this")

    monkeypatch.setitem(cli.COMMANDS, "check-params", (fail, "fails"))
    code, err = run(tmp_path, "", capsys=capsys)
    assert_error(code, err, "error: could not get the weights On a machine with internet")


@pytest.mark.parametrize("text, line, parts", [
    ("search:\n  model:\n    image: stage9\n", 3,
     ("'search.model.image' is 'stage9'", "names no stage with a model",
      "allowed: stage1, stage2, stage3, stage4, clipreid")),
    # CLIP-ReID's prompts are no model to search with.
    ("search:\n  model:\n    text: clipreid_prompts\n", 3,
     ("'search.model.text' is 'clipreid_prompts'",)),
    ("search:\n  top_k: 5\n  model:\n    text: zeroshot\n", 4,
     ("'search.model.text' is 'zeroshot'", "the pretrained model is 'stage1'")),
])
def test_search_model_naming_no_model(tmp_path, capsys, text, line, parts):
    code, err = run(tmp_path, text, capsys=capsys)
    assert_error(code, err, f"params.yaml:{line}:", *parts)


@pytest.mark.parametrize("text, line, parts", [
    ("model:\n  image_size: [256]\n", 2, ("'model.image_size' is [256]", "[height, width]")),
    ("model:\n  mean: [0.5, 0.5]\n", 2, ("'model.mean' is [0.5, 0.5]", "[r, g, b]")),
    ("model:\n  image_size: [8, 4]\n", 2, ("'model.image_size[0]' is 8", ">= 16")),
    ("model:\n  quick_gelu: yes please\n", 2, ("'model.quick_gelu'", "'auto'")),
    ("model:\n  embedding: both\n", 2, ("'model.embedding' is 'both'", "'concat'")),
    ("model:\n  patch_stride: 12\n", 2, ("'model.patch_stride' (12) is above the patch size",)),
    ("model:\n  last_stride: 1\n", 2, ("'model.last_stride' is for ResNet",)),
    ("model:\n  name: RN50\n  sie: true\n", 3, ("'model.sie' is for ViT", "RN50 is a ResNet")),
    ("model:\n  name: RN50\n  patch_stride: 12\n", 3, ("'model.patch_stride' is for ViT",)),
    ("model:\n  name: RN50\n  image_size: [250, 128]\n", 3,
     ("'model.image_size' [250, 128] is not a multiple of 32",)),
])
def test_model_geometry_keys(tmp_path, capsys, text, line, parts):
    code, err = run(tmp_path, text, capsys=capsys)
    assert_error(code, err, f"params.yaml:{line}:", *parts)


def test_clipreid_geometry_passes(tmp_path, capsys):
    text = ("model:\n  name: ViT-B-16\n  image_size: [256, 128]\n  patch_stride: 12\n"
            "  mean: [0.5, 0.5, 0.5]\n  std: [0.5, 0.5, 0.5]\n  embedding: concat\n"
            "  sie: true\n  sie_coe: 1.0\n  quick_gelu: true\n")
    assert run(tmp_path, text, capsys=capsys) == (0, "")
    rn = "model:\n  name: RN50\n  image_size: [256, 128]\n  last_stride: 1\n"
    assert run(tmp_path, rn, capsys=capsys) == (0, "")


def test_batch_augmentation_refuses_a_non_square_input(tmp_path, capsys):
    text = "model:\n  image_size: [256, 128]\ntrain:\n  augment_device: batch\n"
    code, err = run(tmp_path, text, capsys=capsys)
    assert_error(code, err, "params.yaml:4:", "'train.augment_device' batch", "[256, 128]")
