"""`infini eval ppl`: wiring only; the computation is runtime/perplexity.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import click

from ..errors import BadInputError
from .init_run import make_runner, model_tokenizer, parse_count
from .options import TEXT_OR_IDS, plot_option


@click.group("eval")
def evaluate():
    """Quality measurements of a model on text."""


@evaluate.command("ppl")
@click.argument("model")
@click.argument("files", nargs=-1, required=True, type=TEXT_OR_IDS)
@click.option("--tokens", "limit", default="4k", show_default=True, help="Score the first N tokens of each file.")
@click.option("--backend", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
              help="auto: onnxruntime for an export folder, torch otherwise.")
@click.option("--segment-len", type=click.IntRange(min=1), default=None,
              help="Torch only: stream with this segment length instead of the checkpoint's.")
@click.option("--gate", default=None, help="Torch only: set every gate logit beta to this ('closed': shut).")
@click.option("--attend-previous", is_flag=True,
              help="Rebuild a checkpoint so that the local attention also sees the previous segment's keys "
                   "and values (config attend_previous; docs/training.md). An export of such a model (`infini "
                   "convert --attend-previous`, then `infini export`) needs no flag.")
@click.option("--reference", is_flag=True,
              help="Also score with full attention in transformers, in windows of the model's trained context.")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="The trained context for --reference [default: recorded by `infini convert`].")
@click.option("--threads", type=int, default=None)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
@plot_option("A PNG of loss against position in the segment (needs matplotlib).", "plot_path")
def ppl(model, files, limit, backend, segment_len, gate, attend_previous, reference, context, threads, json_out,
        plot_path):
    """Perplexity of MODEL over FILES, streamed segment by segment; the loss by position in the segment."""
    import torch

    from ..runtime import perplexity
    from ..runtime.inputs import iter_tokens
    from ..runtime.past_stream import PastStream
    from ..runtime.stream import Stream

    if threads:
        torch.set_num_threads(threads)
    limit = parse_count(limit)
    tokenizer = model_tokenizer(model)
    runner, backend = _runner(model, backend, segment_len, gate, threads, attend_previous)
    label = (f"{Path(model).name} ({backend}, segment {runner.config.segment_len}"
             + (", previous segment attended" if runner.config.attend_previous else "")
             + (f", gate {gate})" if gate else ")"))
    results, curves = {}, {}
    with contextlib.ExitStack() as stack:
        if isinstance(runner, PastStream):
            stream = runner
        else:
            stack.enter_context(runner)
            stream = Stream(runner)
        for file in files:
            ids = perplexity.read_tokens(iter_tokens(file, tokenizer=tokenizer), limit)
            if len(ids) < 2:
                raise BadInputError(f"{file} has fewer than 2 tokens; nothing to score")
            row = {"infini": perplexity.stream_nll(stream, ids)}
            curves[f"{file.name}: {label}"] = row["infini"]
            if reference:
                row["full_attention"] = _reference(model, ids, context)
                curves[f"{file.name}: full attention"] = row["full_attention"]
            results[str(file)] = row
            _echo(file, row)
    if json_out:
        json_out.write_text(json.dumps({"model": model, "backend": backend, "config": runner.config.to_dict(),
                                        "gate": gate, "tokens": limit, "files": results}, indent=1) + "\n")
    if plot_path and not perplexity.plot(curves, plot_path):
        click.echo("no plot: matplotlib is not installed (pip install 'infini-deploy[plot]')", err=True)


def _runner(model: str, backend: str, segment_len: int | None, gate: str | None, threads: int | None,
            attend_previous: bool = False):
    """The segment runner; --segment-len, --gate and --attend-previous rebuild the torch model with them
    (checkpoints only). A model that attends to the previous segment streams through a PastStream instead."""
    from ..runtime.past_stream import PastStream

    if segment_len is None and gate is None and not attend_previous:
        from ..models.manifest import is_export_dir
        from ..models.checkpoint import resolve_model

        if backend != "onnxruntime" and not is_export_dir(model):
            net = resolve_model(model)
            if net.config.attend_previous:
                return PastStream(net), "torch"
        runner, backend = make_runner(model, backend, "cpu", threads, 0)
        return (PastStream(runner) if runner.config.attend_previous else runner), backend
    from ..models.manifest import is_export_dir
    from ..models.checkpoint import resolve_model
    from ..models.model import with_config
    from ..runtime.torch_runner import TorchRunner

    if backend == "onnxruntime" or is_export_dir(model):
        raise BadInputError("--segment-len, --gate and --attend-previous change the model: give a checkpoint "
                            "(torch), not an export")
    net = resolve_model(model)
    net = with_config(net, segment_len=segment_len or net.config.segment_len,
                      attend_previous=attend_previous or net.config.attend_previous)
    if gate is not None:
        value = -1e4 if gate == "closed" else _float(gate)
        for layer in net.layers:
            layer.self_attn.beta.data.fill_(value)
    return (PastStream(net) if net.config.attend_previous else TorchRunner(net)), "torch"


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise BadInputError(f"--gate {text!r}: expected a number such as -6, or 'closed'") from None


def _reference(model: str, ids, context: int | None) -> dict:
    from ..models.manifest import is_export_dir
    from ..models.checkpoint import load_checkpoint
    from ..models.convert.llama import to_transformers
    from ..runtime.perplexity import full_attention_nll

    folder = Path(model) / "checkpoint" if is_export_dir(model) else Path(model)
    if not folder.is_dir():
        raise BadInputError("--reference needs a checkpoint or export folder of a converted model, not a preset")
    net = load_checkpoint(folder)
    context = context or int(getattr(net, "metadata", {}).get("context") or 0)
    if not context:
        raise BadInputError(f"{model} does not record its trained context (convert it again, or give --context)")
    return full_attention_nll(to_transformers(net, context), ids, context)


def _echo(file: Path, row: dict) -> None:
    for name, r in row.items():
        buckets = ", ".join(f"[{b['from']}, {b['to'] or 'end'}) {b['nll']:.2f}" for b in r["by_position"])
        click.echo(f"{file.name}: {name}: {r['tokens']:,} tokens, ppl {r['ppl']:.2f} (loss {r['nll']:.3f} nats; "
                   f"by position: {buckets}), {r['tokens_per_s']:,.0f} tokens/s")
