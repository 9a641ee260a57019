"""`infini convert`: a pretrained checkpoint (Hugging Face folder or GGUF) of a supported family -> an Infini
checkpoint. Families: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, Gemma 3 text, Phi-3/3.5/4-mini (families.py).

Stages, each checked before the next (docs/conversion.md):

    read      source.py     config.json + safetensors, or a GGUF through transformers; tokenizer
    map       families.py   InfiniConfig of the source's family (refusing what is not implemented, naming it)
              weights.py    weights (fused projections split), beta = gate_init
    validate  validate.py   gates closed, one segment over a probe prompt: logits equal transformers'
    write     checkpoint    config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
                            written atomically: on any error nothing is left at OUT_DIR
"""

from __future__ import annotations

import dataclasses

import time
from dataclasses import dataclass
from pathlib import Path

from ...atomic import atomic_folder
from ..checkpoint import write_checkpoint
from ..config import UPDATE_RULES
from ...errors import BadInputError
from .families import family_of, infini_config, segment_limits
from .weights import build_model
from .source import read_source, transformers_available
from .validate import Parity, check_parity, probe_ids, refuse

DEFAULT_SEGMENT = 2048   # the paper's segment; at most the source's trained context
# sigmoid(-6) = 0.0025: the converted model is its block-local self to within a quarter percent of
# each attention output, yet d sigmoid / d beta = 0.0025 (sigmoid(-30) would give 9e-14, below
# Adam's eps: a gate that can never open). docs/conversion.md has the measurements behind it.
DEFAULT_GATE_INIT = -6.0


@dataclass
class Converted:
    model: object
    tokenizer: object
    parity: Parity | None
    seconds: dict           # per stage
    source_kind: str
    notes: list = dataclasses.field(default_factory=list)   # what the user should know (sliding windows, bounds)


def _adapter_attend_previous(adapter) -> bool:
    from ..adapter import adapter_options

    return bool(adapter_options(adapter).get("attend_previous", False))


def convert(src, out_dir, segment_len: int | None = None, update: str = "linear",
            gate_init: float = DEFAULT_GATE_INIT, validate: bool = True, force: bool = False,
            adapter=None, attend_previous: bool = False) -> Converted:
    """Convert SRC into a checkpoint at OUT_DIR (see the module docstring); returns what was done.

    ``validate``: run the parity check when transformers is installed (``parity`` is None otherwise).
    ``adapter``: an `infini train lm` adapter (models/adapter.py) applied after the check; it refuses a
    base whose weights (source, segment length, gate init) are not the ones it was trained from.
    ``attend_previous``: the local attention also sees the previous segment (models/config.py); an adapter
    trained without it (or with it) applies either way: it changes no weight.

    BadInputError for an unsupported source, IncompatibleArtifactError for damaged files,
    NumericalFaultError when the parity check fails; OUT_DIR is then untouched.
    """
    if update not in UPDATE_RULES:
        raise BadInputError(f"--update {update!r}; expected one of: {', '.join(UPDATE_RULES)}")
    if not -1e3 < gate_init < 1e3:
        raise BadInputError(f"--gate-init {gate_init} is out of range; expected a gate logit such as -6")
    out = Path(out_dir)
    if out.exists() and not force:
        raise BadInputError(f"{out} exists; choose a new folder or pass --force to replace it")
    marks = {"start": time.perf_counter()}
    source = read_source(src)
    if source.tokenizer is None:
        raise BadInputError(f"{src} has no tokenizer.json (nor a tokenizer transformers can build); the converted "
                            "model needs its vocabulary")
    marks["read"] = time.perf_counter()
    segment = segment_len or default_segment(source.config, source.origin)
    # attend_previous changes no weight: an adapter is applied to the base it trained on (its header's options
    # say which), and the model is switched to the attend_previous asked for afterwards
    trained_with = attend_previous if adapter is None else _adapter_attend_previous(adapter)
    config = dataclasses.replace(infini_config(source.config, segment, update, source.origin),
                                 attend_previous=bool(trained_with))
    # first: a vocab_size unlike the embedding's is the config's fault, said before the tokenizer is blamed
    model = build_model(config, source, gate_init, family_of(source.config, source.origin))
    source.tokenizer.check_vocabulary(config.vocab_size, source.origin)
    marks["map"] = time.perf_counter()
    parity = None
    if validate and transformers_available():
        parity = check_parity(model, source, probe_ids(source.tokenizer, config.segment_len))
        refuse(parity, source.origin)
    marks["validate"] = time.perf_counter()
    metadata = {"converted_from": Path(source.origin).name, "source_kind": source.kind, "gate_init": repr(gate_init),
                "context": str(source.config.get("max_position_embeddings") or "")}
    if adapter is not None:
        from ..adapter import adapter_digest, apply_adapter

        apply_adapter(model, adapter)
        metadata["adapter_sha256"] = adapter_digest(adapter)
        marks["adapter"] = time.perf_counter()
    if model.config.attend_previous != bool(attend_previous):
        from ..model import with_config

        model = with_config(model, attend_previous=bool(attend_previous))
    with atomic_folder(out, force) as tmp:
        write_checkpoint(model, tmp, source.tokenizer, metadata=metadata)
    marks["write"] = time.perf_counter()
    names = list(marks)
    seconds = {b: marks[b] - marks[a] for a, b in zip(names, names[1:])}
    return Converted(model, source.tokenizer, parity, seconds, source.kind, notes(config))


def default_segment(hf: dict, origin: str) -> int:
    """DEFAULT_SEGMENT, at most the source's trained context and every bound of exactness it sets (a sliding
    window, a RoPE scaling that changes with the sequence's length)."""
    family_of(hf, origin)   # an unsupported model type is named first
    try:
        limits = [limit for limit, _ in segment_limits(hf)]
    except BadInputError:   # infini_config names the problem, with the source
        limits = []
    return min(DEFAULT_SEGMENT, hf.get("max_position_embeddings") or DEFAULT_SEGMENT, *limits)


def notes(config) -> list[str]:
    """One line per bound the conversion relies on, for the log."""
    out = []
    if config.sliding_window is not None:
        local = "every layer" if config.layer_types is None else \
            f"{config.layer_types.count('sliding_attention')} of {config.n_layer} layers"
        out.append(f"sliding-window attention ({local}, window {config.sliding_window}): exact, the segment of "
                   f"{config.segment_len} tokens fits in the window")
    scaling = dict(config.rope_scaling or {})
    if scaling.get("rope_type") in ("dynamic", "longrope"):
        bound = next(k for k in scaling if k.endswith("position_embeddings"))
        out.append(f"rope scaling {scaling['rope_type']!r}: exact, the segment of {config.segment_len} tokens is at "
                   f"most {bound} ({scaling[bound]}), where transformers keeps the frequencies used here")
    return out
