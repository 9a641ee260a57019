"""Less severe items of the hardening issue in conversion and adapters, through the CLI.

- an adapter carried its base's sha256 but none of its own: flipped bytes in it were applied silently;
- a config whose vocab_size did not match its weights was blamed on the tokenizer;
- NaN weights in a conversion source were refused as a failed parity check, not named.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from infini_deploy.models import init_model, preset, save_checkpoint  # noqa: E402
from infini_deploy.models.adapter import FORMAT, read_adapter, save_adapter  # noqa: E402
from infini_deploy.models.checkpoint import load_checkpoint  # noqa: E402
from infini_deploy.models.convert import convert  # noqa: E402
from infini_deploy.models.hf_tokenizer import HFTokenizer  # noqa: E402

from helpers import write_tiny_tokenizer  # noqa: E402
from llama_fixtures import tiny_llama  # noqa: E402
from helpers import invoke, one_line_error

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "bundled" / "smollm2-infini" / "adapter.safetensors"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("src") / "llama")


@pytest.fixture(scope="module")
def adapter(llama, tmp_path_factory):
    """A gates adapter of the llama converted with segment 64: (its folder, the trained model's gates)."""
    root = tmp_path_factory.mktemp("adapter")
    convert(llama, root / "base", segment_len=64, validate=False)
    base = load_checkpoint(root / "base")
    trained = load_checkpoint(root / "base")
    with torch.no_grad():
        for layer in trained.layers:
            layer.self_attn.beta.fill_(-2.5)
    (root / "adapter").mkdir()
    save_adapter(trained, "gates", base, root / "adapter")
    return root / "adapter"


def test_an_adapter_with_flipped_bytes_is_refused(llama, adapter, tmp_path):
    good = invoke("convert", llama, tmp_path / "ok", "--segment-len", 64, "--no-validate", "--adapter", adapter)
    assert good.exit_code == 0, good.output
    assert all(bool((layer.self_attn.beta == -2.5).all()) for layer in load_checkpoint(tmp_path / "ok").layers)
    flipped = tmp_path / "flipped.safetensors"
    data = bytearray((adapter / "adapter.safetensors").read_bytes())
    data[-3] ^= 0x01                                        # one bit of the last gate's value
    flipped.write_bytes(bytes(data))
    res = invoke("convert", llama, tmp_path / "out", "--segment-len", 64, "--no-validate", "--adapter", flipped)
    one_line_error(res, f"--adapter {flipped} is corrupt: its tensors or header do not match the sha256 in its header")
    assert not (tmp_path / "out").exists() and "sha256" in read_adapter(adapter)[1]


def test_an_adapter_written_before_the_hash_still_loads(llama, adapter, tmp_path):
    from safetensors.torch import save_file

    tensors, header = read_adapter(adapter)
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={k: v for k, v in header.items() if k != "sha256"})
    res = invoke("convert", llama, tmp_path / "out", "--segment-len", 64, "--no-validate", "--adapter", old)
    assert res.exit_code == 0, res.output
    _, bundled = read_adapter(BUNDLED)        # the shipped adapter has no hash of its own
    assert bundled["format"] == FORMAT and "sha256" not in bundled


def test_a_config_vocab_size_unlike_the_embedding_is_the_configs_fault(llama, tmp_path):
    src = shutil.copytree(llama, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    one_line_error(invoke("convert", src, tmp_path / "out", "--segment-len", 64),
                   "the config's vocab_size is 200, but the embedding model.embed_tokens.weight has 300 rows; the "
                   "config does not match the weights")


def test_a_checkpoint_config_vocab_size_unlike_the_embedding_is_the_configs_fault(tmp_path):
    tok = HFTokenizer.load(write_tiny_tokenizer(tmp_path / "tok"))
    ckpt = save_checkpoint(init_model(preset("tiny", vocab_size=300), seed=0), tmp_path / "ckpt", tokenizer=tok)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    message = (f"{ckpt / 'config.json'}: vocab_size is 200, but the embedding embed_tokens.weight of model.safetensors "
               "has 300 rows; the config does not match the weights")
    one_line_error(invoke("generate", ckpt, "--prompt", "hi", "--no-progress"), message)
    one_line_error(invoke("run", ckpt, "--tokens", 100, "--no-progress"), message)


def test_nan_weights_in_a_source_name_the_tensor(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    src = shutil.copytree(llama, tmp_path / "src")
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    one_line_error(invoke("convert", src, tmp_path / "out", "--segment-len", 64),
                   "tensor model.layers.1.mlp.down_proj.weight holds 1 NaN/Inf value(s)")
    assert not (tmp_path / "out").exists()
