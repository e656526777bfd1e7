"""The top-level ``skip_layer`` block: learned per-token layer skipping (our own block; DeepSpeed ignores it)."""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal

from pydantic import Field, StrictBool, model_validator

from random_ltd.config.common import (
    MAX_LAYERS,
    ConfigError,
    ConfigIssue,
    Int,
    Real,
    _Block,
    _brief,
    _duplicates,
    _FieldIssues,
    load_deepspeed_config,
)

__all__ = ["SKIP_LAYER_PATH", "SkipLayerConfig"]

SKIP_LAYER_PATH = "skip_layer"
"""Dotted key path of the SkipLayer block inside a DeepSpeed config (our own block; DeepSpeed ignores it)."""


class SkipLayerConfig(_Block):
    """The ``skip_layer`` block: learned per-token layer skipping ("Learning to Skip for Language Modeling").

    Example::

        "skip_layer": {"enabled": true, "capacity": 0.5, "aux_loss_weight": 0.1,
                       "router": "straight_through_gumbel", "temperature": 1.0, "gumbel_noise": 1.0,
                       "group_size": null, "layers": null}

    Build it from a whole DeepSpeed config with :meth:`from_deepspeed`; ``options(layer_id)`` gives the
    ``random_ltd.layers.skip_layer.SkipLayerOptions`` of one layer.
    """

    _path: ClassVar[str] = SKIP_LAYER_PATH

    enabled: StrictBool = Field(False, description="Wrap the model's transformer layers in SkipLayers.")
    capacity: Real = Field(
        0.5, gt=0.0, le=1.0, description="P in (0, 1]: target fraction of tokens that run each layer (paper: 0.5 "
        "for 2L layers at the cost of L)."
    )
    aux_loss_weight: Real = Field(
        0.1, ge=0.0, description="λ >= 0 of the auxiliary loss λ·Σ_i (r_i − P)² (paper: 0.1)."
    )
    router: Literal["straight_through_gumbel", "sigmoid", "top1_softmax", "random", "highway"] = Field(
        "straight_through_gumbel",
        description="Router G(X|W_G): straight_through_gumbel (paper's choice), sigmoid (threshold), top1_softmax "
        "(gate probability multiplied in), random (Bernoulli(P) baseline), highway (HighwayNet baseline, dense).",
    )
    temperature: Real = Field(1.0, gt=0.0, description="Router softmax/sigmoid temperature (> 0).")
    gumbel_noise: Real = Field(
        1.0, ge=0.0, description="Scale of the Gumbel (logistic for sigmoid) noise added in training (0 = none)."
    )
    threshold: Real = Field(0.5, gt=0.0, lt=1.0, description="sigmoid router: decision threshold in (0, 1).")
    group_size: Int | None = Field(
        None, ge=1, description="Gsize >= 1: the FFN runs on the routed tokens in groups of this size; default "
        "ceil(P * batch * seq_len)."
    )
    implementation: Literal["efficient", "dense"] = Field(
        "efficient", description="'efficient' (gather/scatter of routed tokens) or 'dense' (masked reference)."
    )
    layers: list[Int] | None = Field(
        None, description="Indices (0-based) of the layers to wrap, unique; default all layers."
    )

    @model_validator(mode="after")
    def _check_layers(self) -> SkipLayerConfig:
        """Layer indices must be unique and in [0, MAX_LAYERS) (the model's own bound is checked when converting)."""
        ids = self.layers
        if ids is None:
            return self
        problems = []
        duplicates = _duplicates(ids)
        if duplicates:
            problems.append(("layers", f"duplicate layer ids {_brief(duplicates)} in {_brief(ids)} (must be unique)"))
        negative = [i for i in ids if i < 0]
        if negative:
            problems.append(("layers", f"layer ids {_brief(negative)} are negative (must be >= 0)"))
        too_high = [i for i in ids if i >= MAX_LAYERS]
        if too_high:
            problems.append(("layers", f"layer ids {_brief(too_high)} >= MAX_LAYERS {MAX_LAYERS}"))
        if problems:
            raise _FieldIssues(*problems)
        return self

    def layer_ids(self, num_layers: int) -> tuple[int, ...]:
        """The wrapped layer indices for a model of ``num_layers`` layers; out-of-range ids are a ConfigError."""
        ids = tuple(range(num_layers)) if self.layers is None else tuple(sorted(self.layers))
        outside = [i for i in ids if i >= num_layers]
        if outside:
            raise ConfigError([ConfigIssue(f"{SKIP_LAYER_PATH}.layers",
                                           f"layer ids {outside} outside [0, {num_layers}) (the model has "
                                           f"{num_layers} layers)")])
        return ids

    def options(self, layer_id: int) -> Any:
        """``SkipLayerOptions`` for one layer (imported here: the layers package depends on config, not back)."""
        from random_ltd.layers.skip_layer import SkipLayerOptions

        return SkipLayerOptions(capacity=self.capacity, aux_loss_weight=self.aux_loss_weight, router=self.router,
                                temperature=self.temperature, gumbel_noise=self.gumbel_noise,
                                threshold=self.threshold, group_size=self.group_size,
                                implementation=self.implementation, layer_id=layer_id)

    @classmethod
    def from_deepspeed(cls, ds_config: dict[str, Any] | str | os.PathLike[str]) -> SkipLayerConfig:
        """Read the ``skip_layer`` block of a whole DeepSpeed config (dict or JSON path); missing = disabled."""
        ds = load_deepspeed_config(ds_config)
        block = ds.get(SKIP_LAYER_PATH)
        if block is None:
            return cls()
        if not isinstance(block, dict):
            raise ConfigError([ConfigIssue(SKIP_LAYER_PATH, f"expected an object, got {block!r}")])
        return cls.model_validate(block)
