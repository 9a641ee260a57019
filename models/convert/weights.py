"""A source's weights into an InfiniTransformer: names, fused projections split at load, shape and value checks.

The blocks keep transformers' parameter names, so a tensor maps by name (``model.layers.3.self_attn.q_proj.weight``
-> ``layers.3.self_attn.q_proj.weight``); a family with fused projections (Phi-3's ``qkv_proj`` and
``gate_up_proj``) has them split by rows into the parts, in order. What Infini-attention adds is one gate logit
beta per query head and layer, initialised to ``gate_init`` (docs/conversion.md explains the default).
"""

from __future__ import annotations

import torch

from ...errors import IncompatibleArtifactError, NumericalFaultError
from ..config import InfiniConfig
from ..model import InfiniTransformer
from .families import Family

IGNORED = ("rotary_emb.inv_freq",)   # buffers some old checkpoints stored; recomputed from the config


def hf_name(name: str) -> str:
    """Our tensor name -> the Hugging Face one."""
    return name if name == "lm_head.weight" else f"model.{name}"


def build_model(config: InfiniConfig, source, gate_init: float, family: Family | None = None) -> InfiniTransformer:
    """An InfiniTransformer holding the source's weights (float32) and beta = gate_init everywhere.

    Every tensor the config implies must be there with its shape; a tensor the model would not use
    (a bias, an expert) is refused rather than dropped. Built on the meta device and filled by
    assignment, so the weights are held once.
    """
    with torch.device("meta"):
        model = InfiniTransformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith(".beta") and not (config.tie_embeddings and k == "lm_head.weight")}
    plan = tensor_plan(expected, family)
    check_names(source, plan, config.tie_embeddings)
    state = {}
    for hf, parts in plan.items():
        tensor = source.tensor(hf)
        check_tensor(source.origin, hf, tensor, (sum(expected[p][0] for p in parts), *expected[parts[0]][1:]))
        for part, piece in zip(parts, tensor.split([expected[p][0] for p in parts], dim=0)):
            state[part] = piece.float().contiguous()
    for i in range(config.n_layer):
        state[f"layers.{i}.self_attn.beta"] = torch.full((config.n_head,), float(gate_init))
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def tensor_plan(expected: dict, family: Family | None) -> dict[str, tuple[str, ...]]:
    """HF tensor name -> our tensors it holds, in row order: one for a plain tensor, the parts of a fused one."""
    fused = dict(family.fused) if family else {}
    plan, taken = {}, set()
    for name in expected:
        if name in taken:
            continue
        whole = next((f for f, parts in fused.items() if name.endswith("." + parts[0])), None)
        if whole is not None:
            prefix = name[:-len(fused[whole][0])]
            parts = tuple(prefix + p for p in fused[whole])
            plan[hf_name(prefix + whole)] = parts
            taken.update(parts)
        else:
            plan[hf_name(name)] = (name,)
    return plan


def check_tensor(origin: str, name: str, tensor: torch.Tensor, shape: tuple) -> None:
    """The shape the config implies (the embedding's rows are the config's vocab_size: a mismatch there is the
    config's, said before a tokenizer is blamed for it) and finite values (a NaN in the source, named here, would
    otherwise fail the parity check as a whole)."""
    if name == "model.embed_tokens.weight" and tensor.dim() == 2 and tensor.shape[0] != shape[0]:
        raise IncompatibleArtifactError(f"{origin}: the config's vocab_size is {shape[0]}, but the embedding {name} "
                                        f"has {tensor.shape[0]} rows; the config does not match the weights")
    if tuple(tensor.shape) != shape:
        raise IncompatibleArtifactError(f"{origin}: tensor {name} has shape {tuple(tensor.shape)}, its config implies "
                                        f"{shape}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NumericalFaultError(f"{origin}: tensor {name} holds {bad:,} NaN/Inf value(s); the source's weights are "
                                  "damaged: nothing written")


def check_names(source, plan: dict, tied: bool) -> None:
    have = {n for n in source.names if not n.endswith(IGNORED)}
    want = set(plan)
    missing = sorted(want - have)
    extra = sorted(have - want - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise IncompatibleArtifactError(f"{source.origin}: tensor {missing[0]} is missing"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                        + "; the weights do not match the config")
    if extra:
        raise IncompatibleArtifactError(f"{source.origin}: tensor {extra[0]} is not part of the model its config "
                                        "describes (a bias, an expert, another architecture?)")
