"""Typed pipeline parameters loaded from ``params.yaml``.

Every knob of the pipeline is a field of a dataclass below; ``load_params`` turns the YAML file
into a :class:`Params` object and rejects unknown keys, wrong types and out-of-range values with a
message that names the file, the line and the dotted key. Nothing else in clipid reads raw dicts.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipid.errors import ClipidError
from clipid.stage_registry import PRETRAINED

__all__ = [
    "ConfigError",
    "DataParams",
    "CaptionParams",
    "ClipReidParams",
    "AugmentParams",
    "EvalParams",
    "FaissParams",
    "SearchModelParams",
    "SearchParams",
    "ServeParams",
    "StageParams",
    "RuntimeParams",
    "TrainParams",
    "Hands11kParams",
    "MlflowParams",
    "ModelParams",
    "Params",
    "SyntheticParams",
    "load_params",
    "param_lines",
    "params_from_dict",
    "flatten_params",
]


class ConfigError(ClipidError, ValueError):
    """A parameter file that does not describe a valid :class:`Params`."""


def _spec(default: Any, *, ge: float | None = None, le: float | None = None,
          gt: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with an allowed numeric range kept in its metadata."""
    bounds = {k: v for k, v in {"ge": ge, "le": le, "gt": gt, "lt": lt}.items() if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"bounds": bounds})
    return field(default=default, metadata={"bounds": bounds})


@dataclass(frozen=True)
class SyntheticParams:
    items: int = _spec(240, ge=4)                 # garment identities in total (train + test)
    test_fraction: float = _spec(0.5, gt=0, lt=1)  # share of identities held out for evaluation
    views: int = _spec(4, ge=2)                   # images per identity
    query_views: int = _spec(1, ge=1)             # views per test identity that become queries
    image_size: int = _spec(96, ge=32, le=1024)   # side of the drawn images in pixels
    empty_caption_rate: float = _spec(0.08, ge=0, le=1)  # share of raw captions left empty


@dataclass(frozen=True)
class Hands11kParams:
    aspect: Literal["dorsal_r", "dorsal_l", "palmar_r", "palmar_l"] = "dorsal_r"
    exclude_accessories: bool = True


@dataclass(frozen=True)
class DataParams:
    source: Literal["synthetic", "inshop", "hands11k", "manifest", "market1501", "msmt17",
                    "dukemtmc"] = "synthetic"
    root: str = ""
    seed: int = _spec(0, ge=0)
    cache_size: int = _spec(80, ge=16, le=2048)
    cache_format: Literal["png", "jpg"] = "png"
    splits: int = _spec(10, ge=1)
    max_rejected_fraction: float = _spec(0.05, ge=0, le=1)
    drop_empty_identities: bool = False
    workers: int = _spec(2, ge=0)
    synthetic: SyntheticParams = field(default_factory=SyntheticParams)
    hands11k: Hands11kParams = field(default_factory=Hands11kParams)


@dataclass(frozen=True)
class CaptionParams:
    casing: Literal["lower", "sentence", "keep"] = "lower"
    fallback: str = "a photo of a {noun}"
    noun: str = "garment"


@dataclass(frozen=True)
class ModelParams:
    name: str = "clipid-vit-tiny"
    pretrained: str = ""
    quick_gelu: bool | Literal["auto"] = "auto"   # auto: as open_clip marks the pretrained tag
    image_size: list[int] = _spec([], ge=16, le=4096)  # [height, width]; []: the architecture's
    patch_stride: int = _spec(0, ge=0, le=64)      # ViT patch stride; 0: the patch size
    last_stride: int = _spec(2, ge=1, le=2)        # modified ResNet: layer4's stride
    mean: list[float] = _spec([], ge=0, le=1)      # [r, g, b]; []: the architecture's
    std: list[float] = _spec([], gt=0, le=1)
    embedding: Literal["proj", "concat"] = "proj"  # the image feature every consumer embeds with
    sie: bool = False                              # learnt camera embedding (ViT)
    sie_coe: float = _spec(1.0, ge=0)              # its coefficient


# The R@K each source's papers print (eval.ranks: auto): DeepFashion In-shop's Recall@1..50,
# the re-id and hand-biometrics tables' Rank-1/5/10/20 (also synthetic's and a manifest's).
SOURCE_RANKS = {"inshop": (1, 10, 20, 30, 40, 50)}
DEFAULT_RANKS = (1, 5, 10, 20)


@dataclass(frozen=True)
class EvalParams:
    batch_size: int = _spec(128, ge=1)
    workers: int = _spec(0, ge=0)
    flip: bool = False
    max_rank: int = _spec(50, ge=1)
    ranks: list[int] | Literal["auto"] = _spec("auto", ge=1)
    verification: bool = True
    aqe: bool = False
    aqe_k: int = _spec(5, ge=1)
    aqe_alpha: float = _spec(3.0, ge=0)
    rerank: bool = False
    rerank_k1: int = _spec(20, ge=1)
    rerank_k2: int = _spec(6, ge=1)
    rerank_lambda: float = _spec(0.3, ge=0, le=1)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"

    def reported_ranks(self, source: str = "") -> tuple[int, ...]:
        """The K of the reported R@K: ``ranks``, or with ``auto`` what ``source``'s papers
        print."""
        if self.ranks == "auto":
            return SOURCE_RANKS.get(source, DEFAULT_RANKS)
        return tuple(self.ranks)

    def problems(self) -> list[tuple[str, str]]:
        """``(key, what is wrong)`` beyond each value's type and range."""
        if self.ranks != "auto" and (not self.ranks or sorted(set(self.ranks)) != self.ranks):
            return [("ranks", f"is {self.ranks!r}; give 'auto' or ranks in increasing order, "
                              "each once, e.g. [1, 5, 10, 20]")]
        return []


@dataclass(frozen=True)
class AugmentParams:
    flip: bool = True
    crop_scale: float = _spec(0.7, gt=0, le=1)
    random_erasing: float = _spec(0.25, ge=0, le=1)
    policy: Literal["resized_crop", "pad_crop"] = "resized_crop"
    padding: int = _spec(10, ge=0)


@dataclass(frozen=True)
class TrainParams:
    seed: int = _spec(0, ge=0)
    lr: float = _spec(1e-3, gt=0, le=1)
    epochs: int = _spec(8, ge=1)
    batch_size: int = _spec(64, ge=2)
    pk_k: int = _spec(4, ge=1)
    weight_decay: float = _spec(0.05, ge=0)
    warmup_epochs: float = _spec(1.0, ge=0)
    grad_clip: float = _spec(1.0, ge=0)
    head_lr_mult: float = _spec(10.0, gt=0)
    label_smoothing: float = _spec(0.1, ge=0, lt=1)
    triplet_margin: float = _spec(0.3, ge=0)
    center_lr: float = _spec(0.5, gt=0)
    workers: int | Literal["auto"] = _spec("auto", ge=0)  # auto: cores minus one
    log_every: int = _spec(5, ge=1)
    nproc: int = _spec(1, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    tf32: bool = False
    augment_device: Literal["loader", "batch"] = "loader"
    image_cache: bool = False
    augment: AugmentParams = field(default_factory=AugmentParams)
    pk_epoch: Literal["identities", "instances"] = "identities"
    optimizer: Literal["adamw", "adam"] = "adamw"
    bias_lr_factor: float = _spec(1.0, gt=0)
    weight_decay_bias: float = _spec(0.0, ge=0)
    schedule: Literal["cosine", "multistep"] = "cosine"
    milestones: list[int] = _spec([30, 50], ge=1)
    gamma: float = _spec(0.1, gt=0, le=1)
    warmup_factor: float = _spec(0.1, ge=0, le=1)


@dataclass(frozen=True)
class StageParams:
    """What one fine-tuning stage trains and how: the engine reads nothing else per stage."""

    init: str = PRETRAINED         # the stage whose model this one starts from
    train_image: bool = True
    train_text: bool = False
    loss: Literal["supcon", "infonce", "none"] = "supcon"
    contrastive_weight: float = _spec(1.0, ge=0)
    id_weight: float = _spec(0.0, ge=0)
    triplet_weight: float = _spec(0.0, ge=0)
    center_weight: float = _spec(0.0, ge=0)
    sampler: Literal["random", "pk"] = "random"
    epochs: int = _spec(0, ge=0)
    lr_mult: float = _spec(1.0, gt=0)
    text_lr_mult: float = _spec(1.0, gt=0)
    identity_losses: Literal["clipid", "paper"] = "clipid"

    @property
    def contrastive(self) -> bool:
        """The image-text contrastive term is on (it also decides whether captions are read)."""
        return self.loss != "none" and self.contrastive_weight > 0


@dataclass(frozen=True)
class ClipReidParams:
    """CLIP-ReID (Li et al., AAAI 2023): per-identity prompts learnt against the frozen towers
    (stage ``clipreid_prompts``), then the image tower aligned to them (``clipreid_image``)."""

    init: str = PRETRAINED  # stage1 (the pretrained model), stage2 or stage3
    noun: str = "garment"
    template: str = "a photo of a {ctx} {noun}."
    n_ctx: int = _spec(4, ge=1, le=32)
    prompts: Literal["learned", "fixed"] = "learned"
    fixed_source: Literal["template", "captions"] = "template"
    prompt_epochs: int = _spec(30, ge=1)
    prompt_batch_size: int = _spec(64, ge=2)
    prompt_lr: float = _spec(5e-3, gt=0, le=1)
    prompt_weight_decay: float = _spec(1e-4, ge=0)
    prompt_warmup_epochs: float = _spec(2.0, ge=0)
    prompt_warmup_lr: float = _spec(0.0, ge=0)
    prompt_lr_min: float = _spec(0.0, ge=0)
    prompt_schedule_unit: Literal["step", "epoch"] = "step"
    losses: Literal["clipid", "paper"] = "clipid"
    epochs: int = _spec(0, ge=0)
    lr_mult: float = _spec(1.0, gt=0)
    i2t_weight: float = _spec(1.0, ge=0)
    id_weight: float = _spec(1.0, ge=0)
    triplet_weight: float = _spec(1.0, ge=0)
    center_weight: float = _spec(0.0, ge=0)

    def image_stage(self) -> StageParams:
        """The engine's description of ``clipreid_image``: image tower only, no image-text
        contrastive term (the prompts' cross-entropy replaces it), identity losses, PK
        sampler. Built here, without torch: ``check-params`` reads its sampler."""
        return StageParams(init=self.init, train_image=True, train_text=False, loss="none",
                           contrastive_weight=0.0, id_weight=self.id_weight,
                           triplet_weight=self.triplet_weight, center_weight=self.center_weight,
                           sampler="pk", epochs=self.epochs, lr_mult=self.lr_mult,
                           identity_losses=self.losses)


# The models a gallery can be indexed with: a stage with a model (Stage 1 is the pretrained
# model, the rest checkpoints); clipid.checks holds it to clipid.stage_registry.model_stages().
SearchModel = str


@dataclass(frozen=True)
class FaissParams:
    # hnsw: recall@10 >= 0.95 at >= 10x exact search's speed (BENCHMARKS.md, bench/search)
    type: Literal["ivf", "hnsw", "ivfpq"] = "hnsw"
    nlist: int = _spec(1024, ge=1)              # ivf: k-means cells (at most N // 39 are used)
    nprobe: int = _spec(128, ge=1)              # ivf: cells visited per query
    train_size: int = _spec(100_000, ge=1)      # ivf: vectors k-means trains on
    hnsw_m: int = _spec(32, ge=2, le=256)       # hnsw: graph degree
    ef_construction: int = _spec(200, ge=1)     # hnsw: candidate list while building
    ef_search: int = _spec(128, ge=1)           # hnsw: candidate list while searching
    pq_m: int = _spec(16, ge=1)                 # ivfpq: sub-quantisers (divides the dim)
    pq_nbits: int = _spec(8, ge=1, le=16)       # ivfpq: bits per sub-quantiser code
    shard_rows: int = _spec(1_000_000, ge=1)    # ivfpq: embedding rows per shard on disk


@dataclass(frozen=True)
class SearchModelParams:
    image: SearchModel = "stage4"
    text: SearchModel = "stage3"


@dataclass(frozen=True)
class SearchParams:
    """The gallery index (stage ``index``) and ``clipid search``."""

    model: SearchModelParams = field(default_factory=SearchModelParams)
    backend: Literal["exact", "faiss"] = "exact"
    faiss: FaissParams = field(default_factory=FaissParams)
    top_k: int = _spec(10, ge=1)


@dataclass(frozen=True)
class ServeParams:
    """``clipid serve``: the search web app over the gallery indexes."""

    host: str = "127.0.0.1"                     # loopback only unless changed
    port: int = _spec(8000, ge=1, le=65535)
    max_upload_mb: float = _spec(10.0, gt=0)    # larger query images are refused (413)
    max_top_k: int = _spec(100, ge=1)           # most results one request may ask for
    # larger images (by their header) refused (413); Pillow itself opens none over twice its
    # default MAX_IMAGE_PIXELS
    max_pixels: int = _spec(50_000_000, ge=1, le=178_956_970)
    max_concurrent: int = _spec(2, ge=1)        # decodes/embeddings in flight at once
    max_queued: int = _spec(8, ge=0)            # waiting behind them; more: 503 + Retry-After
    large_pixels: int = _spec(16_000_000, ge=1)  # larger uploads: max_concurrent - 1 at once
    queue_timeout_s: float = _spec(10.0, gt=0)  # longest wait in that queue before a 503


@dataclass(frozen=True)
class RuntimeParams:
    device: str = "auto"
    threads: int = _spec(0, ge=0)


@dataclass(frozen=True)
class MlflowParams:
    """Tracking, and who moves the Model Registry's production alias (README: Team setup)."""

    log_checkpoints: bool = True
    # auto: champion moves from the production branch's pipeline on a shared store (from every
    # pipeline on the repository's own); always; never. Others set candidate-<exp or branch>.
    promote: Literal["auto", "always", "never"] = "auto"
    production_branch: str = "main"

    def problems(self) -> list[tuple[str, str]]:
        if not re.fullmatch(r"[^\s~^:?*\[\\]+", self.production_branch) or \
                self.production_branch.startswith("-"):
            return [("production_branch", f"is {self.production_branch!r}; give a git branch "
                                          "name, e.g. main")]
        return []


@dataclass(frozen=True)
class Params:
    data: DataParams = field(default_factory=DataParams)
    captions: CaptionParams = field(default_factory=CaptionParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    stage2: StageParams = field(default_factory=StageParams)
    stage3: StageParams = field(default_factory=lambda: StageParams(
        init="stage2", train_text=True, text_lr_mult=0.1))
    stage4: StageParams = field(default_factory=lambda: StageParams(
        init="stage3", loss="none", id_weight=1.0, triplet_weight=1.0, center_weight=5e-4,
        sampler="pk"))
    clipreid: ClipReidParams = field(default_factory=ClipReidParams)
    eval: EvalParams = field(default_factory=EvalParams)
    search: SearchParams = field(default_factory=SearchParams)
    serve: ServeParams = field(default_factory=ServeParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    mlflow: MlflowParams = field(default_factory=MlflowParams)


# --------------------------------------------------------------------------------------------
# YAML loading

_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class _ParamsLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-05`` (as written by ``dvc exp run -S``) as a float.

    PyYAML implements YAML 1.1, whose float pattern requires a dot, so ``1e-05`` would be a string.
    """


_ParamsLoader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Dotted key -> 1-based line number, for error messages."""
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a parameter file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameter file not found")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 - a SafeLoader subclass
        root = yaml.compose(text, Loader=_ParamsLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    lines = _key_lines(root) if root is not None else {}
    return params_from_dict(raw or {}, source=str(path), lines=lines)


def param_lines(path: str | Path) -> dict[str, int]:
    """Dotted key -> line in the parameter file: checks beyond the types (``clipid.checks``)
    name the line too."""
    root = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=_ParamsLoader)
    return _key_lines(root) if root is not None else {}


def params_from_dict(raw: dict[str, Any], *, source: str = "<params>",
                     lines: dict[str, int] | None = None) -> Params:
    """Build :class:`Params` from a nested dict, validating every key and value."""
    return _build(Params, raw, "", source, lines or {})


def _default(fld: dataclasses.Field) -> Any:
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return fld.default


def _where(source: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key) or lines.get(key.split("[")[0])   # a list item: its key's line
    return f"{source}:{line}" if line else source


def _build(cls: type, raw: Any, prefix: str, source: str, lines: dict[str, int],
           base: Any = None) -> Any:
    """``cls`` from ``raw``; keys ``raw`` leaves out keep the values of ``base`` (the field's own
    default, so a partial ``stage3:`` section keeps stage 3's defaults)."""
    where_self = _where(source, lines, prefix.rstrip("."))
    if not isinstance(raw, dict):
        raise ConfigError(f"{where_self}: '{prefix.rstrip('.')}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
            raise ConfigError(f"{_where(source, lines, dotted)}: unknown key '{dotted}'{hint}")
        kwargs[key] = _convert(hints[key], fields[key], value, dotted, source, lines)
    built = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    for key, problem in getattr(built, "problems", list)():  # checks across a section's keys
        raise ConfigError(f"{_where(source, lines, prefix + key)}: '{prefix}{key}' {problem}")
    return built


def _convert(tp: Any, fld: dataclasses.Field, value: Any, key: str, source: str,
             lines: dict[str, int]) -> Any:
    where = _where(source, lines, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source, lines, base=_default(fld))
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{where}: '{key}' is {value!r}; allowed values: {allowed}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) > 1:
            return _convert_union(arms, fld, value, key, source, lines)
        (tp,) = arms
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        return [_convert(item_tp, fld, v, f"{key}[{i}]", source, lines)
                for i, v in enumerate(value)]
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported parameter type {tp!r} for {key}")
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be {tp.__name__}, got {value!r}")
    bounds = fld.metadata.get("bounds", {})
    if bounds and not _in_bounds(value, bounds):
        raise ConfigError(f"{where}: '{key}' is {value!r}; allowed range: {_describe(bounds)}")
    return value


def _convert_union(arms: list[Any], fld: dataclasses.Field, value: Any, key: str, source: str,
                   lines: dict[str, int]) -> Any:
    """The first arm of ``int | Literal["auto"]`` (say) that takes ``value``."""
    errors = []
    for arm in arms:
        try:
            return _convert(arm, fld, value, key, source, lines)
        except ConfigError as exc:
            errors.append(str(exc).split(": ", 1)[-1])
    raise ConfigError(f"{_where(source, lines, key)}: {' or '.join(errors)}")


def _in_bounds(value: float, bounds: dict[str, float]) -> bool:
    return (value >= bounds.get("ge", float("-inf")) and value <= bounds.get("le", float("inf"))
            and value > bounds.get("gt", float("-inf")) and value < bounds.get("lt", float("inf")))


def _describe(bounds: dict[str, float]) -> str:
    symbols = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{symbols[k]} {v}" for k, v in bounds.items())


def flatten_params(params: Any, prefix: str = "") -> dict[str, Any]:
    """``{"data.source": "synthetic", ...}``: the form MLflow and reports use."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        if dataclasses.is_dataclass(value):
            flat.update(flatten_params(value, f"{prefix}{f.name}."))
        else:
            flat[f"{prefix}{f.name}"] = value
    return flat
