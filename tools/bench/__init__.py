"""`infini bench`: measurements that compare backends, one file per benchmark; figures go to stdout and JSON,
never asserts. The measurements themselves are in runtime/bench/."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def bench():
    """Benchmarks (ratios measured within one run on this machine)."""


def export_to(model: str, out: Path, precision: str, seed: int) -> Path:
    from ...export.exporter import export_model
    from ...runtime.open import load_model

    export_model(load_model(model, seed), out, precision)
    return out


from .cpu import bench_cpu  # noqa: E402  (the commands import export_to from here)
from .decode import bench_decode  # noqa: E402
from .feed import bench_feed  # noqa: E402
from .generate import bench_generate  # noqa: E402
from .long import bench_long  # noqa: E402
from .memory import bench_memory  # noqa: E402
from .openai import bench_openai  # noqa: E402
from .runners import bench_runners  # noqa: E402
from .serve import bench_serve  # noqa: E402

for command in (bench_runners, bench_long, bench_feed, bench_generate, bench_memory, bench_serve, bench_cpu,
                bench_decode, bench_openai):
    bench.add_command(command)
