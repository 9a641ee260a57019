"""Infini adapters: only what `infini train lm` changed, applied to the base model it was trained from.

``adapter.safetensors`` holds, by trainable set: the gates (every layer's beta), the q/k/v weights, the
low-rank factors (lora_a, lora_b, and their scale in the header) of q/k/v with the gates, or every weight.
Its header names the base: the sha256 of the converted base model's weights (checkpoint.weights_digest,
which covers the gates it was converted with) and its config digest, and the adapter's own sha256 over every
other header field and its tensors (checked at load: flipped bytes are refused, not applied; adapters written
before it was recorded load without the check). Applying it to any other model is refused. Applying is the
function training uses to merge, so base + adapter equals the trained model bit for bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import BadInputError, IncompatibleArtifactError
from .checkpoint import tensors_digest, weights_digest
from .train.lm import QKV, LoRALinear, merge_lora
from .model import InfiniTransformer

ADAPTER_FILE = "adapter.safetensors"
FORMAT = "infini-deploy adapter 1"


def adapter_tensors(model: InfiniTransformer, trainable: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, extra header fields) of a trained model (before :func:`train.lm.merge_adapters`)."""
    tensors, extra = {}, {}
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        tensors[f"layers.{i}.self_attn.beta"] = attn.beta.detach()
        for name in QKV:
            proj = getattr(attn, name)
            if trainable == "lora":
                if not isinstance(proj, LoRALinear):
                    raise BadInputError(f"layer {i} {name} has no low-rank adapter; was the model trained with lora?")
                tensors[f"layers.{i}.self_attn.{name}.lora_a"] = proj.lora_a.detach()
                tensors[f"layers.{i}.self_attn.{name}.lora_b"] = proj.lora_b.detach()
                extra["lora_scale"] = repr(proj.scale)
            elif trainable == "qkv":
                tensors[f"layers.{i}.self_attn.{name}.weight"] = proj.weight.detach()
    if trainable == "all":
        tensors = {k: v.detach() for k, v in model.state_dict().items()
                   if not (model.config.tie_embeddings and k == "lm_head.weight")}
    return {k: v.float().contiguous() for k, v in tensors.items()}, extra


def save_adapter(model: InfiniTransformer, trainable: str, base: InfiniTransformer | dict, folder: Path,
                 info: dict | None = None) -> Path:
    """Write ``folder/adapter.safetensors`` (into a folder being written atomically by the caller).
    ``base``: the base model, or its {"weights_sha256", "config_digest"}."""
    tensors, extra = adapter_tensors(model, trainable)
    ident = base if isinstance(base, dict) else {"weights_sha256": weights_digest(base),
                                                  "config_digest": base.config.digest()}
    header = {"format": FORMAT, "trainable": trainable, "base_weights_sha256": ident["weights_sha256"],
              "base_config_digest": ident["config_digest"], **extra,
              **({"info": json.dumps(info, sort_keys=True)} if info else {})}
    header["sha256"] = _digest(header, tensors)
    path = Path(folder) / ADAPTER_FILE
    save_file(tensors, str(path), metadata=header)
    path.chmod(0o644)
    return path


def base_options(model: InfiniTransformer) -> dict:
    """The `infini convert` options that rebuild this (converted) base from its source: stored with an adapter,
    so `infini convert SRC OUT --adapter DIR` needs no more than SRC."""
    meta = getattr(model, "metadata", None) or {}
    options = {"segment_len": model.config.segment_len, "update": model.config.update}
    if model.config.attend_previous:
        options["attend_previous"] = True
    if "gate_init" in meta:
        options["gate_init"] = float(meta["gate_init"])
    if "converted_from" in meta:
        options["converted_from"] = meta["converted_from"]
    return options


def adapter_options(path: str | Path) -> dict:
    """The base's convert options an adapter was saved with ({} for adapters saved before they were)."""
    info = read_adapter(path)[1].get("info")
    try:
        return dict(json.loads(info).get("convert") or {}) if info else {}
    except (ValueError, AttributeError):
        raise IncompatibleArtifactError(f"--adapter {path}: its header's info is not JSON") from None


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every header field but the digest itself and over the tensors (name, dtype, shape, bytes)."""
    fields = json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(f"{fields};{tensors_digest(tensors)}".encode()).hexdigest()


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of an adapter file or of a folder holding one; refuses anything else."""
    path = Path(path)
    file = path / ADAPTER_FILE if path.is_dir() else path
    if not file.is_file():
        raise BadInputError(f"--adapter {path}: expected an adapter folder (with {ADAPTER_FILE}) or file, "
                            f"written by `infini train lm`")
    try:
        from safetensors import safe_open

        with safe_open(str(file), "pt") as f:
            header = dict(f.metadata() or {})
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise IncompatibleArtifactError(f"--adapter {file}: not a readable safetensors file ({e})") from None
    if header.get("format") != FORMAT:
        raise IncompatibleArtifactError(f"--adapter {file}: not an infini-deploy adapter (format "
                                        f"{header.get('format')!r}, expected {FORMAT!r})")
    if "sha256" in header and header["sha256"] != _digest(header, tensors):
        raise IncompatibleArtifactError(f"--adapter {file} is corrupt: its tensors or header do not match the sha256 "
                                        "in its header (the file was changed or damaged); train it again or restore it")
    return tensors, header


def adapter_digest(path: str | Path) -> str:
    """sha256 of the adapter file (of a folder holding one)."""
    path = Path(path)
    file = path / ADAPTER_FILE if path.is_dir() else path
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _check_base(model: InfiniTransformer, path, header: dict, digest: str | None = None,
                any_local_window: bool = False) -> None:
    """``any_local_window``: the base may differ in attend_previous alone, which changes no weight."""
    digest = digest or weights_digest(model)
    configs = ({dataclasses.replace(model.config, attend_previous=v).digest() for v in (False, True)}
               if any_local_window else {model.config.digest()})
    if digest != header["base_weights_sha256"] or header["base_config_digest"] not in configs:
        raise IncompatibleArtifactError(
            f"--adapter {path} was trained on a base model with weights sha256 {header['base_weights_sha256'][:16]}... "
            f"(config {header['base_config_digest'][:12]}); this model's are {digest[:16]}... (config "
            f"{model.config.digest()[:12]}): convert the base with the same source and options as the adapter's "
            f"model card says")


def continue_adapter(model: InfiniTransformer, path: str | Path, trainable: str, base_digest: str) -> None:
    """Load an adapter's tensors into a model being trained (after train.lm.prepare, so its LoRA modules
    exist), to train on from where an earlier run stopped; the base must be the one the adapter was trained on
    (``base_digest``: its weights' sha256 before prepare) and the trainable set the same. The base may attend
    to the previous segment where the adapter's did not, or the other way: training on changes the local window
    (the new adapter names this base)."""
    tensors, header = read_adapter(path)
    _check_base(model, path, header, base_digest, any_local_window=True)
    if header["trainable"] != trainable:
        raise BadInputError(f"--init-adapter {path} trained --trainable {header['trainable']}, not {trainable}: "
                            f"pass --trainable {header['trainable']}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name not in params or params[name].shape != value.shape:
                raise IncompatibleArtifactError(f"--init-adapter {path}: tensor {name} {tuple(value.shape)} does not "
                                                "fit this model (another --lora-rank?)")
            params[name].copy_(value.to(params[name].dtype))


def apply_adapter(model: InfiniTransformer, path: str | Path) -> InfiniTransformer:
    """Apply an adapter to its base model in place (and return it); refuses a base whose weights differ."""
    tensors, header = read_adapter(path)
    _check_base(model, path, header)
    state = model.state_dict()
    trainable = header["trainable"]
    with torch.no_grad():
        for name, value in tensors.items():
            if name.endswith((".lora_a", ".lora_b")):
                continue
            if name not in state or state[name].shape != value.shape:
                raise IncompatibleArtifactError(f"--adapter {path}: tensor {name} {tuple(value.shape)} does not fit "
                                                "this model")
            state[name].copy_(value.to(state[name].dtype))
        if trainable == "lora":
            scale = float(header["lora_scale"])
            for i, layer in enumerate(model.layers):
                for name in QKV:
                    proj = getattr(layer.self_attn, name)
                    a, b = tensors[f"layers.{i}.self_attn.{name}.lora_a"], tensors[f"layers.{i}.self_attn.{name}.lora_b"]
                    proj.weight.copy_(merge_lora(proj.weight, a, b, scale))
    return model
