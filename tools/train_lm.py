"""`infini train lm`: continual training of a model on long text, through its memory (models/train/lm.py).

OUT_DIR is always a complete checkpoint: it is (re)written atomically at every --save-every and at the
end, with the trained model (low-rank adapters merged), adapter.safetensors (what training changed, for
`infini convert --adapter`), train_log.json, and the optimizer state that `--resume` continues from.
Under torchrun the same command trains data-parallel (gloo on CPUs, NCCL on GPUs); rank 0 writes.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import click
import numpy as np

from ..errors import BadInputError, IncompatibleArtifactError
from ..paths import describe_absent, read_json
from ..signals import stop_requests
from .options import DEVICE, TEXT_OR_IDS, THREADS, Number, parse_count, seed_option

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"


@click.command("lm")
@click.argument("model")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--data", "data_files", multiple=True, required=True, type=TEXT_OR_IDS,
              help="Training text (UTF-8, the model's tokenizer); repeat for several files.")
@click.option("--held-out", "held_out_files", multiple=True, type=TEXT_OR_IDS,
              help="Documents training never sees, for the perplexity at the end [default: the last 5% of each "
                   "--data file, which training then never reads].")
@click.option("--eval-tokens", default="16k", show_default=True, help="Held-out tokens evaluated (perplexity).")
@click.option("--segment-len", type=click.IntRange(1, 1 << 16), default=None,
              help="Train at this segment length [default: the model's].")
@click.option("--segments", type=click.IntRange(1, 4096), default=4, show_default=True,
              help="Segments per row: the loss backpropagates through the memory over all of them.")
@click.option("--trainable", type=click.Choice(["gates", "qkv", "lora", "all"]), default="qkv", show_default=True,
              help="What learns: the gates; gates + q/k/v; gates + low-rank adapters on q/k/v; every weight.")
@click.option("--lora-rank", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--steps", type=click.IntRange(1, 10**9), default=200, show_default=True)
@click.option("--batch", type=click.IntRange(1, 1 << 16), default=4, show_default=True, help="Global batch (rows).")
@click.option("--lr", type=Number(0, 10, min_open=True), default=2e-4, show_default=True)
@click.option("--beta-lr", type=Number(0, 10, min_open=True), default=2e-2, show_default=True,
              help="Learning rate of the gates (no weight decay).")
@click.option("--autocast", type=click.Choice(["auto", "bf16", "off"]), default="auto", show_default=True,
              help="bf16 autocast of the weights' matmuls (state float32); auto: as `infini run` decides.")
@click.option("--max-minutes", type=Number(0, 1e6, min_open=True), default=None)
@click.option("--save-every", type=click.IntRange(0, 10**9), default=0, show_default=True,
              help="Rewrite OUT_DIR (a resumable checkpoint) every this many steps (0: at the end only).")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is OUT_DIR (same data and options).")
@click.option("--device", type=DEVICE, default="cpu", show_default=True)
@click.option("--threads", type=THREADS, default=None, help="torch intra-op threads.")
@seed_option()
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is a checkpoint of ours.")
@click.option("--progress/--no-progress", default=True, show_default=True)
def lm(model, out_dir, data_files, held_out_files, eval_tokens, segment_len, segments, trainable, lora_rank, steps,
       batch, lr, beta_lr, autocast, max_minutes, save_every, resume, device, threads, seed, force, progress):
    """Train MODEL (a converted checkpoint or a preset) on long text through its memory; write OUT_DIR."""
    import torch

    from ..models.train import lm as lt
    from ..models.train.loop import make_optimizer
    from ..models.checkpoint import LOG_FILE, resolve_model, resolve_tokenizer
    from .init_run import fastest_autocast

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        if not device.startswith("cuda"):
            _gloo_on_loopback(os.environ)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA device is available; available: cpu")
    if threads:
        torch.set_num_threads(threads)
    if resume and not (out_dir / STATE_FILE).is_file():
        raise BadInputError(f"--resume: {out_dir} holds no {STATE_FILE} of a run to continue")
    if not resume:   # OUT_DIR is checked before training: a bad path fails now, not after an hour
        from ..atomic import check_replaceable
        from ..models.checkpoint import owned_checkpoint
        from ..paths import check_output_path

        check_replaceable(check_output_path(out_dir, folder=True), force, owned_checkpoint, "checkpoint")
    base = resolve_model(model, seed)
    if segment_len is not None and segment_len != base.config.segment_len:
        base = _with_segment_len(base, segment_len)
    tokenizer = resolve_tokenizer(model)
    cfg = lt.LMTrainConfig(steps=steps, batch=batch, segments=segments, lr=lr, beta_lr=beta_lr, trainable=trainable,
                           lora_rank=lora_rank, seed=seed, max_minutes=max_minutes,
                           autocast=None if autocast == "off" else
                           ("bf16" if autocast == "bf16" else _auto(fastest_autocast(base, device))))
    window = segments * base.config.segment_len + 1
    train_docs, held_out, data = _documents(data_files, held_out_files, tokenizer, window)
    corpus = lt.Corpus(train_docs, window)
    base_ident = {"weights_sha256": _digest(base), "config_digest": base.config.digest()}
    net = _copy(base)
    names = lt.prepare(net, cfg)
    optimizer = make_optimizer(net, cfg.lr, cfg.beta_lr, cfg.weight_decay)
    start_step, log = 0, []
    if resume:
        start_step, log = _load_resume(out_dir, net, optimizer, cfg, data, base_ident)
    if rank == 0:
        click.echo(f"training {len(names)} tensors ({sum(p.numel() for p in net.parameters() if p.requires_grad):,} "
                   f"parameters, --trainable {trainable}) on {corpus_tokens(train_docs):,} tokens of "
                   f"{len(data_files)} file(s), rows of {segments} x {base.config.segment_len} tokens, global batch "
                   f"{batch}{f' over {world} processes' if world > 1 else ''}, autocast {cfg.autocast or 'off'}"
                   + (f", from step {start_step}" if start_step else ""))

    def on_log(e):
        msg = (f"step {e['step']}: loss {e['loss']:.4f}, {e['tokens_per_s']:,.0f} tokens/s, mean gate "
               f"{e['gates_mean']:.3f}, {e['seconds']:.0f}s")
        if progress:
            from tqdm import tqdm
            tqdm.write(msg)
        else:
            click.echo(msg)

    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    meta = {"argv": "infini train lm " + " ".join(sys.argv[3:]), "started": started, "device": device,
            "world_size": world, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "data": data, "base_model": str(model),
            "base": base_ident}

    def save(step, result=None):
        _write(out_dir, net, base, tokenizer, optimizer, cfg, step, log + (result.log if result else []), meta,
               result, force or resume or step > start_step)

    with stop_requests() as stop:   # a signal now stops training after its step; what it learned is saved
        result = lt.train_lm(net, corpus, cfg, optimizer, start_step, device, rank, world, progress and rank == 0,
                             on_log if rank == 0 else None,
                             on_checkpoint=(lambda step: save(step)) if save_every else None,
                             checkpoint_every=save_every, stop=stop)
        evaluation = _evaluate(net, held_out, parse_count(eval_tokens, "--eval-tokens"), cfg) if rank == 0 else None
    if rank == 0:
        meta["held_out"] = evaluation
        save(result.steps_done, result)
        if result.stopped == "interrupted":
            click.echo(f"stopped early ({stop.name}): the checkpoint holds the {result.steps_done} of {steps} steps "
                       "done; continue with --resume")
        click.echo(f"trained to step {result.steps_done} in {result.seconds / 60:.1f} min ({result.stopped}); held-out "
                   f"perplexity {evaluation['ppl']:.3f} over {evaluation['tokens']:,} tokens "
                   f"({evaluation['source']}); checkpoint and adapter in {out_dir}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def _auto(choice: str) -> str | None:
    return None if choice == "off" else choice


def _digest(model) -> str:
    from ..models.checkpoint import weights_digest

    return weights_digest(model)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _with_segment_len(model, segment_len: int):
    """The same weights with another segment length (the weights do not depend on it)."""
    from dataclasses import replace

    from ..models.model import InfiniTransformer

    net = InfiniTransformer(replace(model.config, segment_len=segment_len))
    net.load_state_dict(model.state_dict())
    net.metadata = getattr(model, "metadata", None)
    return net


def corpus_tokens(docs) -> int:
    return int(sum(len(d) for d in docs))


def _gloo_on_loopback(env) -> None:
    """Pin gloo to the loopback when every process runs on this machine and GLOO_SOCKET_IFNAME is unset.

    gloo otherwise picks its interface by resolving the host's name, which on some machines resolves to no
    local address or only through a slow resolver: the rendezvous then fails now and then (seen in CI). A run
    across machines (LOCAL_WORLD_SIZE below WORLD_SIZE) and an explicit GLOO_SOCKET_IFNAME are left alone."""
    import socket

    if env.get("GLOO_SOCKET_IFNAME") or env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE")) != env.get("WORLD_SIZE"):
        return
    loopback = next((n for n in ("lo", "lo0") if n in {name for _, name in socket.if_nameindex()}), None)
    if loopback:
        env["GLOO_SOCKET_IFNAME"] = loopback


def _documents(data_files, held_out_files, tokenizer, window: int):
    """(training documents, held-out documents, what was used): the ids of each file; without --held-out
    the last 5% of every --data file is held out (and never trained on)."""
    import hashlib

    from ..runtime.inputs import iter_tokens

    def ids(path):
        return np.concatenate(list(iter_tokens(path, tokenizer=tokenizer)))

    train, held, used = [], [], {"train": [], "held_out": []}
    for f in data_files:
        doc = ids(f)
        digest = hashlib.sha256(Path(f).read_bytes()).hexdigest()
        if held_out_files:
            train.append(doc)
            used["train"].append({"file": str(f), "sha256": digest, "tokens": len(doc)})
        else:
            cut = int(len(doc) * 0.95)
            train.append(doc[:cut])
            held.append(doc[cut:])
            used["train"].append({"file": str(f), "sha256": digest, "tokens": cut})
            used["held_out"].append({"file": str(f), "sha256": digest, "tokens": len(doc) - cut, "part": "last 5%"})
    for f in held_out_files:
        doc = ids(f)
        held.append(doc)
        used["held_out"].append({"file": str(f), "sha256": hashlib.sha256(Path(f).read_bytes()).hexdigest(),
                                 "tokens": len(doc)})
    return train, held, used


def _evaluate(net, held_out, limit: int, cfg) -> dict:
    """Held-out perplexity, streamed through the model as deployed (runtime/perplexity.py)."""
    from ..runtime.past_stream import PastStream
    from ..runtime.perplexity import stream_nll
    from ..runtime.stream import Stream
    from ..runtime.torch_runner import TorchRunner

    ids = np.concatenate(held_out)[:limit] if held_out else np.zeros(0, np.int64)
    if len(ids) < 2:
        return {"tokens": 0, "ppl": float("nan"), "nll": float("nan"), "source": "no held-out text"}
    plain = _merged_copy(net)
    stream = (PastStream(plain, autocast=cfg.autocast) if plain.config.attend_previous
              else Stream(TorchRunner(plain, autocast=cfg.autocast)))
    r = stream_nll(stream, ids)
    return {"tokens": int(len(ids)), "ppl": r["ppl"], "nll": r["nll"], "by_position": r["by_position"],
            "source": "held-out documents (see data.held_out)"}


def _merged_copy(net):
    import copy

    from ..models.train.lm import merge_adapters

    return merge_adapters(copy.deepcopy(net)).eval()


def _write(out_dir, net, base, tokenizer, optimizer, cfg, step, log, meta, result, force) -> None:
    from safetensors.torch import save_file

    from ..atomic import atomic_folder
    from ..models.adapter import base_options, save_adapter
    from ..models.checkpoint import LOG_FILE, owned_checkpoint, write_checkpoint
    from ..models.train.lm import config_dict

    with atomic_folder(out_dir, force, owned_checkpoint, "checkpoint") as tmp:
        write_checkpoint(_merged_copy(net).float().cpu(), tmp, tokenizer if tokenizer.kind != "bytes" else None,
                         metadata=getattr(base, "metadata", None))
        save_adapter(net, cfg.trainable, meta["base"], tmp, {"steps": step, "base_model": meta["base_model"],
                                                              "convert": base_options(base)})
        save_file(_optimizer_tensors(net, optimizer), str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "train_config": config_dict(cfg),
                                                  "data": meta["data"], "base": meta["base"],
                                                  "trainable_state": _trainable_digest(net)}, indent=1) + "\n")
        entry = {**meta, "train_config": config_dict(cfg), "steps_done": step, "log": log,
                 "stopped_by": result.stopped if result else "checkpoint", "seconds": round(result.seconds, 1) if result else None,
                 "skipped_steps": result.skipped if result else None}
        (tmp / LOG_FILE).write_text(json.dumps(entry, indent=1) + "\n")


def _optimizer_tensors(net, optimizer) -> dict:
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


def _trainable_digest(net) -> str:
    import hashlib

    h = hashlib.sha256()
    for n, p in net.named_parameters():
        if p.requires_grad:
            h.update(n.encode())
            h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_resume(out_dir, net, optimizer, cfg, data, base_ident) -> tuple[int, list]:
    """(step, log) of the run in OUT_DIR, its trainable tensors and AdamW moments restored into ``net`` and
    ``optimizer``. Anything damaged, missing or of another run is one error naming the file, before training."""
    from ..models.checkpoint import LOG_FILE
    from ..models.train.lm import config_dict

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
    if _trainable_digest(net) != state["trainable_state"]:
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
