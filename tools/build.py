"""`infini build`: wiring only; the work is in export/engine.py."""

from __future__ import annotations

from pathlib import Path

import click

from ..paths import check_output_path
from ..runtime.trt_shim import BACKENDS as BUILDERS


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--builder", type=click.Choice(BUILDERS), default="auto", show_default=True,
              help="The TensorRT that builds: auto is tensorrt if installed, else tensorrt-rtx.")
@click.option("--min-n", type=click.IntRange(1, 1 << 20), default=1, show_default=True, help="Shortest segment.")
@click.option("--opt-n", type=click.IntRange(1, 1 << 20), default=None, help="Segment length to tune for [default: N].")
@click.option("--max-n", type=click.IntRange(1, 1 << 20), default=None, help="Longest segment [default: N].")
@click.option("--min-batch", type=click.IntRange(1, 1 << 16), default=1, show_default=True)
@click.option("--opt-batch", type=click.IntRange(1, 1 << 16), default=1, show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 1 << 16), default=8, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Read before and write after the build (faster rebuilds).")
@click.option("--target-cc", multiple=True, help="TensorRT-RTX: a compute capability to target (repeat: 8.9, 12.0).")
@click.option("--plugin", is_flag=True, help="Bind infini::Memory to the TensorRT plugin (full TensorRT only).")
def build(export_dir, builder, min_n, opt_n, max_n, min_batch, opt_batch, max_batch, timing_cache, target_cc,
          plugin):
    """Build a TensorRT engine from each graph of EXPORT_DIR and record it in its infini.json."""
    from ..export.engine import BuildOptions, build_engines

    if timing_cache is not None:
        check_output_path(timing_cache, folder=False, create=False)
        _check_timing_cache(timing_cache, export_dir)
    options = BuildOptions(builder, min_n, opt_n, max_n, min_batch, opt_batch, max_batch, tuple(target_cc), plugin,
                           str(timing_cache) if timing_cache else None)
    record = build_engines(export_dir, options).tensorrt
    click.echo(f"built with {record['flavour']} {record['version']} ({record['precision']}, strongly typed), "
               f"for compute capability {', '.join(record['compute_capabilities'])}")
    if str(record.get("timing_cache", "")).startswith("not used"):
        click.echo(f"--timing-cache {record['timing_cache']}")
    for name, e in record["engines"].items():
        first, shapes = next(iter(e["profiles"][0].items()))
        click.echo(f"  {name}: {export_dir / e['file']} ({e['bytes']:,} bytes, {e['build_s']:.1f} s), profile "
                   f"{first} min {shapes['min']} opt {shapes['opt']} max {shapes['max']}")


def _check_timing_cache(cache: Path, export_dir: Path) -> None:
    """The timing cache is read and rewritten: it must not be one of the export's own files."""
    from ..errors import BadInputError
    from ..export.engine import is_engine_name
    from ..models.manifest import MANIFEST_FILE, load_manifest

    try:
        relative = cache.resolve().relative_to(export_dir.resolve()).as_posix()
    except ValueError:
        return
    if relative == MANIFEST_FILE or relative in load_manifest(export_dir).files or is_engine_name(relative):
        raise BadInputError(f"--timing-cache {cache} is a file of the export folder; give another file")
