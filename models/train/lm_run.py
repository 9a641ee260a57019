"""A language-model training run on disk: what `infini train lm` writes and what `--resume` continues from.

OUT_DIR is always a complete checkpoint: it is (re)written atomically at every --save-every and at the end,
with the trained model (low-rank adapters merged), adapter.safetensors (what training changed, for `infini
convert --adapter`), train_log.json, train_state.json (the step, the options, the data's and the base's hashes)
and optimizer.safetensors (the trained tensors and AdamW's moments by name). Resuming from it computes the same
numbers as a run that never stopped (lm.py draws the batch of step t from (seed, t)); anything damaged, missing
or of another run is refused in one line naming the file, before training.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ...errors import BadInputError, IncompatibleArtifactError
from ...paths import describe_absent, read_json
from .lm import config_dict, merge_adapters

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"


def merged_copy(net):
    """A copy of ``net`` with its low-rank adapters merged, in eval mode (what the checkpoint holds)."""
    return merge_adapters(copy.deepcopy(net)).eval()


def write_run(out_dir, net, base, tokenizer, optimizer, cfg, step, log, meta, result, force) -> None:
    """OUT_DIR, atomically: the merged model, its adapter, the optimizer state, train_state.json, train_log.json."""
    from safetensors.torch import save_file

    from ...atomic import atomic_folder
    from ..adapter import base_options, save_adapter
    from ..checkpoint import LOG_FILE, owned_checkpoint, write_checkpoint

    with atomic_folder(out_dir, force, owned_checkpoint, "checkpoint") as tmp:
        write_checkpoint(merged_copy(net).float().cpu(), tmp, tokenizer if tokenizer.kind != "bytes" else None,
                         metadata=getattr(base, "metadata", None))
        save_adapter(net, cfg.trainable, meta["base"], tmp, {"steps": step, "base_model": meta["base_model"],
                                                              "convert": base_options(base)})
        save_file(optimizer_tensors(net, optimizer), str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "train_config": config_dict(cfg),
                                                  "data": meta["data"], "base": meta["base"],
                                                  "trainable_state": trainable_digest(net)}, indent=1) + "\n")
        entry = {**meta, "train_config": config_dict(cfg), "steps_done": step, "log": log,
                 "stopped_by": result.stopped if result else "checkpoint", "seconds": round(result.seconds, 1) if result else None,
                 "skipped_steps": result.skipped if result else None}
        (tmp / LOG_FILE).write_text(json.dumps(entry, indent=1) + "\n")


def optimizer_tensors(net, optimizer) -> dict:
    """AdamW's moments and step counts by parameter name, plus the trainable tensors themselves (so a resumed
    run continues from exactly these values, including the low-rank factors)."""
    import torch

    names = {id(p): n for n, p in net.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            out[f"param/{n}"] = p.detach().float().contiguous()
            for k, v in optimizer.state.get(p, {}).items():
                out[f"{k}/{n}"] = (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().contiguous()
    return out


def trainable_digest(net) -> str:
    import hashlib

    h = hashlib.sha256()
    for n, p in net.named_parameters():
        if p.requires_grad:
            h.update(n.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_run(out_dir, net, optimizer, cfg, data, base_ident) -> tuple[int, list]:
    """(step, log) of the run in OUT_DIR, its trainable tensors and AdamW moments restored into ``net`` and
    ``optimizer``. Anything damaged, missing or of another run is one error naming the file, before training."""
    from ..checkpoint import LOG_FILE

    state = _read_state(out_dir / STATE_FILE, cfg.steps)
    saved, now = state["train_config"], config_dict(cfg)
    changed = sorted(k for k in now if k not in ("steps", "max_minutes") and saved.get(k) != now[k])
    if changed:
        raise BadInputError(f"--resume: options differ from the run in {out_dir}: "
                            + ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed))
    if state["base"] != base_ident:
        raise BadInputError(f"--resume: {out_dir} was trained from another base model ({state['base']['weights_sha256'][:16]}...)")
    if [d["sha256"] for d in state["data"]["train"]] != [d["sha256"] for d in data["train"]]:
        raise BadInputError(f"--resume: the --data files differ from those of the run in {out_dir}")
    _restore(net, optimizer, out_dir / OPTIMIZER_FILE)
    if trainable_digest(net) != state["trainable_state"]:
        raise BadInputError(f"--resume: {out_dir}/{OPTIMIZER_FILE} does not hold the state its {STATE_FILE} names")
    log = _read_run_json(out_dir / LOG_FILE, "training log")
    if not isinstance(log, dict) or not isinstance(log.get("log"), list):
        raise IncompatibleArtifactError(f"--resume: {out_dir / LOG_FILE} holds no \"log\" list; expected the log "
                                        f"entries of the run")
    return state["step"], log["log"]


def _is_sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64


STATE_FIELDS = {   # what --resume reads from train_state.json: (check, what it must be)
    "step": (lambda v: type(v) is int and v >= 0, "the number of steps done (a whole number, 0 or more)"),
    "train_config": (lambda v: isinstance(v, dict), "the run's options (an object)"),
    "data": (lambda v: isinstance(v, dict) and isinstance(v.get("train"), list)
             and all(isinstance(d, dict) and _is_sha256(d.get("sha256")) for d in v["train"]),
             "the training files (an object whose \"train\" lists each file's sha256)"),
    "base": (lambda v: isinstance(v, dict) and _is_sha256(v.get("weights_sha256"))
             and isinstance(v.get("config_digest"), str), "the base model's weights_sha256 and config_digest"),
    "trainable_state": (_is_sha256, "the sha256 of the trained tensors"),
}


def _read_state(path: Path, steps: int) -> dict:
    """train_state.json, every field :data:`STATE_FIELDS` names checked, its step at most ``steps``."""
    state = _read_run_json(path, "training state")
    if not isinstance(state, dict):
        raise IncompatibleArtifactError(f"--resume: {path} holds a JSON {type(state).__name__}; expected an object "
                                        f"with {', '.join(STATE_FIELDS)}")
    for key, (ok, what) in STATE_FIELDS.items():
        if key not in state or not ok(state[key]):
            shown = f"is {json.dumps(state[key])[:40]}" if key in state else "is missing"
            raise IncompatibleArtifactError(f"--resume: {path}: {key} {shown}; expected {what}")
    if state["step"] > steps:
        raise BadInputError(f"--resume: {path} records step {state['step']}, beyond --steps {steps}: pass --steps "
                            f"{state['step']} or more to continue that run")
    return state


def _read_run_json(path: Path, what: str):
    try:
        return read_json(path, f"--resume: {what}")
    except IncompatibleArtifactError as e:
        raise IncompatibleArtifactError(f"--resume: {e}; expected the {what} the run saved") from None


ADAM_STATE = ("exp_avg", "exp_avg_sq", "step")   # what AdamW keeps per tensor (all of it, or none before a step)


def _restore(net, optimizer, path: Path) -> None:
    """Copy the trainable tensors and their AdamW moments of ``path`` (optimizer.safetensors) into ``net`` and
    ``optimizer``, each checked against the tensor it belongs to."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BadInputError(f"--resume: {path} {describe_absent(path)}; expected the optimizer state of the run")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise IncompatibleArtifactError(f"--resume: {path} is corrupt or truncated ({e}); expected the optimizer "
                                        "state of the run") from None
    by_name: dict[str, dict] = {}
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        by_name.setdefault(name, {})[kind] = t
    names = {id(p): n for n, p in net.named_parameters()}
    with torch.no_grad():
        for group in optimizer.param_groups:
            for p in group["params"]:
                n = names[id(p)]
                saved = by_name.get(n, {})
                moments = {k: v for k, v in saved.items() if k != "param"}
                _check_tensor(path, f"param/{n}", saved.get("param"), p.shape)
                if moments and sorted(moments) != sorted(ADAM_STATE):
                    raise IncompatibleArtifactError(f"--resume: {path} holds {', '.join(sorted(moments))} for {n}; "
                                                    f"expected {', '.join(ADAM_STATE)} (AdamW's state)")
                for k, v in moments.items():
                    _check_tensor(path, f"{k}/{n}", v, () if k == "step" else p.shape)
                p.copy_(saved["param"].to(p.dtype))
                if moments:
                    optimizer.state[p] = {k: (v if k != "step" else v.float()) for k, v in moments.items()}


def _check_tensor(path: Path, key: str, t, shape) -> None:
    if t is None:
        raise IncompatibleArtifactError(f"--resume: {path} holds no {key}; expected every trained tensor and its "
                                        "AdamW state")
    if tuple(t.shape) != tuple(shape) or not t.is_floating_point():
        raise IncompatibleArtifactError(f"--resume: {path}: {key} is {t.dtype} of shape {tuple(t.shape)}; expected "
                                        f"float of shape {tuple(shape)}")
