"""`infini eval`: quality measurements of a model on text; the computations are in runtime/quality/."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import BadInputError
from ..runtime.open import changed_model, load_model, model_tokenizer, open_stream
from .options import (TEXT_OR_IDS, backend_options, check_outputs, model_change_options, output_options, parse_count,
                      plot_option, seed_option, tokens_option, write_json)


@click.group("eval")
def evaluate():
    """Quality measurements of a model on text."""


@evaluate.command("ppl")
@click.argument("model")
@click.argument("files", nargs=-1, required=True, type=TEXT_OR_IDS)
@tokens_option("4k", "Score the first N tokens of each file.")
@model_change_options()
@click.option("--reference", is_flag=True,
              help="Also score with full attention in transformers, in windows of the model's trained context.")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="The trained context for --reference [default: recorded by `infini convert`].")
@seed_option("Seed when MODEL is a preset.")
@backend_options()
@output_options("perplexities")
@plot_option("A PNG of loss against position in the segment (needs matplotlib).")
def ppl(model, files, count, segment_len, gate, attend_previous, reference, context, seed, backend, device, threads,
        autocast, json_out, force, plot_out):
    """Perplexity of MODEL over FILES, streamed segment by segment; the loss by position in the segment."""
    from ..runtime.inputs import iter_tokens
    from ..runtime.quality import perplexity

    check_outputs(force, {"--json-out": json_out, "--plot": plot_out}, {f"FILE {f}": f for f in files},
                  {"MODEL": Path(model)})
    limit = parse_count(count)
    tokenizer = model_tokenizer(model)
    net = changed_model(model, backend, seed, segment_len, gate, attend_previous)
    stream, backend = open_stream(model, backend, device, threads, seed, autocast, net=net)
    cfg = stream.config
    label = (f"{Path(model).name} ({backend}, segment {cfg.segment_len}"
             + (", previous segment attended" if cfg.attend_previous else "")
             + (f", gate {'closed' if gate == -1e4 else gate})" if gate is not None else ")"))
    results, curves = {}, {}
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
        write_json(json_out, {"model": model, "backend": backend, "runner": label, "config": cfg.to_dict(),
                              "gate": gate, "tokens": limit, "files": results}, force)
    if plot_out:
        perplexity.plot(curves, plot_out, force)


def _reference(model: str, ids, context: int | None) -> dict:
    from ..models.convert.reference import to_transformers
    from ..models.manifest import is_export_dir
    from ..runtime.quality.perplexity import full_attention_nll

    if not (Path(model).is_dir() or is_export_dir(model)):
        raise BadInputError("--reference needs a checkpoint or export folder of a converted model, not a preset")
    net = load_model(model)
    context = context or int(getattr(net, "metadata", {}).get("context") or 0)
    if not context:
        raise BadInputError(f"{model} does not record its trained context (convert it again, or give --context)")
    return full_attention_nll(to_transformers(net, context), ids, context)


def _echo(file: Path, row: dict) -> None:
    for name, r in row.items():
        buckets = ", ".join(f"[{b['from']}, {b['to'] or 'end'}) {b['nll']:.2f}" for b in r["by_position"])
        click.echo(f"{file.name}: {name}: {r['tokens']:,} tokens, ppl {r['ppl']:.2f} (loss {r['nll']:.3f} nats; "
                   f"by position: {buckets}), {r['tokens_per_s']:,.0f} tokens/s")
