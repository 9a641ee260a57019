"""`infini train passkey`: train a model that retrieves a key through its memory (models/train/passkey.py)."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import click

from ...errors import BadInputError
from ...models.config import PRESETS, UPDATE_RULES
from ...runtime.open import AUTOCAST
from ...signals import stop_requests
from ..options import TEXT, Number, device_option, progress_option, seed_option, threads_option


@click.command("passkey")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--preset", "preset_name", type=click.Choice(sorted(PRESETS)), default="passkey", show_default=True)
@click.option("--steps", type=click.IntRange(1, 10**9), default=1500, show_default=True)
@click.option("--batch", type=click.IntRange(1, 1 << 16), default=12, show_default=True)
@click.option("--lr", type=Number(0, 10, min_open=True), default=3e-3, show_default=True)
@click.option("--beta-lr", type=Number(0, 10, min_open=True), default=1e-2, show_default=True,
              help="Learning rate of the gates (beta).")
@click.option("--min-segments", type=click.IntRange(2, 4096), default=3, show_default=True)
@click.option("--max-segments", type=click.IntRange(2, 4096), default=8, show_default=True,
              help="The curriculum grows prompts from --min-segments to this many segments.")
@click.option("--memory-only", type=Number(0, 1), nargs=2, default=(0.5, 0.9), show_default=True,
              help="Share of prompts whose needle only the memory can reach: at the start, at the end of the "
              "curriculum (the rest have the needle in the question's segment).")
@click.option("--answer-weight", type=Number(0, 1e6), default=5.0, show_default=True,
              help="Weight of the answer digits' loss, added to the all-token loss.")
@click.option("--boundary", type=Number(0, 1), default=0.2, show_default=True,
              help="Share of rows whose answer straddles a segment boundary.")
@click.option("--dilute", type=Number(0, 1), default=0.75, show_default=True,
              help="Share of rows that start from the simulated state of a long filler stream (docs/training.md).")
@click.option("--dilute-tokens", type=Number(0, 1e12, min_open=True), nargs=2, default=(1e3, 2e6), show_default=True,
              help="Length range (tokens, log-uniform) of that simulated stream.")
@click.option("--dilute-segments", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Segments of filler run (with gradient) to measure the simulated state per token.")
@click.option("--dilute-old-memory/--dilute-from-zero", default=False, show_default=True,
              help="Measure that state with the filler written on top of an old memory (as late tokens of a long "
                   "stream are) instead of from zero; costs a forward pass more (docs/training.md).")
@click.option("--dilute-late", type=Number(0, 1), default=0.0, show_default=True,
              help="Share of the diluted rows whose simulated state is added after their needle instead of before "
                   "the row: the needle written on a young memory, as at depth 0 of a long stream (docs/training.md).")
@click.option("--distill", type=Number(0, 1e6), default=0.0, show_default=True,
              help="Weight of the KL to the --init model's full attention (its transformers source) at every position "
                   "beyond the local window: the memory learns what full attention knows (docs/training.md).")
@click.option("--init", "init_from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Start from this checkpoint's weights and config (fine-tuning) instead of --preset at random.")
@click.option("--trainable", type=click.Choice(["gates", "qkv", "lora", "all"]), default="all", show_default=True,
              help="What learns (as `infini train lm`); anything but all also writes OUT_DIR/adapter.safetensors.")
@click.option("--lora-rank", type=click.IntRange(1, 4096), default=8, show_default=True)
@click.option("--init-adapter", type=click.Path(exists=True, path_type=Path), default=None,
              help="Train on from this adapter (of an earlier run on the same --init base and --trainable set) "
                   "instead of from zero: a stage of a curriculum, whose adapter stays one adapter of that base.")
@click.option("--autocast", type=click.Choice(AUTOCAST), default="auto", show_default=True,
              help="bf16 autocast of the weights' matmuls (the memory path and the state stay float32); auto: as "
                   "`infini run` decides (bf16 on a CPU with native bf16 for a model at least 256 wide).")
@click.option("--haystack", "haystack_files", multiple=True, type=TEXT,
              help="Real text as the filler (prose haystacks) instead of the varied sentences; repeat for several files.")
@seed_option()
@device_option()
@click.option("--update", type=click.Choice(UPDATE_RULES), default=None,
              help="Memory update rule [default: linear; with --init, the checkpoint's].")
@click.option("--max-minutes", type=Number(0, 1e6, min_open=True), default=None,
              help="Stop (and save) after this long; the LR schedule then follows time as well as steps.")
@threads_option()
@click.option("--checkpointing/--no-checkpointing", default=None,
              help="Recompute each segment in backward (gradient checkpointing): the memory of one segment's "
                   "activations instead of all.  [default: on when the whole row would not fit]")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it is a checkpoint of ours.")
@progress_option()
def train_passkey(out_dir, preset_name, steps, batch, lr, beta_lr, min_segments, max_segments, memory_only, answer_weight,
            boundary, dilute, dilute_tokens, dilute_segments, dilute_old_memory, dilute_late, distill, init_from, trainable, lora_rank, init_adapter, autocast,
            haystack_files,
            seed, device,
            update, max_minutes, threads, checkpointing, force, progress):
    """Train on passkey prompts (varied filler) and write a checkpoint to OUT_DIR plus OUT_DIR/train_log.json."""
    import torch

    from ...atomic import atomic_folder
    from ...limits import available_memory_bytes, check_fits
    from ...models.checkpoint import LOG_FILE, init_model, load_checkpoint, owned_checkpoint, write_checkpoint, \
        weights_digest
    from ...models.config import preset
    from ...models.train import lm as lt
    from ...models.train.passkey import TrainConfig, train as run_training, write_log
    from ...runtime.open import fastest_autocast

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA device is available; available: cpu")
    if threads:
        torch.set_num_threads(threads)
    tokenizer = None
    if init_from is not None:
        from ...models.checkpoint import checkpoint_tokenizer

        model = load_checkpoint(init_from)
        tokenizer = checkpoint_tokenizer(init_from)   # a converted model: prompts in its own vocabulary
        tokenizer = None if tokenizer.kind == "bytes" else tokenizer
        model_cfg = model.config
        if update is not None and model_cfg.update != update:
            raise BadInputError(f"--init {init_from} uses the {model_cfg.update} update rule, not --update {update}: "
                                f"drop --update (or pass --update {model_cfg.update})")
    else:
        model_cfg = preset(preset_name, update=update or "linear")
        model = init_model(model_cfg, seed)
    if autocast == "auto":
        autocast = fastest_autocast(model, device)
    # activations of every segment, or (checkpointing) of one segment and the state between segments
    whole = 16 * model_cfg.parameter_count() + max_segments * model_cfg.n_layer * model_cfg.step_bytes(batch)
    if checkpointing is None:
        checkpointing = whole > 0.8 * available_memory_bytes()
    segments = 1 if checkpointing else max_segments
    check_fits(16 * model_cfg.parameter_count() + segments * model_cfg.n_layer * model_cfg.step_bytes(batch),
               f"training this model at --batch {batch} over {max_segments} segments (weights, gradients, AdamW "
               "state, activations" + (", one segment at a time)" if checkpointing else ")"))
    cfg = TrainConfig(steps=steps, batch=batch, lr=lr, beta_lr=beta_lr, min_segments=min_segments,
                      max_segments=max_segments, answer_weight=answer_weight,
                      memory_only_start=memory_only[0], memory_only=memory_only[1], boundary=boundary, dilute=dilute,
                      dilute_tokens=tuple(dilute_tokens), dilute_segments=dilute_segments,
                      dilute_old_memory=dilute_old_memory, dilute_late=dilute_late, seed=seed,
                      max_minutes=max_minutes,
                      filler="prose" if haystack_files else "varied",
                      haystack_files=tuple(str(f) for f in haystack_files),
                      autocast=None if autocast == "off" else autocast, checkpointing=checkpointing,
                      distill=distill)

    if init_adapter is not None and (init_from is None or trainable == "all"):
        raise BadInputError("--init-adapter needs --init (the adapter's base) and a --trainable set other than all")
    # the base's copy, before any adapter is added (and after the refusals that cost nothing)
    teacher = _teacher(model, init_from, max_segments, cfg.autocast) if distill else None
    base_ident = {"weights_sha256": weights_digest(model), "config_digest": model.config.digest()}
    lt.prepare(model, lt.LMTrainConfig(trainable=trainable, lora_rank=lora_rank, seed=seed))
    if init_adapter is not None:
        from ...models.adapter import adapter_digest, continue_adapter

        continue_adapter(model, init_adapter, trainable, base_ident["weights_sha256"])

    def on_log(e):
        flat = [g for layer in e["gates"] for g in layer]
        gates = (" ".join(f"{g:.2f}" for g in flat) if len(flat) <= 16    # a big model: its spread, not 270 numbers
                 else f"mean {sum(flat) / len(flat):.3f} max {max(flat):.3f}")
        msg = (f"step {e['step']}: loss {e['loss']:.3f}, answer loss {e['answer_loss']:.3f}, "
               f"retrieval acc {e['answer_accuracy']:.2f}, "
               + (f"distill {e['distill']:.3f}, " if "distill" in e else "")
               + f"{e['segments']} seg, gates {gates}, "
               f"|z| max {e['norm_max']:.1f}, {e['seconds']:.0f}s")
        if progress:
            from tqdm import tqdm
            tqdm.write(msg)
        else:
            click.echo(msg)

    # OUT_DIR is checked (and locked) before training: a bad path fails now, not after an hour
    with atomic_folder(out_dir, force, owned_checkpoint, "checkpoint") as tmp:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        with stop_requests() as stop:   # a signal now stops training after its step; what it learned is saved
            result = run_training(model, cfg, device=device, progress=progress, on_log=on_log, tokenizer=tokenizer,
                                  stop=stop, teacher=teacher)
        model = model.float().cpu()
        if trainable != "all":
            from ...models.adapter import base_options, save_adapter

            info = {"steps": result.steps_done, "base_model": str(init_from), "convert": base_options(model)}
            if init_adapter is not None:
                info["continued_from"] = {"adapter": str(init_adapter), "sha256": adapter_digest(init_adapter)}
            save_adapter(model, trainable, base_ident, tmp, info)
        model = lt.merge_adapters(model)
        for p in model.parameters():
            p.requires_grad_(True)
        write_checkpoint(model, tmp, tokenizer, metadata=getattr(model, "metadata", None))
        command = "infini train passkey " + " ".join(sys.argv[3:])
        write_log(tmp / LOG_FILE, result, cfg, model_cfg,
                  {"device": device, "threads": torch.get_num_threads(), "started": started,
                   "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                   "argv": command})
    last = result.log[-1] if result.log else {}
    if result.stopped == "interrupted":
        click.echo(f"stopped early ({stop.name}): the checkpoint holds the {result.steps_done} of {steps} steps done")
    click.echo(f"trained {result.steps_done} steps in {result.seconds / 60:.1f} min ({result.stopped}); "
               f"last loss {last.get('loss', float('nan')):.3f}, retrieval acc {last.get('answer_accuracy', 0):.2f}; "
               f"checkpoint in {out_dir}")


def _teacher(model, init_from, max_segments: int, autocast):
    """The full-attention teacher of --distill: the --init model (a converted one) as its transformers source."""
    from ...models.train.distill import Teacher

    if init_from is None:
        raise BadInputError("--distill needs --init: a converted model, whose full-attention source is the teacher")
    context = int(getattr(model, "metadata", {}).get("context") or 0)
    if not context:
        raise BadInputError(f"--distill: {init_from} does not record its trained context (convert it again)")
    rows = max_segments * model.config.segment_len
    if rows > context:
        raise BadInputError(f"--distill: rows of up to {rows:,} tokens (--max-segments {max_segments}) exceed the "
                            f"teacher's trained context of {context:,}; lower --max-segments")
    return Teacher(model, context, autocast)
