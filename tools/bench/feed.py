"""`infini bench feed`: tokens/s of feeding a stream in small pieces, with the segment step and with the chunk step."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ...export.cache import scratch
from ..options import (check_outputs, output_options, parse_count, seed_option, tokens_option, write_json)
from ..options import backend_options
from . import export_to


@click.command("feed")
@click.argument("model", required=False)
@click.option("--pieces", default="1,16,128,N", show_default=True,
              help="Piece sizes in tokens (N: the model's segment length).")
@tokens_option("2k", "Tokens fed at each piece size.")
@backend_options()
@seed_option()
@output_options()
def bench_feed(model, pieces, count, backend, device, threads, autocast, seed, json_out, force):
    """Tokens/s of feeding a stream in small pieces, with the segment step only (each piece recomputes its
    unfinished segment) and with the chunk step (each piece costs its own tokens). MODEL: preset, checkpoint
    or export folder; default the bundled passkey model."""
    import torch

    from ...errors import BadInputError
    from ...models.checkpoint import PASSKEY_MODEL as BUNDLED
    from ...models.manifest import is_export_dir
    from ...runtime.bench.feed import feed_throughput
    from ...runtime.open import open_runner
    from ...runtime.stream import Stream

    model = model or str(BUNDLED)
    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    tokens = parse_count(count)
    with scratch() as tmp:
        source = model
        # a checkpoint or preset on a backend that runs exports: exported here first
        if backend in ("onnxruntime", "openvino") and not is_export_dir(model):
            source = str(export_to(model, Path(tmp) / "export", "fp32", seed))
        runner, backend = open_runner(source, backend, "segment", device, threads, seed, autocast)
        chunk, _ = open_runner(source, backend, "chunk", device, threads, seed, autocast, getattr(runner, "model", None))
        N = runner.config.segment_len
        try:
            sizes = [N if p.strip() == "N" else int(p) for p in pieces.split(",")]
        except ValueError:
            raise BadInputError(f"--pieces {pieces!r}: expected sizes in tokens separated by commas, e.g. 1,16,128,N")
        sizes = list(dict.fromkeys(sizes))       # "128,N" with N = 128 measures once
        if not sizes or min(sizes) < 1:
            raise BadInputError(f"--pieces {pieces!r}: every size must be at least 1")
        ids = torch.from_numpy(np.random.default_rng(seed).integers(0, min(256, runner.config.vocab_size),
                                                                    (1, tokens), dtype=np.int64))
        rows = []
        for size in sizes:
            for step, make in (("segment", lambda: Stream(runner)), ("chunk", lambda: Stream(runner, chunk_runner=chunk))):
                row = feed_throughput(make, ids, size)
                row["step"] = step
                rows.append(row)
                click.echo(f"pieces of {size:>5}: {row['tokens_per_s']:>9,.0f} tokens/s with the {step} step "
                           f"(last logits vs teacher-forced {row['logits_max_abs_vs_teacher_forced']:.1e})")
    result = {"model": model, "backend": backend, "threads": torch.get_num_threads(), "segment_len": N, "rows": rows}
    if json_out:
        write_json(json_out, result, force)
