"""`infini bench generate`: what a generated token costs at each place in its segment, prefill and generation
tokens/s, and the bytes a stream carries; for segment-local and attend_previous models alike."""

from __future__ import annotations

import re
from pathlib import Path

import click

from ...export.cache import scratch
from ..options import backend_options, check_outputs, model_change_options, output_options, seed_option, write_json
from . import export_to


@click.command("generate")
@click.argument("model", required=False)
@click.option("--positions", default="1,N-1", show_default=True,
              help="Places in the segment to time a decode step at (tokens already in it; N: the segment length).")
@click.option("--repeat", type=click.IntRange(1, 10000), default=20, show_default=True,
              help="Timed calls per position (the median is reported).")
@click.option("--new-tokens", type=click.IntRange(1, 1 << 20), default=None,
              help="Tokens generated after the prefill [default: 2N, two folds or commits].")
@backend_options()
@model_change_options()
@seed_option()
@output_options()
def bench_generate(model, positions, repeat, new_tokens, backend, device, threads, autocast, segment_len, gate,
                   attend_previous, seed, json_out, force):
    """Decode-step cost at in-segment positions (and, beside it, rerunning the unfinished segment through the
    segment step, the retired way to generate without a decode step), prefill and generation tokens/s, and the
    state bytes, on MODEL: preset, checkpoint or export folder; default the bundled passkey model."""
    import numpy as np
    import torch

    from ...errors import BadInputError
    from ...models.checkpoint import PASSKEY_MODEL as BUNDLED
    from ...models.manifest import is_export_dir
    from ...runtime.bench.generate import position_costs, prefill_and_generate
    from ...runtime.bench.measure import machine
    from ...runtime.open import changed_model, open_stream
    from ...runtime.stream import Stream

    model = model or str(BUNDLED)
    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    net = changed_model(model, backend, seed, segment_len, gate, attend_previous)
    with scratch() as tmp:
        source = model
        if backend == "onnxruntime" and not is_export_dir(model):   # a checkpoint or preset: exported here first
            source = str(export_to(model, Path(tmp) / "export", "fp32", seed))
        stream, backend_name = open_stream(source, backend, device, threads, seed, autocast, net=net)
        runners = dict(runner=stream.runner, decode_runner=stream.decode_runner, chunk_runner=stream.chunk_runner)
        make = lambda: Stream(**runners)  # noqa: E731  (more streams over the same runners)
        cfg = stream.config
        N = cfg.segment_len
        try:
            places = sorted({_place(p.strip(), N) for p in positions.split(",")})
        except ValueError:
            raise BadInputError(f"--positions {positions!r}: expected places separated by commas, e.g. 1,N-1") from None
        if not places or places[0] < 0 or places[-1] > N - 1:
            raise BadInputError(f"--positions {positions!r}: every place must be in [0, N-1] = [0, {N - 1}]")
        if stream.decode_runner is None:
            raise BadInputError(f"{model} has no decode step on {backend_name}; export it again (`infini export`)")
        new_tokens = new_tokens or 2 * N
        prefill = 2 * N + 3   # two committed segments (an attend_previous past at its steady length) and a part
        ids = torch.from_numpy(np.random.default_rng(seed).integers(0, min(256, cfg.vocab_size),
                                                                    (1, prefill + 1), dtype=np.int64))
        stream.feed(ids[:, :2 * N], keep="none")
        rows = position_costs(stream, ids, places, repeat)
        for row in rows:
            click.echo(f"position {row['position']:>5}: decode step {row['decode_ms']:8.2f} ms "
                       f"({row['decode_tokens_per_s']:7.1f} tokens/s); rerunning the unfinished segment "
                       f"{row['rerun_ms']:8.2f} ms ({row['rerun_tokens_per_s']:7.1f} tokens/s)")
        whole = prefill_and_generate(make, ids, prefill, new_tokens)
        click.echo(f"prefill {whole['prefill_tokens_per_s']:,.0f} tokens/s; {whole['new_tokens']} tokens generated "
                   f"at {whole['generate_tokens_per_s']:.1f} tokens/s; state {whole['state_bytes']:,} bytes "
                   f"(+ decode cache {whole['decode_cache_bytes']:,})")
    result = {"model": model, "backend": backend_name, "threads": torch.get_num_threads(), "machine": machine(),
              "torch": torch.__version__, "segment_len": N, "attend_previous": cfg.attend_previous,
              "autocast": autocast, "positions": rows, **whole}
    if json_out:
        write_json(json_out, result, force)


def _place(text: str, N: int) -> int:
    """A place in the segment: a number, or N-k (N the segment length)."""
    match = re.fullmatch(r"N-(\d+)", text)
    return N - int(match.group(1)) if match else int(text)
