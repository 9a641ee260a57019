"""`infini verify`: the same tokens through torch and every exported backend available here; drift per segment.
The comparison is runtime/quality/compare.py."""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.open import exported_runners, load_export, model_tokenizer
from .options import TEXT_OR_IDS, check_outputs, output_options, seed_option, threads_option, write_json


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--segments", type=click.IntRange(1, 10**9), default=16, show_default=True)
@click.option("--batch", type=click.IntRange(1, 1 << 16), default=1, show_default=True)
@seed_option("Seed of the random tokens.")
@click.option("--text", "text_file", type=TEXT_OR_IDS, default=None,
              help="Stream this text (the export's tokenizer) instead of random ids [default for a model with its "
                   "own vocabulary: the validation text export/data/validation.txt].")
@click.option("--every", type=click.IntRange(min=1), default=None,
              help="Print every k-th segment (and the last) [default: about 20 rows].")
@threads_option("Threads of every backend [default: theirs].")
@output_options("figures of every segment")
def verify(export_dir, segments, batch, seed, text_file, every, threads, json_out, force):
    """Stream the same tokens through torch and every available exported backend; report drift. Random ids, or
    text for a model with its own vocabulary (where a quantized model's top-1 agreement means something)."""
    import torch

    from ..runtime.quality.compare import TOLERANCES, agreement, check_tolerance, drift, format_table, summary_rows, worst
    from ..runtime.torch_runner import TorchRunner

    check_outputs(force, {"--json-out": json_out}, folders={"EXPORT_DIR": export_dir})
    if threads:
        torch.set_num_threads(threads)
    from ..export.exporter import precision_model

    manifest, model = load_export(export_dir)
    runners = exported_runners(export_dir, threads)
    text, source = _verify_text(export_dir, text_file)
    low = precision_model(model, manifest.precision)   # torch in the export's precision, for its tolerance
    with TorchRunner(model) as reference:
        for r in runners.values():
            r.activate()
        try:
            rows = drift(reference, runners, segments, batch, seed,
                         precision=TorchRunner(low).activate() if low else None, text=text)
        finally:
            for r in runners.values():
                r.deactivate()
    tolerance = TOLERANCES[manifest.precision]
    click.echo(f"{export_dir}: {manifest.precision}, {segments} segments of up to {manifest.config.segment_len} "
               f"tokens (last partial), batch {batch}, {source}; differences against torch fp32")
    for name, backend_rows in rows.items():
        click.echo(format_table(name, summary_rows(backend_rows, every)))
    if json_out:
        write_json(json_out, {
            "export_dir": str(export_dir), "precision": manifest.precision, "segments": segments, "batch": batch,
            "seed": seed, "tokens": source, "tolerance": tolerance.__dict__,
            "backends": {n: {"worst": worst(r), "rows": r} for n, r in rows.items()}}, force)
    for name, backend_rows in rows.items():
        check_tolerance(name, backend_rows, tolerance)
    if tolerance.cosine_min is not None:
        figures = "; ".join(f"{n}: logits cosine {a['logits_cosine']:.4f}, top-1 {a['top1_agreement']:.1%}"
                            for n, a in ((n, agreement(r)) for n, r in rows.items()))
        click.echo(f"all within the {manifest.precision} tolerance (over every position: mean logits cosine >= "
                   f"{tolerance.cosine_min:g}, top-1 agreement >= {tolerance.top1_min:.0%}; state "
                   f"{tolerance.state_rel:g} relative): {figures}")
        return
    extra = " or 4 x torch's own error in this precision" if low else ""
    click.echo(f"all within the {manifest.precision} tolerance (logits {tolerance.logits_rel:g} x max(1, |logits|)"
               f"{extra}; state {tolerance.state_rel:g} relative{extra})")


def _verify_text(export_dir: Path, text_file: Path | None):
    """(ids or None, what they are): --text, else the validation text for a model with its own vocabulary."""
    import numpy as np
    import torch

    from ..export.exporter import VALIDATION_TEXT, validation_text
    tokenizer = model_tokenizer(str(export_dir))
    if text_file is None:
        ids = validation_text(tokenizer)
        return ids, (f"export/data/{VALIDATION_TEXT}" if ids is not None else "random ids")
    from ..runtime.inputs import iter_tokens

    ids = torch.from_numpy(np.concatenate(list(iter_tokens(text_file, tokenizer=tokenizer))))
    return ids, f"{text_file} ({len(ids):,} ids)"
