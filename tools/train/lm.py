"""`infini train lm`: continual training of a model on long text, through its memory (models/train/lm.py).

OUT_DIR is a resumable checkpoint written atomically at every --save-every and at the end (models/train/lm_run.py).
Under torchrun the same command trains data-parallel (gloo on CPUs, NCCL on GPUs); rank 0 writes.
"""

from __future__ import annotations

import copy
import os
import platform
import sys
import time
from pathlib import Path

import click
import numpy as np

from ...errors import BadInputError
from ...models.train.lm_run import STATE_FILE, load_run, merged_copy, write_run
from ...runtime.quality.perplexity import held_out_nll
from ...signals import stop_requests
from ...runtime.open import AUTOCAST
from ..options import TEXT_OR_IDS, Number, device_option, parse_count, progress_option, seed_option, \
    threads_option


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
@click.option("--autocast", type=click.Choice(AUTOCAST), default="auto", show_default=True,
              help="bf16 autocast of the weights' matmuls (state float32); auto: as `infini run` decides.")
@click.option("--max-minutes", type=Number(0, 1e6, min_open=True), default=None)
@click.option("--save-every", type=click.IntRange(0, 10**9), default=0, show_default=True,
              help="Rewrite OUT_DIR (a resumable checkpoint) every this many steps (0: at the end only).")
@click.option("--resume", is_flag=True, help="Continue the run whose checkpoint is OUT_DIR (same data and options).")
@device_option()
@threads_option()
@seed_option()
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is a checkpoint of ours.")
@progress_option()
def train_lm(model, out_dir, data_files, held_out_files, eval_tokens, segment_len, segments, trainable, lora_rank, steps,
       batch, lr, beta_lr, autocast, max_minutes, save_every, resume, device, threads, seed, force, progress):
    """Train MODEL (a converted checkpoint or a preset) on long text through its memory; write OUT_DIR."""
    import torch

    from ...models.checkpoint import weights_digest
    from ...models.train import lm as lt
    from ...models.train.loop import make_optimizer
    from ...runtime.open import fastest_autocast, load_model, model_tokenizer

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
        from ...atomic import check_replaceable
        from ...models.checkpoint import owned_checkpoint
        from ...paths import check_output_path

        check_replaceable(check_output_path(out_dir, folder=True), force, owned_checkpoint, "checkpoint")
    base = load_model(model, seed, segment_len)
    tokenizer = model_tokenizer(model)
    if autocast == "auto":
        autocast = fastest_autocast(base, device)
    cfg = lt.LMTrainConfig(steps=steps, batch=batch, segments=segments, lr=lr, beta_lr=beta_lr, trainable=trainable,
                           lora_rank=lora_rank, seed=seed, max_minutes=max_minutes,
                           autocast=None if autocast == "off" else autocast)
    window = segments * base.config.segment_len + 1
    train_docs, held_out, data = _documents(data_files, held_out_files, tokenizer, window)
    corpus = lt.Corpus(train_docs, window)
    base_ident = {"weights_sha256": weights_digest(base), "config_digest": base.config.digest()}
    net = copy.deepcopy(base)
    names = lt.prepare(net, cfg)
    optimizer = make_optimizer(net, cfg.lr, cfg.beta_lr, cfg.weight_decay)
    start_step, log = 0, []
    if resume:
        start_step, log = load_run(out_dir, net, optimizer, cfg, data, base_ident)
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
        write_run(out_dir, net, base, tokenizer, optimizer, cfg, step, log + (result.log if result else []), meta,
                  result, force or resume or step > start_step)

    with stop_requests() as stop:   # a signal now stops training after its step; what it learned is saved
        result = lt.train_lm(net, corpus, cfg, optimizer, start_step, device, rank, world, progress and rank == 0,
                             on_log if rank == 0 else None,
                             on_checkpoint=(lambda step: save(step)) if save_every else None,
                             checkpoint_every=save_every, stop=stop)
        evaluation = _evaluate(merged_copy(net), held_out, parse_count(eval_tokens, "--eval-tokens"), cfg) \
            if rank == 0 else None
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

    from ...runtime.inputs import iter_tokens

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


def _evaluate(merged, held_out, limit: int, cfg) -> dict:
    """Held-out perplexity of the trained model, streamed as deployed (runtime/quality/perplexity.py)."""
    ids = np.concatenate(held_out)[:limit] if held_out else np.zeros(0, np.int64)
    r = held_out_nll(merged, ids, cfg.autocast)
    return {"tokens": int(len(ids)), "ppl": r["ppl"], "nll": r["nll"], "by_position": r["by_position"],
            "source": "held-out documents (see data.held_out)" if len(ids) >= 2 else "no held-out text"}
