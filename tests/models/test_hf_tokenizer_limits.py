"""A chat template renders within limits (hardening issue, bug 7).

`{% for i in range(100000000) %}` was an OverflowError traceback (jinja's sandbox caps a range at 100,000) and
two nested `range(99999)` loops made `infini generate --chat` run without end. Now every loop step and call
counts against a budget, the text made is capped, and a template that passes either is one line naming it.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from infini_deploy.errors import BadInputError
from infini_deploy.models import init_model, preset, save_checkpoint
from infini_deploy.models.hf_tokenizer import HFTokenizer, render_chat
from infini_deploy.tools.cli import cli

from helpers import CHAT_TEMPLATE, write_tiny_tokenizer
from helpers import one_line_error

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny checkpoint with a tokenizer.json of 300 ids and the ChatML template."""
    root = tmp_path_factory.mktemp("chat")
    tok = HFTokenizer.load(write_tiny_tokenizer(root / "tok"))
    save_checkpoint(init_model(preset("tiny", vocab_size=300), seed=0), root / "ckpt", tokenizer=tok)
    return root / "ckpt"


def with_template(base, tmp_path, template):
    import shutil

    folder = shutil.copytree(base, tmp_path / "ckpt")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


def chat(folder):
    return CliRunner().invoke(cli, ["generate", str(folder), "--prompt", "hi", "--chat", "--max-new-tokens", "1",
                                    "--no-progress"], catch_exceptions=False)


BOMBS = [
    ("huge-range", "{% for i in range(100000000) %}x{% endfor %}", "a range of more than 100,000"),
    ("nested-loops", "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
     "takes more than 1,001,000 loop steps and calls"),
    ("output", "{% for i in range(99999) %}{{ 'twenty characters...' }}{% endfor %}", "renders more than 1 MiB"),
    ("string-repeat", "{{ 'x' * 1000000000 }}", "renders more than 1 MiB"),
    ("string-doubling", "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s|length }}", "renders more than 1 MiB"),
    ("method-padding", "{{ 'x'.ljust(1000000000) }}", "renders more than 1 MiB"),
    ("filter-padding", "{{ 'x'|center(1000000000) }}", "renders more than 1 MiB"),
    ("recursion", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recurses too deeply"),
    ("branching-recursion", "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                            "{{ f(60) }}", "takes more than"),   # 1,001,000 calls or 5 s, whichever comes first
]


@pytest.mark.parametrize("template, message", [b[1:] for b in BOMBS], ids=[b[0] for b in BOMBS])
def test_a_template_past_the_limits_is_one_line_naming_it(base, tmp_path, template, message):
    folder = with_template(base, tmp_path, template)
    start = time.perf_counter()
    one_line_error(chat(folder), f"the chat template of {folder / 'tokenizer_config.json'}", message)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("template, message", [("{{ raise_exception('no system role') }}", "failed: no system role"),
                                               ("{{ 1 / 0 }}", "failed: ZeroDivisionError: division by zero")])
def test_a_template_that_fails_names_its_file(base, tmp_path, template, message):
    folder = with_template(base, tmp_path, template)
    one_line_error(chat(folder), f"the chat template of {folder / 'tokenizer_config.json'} {message}")


def test_the_limits_scale_with_the_messages_and_leave_real_templates_alone(base, tmp_path):
    """A long conversation (3 MB of message text, 20,000 messages) renders: the caps are on what the template
    adds to the messages, not on the messages."""
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 30} for i in range(20000)]
    text = render_chat(CHAT_TEMPLATE, long, True, {})
    assert len(text) > 3_000_000 and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(BadInputError, match="renders more than 1 MiB"):
        render_chat("{% for m in messages %}{{ m.content * 3 }}{% endfor %}", HI * 4 + long[:1] * 20000, True, {})
    assert "hi" in render_chat(CHAT_TEMPLATE, HI, True, {})
