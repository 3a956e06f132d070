"""JSON side files of a model directory (tokenizer_config.json, special_tokens_map.json, ...)."""

from __future__ import annotations

import json
from pathlib import Path


def read_optional_json(path: Path):
    """The parsed file, None when it does not exist; a ValueError naming the file when it is not JSON."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
