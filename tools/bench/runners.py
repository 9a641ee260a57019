"""`infini bench runners`: tokens/s of torch and onnxruntime on the same model, threads and input."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ...paths import check_output_path
from ...export.cache import scratch
from ..options import (check_outputs, output_options, parse_count, precision_option, seed_option, threads_option,
                       tokens_option, write_json)
from . import export_to


@click.command("runners")
@click.argument("model", default="tiny")
@tokens_option("16k", "Tokens per stream (16k, 1m).")
@click.option("--batch", type=click.IntRange(1, 1 << 16), default=1, show_default=True)
@threads_option("torch and onnxruntime intra-op threads [default: theirs].")
@precision_option()
@click.option("--repeat", type=click.IntRange(1, 1000), default=3, show_default=True)
@seed_option()
@click.option("--profile", "profile_prefix", default=None,
              help="Also profile onnxruntime per op (its profiler's JSON goes to PREFIX*.json).")
@output_options()
def bench_runners(model, count, batch, threads, precision, repeat, seed, profile_prefix, json_out, force):
    """Tokens/s of torch (eager, fp32) and onnxruntime (CPU) on MODEL: preset, checkpoint or export folder."""
    import torch

    from ...models.manifest import is_export_dir
    from ...runtime.bench.speed import compare_throughput

    from ...limits import check_fits

    check_outputs(force, {"--json-out": json_out}, folders={"MODEL": Path(model)})
    if profile_prefix:
        check_output_path(Path(profile_prefix), folder=False, create=False)
    if threads:
        torch.set_num_threads(threads)
    count = parse_count(count)
    check_fits(batch * count * 8, f"--batch {batch} x --tokens {count:,} of token ids")
    tokens = np.random.default_rng(seed).integers(0, 256, (batch, count), dtype=np.int64)
    with scratch() as tmp:
        export_dir = Path(model) if is_export_dir(model) else export_to(model, Path(tmp) / "export", precision, seed)
        result = _measure(export_dir, tokens, threads, repeat, compare_throughput)
        if profile_prefix:
            result["onnxruntime_profile"] = _profile(export_dir, tokens, threads, profile_prefix)
    result.update(model=model, tokens=int(tokens.size), batch=batch, threads=torch.get_num_threads(), repeat=repeat)
    for name in ("torch", "onnxruntime"):
        r = result["runners"][name]
        click.echo(f"{name:>12}: {r['tokens_per_s']:>10,.0f} tokens/s (best of {repeat}; median "
                   f"{r['tokens_per_s_median']:,.0f})")
    click.echo(f"onnxruntime / torch: {result['ratio']:.2f}x ({result['precision']} export, {result['threads']} threads, "
               f"{result['tokens']:,} tokens)")
    if json_out:
        write_json(json_out, result, force)


def _profile(export_dir: Path, tokens, threads: int, prefix: str) -> dict:
    from ...runtime.bench.speed import profile_onnxruntime

    profile = profile_onnxruntime(export_dir, tokens, threads, prefix)
    top = ", ".join(f"{op} {ms:.0f} ms" for op, ms in list(profile["by_op_type"].items())[:6])
    click.echo(f"onnxruntime per op type ({profile['total_ms']:.0f} ms of kernels): {top}")
    return profile


def _measure(export_dir: Path, tokens, threads: int, repeat: int, compare) -> dict:
    from ...runtime.ort_runner import OrtRunner
    from ...runtime.torch_runner import TorchRunner
    from ...runtime.open import load_export

    manifest, model = load_export(export_dir)
    runners = {"torch": TorchRunner(model), "onnxruntime": OrtRunner(export_dir, "cpu", threads)}
    try:
        figures = compare(runners, tokens, repeat)
    finally:
        for r in runners.values():
            r.deactivate()
    return {"runners": figures, "precision": manifest.precision, "config": manifest.config.to_dict(),
            "ratio": figures["onnxruntime"]["tokens_per_s"] / figures["torch"]["tokens_per_s"]}
