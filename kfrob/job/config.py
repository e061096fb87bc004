"""The training job's configuration: a YAML file, validated whole before anything runs.

A config has seven sections; every key has a default, so an empty file (or none at all) is
the embedded default: the MLP on the Fashion-MNIST subset shipped inside kfrob, compared
across kfrob, SGD and AdamW::

    workload: mlp                 # mlp | autoencoder | cnn (images) | transformer (text)
    data:
      source: embedded            # images: embedded | full | auto (full if found, else
                                  # embedded); text: stdlib | files. Default: embedded for
                                  # images, stdlib for the transformer
      dir: null                   # full/auto: a directory holding the four IDX .gz files
                                  # (else $KFROB_DATA); named, it must hold them: no fallback.
                                  # files: the folder of text files (every file below it)
      download: false             # full/auto: download if not found (into dir, else the
                                  # user cache)
      train_size: null            # images: use only the first N training / test images
      test_size: null
      train_bytes: 4000000        # text: cap on the training text, in bytes
      val_bytes: 500000           # text: cap on the validation text, in bytes
      val_windows: 128            # text: validation windows, spread evenly over its text
    model:                        # the transformer's size (the image models are fixed)
      d_model: 64
      n_layers: 4
      n_heads: 4
      context: 64                 # bytes per window (and learned positions)
      tied: false                 # head shares the token embedding's weight
    training:
      batch_size: 128
      epochs: 5
      max_steps: null             # stop after this many steps (before the epochs run out)
      max_seconds: null           # stop after the step that takes the training time past it
      warmup_steps: 20            # untimed steps on a throwaway model before the clock starts
      eval_every: 20              # steps between evaluations (null: each epoch)
      seed: 0                     # model initialisation, data order, kfrob's MC sampler
      device: cpu                 # cpu | cuda | cuda:1 | mps ...
      target: {metric: test_accuracy, value: 0.85}   # for steps/seconds to target; metric:
                                  # train_loss, test_loss, test_accuracy (images), val_loss
                                  # (text)
    logging:
      log_every: 10               # steps between TensorBoard scalars and kfrob diagnostics
      histograms: true            # factor eigenvalue histograms at each inverse refresh
      checkpoint_every: null      # steps between checkpoints (always: each epoch and at exit)
    regularization:               # a penalty added to the loss (kfrob.penalties)
      kind: none                  # none | nuclear | schatten | nuclear_frobenius | frobenius
                                  # | metric_frobenius | geometric_complexity | hessian_trace
      weight: 0.0                 # the penalty's factor (>= 0)
      layers: null                # matrix penalties: only these layers (default: all)
      p: 1.0                      # Schatten's exponent
      every: 1                    # apply on every N-th step (for the expensive kinds)
      n_samples: 1                # random probes of geometric_complexity / hessian_trace
    optimizers:                   # label -> keyword arguments of its constructor
                                  # (label = kfrob | sgd | adam | adamw, or any label
                                  #  with `type: <one of those>` among the arguments)
      kfrob: {lr: 0.003}
      sgd: {lr: 0.05, momentum: 0.9}
      adamw: {lr: 0.001}

Unknown keys are errors that name the key (and the closest known one), values are checked
against their types and ranges, and optimizer arguments against the optimizer's signature;
keys that only the other kind of data uses (``train_bytes`` for an image workload, a
``model`` size for one, ``train_size`` for the transformer, …) must keep their defaults, and
the data source and target metric must be the workload's: :func:`load_config` raises one
``ValueError`` listing every problem.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from torch import nn

from kfrob.job.optimizers import check_arguments, optimizer_type
from kfrob.job.workloads import WORKLOADS

__all__ = ["Config", "apply_overrides", "dump_config", "load_config", "parse_yaml"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# the data sources of each kind of workload (the first is its default) and the data keys
# that only that kind uses
SOURCES = {"images": ("embedded", "full", "auto"), "text": ("stdlib", "files")}
DATA_KEYS = {
    "images": ("download", "train_size", "test_size"),
    "text": ("train_bytes", "val_bytes", "val_windows"),
}


class DataConfig(Section):
    source: Literal["embedded", "full", "auto", "stdlib", "files"] = "embedded"
    dir: str | None = None
    download: bool = False
    train_size: int | None = Field(default=None, ge=1)
    test_size: int | None = Field(default=None, ge=1)
    train_bytes: int = Field(default=4_000_000, ge=1)
    val_bytes: int = Field(default=500_000, ge=1)
    val_windows: int = Field(default=128, ge=1)

    @model_validator(mode="after")
    def _dir_fits_the_source(self) -> DataConfig:
        if self.source == "embedded" and (self.dir is not None or self.download):
            given = "data.dir" if self.dir is not None else "data.download"
            raise ValueError(
                f"{given} is set but data.source is 'embedded' (the subset shipped with "
                "kfrob, which needs no directory); set data.source to 'full' or 'auto'"
            )
        if self.source == "stdlib" and self.dir is not None:
            raise ValueError(
                "data.dir is set but data.source is 'stdlib' (the interpreter's standard "
                "library); set data.source to 'files' to read the files under data.dir"
            )
        if self.source == "files" and self.dir is None:
            raise ValueError("data.source 'files' reads the files under data.dir; set data.dir")
        return self


class ModelConfig(Section):
    """The transformer's size (:func:`kfrob.job.transformer.transformer`)."""

    d_model: int = Field(default=64, ge=1)
    n_layers: int = Field(default=4, ge=1)
    n_heads: int = Field(default=4, ge=1)
    context: int = Field(default=64, ge=1)
    tied: bool = False

    @model_validator(mode="after")
    def _heads_divide_the_width(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be a multiple of model.n_heads "
                f"({self.n_heads})"
            )
        return self


class TargetConfig(Section):
    metric: Literal["test_accuracy", "test_loss", "train_loss", "val_loss"]
    value: float

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "test_accuracy"

    def reached(self, value: float) -> bool:
        return value >= self.value if self.higher_is_better else value <= self.value


class TrainingConfig(Section):
    batch_size: int = Field(default=128, ge=1)
    epochs: int = Field(default=5, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)
    warmup_steps: int = Field(default=20, ge=0)
    eval_every: int | None = Field(default=20, ge=1)
    seed: int = Field(default=0, ge=0)
    device: str = "cpu"
    target: TargetConfig | None = TargetConfig(metric="test_accuracy", value=0.85)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        try:
            torch.device(value)
        except RuntimeError as err:
            raise ValueError(f"not a torch device: {err}") from None
        return value


class LoggingConfig(Section):
    log_every: int = Field(default=10, ge=1)
    histograms: bool = True
    checkpoint_every: int | None = Field(default=None, ge=1)


REGULARIZERS = (
    "none", "nuclear", "schatten", "nuclear_frobenius", "frobenius", "metric_frobenius",
    "geometric_complexity", "hessian_trace",
)  # fmt: skip


class RegularizationConfig(Section):
    """A penalty added to the loss (see :mod:`kfrob.job.regularization`)."""

    kind: Literal[REGULARIZERS] = "none"  # type: ignore[valid-type]
    weight: float = Field(default=0.0, ge=0.0)
    layers: list[str] | None = None
    p: float = Field(default=1.0, ge=1.0)
    every: int = Field(default=1, ge=1)
    n_samples: int = Field(default=1, ge=1)


_NOT_FOR_TEXT = {
    "geometric_complexity": "it differentiates the output with respect to the input, which is "
    "bytes (integers)",
    "hessian_trace": "it needs a double backward, which scaled_dot_product_attention has not",
}


def _default_optimizers() -> dict[str, dict[str, Any]]:
    return {
        "kfrob": {"lr": 0.003},
        "sgd": {"lr": 0.05, "momentum": 0.9},
        "adamw": {"lr": 0.001},
    }


class Config(Section):
    """The whole job; see the module docstring for every key and its default."""

    workload: str = "mlp"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    logging: LoggingConfig = LoggingConfig()
    regularization: RegularizationConfig = RegularizationConfig()
    optimizers: dict[str, dict[str, Any]] = Field(default_factory=_default_optimizers)

    @field_validator("workload")
    @classmethod
    def _known_workload(cls, name: str) -> str:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
        return name

    @model_validator(mode="before")
    @classmethod
    def _source_follows_the_workload(cls, raw: Any) -> Any:
        """An unset ``data.source`` is the workload's default (``stdlib`` for text)."""
        if not isinstance(raw, dict) or raw.get("workload") not in WORKLOADS:
            return raw
        default = SOURCES[WORKLOADS[raw["workload"]].data][0]
        data = raw.get("data")
        if data is None:
            return {**raw, "data": {"source": default}}
        if isinstance(data, dict) and "source" not in data:
            return {**raw, "data": {**data, "source": default}}
        return raw

    def build_model(self) -> nn.Module:
        """A freshly initialised model of the workload (the transformer at ``model``'s
        size)."""
        workload = WORKLOADS[self.workload]
        return workload.build(**self.model.model_dump()) if workload.sized else workload.build()

    @field_validator("optimizers")
    @classmethod
    def _known_optimizers(cls, optimizers: dict[str, dict[str, Any]]) -> dict[str, dict]:
        if not optimizers:
            raise ValueError("at least one optimizer is needed")
        problems = [p for name, args in optimizers.items() for p in check_arguments(name, args)]
        if problems:
            raise ValueError("\n  ".join(problems))
        return optimizers

    @model_validator(mode="after")
    def _regularization_fits(self) -> Config:
        reg = self.regularization
        if reg.layers is not None:
            from kfrob.penalties import penalized_layers

            known = sorted(penalized_layers(self.build_model()))
            unknown = [name for name in reg.layers if name not in known]
            if unknown:
                raise ValueError(
                    f"regularization.layers: {unknown} are not layers of workload "
                    f"{self.workload!r}; choose from {known}"
                )
        if WORKLOADS[self.workload].data == "text" and reg.kind in _NOT_FOR_TEXT:
            raise ValueError(
                f"regularization.kind: {reg.kind!r} is not available for workload "
                f"{self.workload!r}: {_NOT_FOR_TEXT[reg.kind]}"
            )
        if reg.kind == "metric_frobenius":
            others = [n for n, a in self.optimizers.items() if optimizer_type(n, a) != "kfrob"]
            if others:
                raise ValueError(
                    "regularization.kind: 'metric_frobenius' measures the weights in kfrob's "
                    f"running factors, which optimizers {others} do not have"
                )
        return self

    @model_validator(mode="after")
    def _data_fits_workload(self) -> Config:
        kind = WORKLOADS[self.workload].data
        if self.data.source not in SOURCES[kind]:
            raise ValueError(
                f"data.source: {self.data.source!r} is not a source of {kind}; workload "
                f"{self.workload!r} reads {' or '.join(map(repr, SOURCES[kind]))}"
            )
        (other,) = set(SOURCES) - {kind}
        defaults = DataConfig.model_fields
        changed = [f"data.{key}" for key in DATA_KEYS[other]
                   if getattr(self.data, key) != defaults[key].default]  # fmt: skip
        if not WORKLOADS[self.workload].sized and self.model != ModelConfig():
            changed.append("model")
        if changed:
            raise ValueError(
                f"{', '.join(changed)}: not used by workload {self.workload!r} ({kind}); "
                "leave them out"
            )
        return self

    @model_validator(mode="after")
    def _target_fits_workload(self) -> Config:
        target = self.training.target
        workload = WORKLOADS[self.workload]
        if target is None or target.metric in workload.metrics:
            return self
        choices = " or ".join(map(repr, workload.metrics))
        if target.metric == "test_accuracy" and workload.data == "images":
            reason = "'test_accuracy' needs a classifier"
        else:
            reason = f"{target.metric!r} is not measured on {workload.data}"
        raise ValueError(
            f"training.target.metric: {reason}; workload {self.workload!r} reports {choices}"
        )


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` as a string; read every decimal number as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?$|^[-+]?\d+[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """YAML with numbers such as ``1e-3`` read as floats."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            raise ValueError(f"override {override!r}: expected dotted.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for i, part in enumerate(parents):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {override!r}: {'.'.join(parents[: i + 1])} is a value")
            node = child
        node[leaf] = parse_yaml(text)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config (``path=None``: the defaults)."""
    raw: Any = {}
    if path is not None:
        try:
            raw = parse_yaml(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"config {path}: {err}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config {path}: expected a mapping at the top level")
    try:
        config = Config.model_validate(raw)
        if overrides:  # on top of the file's values and the defaults it left alone
            raw = apply_overrides(config.model_dump(), overrides)
            config = Config.model_validate(raw)
    except ValidationError as err:
        raise ValueError(_explain(err, path)) from None
    return config


def dump_config(config: Config) -> str:
    """``config`` as YAML that :func:`load_config` reads back to an equal config: every key,
    defaults and overrides included (what a run directory keeps as ``config.yaml``)."""
    header = "# The effective config of this run (file, defaults and overrides); kfrob --resume\n"
    header += "# reads it. A valid --config file too.\n"
    return header + yaml.safe_dump(config.model_dump(), sort_keys=False)


def _keys_at(location: list[str]) -> list[str]:
    """The known keys of the section at ``location`` (``[]`` for a free-form mapping)."""
    section: Any = Config
    for part in location:
        field = section.model_fields.get(part) if isinstance(section, type) else None
        if field is None:
            return []
        candidates = (field.annotation, *get_args(field.annotation))
        section = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    return list(section.model_fields) if section is not None else []


def _explain(err: ValidationError, path: str | Path | None) -> str:
    """One line per problem, naming the dotted key; unknown keys get a suggestion."""
    lines = []
    for problem in err.errors():
        location = [str(part) for part in problem["loc"]]
        key = ".".join(location)
        if problem["type"] == "extra_forbidden":
            close = difflib.get_close_matches(location[-1], _keys_at(location[:-1]), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"unknown key {key!r}{hint}")
        else:
            message = problem["msg"].removeprefix("Value error, ")
            if problem["type"] == "value_error":  # our own messages name their keys
                lines.append(message if message.startswith(key) or not key else f"{key}: {message}")
            else:
                lines.append(f"{key}: {message} (got {problem['input']!r})")
    where = f"config {path}" if path is not None else "config"
    return f"invalid {where}:\n  " + "\n  ".join(lines)
