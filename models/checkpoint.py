"""Checkpoints: a folder with ``config.json`` and ``model.safetensors``, plus ``tokenizer.json`` and
``tokenizer_config.json`` when the model has a real vocabulary (models/hf_tokenizer.py). Never unpickles."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_folder
from ..errors import BadInputError, IncompatibleArtifactError, InfiniError, NumericalFaultError
from ..limits import check_fits
from ..paths import describe_absent, read_json
from .config import InfiniConfig
from .model import InfiniTransformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LOG_FILE = "train_log.json"
# the models that ship inside the package (package_data in setup.cfg): the trained passkey toy (`infini demo`,
# docs/model_card.md) and the SmolLM2 Infini adapter (`infini demo --model smollm2`, docs/model_card_smollm2.md)
BUNDLED = Path(__file__).resolve().parent / "bundled"
PASSKEY_MODEL = BUNDLED / "passkey"
SMOLLM2_ADAPTER = BUNDLED / "smollm2-infini"
EMBEDDING = "embed_tokens.weight"   # (vocab_size, d_model): its rows are the vocabulary
# Every file a checkpoint folder of ours may hold: `--force` replaces a checkpoint only when it holds nothing else.
CHECKPOINT_FILES = frozenset({CONFIG_FILE, WEIGHTS_FILE, LOG_FILE, "tokenizer.json", "tokenizer_config.json",
                              "special_tokens_map.json", "chat_template.jinja", "generation_config.json",
                              # `infini train lm`: what it changed, and the state --resume continues from
                              "adapter.safetensors", "optimizer.safetensors", "train_state.json"})


def owned_checkpoint(folder: Path) -> set[str] | None:
    """The files of ours in a checkpoint folder (for atomic.atomic_folder), None when it is not one of ours:
    its config.json must be an infini-deploy config (a Hugging Face folder's is not)."""
    try:
        load_config(folder)
    except InfiniError:
        return None
    return set(CHECKPOINT_FILES)


def save_checkpoint(model: InfiniTransformer, out_dir: str | os.PathLike, force: bool = False,
                    tokenizer=None, metadata: dict | None = None) -> Path:
    """Write the checkpoint folder atomically: a sibling temp folder, renamed into place (atomic.py).

    ``tokenizer``: a models.tokenizer tokenizer whose files go with the weights (none for bytes).
    ``metadata``: str -> str, stored in the safetensors header (e.g. where a conversion came from).
    """
    with atomic_folder(out_dir, force, owned_checkpoint, "checkpoint") as tmp:
        write_checkpoint(model, tmp, tokenizer, metadata)
    return Path(out_dir)


def write_checkpoint(model: InfiniTransformer, folder: Path, tokenizer=None, metadata: dict | None = None) -> list[str]:
    """The checkpoint's files into an existing (temp) folder; returns their names. Refuses NaN/Inf weights."""
    if tokenizer is not None:
        tokenizer.check_vocabulary(model.config.vocab_size, str(folder))
    metadata = metadata if metadata is not None else getattr(model, "metadata", None) or None
    # tied weights are stored once (safetensors refuses shared storage)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_embeddings and k == "lm_head.weight")}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise NumericalFaultError(f"refusing to write a checkpoint with NaN/Inf weights (tensor {bad}); "
                                  "nothing was written")
    save_file(state, str(folder / WEIGHTS_FILE), metadata=metadata)
    (folder / WEIGHTS_FILE).chmod(0o644)   # safetensors makes it private; the folder is meant to be shared
    (folder / CONFIG_FILE).write_text(model.config.to_json() + "\n")
    return [CONFIG_FILE, WEIGHTS_FILE, *(tokenizer.save(folder) if tokenizer is not None else [])]


def load_config(path: str | os.PathLike) -> InfiniConfig:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise BadInputError(f"{path} is not a checkpoint: {CONFIG_FILE} {describe_absent(file)} (expected "
                            f"{CONFIG_FILE} and {WEIGHTS_FILE} in it)")
    data = read_json(file, "config")
    try:
        return InfiniConfig.from_dict(data)
    except TypeError as e:
        raise IncompatibleArtifactError(f"{file}: bad config ({e})") from None


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> InfiniTransformer:
    """Load and check a checkpoint: every tensor the config implies, with the right shape, no others."""
    config = load_config(path)
    check_fits(4 * config.parameter_count(), f"the model of {Path(path) / CONFIG_FILE}")
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise BadInputError(f"{path} is not a checkpoint: {WEIGHTS_FILE} {describe_absent(weights)}")
    try:
        tensors = load_file(str(weights), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise IncompatibleArtifactError(f"{weights} is corrupt or truncated: {e}") from None
    model = InfiniTransformer(config)
    expected = {k: v for k, v in model.state_dict().items()
                if not (config.tie_embeddings and k == "lm_head.weight")}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise IncompatibleArtifactError(
            f"{weights} does not match its config: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    check_vocab_rows(config, tuple(tensors[EMBEDDING].shape), weights)
    for name, ref in expected.items():
        if tuple(tensors[name].shape) != tuple(ref.shape):
            raise IncompatibleArtifactError(
                f"{weights}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                f"config.json implies {tuple(ref.shape)}")
        if not tensors[name].is_floating_point():
            raise IncompatibleArtifactError(f"{weights}: tensor {name} has dtype {tensors[name].dtype}, expected float")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    model.metadata = read_metadata(weights)   # e.g. where a conversion came from; saved again with the weights
    return model.to(device).eval()


def check_vocab_rows(config: InfiniConfig, shape: tuple | None, weights) -> None:
    """IncompatibleArtifactError when the config's vocab_size is not the embedding's row count: the config is
    wrong (checked before the tokenizer, which would otherwise be blamed for ids past the config's vocabulary)."""
    if shape is not None and len(shape) == 2 and shape[0] != config.vocab_size:
        raise IncompatibleArtifactError(f"{Path(weights).parent / CONFIG_FILE}: vocab_size is {config.vocab_size}, but "
                                        f"the embedding {EMBEDDING} of {Path(weights).name} has {shape[0]} rows; the "
                                        "config does not match the weights")


def _embedding_shape(weights: Path) -> tuple | None:
    """The embedding's shape from the safetensors header (no tensor read); None when it cannot be told."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return tuple(f.get_slice(EMBEDDING).get_shape())
    except Exception:   # noqa: BLE001 (a missing or damaged file is load_checkpoint's to report)
        return None


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over named tensors (name, dtype, shape and bytes, in name order)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{str(t.dtype)}:{tuple(t.shape)};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def weights_digest(model: InfiniTransformer) -> str:
    """sha256 of a model's weights as float32 bytes, by name: the same for a model and its export's checkpoint,
    so a snapshot names the weights it was saved from whatever backend ran them (runtime/snapshot.py)."""
    with torch.no_grad():
        return tensors_digest({k: v.float() for k, v in model.state_dict().items()})


def read_metadata(weights: Path) -> dict:
    """The safetensors header's str -> str metadata (conversion: converted_from, gate_init, context)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return dict(f.metadata() or {})


def init_model(config: InfiniConfig, seed: int = 0) -> InfiniTransformer:
    """A randomly initialised model, deterministic for a seed."""
    check_fits(4 * config.parameter_count(), "this model config")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return InfiniTransformer(config).eval()
    finally:
        torch.random.set_rng_state(gen_state)


def checkpoint_tokenizer(path: str | os.PathLike, config: InfiniConfig | None = None):
    """The tokenizer of a checkpoint folder (its tokenizer.json, else bytes), checked against its vocabulary."""
    from .tokenizer import load_tokenizer

    config = config or load_config(path)
    check_vocab_rows(config, _embedding_shape(Path(path) / WEIGHTS_FILE), Path(path) / WEIGHTS_FILE)
    return load_tokenizer(path, config.vocab_size)


def resolve_tokenizer(name_or_path: str):
    """The tokenizer of a checkpoint folder or a preset (bytes)."""
    from .tokenizer import ByteTokenizer

    return checkpoint_tokenizer(name_or_path) if Path(name_or_path).is_dir() else ByteTokenizer()


def resolve_model(name_or_path: str, seed: int = 0, update: str | None = None) -> InfiniTransformer:
    """A checkpoint folder, or a preset name (freshly initialised with ``seed``)."""
    from .config import PRESETS, preset

    path = Path(name_or_path)
    if path.is_dir():
        if update is not None:
            raise BadInputError("--update applies to presets only; a checkpoint's rule is in its config.json")
        return load_checkpoint(path)
    if name_or_path in PRESETS:
        return init_model(preset(name_or_path, **({"update": update} if update else {})), seed)
    raise BadInputError(f"model {name_or_path!r} is neither a checkpoint folder nor a preset "
                        f"({', '.join(PRESETS)})")
