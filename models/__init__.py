"""What is computed: the Infini-Transformer, its config, tokenizer, checkpoints and step I/O spec."""

from .checkpoint import init_model, load_checkpoint, save_checkpoint
from .config import PRESETS, InfiniConfig, preset
from .memory import memory_reference
from .model import InfiniTransformer

__all__ = ["InfiniConfig", "InfiniTransformer", "PRESETS", "preset", "init_model",
           "load_checkpoint", "save_checkpoint", "memory_reference"]
