from pathlib import Path

import pytest

from clipid.config import ConfigError, Params, flatten_params, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repo_params_load_into_typed_object():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)
    assert params.data.source == "synthetic"
    assert isinstance(params.data.synthetic.items, int)
    assert isinstance(params.data.max_rejected_fraction, float)


def test_repo_params_set_every_field():
    """params.yaml documents every knob: nothing falls back to a hidden default."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from keys(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    assert set(keys(raw)) == set(flatten_params(Params()))


@pytest.mark.parametrize("text", ["1e-05", "1E-5", "+5e-1", "1.5e-3", "0.25"])
def test_exponent_floats_are_floats(tmp_path, text):
    # dvc exp run -S x=1e-5 writes 1e-05, which plain PyYAML (YAML 1.1) reads as a string.
    params = load_params(write(tmp_path, f"data:\n  max_rejected_fraction: {text}\n"))
    assert params.data.max_rejected_fraction == pytest.approx(float(text))


def test_int_is_accepted_for_float(tmp_path):
    params = load_params(write(tmp_path, "data:\n  max_rejected_fraction: 0\n"))
    assert params.data.max_rejected_fraction == 0.0
    assert isinstance(params.data.max_rejected_fraction, float)


def test_unknown_key_names_key_line_and_closest(tmp_path):
    path = write(tmp_path, "data:\n  source: synthetic\n  cache_sise: 64\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    msg = str(err.value)
    assert f"{path}:3" in msg
    assert "data.cache_sise" in msg
    assert "did you mean 'data.cache_size'" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*'model'"):
        load_params(write(tmp_path, "modle:\n  name: RN50\n"))


def test_wrong_type_names_key_and_type(tmp_path):
    path = write(tmp_path, "data:\n  synthetic:\n    items: many\n")
    with pytest.raises(ConfigError, match=r":3: 'data.synthetic.items' must be int, got 'many'"):
        load_params(path)


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="must be int"):
        load_params(write(tmp_path, "data:\n  splits: true\n"))


def test_out_of_range_names_range(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.max_rejected_fraction' is 1.5; allowed range: "
                                          r">= 0 and <= 1"):
        load_params(write(tmp_path, "data:\n  max_rejected_fraction: 1.5\n"))


def test_choice_names_allowed_values(tmp_path):
    with pytest.raises(ConfigError, match=r"'data.source' is 'imagenet'; allowed values: "
                                          r"'synthetic', 'inshop', 'hands11k', 'manifest'"):
        load_params(write(tmp_path, "data:\n  source: imagenet\n"))


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="'data' must be a mapping"):
        load_params(write(tmp_path, "data: 3\n"))


def test_invalid_yaml_names_file(tmp_path):
    path = write(tmp_path, "data: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_missing_keys_take_defaults():
    params = params_from_dict({"data": {"source": "manifest"}})
    assert params.data.source == "manifest"
    assert params.data.cache_size == Params().data.cache_size


def test_flatten_params_uses_dotted_keys():
    flat = flatten_params(Params())
    assert flat["data.synthetic.items"] == Params().data.synthetic.items
    assert flat["model.name"] == Params().model.name


def test_partial_section_keeps_that_sections_defaults():
    params = params_from_dict({"stage4": {"triplet_weight": 2.0}})
    assert params.stage4.triplet_weight == 2.0
    assert params.stage4.sampler == "pk" and params.stage4.init == "stage3"
    assert params_from_dict({"stage3": {}}).stage3.train_text is True


@pytest.mark.parametrize(("source", "ranks"), [("inshop", (1, 10, 20, 30, 40, 50)),
                                               ("market1501", (1, 5, 10, 20)),
                                               ("hands11k", (1, 5, 10, 20)),
                                               ("synthetic", (1, 5, 10, 20))])
def test_auto_ranks_are_what_each_sources_papers_print(source, ranks):
    assert Params().eval.reported_ranks(source) == ranks
    given = params_from_dict({"eval": {"ranks": [1, 3]}}).eval
    assert given.reported_ranks(source) == (1, 3)


@pytest.mark.parametrize("value", ["[]", "[5, 1]", "[1, 1]", "[0, 3]", "most"])
def test_bad_ranks_are_one_line_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, f"eval:\n  max_rank: 50\n  ranks: {value}\n"))
    message = str(err.value)
    assert "\n" not in message and "params.yaml:3" in message and "'eval.ranks" in message


@pytest.mark.parametrize("value", ["''", "'feature x'", "-main", "'a:b'"])
def test_a_production_branch_that_is_no_git_branch_is_one_line_naming_the_key(tmp_path, value):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, f"mlflow:\n  promote: auto\n  production_branch: {value}\n"))
    message = str(err.value)
    assert "\n" not in message and "params.yaml:3" in message
    assert "'mlflow.production_branch'" in message and "git branch" in message
