"""A checkpoint's own tokenizer: ``tokenizer.json`` (the Hugging Face `tokenizers` format) with its
special tokens and chat template in ``tokenizer_config.json``.

The interface is the byte tokenizer's (models/tokenizer.py). Choices, where transformers is the reference:

- Chat templates render with jinja2 the way transformers' ``apply_chat_template`` does (a sandboxed
  environment with trim_blocks and lstrip_blocks, ``raise_exception``, ``tojson``, ``strftime_now``,
  the special tokens as variables), so transformers is not needed at run time; a test checks both
  give the same text. The rendered text is encoded without adding special tokens (the template
  writes them), as transformers does.
- ``start_ids`` are the ids the tokenizer's post-processor puts before a text (Llama's BOS), added
  once at the start of a stream, never at every chunk.
- ``stop_ids``: the EOS token, and ``stop_ids`` of tokenizer_config.json when conversion found more
  (a generation_config.json's eos_token_id list, e.g. Llama 3's <|eot_id|>).
- A long file is encoded in windows (:meth:`HFTokenizer.encode_stream`) so that it streams in bounded
  memory and gives the ids of encoding the whole text at once (tested).
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..errors import BadInputError, IncompatibleArtifactError, InfiniError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
HOLD_BACK = 1024    # characters at the end of a window not committed yet: a pre-token may still grow there
LOOK_BEHIND = 64    # committed characters re-encoded before the rest: where a "prepend" normaliser acts
WINDOW = 1 << 16    # characters encoded at a time, about


class HFDecoder:
    """Incremental detokenizer (tokenizers.decoders.DecodeStream): text as soon as it is complete."""

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tok, self._stream = tokenizer, DecodeStream(skip_special_tokens=True)

    def step(self, token: int) -> str:
        return self._stream.step(self._tok, int(token)) or ""

    def end(self) -> str:
        return ""


class HFTokenizer:
    """tokenizer.json + special tokens + chat template. Build with :meth:`load` or :meth:`from_parts`."""

    kind = "tokenizer.json"

    def __init__(self, json_text: str, config: dict):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_str(json_text)
        except Exception as e:   # tokenizers raises a bare Exception for malformed files
            raise IncompatibleArtifactError(f"{TOKENIZER_FILE} is not a valid tokenizers file ({str(e)[:200]})") from None
        self._json_text, self.config = json_text, dict(config)
        self.special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
        self.chat_template = config.get("chat_template")
        self.template_file = config.get("chat_template_file")   # where it was read, for messages
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.start_ids = tuple(self._leading_special_ids())
        eos = self.token_id(self.special["eos_token"])
        self.stop_ids = tuple(dict.fromkeys([*([eos] if eos is not None else []), *config.get("stop_ids", [])]))

    # -- files --------------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: str | os.PathLike) -> "HFTokenizer":
        """From a folder with tokenizer.json and (optionally) tokenizer_config.json / chat_template.jinja."""
        folder = Path(folder)
        config = read_tokenizer_config(folder)
        try:
            text = (folder / TOKENIZER_FILE).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise IncompatibleArtifactError(f"{folder / TOKENIZER_FILE} cannot be read ({e})") from None
        return cls(text, config)

    def save(self, folder: Path) -> list[str]:
        """Write tokenizer.json (the text it was read from, byte for byte) and tokenizer_config.json."""
        (Path(folder) / TOKENIZER_FILE).write_text(self._json_text, encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast",
                  **{k: v for k, v in self.special.items() if v is not None},
                  **({"chat_template": self.chat_template} if self.chat_template else {}),
                  **({"stop_ids": list(self.stop_ids)} if self.stop_ids else {})}
        (Path(folder) / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                     encoding="utf-8")
        return [TOKENIZER_FILE, TOKENIZER_CONFIG]

    def check_vocabulary(self, vocab_size: int, where: str) -> None:
        """BadInputError if the tokenizer has ids the model's embedding does not."""
        if self.vocab_size > vocab_size:
            raise BadInputError(f"{where}: {TOKENIZER_FILE} has ids up to {self.vocab_size - 1} but the model's "
                                f"vocabulary has {vocab_size} ids; the tokenizer does not belong to this model")
        for name, text in self.special.items():
            if text is not None and self.token_id(text) is None:
                raise BadInputError(f"{where}: {name} {text!r} is not a token of {TOKENIZER_FILE}")

    # -- text <-> ids -------------------------------------------------------------------------------
    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    def encode(self, text: str | bytes) -> np.ndarray:
        """Text -> int64 ids, no special tokens added (start_ids are the stream's, chat() writes its own)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def decoder(self) -> HFDecoder:
        return HFDecoder(self._tok)

    def encode_stream(self, chunks: Iterable[bytes]) -> Iterator[np.ndarray]:
        """UTF-8 byte chunks (already checked) -> ids, the same as encoding their whole text at once.

        Windows of about WINDOW characters; the last HOLD_BACK characters of a window wait for the next
        one (a word may go on there), and LOOK_BEHIND committed characters are encoded again in front
        of them, then dropped, so the cut is encoded in context. Memory: one window, whatever the file.
        """
        import codecs

        utf8 = codecs.getincrementaldecoder("utf-8")(errors="strict")
        text, start = "", 0                       # text[start:] is not committed yet
        for data in chunks:
            text += utf8.decode(data)
            if len(text) - start >= WINDOW:
                ids, cut = self._commit(text, start, final=False)
                yield ids
                keep = max(0, cut - LOOK_BEHIND)
                text, start = text[keep:], cut - keep
        text += utf8.decode(b"", final=True)
        if len(text) > start:
            yield self._commit(text, start, final=True)[0]

    def _commit(self, text: str, start: int, final: bool) -> tuple[np.ndarray, int]:
        """(ids of the tokens from text[start] on that end before the hold-back, where the next one starts)."""
        enc = self._tok.encode(text, add_special_tokens=False)
        limit = len(text) if final else len(text) - HOLD_BACK
        ids, cut = [], len(text)
        for token, (lo, hi) in zip(enc.ids, enc.offsets):
            if lo < start:
                if hi > start:
                    raise InfiniError("tokenizer.json does not cut this text at a stable place; stream it as a "
                                      ".npy file of token ids instead")
                continue
            if hi > limit:
                cut = lo
                break
            ids.append(token)
        return np.asarray(ids, dtype=np.int64), cut

    def chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The chat template rendered over ``messages`` ([{"role": ..., "content": ...}]), as text."""
        if not self.chat_template:
            raise BadInputError("this model's tokenizer has no chat template; use --prompt without --chat")
        return render_chat(self.chat_template, messages, add_generation_prompt, self.special, self.template_file)

    def _leading_special_ids(self) -> list[int]:
        """Ids the post-processor adds before a single text (e.g. Llama's BOS); [] for most tokenizers."""
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        n = len(full) - len(bare)
        return full[:n] if n > 0 and full[n:] == bare else []


TEMPLATE_CHARS = 1 << 20      # text a chat template may make beyond twice its messages' text (and any string)
TEMPLATE_STEPS = 1_000_000    # loop steps and calls a render may take, plus 1,000 per message
TEMPLATE_SECONDS = 5.0        # and its wall time: a backstop for steps that are slow (filters over long text)
LOOP, SIZED = "__infini_loop", "__infini_sized"   # the guards the template's loops and `~` are wrapped in


class TemplateLimit(Exception):
    """A render went past a limit of :class:`_Budget` (becomes one BadInputError naming the template)."""


class _Budget:
    """What one render of a chat template may spend: every loop step and call is charged, and every string
    made (an output piece, a ``~``, ``+`` or ``*`` result, a call's result) must stay under ``chars``."""

    def __init__(self, messages: list[dict]):
        text = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
        self.chars = TEMPLATE_CHARS + 2 * text
        self.steps = TEMPLATE_STEPS + 1000 * len(messages)
        self.used, self.deadline = 0, time.monotonic() + TEMPLATE_SECONDS

    def step(self) -> None:
        self.used += 1
        if self.used > self.steps:
            raise TemplateLimit(f"takes more than {self.steps:,} loop steps and calls")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"takes more than {TEMPLATE_SECONDS:g} s")

    def sized(self, value, n: int | None = None):
        """``value`` if it (or ``n``, the size about to be made) fits; a number above the cap asks for a size."""
        n = len(value) if n is None and isinstance(value, (str, list, tuple)) else n
        if n is not None and n > self.chars:
            raise TemplateLimit(f"renders more than 1 MiB beyond its messages ({n:,} characters; at most "
                                f"{self.chars:,})")
        return value

    def check_args(self, args, kwargs) -> None:
        for a in (*args, *kwargs.values()):
            if type(a) is int and a > self.chars:   # a width or count that big can only make a huge string
                self.sized(None, a)


def _sandbox(budget: _Budget):
    """transformers' environment (immutable sandbox, trim_blocks, lstrip_blocks, loop controls), with every
    call, filter, ``*``/``+``/``**`` and loop step charged to ``budget``."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**"])

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            budget.step()
            if __obj is not __self.globals.get("range"):   # the sandbox's range has its own limit, and message
                budget.check_args(args, kwargs)
            return budget.sized(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            budget.step()
            if operator == "*" and isinstance(left, (str, list, tuple)) != isinstance(right, (str, list, tuple)):
                seq, n = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
                budget.sized(None, len(seq) * n if isinstance(n, int) else None)
            if operator == "**" and isinstance(right, int) and abs(right) > 1024:
                raise TemplateLimit(f"computes a power of {right:,}")
            return budget.sized(super().call_binop(context, operator, left, right))

    env = Limited(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    for name, f in list(env.filters.items()):
        env.filters[name] = _charged(f, budget)

    def loop(iterable):
        for item in iterable:
            budget.step()
            yield item
    env.globals.update({LOOP: loop, SIZED: lambda value: value})   # call() charges and sizes SIZED's result
    return env


def _charged(f, budget: _Budget):
    """A filter whose numbers are checked before it runs and whose result is sized after (jinja calls filters
    directly, not through the environment's call)."""
    import functools

    @functools.wraps(f)   # keeps jinja's pass_context / pass_environment marker
    def charged(*args, **kwargs):
        budget.step()
        budget.check_args(args, kwargs)
        return budget.sized(f(*args, **kwargs))
    return charged


def _guarded(env, template: str):
    """The template's syntax tree with every ``for`` iterable wrapped in LOOP (charged per step) and every ``~``
    in SIZED (a string doubled in a loop is stopped at the cap, not at the memory's end)."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    def wrap(guard, node):
        return nodes.Call(nodes.Name(guard, "load", lineno=node.lineno), [node], [], None, None, lineno=node.lineno)

    class Guard(NodeTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = wrap(LOOP, node.iter)
            return node

        def visit_Concat(self, node):
            return wrap(SIZED, self.generic_visit(node))

    tree = Guard().visit(env.parse(template))
    tree.set_environment(env)
    return tree


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool, special: dict,
                where: str | None = None) -> str:
    """Render a chat template as transformers' apply_chat_template(tokenize=False) does, within limits: a
    template that loops or calls more than TEMPLATE_STEPS times (+ 1,000 per message), runs TEMPLATE_SECONDS,
    makes text of more than 1 MiB beyond twice its messages', recurses without end or fails is one
    BadInputError naming it (``where``: its file)."""
    import jinja2

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    name = f"the chat template of {where}" if where else "the chat template"
    budget = _Budget(messages)
    env = _sandbox(budget)
    env.filters["tojson"] = _charged(tojson, budget)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
    try:
        pieces, size = [], 0
        for piece in env.from_string(_guarded(env, template)).generate(
                messages=messages, add_generation_prompt=add_generation_prompt,
                **{k: v for k, v in special.items() if v is not None}):
            size += len(piece)
            budget.sized(None, size)
            pieces.append(piece)
        return "".join(pieces)
    except TemplateLimit as e:
        raise BadInputError(f"{name} {e}; refusing to render it") from None
    except RecursionError:
        raise BadInputError(f"{name} recurses too deeply; refusing to render it") from None
    except MemoryError:
        raise BadInputError(f"{name} needs more memory than there is; refusing to render it") from None
    except OverflowError as e:
        if "MAX_RANGE" in str(e):
            from jinja2.sandbox import MAX_RANGE

            raise BadInputError(f"{name} asks for a range of more than {MAX_RANGE:,} items (the sandbox's limit); "
                                "refusing to render it") from None
        raise BadInputError(f"{name} failed: {e}") from None
    except jinja2.exceptions.TemplateError as e:
        raise BadInputError(f"{name} failed: {e}") from None
    except Exception as e:   # noqa: BLE001 (a template's own error: 1/0, a bad index, a wrong type)
        raise BadInputError(f"{name} failed: {type(e).__name__}: {str(e)[:200]}") from None


def read_tokenizer_config(folder: Path) -> dict:
    """tokenizer_config.json (special tokens, chat template) of a folder, and chat_template.jinja when there.

    A template given as a list of named templates (some Hugging Face models) yields the "default" one."""
    config = {}
    path = folder / TOKENIZER_CONFIG
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise IncompatibleArtifactError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise IncompatibleArtifactError(f"{path} must hold a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if template is not None:
        config["chat_template_file"] = str(path)
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        config["chat_template_file"] = str(folder / "chat_template.jinja")
    if template is not None and not isinstance(template, str):
        raise IncompatibleArtifactError(f"{path}: chat_template must be a string")
    config["chat_template"] = template
    for name in SPECIAL_NAMES:
        config[name] = _token_text(config.get(name))
    return config


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None
