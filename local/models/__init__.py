"""One module per architecture, keyed by the checkpoint's `model_type`.

Each module exposes `Config` (a frozen dataclass with HF field names), `remap(names, cfg)`
(checkpoint tensor names -> module names) and `build(cfg, names)` (the nn.Module).
"""

from __future__ import annotations

import importlib
from types import ModuleType

ARCHITECTURES = {
    "deepseek_v2": "deepseek_v2",
    "deepseek_v3": "deepseek_v3",
    "qwen3_moe": "qwen3_moe",
}


class UnknownArchitecture(ValueError):
    pass


def get_architecture(model_type: str | None) -> ModuleType:
    """The model module for a `model_type`, or an error that lists the supported ones."""
    if model_type not in ARCHITECTURES:
        raise UnknownArchitecture(
            f"model_type '{model_type}' is not supported; Tandem runs: {', '.join(ARCHITECTURES)}"
        )
    return importlib.import_module(f".{ARCHITECTURES[model_type]}", __name__)
