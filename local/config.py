"""Model configs: frozen dataclasses whose field names are the HF `config.json` keys."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config.json (or GGUF key-value set) that cannot describe a runnable model."""


def _type_ok(value, annotation) -> bool:
    """Loose check of a JSON value against a field annotation such as `int | None`."""
    if isinstance(annotation, str):  # `from __future__ import annotations`
        annotation = eval(annotation, {"typing": typing}, {})  # noqa: S307 - our own annotations only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


@dataclass(frozen=True)
class BaseConfig:
    """Shared loading: `from_dict` keeps the known keys, ignores the rest, and checks types."""

    # other names the same field is saved under (transformers' attribute_map), alias -> field
    ALIASES: typing.ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json"):
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        for alias, name in cls.ALIASES.items():
            if alias in d and name not in d:
                d[name] = d[alias]
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(
                        f"{source} has no '{f.name}', which a {cls.__name__} needs; "
                        "is this the config.json the checkpoint came with?"
                    )
                continue
            value = d[f.name]
            if not _type_ok(value, f.type):
                raise ConfigError(f"{source}: '{f.name}' is {value!r}, expected {f.type}")
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ConfigError when the values disagree with each other."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and not isinstance(v, bool) and v < 0:
                raise ConfigError(f"config '{f.name}' is {v}; it must not be negative")

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def read_json(path: Path) -> dict:
    """Read a JSON file, turning a parse error into one that names the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); the file is damaged or truncated") from e


# ---- RoPE parameters ---------------------------------------------------------------------


@dataclass(frozen=True)
class RopeSpec:
    """Normalized RoPE settings, from HF's `rope_scaling` (4.x) or `rope_parameters` (5.x)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


def rope_spec(rope_theta: float | None, rope_scaling: dict | None, rope_parameters: dict | None,
              max_position_embeddings: int) -> RopeSpec:
    """Merge the legacy and the new way HF stores RoPE settings into one RopeSpec."""
    params = dict(rope_scaling or {})
    params.update(rope_parameters or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope type '{rope_type}' is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    theta = params.get("rope_theta", rope_theta)
    theta = 10000.0 if theta is None else float(theta)
    factor = params.get("factor")
    orig = params.get("original_max_position_embeddings")
    if rope_type == "yarn":
        orig = orig or max_position_embeddings
        if factor is None:
            factor = max_position_embeddings / orig
    if rope_type in ("linear", "yarn") and (factor is None or factor <= 0):
        raise ConfigError(f"rope type '{rope_type}' needs a positive 'factor', got {factor!r}")
    return RopeSpec(
        rope_type=rope_type,
        theta=theta,
        factor=float(factor) if factor is not None else 1.0,
        original_max_position_embeddings=orig,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(spec: RopeSpec, qk_head_dim: int) -> float:
    """DeepSeek's attention scale: 1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = qk_head_dim ** -0.5
    if spec.rope_type != "default" and spec.mscale_all_dim:
        m = yarn_get_mscale(spec.factor, spec.mscale_all_dim)
        scale = scale * m * m
    return scale


def kv_cache_values_per_token(cfg) -> int:
    """Values one token of context adds to the KV cache, all layers: MLA keeps the latent and the rope
    key (kv_lora_rank + qk_rope_head_dim), GQA a key and a value per KV head."""
    if hasattr(cfg, "kv_lora_rank"):
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.num_key_value_heads * cfg.head_size
    return per_layer * cfg.num_hidden_layers
