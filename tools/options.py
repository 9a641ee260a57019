"""Option types and checks shared by every command: a bad number, name or path is refused by the option
itself, with the valid range or names, before any work starts.

- numbers: :class:`Number` (finite floats in a range: NaN and inf are refused, which click's FloatRange
  lets through), ``SEED``, ``THREADS`` (at most 4 per CPU: huge counts crash the thread pools),
  :class:`Count` (65536, 64k, 1m within a range);
- names: :class:`Device` (cpu, cuda, cuda:N);
- text files: :class:`TextFile` (``TEXT``, ``TEXT_OR_IDS``): UTF-8 text (paths.check_text_file), the same check
  and line for every option that takes one;
- paths: :func:`check_outputs` refuses an output that exists (without ``--force``), that is also an input of
  the same command, or whose folder cannot be written, before the work; results are then written atomically
  (atomic.py).

Options that several commands take are declared once here, alone or as groups a command subscribes to
(Polygraphy's argument groups): :func:`backend_options` (--backend, --device, --threads, --autocast),
:func:`output_options` (--json-out, --force), :func:`model_change_options` (--segment-len, --gate,
--attend-previous), :func:`server_options` (--server, --stream-id), and single options (--seed, --tokens,
--progress, --plot, --precision). The same option has the same name, default and choices in every command:
the table is in docs/cli.md.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import click

from ..errors import BadInputError
from ..limits import max_threads
from ..models.spec import PRECISIONS
from ..paths import TEXT_SCAN, check_output_path, check_text_file
from ..runtime.open import AUTOCAST, BACKENDS

SEED = click.IntRange(0, 2**63 - 1)
THREADS = click.IntRange(1, max_threads())
MAX_TOKENS = 1 << 40


class Number(click.FloatRange):
    """A finite float in a range (click's FloatRange accepts 'nan', which compares false to every bound)."""

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


def parse_count(text: str | None, option: str = "--tokens", limit: int = MAX_TOKENS) -> int | None:
    """'65536', '64k' (x1024), '1m' (x1024^2), '1g' -> int in [1, limit]. ``option`` names the flag in errors."""
    if text is None:
        return None
    text = str(text).strip()
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 15):
        raise BadInputError(f"{option} {text[:30]!r}: expected a count such as 65536, 64k or 1m")
    value = int(digits) * scale
    if value < 1:
        raise BadInputError(f"{option} must be at least 1, got {text}")
    if value > limit:
        raise BadInputError(f"{option} {text}: at most {limit:,} ({limit >> 30:,}g) here")
    return value


def parse_list(text: str, option: str, item=str, example: str = "") -> list:
    """A comma-separated list, each element converted by ``item`` (its ValueError becomes one line naming the
    option and ``example``; its BadInputError passes as it is); empty elements are skipped, an empty list
    refused. The one list parser of the command line (--lengths, --depths, --context, --paths, ...)."""
    values = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            values.append(item(part.strip()))
        except BadInputError:   # (a ValueError too) already names the option
            raise
        except ValueError:
            raise BadInputError(f"{option} {text!r}: expected {example}") from None
    if not values:
        raise BadInputError(f"{option} is empty; expected {example}")
    return values


def parse_counts(text: str, option: str) -> list[int]:
    """Counts such as 4k,32k,1m (see :func:`parse_count`)."""
    return parse_list(text, option, lambda x: parse_count(x, option), "counts such as 4k,32k,1m")


class Device(click.ParamType):
    """cpu, cuda or cuda:N (whether a GPU is there is checked where the device is used)."""
    name = "device"

    def convert(self, value, param, ctx):
        if isinstance(value, str) and re.fullmatch(r"cpu|cuda(:\d{1,2})?", value):
            return value
        self.fail(f"{value!r} is not a device; expected one of: cpu, cuda, cuda:N", param, ctx)


DEVICE = Device()


class Gate(click.ParamType):
    """A gate logit: a finite number, or 'closed' (-1e4: sigmoid is 0 in float32)."""
    name = "gate"

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)) or value == "closed":
            return -1e4 if value == "closed" else float(value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise BadInputError(f"--gate {value!r}: expected a number such as -6, or 'closed'")
        return number


GATE = Gate()


class TextFile(click.ParamType):
    """A file of UTF-8 text (paths.check_text_file), refused with one line naming the option before any work.
    ``whole``: check every byte (a file read at once: a haystack); else the first chunk, as the stream that reads
    the file checks the rest with the same line. ``npy``: a .npy array of token ids is taken too. ``what``: the
    words for it in messages (default: the option's name)."""
    name = "file"

    def __init__(self, whole: bool = False, npy: bool = False, what: str | None = None):
        self.whole, self.npy, self.what = whole, npy, what

    def convert(self, value, param, ctx):
        what = self.what or (param.opts[0] if isinstance(param, click.Option) else "file")
        return check_text_file(Path(value), what, scan=None if self.whole else TEXT_SCAN, npy=self.npy)


TEXT = TextFile(whole=True)              # text read at once (--haystack)
TEXT_OR_IDS = TextFile(npy=True)         # text or a .npy of ids, streamed (--input, --data, eval's FILES)
PROMPT_FILE = TextFile(npy=True, what="prompt file")   # the same, named as generate's messages always named it


def device_option(help_text: str = "cpu or cuda (cuda:N).", default: str = "cpu"):
    return click.option("--device", type=DEVICE, default=default, show_default=True, help=help_text)


def seed_option(help_text: str | None = None):
    return click.option("--seed", type=SEED, default=0, show_default=True, help=help_text)


def threads_option(help_text: str = "Intra-op threads [default: the library's].", default: int | None = None):
    return click.option("--threads", type=THREADS, default=default, show_default=default is not None,
                        help=help_text)


def json_out_option(help_text: str = "Also write the figures as JSON."):
    return click.option("--json-out", type=click.Path(path_type=Path), default=None, help=help_text)


def plot_option(help_text: str = "Also draw a PNG (needs matplotlib: the `plot` extra).", name: str = "plot_out"):
    return click.option("--plot", name, type=click.Path(path_type=Path), default=None, help=help_text,
                        callback=_plot_needs_matplotlib)


def _plot_needs_matplotlib(ctx, param, value):
    """--plot without matplotlib is refused before any work (not after an hour of measuring)."""
    if value is not None:
        from ..runtime.bench.measure import pyplot

        pyplot()
    return value


def progress_option():
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")


def tokens_option(default: str | None = None, help_text: str = "Tokens to stream (65536, 64k, 1m)."):
    return click.option("--tokens", "count", default=default, show_default=default is not None, help=help_text)


def _group(*options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def backend_options(threads_help: str = "Intra-op threads of torch and onnxruntime [default: theirs]."):
    """--backend, --device, --threads, --autocast: where and how MODEL runs (runtime/open.py decides)."""
    return _group(
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="auto: onnxruntime for an export folder (infini.json), torch otherwise; openvino: the "
                          "folder's graphs in OpenVINO on the CPU (docs/openvino.md); tensorrt: the folder's engines "
                          "(`infini build`), on a GPU they run on."),
        device_option(),
        threads_option(threads_help),
        click.option("--autocast", type=click.Choice(AUTOCAST), default="auto", show_default=True,
                     help="torch: bf16 autocast of the weights' matmuls, the state float32. auto: bf16 on a CPU with "
                          "native bf16 (AMX or AVX-512 BF16) for a float32 model at least 256 wide, the fastest CPU "
                          "path measured (docs/cpu.md); off: float32. openvino: bf16 is its bf16 inference precision "
                          "(a CPU with bf16 instructions), auto and off f32."))


def output_options(what: str = "figures"):
    """--json-out and --force (which replaces what --json-out and --plot name)."""
    return _group(json_out_option(f"Also write the {what} as JSON."),
                  force_option("Replace the --json-out (and --plot) files if they exist."))


def model_change_options():
    """--segment-len, --gate, --attend-previous/--segment-local: the same weights run another way (checkpoints and presets)."""
    return _group(
        click.option("--segment-len", type=click.IntRange(1, 1 << 20), default=None,
                     help="Run with this segment length instead of the model's (torch)."),
        click.option("--gate", type=GATE, default=None,
                     help="Set every gate logit beta to this number, or 'closed' (torch)."),
        click.option("--attend-previous/--segment-local", "attend_previous", default=None,
                     help="Run the local attention over the previous segment's keys and values too, or over the "
                          "segment alone (config attend_previous; docs/conversion.md)  [default: the model's; an "
                          "export's graphs are fixed]"))


def server_options(stream_help: str = "With --server: the stream to continue (default: a new one)."):
    """--server and --stream-id: run on a stream a Triton server holds (`infini serve`)."""
    return _group(
        click.option("--server", default=None, help="Run on the model a Triton server serves (`infini serve`), at "
                     "this HTTP address (host:port); MODEL then gives only the tokenizer (the export the server "
                     "runs)."),
        click.option("--stream-id", type=click.IntRange(1, 2**63 - 1), default=None,
                     help=stream_help))


def check_server_options(server, local: tuple[str, ...], remote: tuple[str, ...]) -> None:
    """With --server the server's model runs: the ``local`` runner's options given on the command line are
    refused, as are the ``remote`` stream's options without --server (before anything is read or sent)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    params = {p.name: p for p in ctx.command.params}

    def given(names):
        return ["/".join(params[n].opts + params[n].secondary_opts) for n in names
                if ctx.get_parameter_source(n) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]

    if server is not None and given(local):
        raise BadInputError(f"{', '.join(given(local))} cannot go with --server: the server's model runs, with the "
                            "server's settings (`infini serve`)")
    if server is None and given(remote):
        raise BadInputError(f"{', '.join(given(remote))} needs --server (a stream on a Triton server)")


def precision_option(help_text: str = "Precision of the export when MODEL is not an export folder."):
    return click.option("--precision", type=click.Choice(list(PRECISIONS)), default="fp32", show_default=True,
                        help=help_text)


def write_json(path, result: dict, force: bool = False) -> None:
    """Write a command's figures as JSON (atomically), with the CPU they were measured on (its model name and
    flags: runtime/bench/measure.cpu_info) unless the result names it already: a figure without its machine
    cannot be compared."""
    import json

    from ..atomic import write_text
    from ..runtime.bench.measure import cpu_info

    write_text(path, json.dumps({**result, "cpu": result.get("cpu") or cpu_info()}, indent=2) + "\n", force=force)


def force_option(help_text: str = "Replace the output files if they exist."):
    return click.option("--force", is_flag=True, help=help_text)


def check_outputs(force: bool, outputs: dict[str, Path | None], inputs: dict[str, Path | None] = {},
                  folders: dict[str, Path | None] = {}) -> None:
    """Before the work: every output can be written, exists only with ``force`` (and then only as a regular
    file), is none of the inputs nor another output, and lies in none of the input ``folders`` (a model or
    export folder: a report must never overwrite the model it ran). Each output is then locked for the rest
    of the command (a second command writing it fails at once). ``outputs``/``inputs``/``folders``: option
    name -> path (None: not given)."""
    from ..atomic import check_file_replaceable, output_lock

    given = {k: Path(v) for k, v in outputs.items() if v is not None}
    for option, path in given.items():
        check_output_path(path, folder=False, create=False)
        try:
            check_file_replaceable(path, force)
        except BadInputError as e:
            raise BadInputError(f"{option} {e}") from None
        for name, folder in folders.items():
            if folder is not None and Path(folder).is_dir() and _inside(path, Path(folder)):
                raise BadInputError(f"{option} {path} is inside {name} {folder}; write it elsewhere (an output "
                                    "must never change the model it runs)")
    seen: dict[str, str] = {}
    for option, path in [*((k, Path(v)) for k, v in inputs.items() if v is not None), *given.items()]:
        key = _identity(path)
        if key in seen:
            raise BadInputError(f"{option} {path} is also the {seen[key]} of this command; choose another file")
        seen[key] = option
    ctx = click.get_current_context(silent=True)
    for path in given.values():
        if ctx is not None and path.parent.is_dir():
            ctx.with_resource(output_lock(path))


def _inside(path: Path, folder: Path) -> bool:
    try:
        resolved, root = path.resolve(), folder.resolve()
    except (RuntimeError, OSError):
        return False
    return root in resolved.parents


def _identity(path: Path) -> str:
    try:
        st = path.stat()
        return f"inode:{st.st_dev}:{st.st_ino}"
    except OSError:
        try:
            return f"path:{path.resolve()}"
        except RuntimeError:   # a symlink loop
            return f"path:{path.absolute()}"
