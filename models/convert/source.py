"""What a conversion reads: a Hugging Face model folder or a GGUF file, as one ``Source``.

    HF folder:  config.json + model.safetensors (or model.safetensors.index.json and its shards)
                [+ tokenizer.json, tokenizer_config.json / chat_template.jinja, generation_config.json]
                read here with safetensors (never a pickle: pytorch_model.bin is refused).
    GGUF file:  read by transformers (gguf + transformers, the `convert` extra), which dequantises
                the weights to float32, undoes llama.cpp's permutation of q/k and builds the
                tokenizer from the file's metadata; this module only checks the file first
                (magic, architecture, truncation) so those cases are one line.

The Source holds the config as a plain dict in Hugging Face's names and a function from a
Hugging Face tensor name to a float32 tensor (or None when absent), so the mapping
(models/convert/families.py, weights.py) does not care where the numbers came from.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ...errors import BadInputError, IncompatibleArtifactError, MissingBackendError
from ...paths import inside
from ..hf_tokenizer import TOKENIZER_FILE, HFTokenizer, read_tokenizer_config

# llama.cpp's architecture names whose GGUF transformers reads ("llama" is also Mistral's, SmolLM's)
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "phi3")
# tensors llama.cpp stores for a RoPE scaling (Llama 3.1+'s llama3 factors, Phi-3's LongRoPE): transformers' GGUF
# reader ignores them, so it would build (and check us against) a model without the scaling
ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass
class Source:
    origin: str                                   # what was read, for messages and the checkpoint's metadata
    kind: str                                     # "hf" or "gguf"
    config: dict                                  # config.json's fields (Hugging Face names)
    tensor: Callable[[str], torch.Tensor | None]  # HF tensor name -> float32 tensor, None if absent
    names: list[str]                              # every tensor name the source holds
    tokenizer: HFTokenizer | None
    transformers_path: tuple = field(default=())  # from_pretrained arguments of the same model (validation)
    reference: object = None                      # transformers' model of it, when reading made one (GGUF)


def read_source(src: str | Path) -> Source:
    """A Hugging Face folder or a .gguf file; BadInputError / IncompatibleArtifactError naming what is wrong."""
    src = Path(src)
    if src.is_dir():
        return read_hf_folder(src)
    if src.is_file() and src.suffix.lower() == ".gguf":
        return read_gguf(src)
    if not src.exists():
        raise BadInputError(f"{src} does not exist; expected a Hugging Face model folder or a .gguf file")
    raise BadInputError(f"{src} is neither a folder nor a .gguf file; expected a Hugging Face model folder "
                        "(config.json + *.safetensors) or a .gguf file")


# -- Hugging Face folders --------------------------------------------------------------------------
def read_hf_folder(folder: Path) -> Source:
    config = _json(folder / "config.json", what="a Hugging Face model folder")
    files = _safetensors_files(folder)
    index: dict[str, Path] = {}
    handles = {}
    for file in files:
        handles[file] = _open_safetensors(file)
        for name in handles[file].keys():
            index[name] = file

    def tensor(name: str) -> torch.Tensor | None:
        file = index.get(name)
        if file is None:
            return None
        try:
            return handles[file].get_tensor(name).float()
        except Exception as e:   # safetensors raises SafetensorError; a truncated file also OSError
            raise IncompatibleArtifactError(f"{file} is truncated or corrupt (tensor {name}: {e})") from None

    return Source(str(folder), "hf", config, tensor, sorted(index), _hf_tokenizer(folder),
                  (str(folder),))


def _json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BadInputError(f"{path.parent} has no {path.name}: it is not {what} (expected config.json and "
                            "*.safetensors, or give a .gguf file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IncompatibleArtifactError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise IncompatibleArtifactError(f"{path} must hold a JSON object")
    return data


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise IncompatibleArtifactError(f"{index} has no weight_map")
        root = _link_root(folder)
        files = sorted({inside(folder, f, index, root) for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise IncompatibleArtifactError(f"{index} names shards that are not there: {', '.join(missing[:3])}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = (f" (it has {', '.join(pickles[:2])}: pickled weights are never loaded; save them as safetensors "
            "first)" if pickles else "")
    raise BadInputError(f"{folder} has no *.safetensors weights{hint}")


def _link_root(folder: Path) -> Path:
    """Where the files an index names may resolve to: the folder, or for a snapshot of huggingface_hub's cache
    (models--org--name/snapshots/REV, whose files link to ../../blobs/SHA) the repository's cache folder."""
    real = folder.resolve()
    return real.parent.parent if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir() else folder


def _open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:
        raise IncompatibleArtifactError(f"{file} is truncated or not a safetensors file ({e})") from None


def _hf_tokenizer(folder: Path) -> HFTokenizer | None:
    """tokenizer.json (+ its config), or one built by transformers from a slow tokenizer when it is there."""
    stops = _generation_stops(folder)
    if (folder / TOKENIZER_FILE).is_file():
        tok = HFTokenizer.load(folder)
    elif any((folder / f).is_file() for f in ("tokenizer.model", "vocab.json")):
        tok = _tokenizer_from_transformers(lambda t: t.from_pretrained(str(folder)), f"{folder}")
    else:
        return None
    if stops:
        tok = HFTokenizer(tok._json_text, {**tok.config, "stop_ids": [*tok.stop_ids, *stops]})
    return tok


def _generation_stops(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list): extra ids that end generation."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    ids = _json(path, "a generation config").get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]


def _tokenizer_from_transformers(load, where: str) -> HFTokenizer:
    """Build tokenizer.json with transformers (AutoTokenizer), save it, read it back as ours."""
    transformers = require_transformers("build tokenizer.json for " + where)
    try:
        tok = load(transformers.AutoTokenizer)
    except Exception as e:
        raise IncompatibleArtifactError(f"transformers cannot build a tokenizer for {where}: {str(e)[:200]}") from None
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        if not (Path(tmp) / TOKENIZER_FILE).is_file():
            raise IncompatibleArtifactError(f"{where}: transformers made no {TOKENIZER_FILE} (a slow tokenizer "
                                            "only); convert needs a fast one")
        config = read_tokenizer_config(Path(tmp))
        if config.get("chat_template") is None and getattr(tok, "chat_template", None):
            config["chat_template"] = tok.chat_template
        config["chat_template_file"] = where   # not the temporary folder
        return HFTokenizer((Path(tmp) / TOKENIZER_FILE).read_text(encoding="utf-8"), config)


def transformers_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def require_transformers(why: str):
    try:
        import transformers
    except ImportError:
        raise MissingBackendError(f"to {why}, install transformers: pip install 'infini-deploy[convert]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


# -- GGUF ------------------------------------------------------------------------------------------
def read_gguf(path: Path) -> Source:
    """Check the file, then let transformers read it: its model (weights dequantised to float32, q/k
    un-permuted) is both where the weights come from and the parity check's reference."""
    arch, facts = check_gguf(path)
    transformers = require_transformers(f"read {path.name} (a GGUF file)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    except Exception as e:   # transformers and gguf raise ValueError, KeyError, IndexError, ...
        raise IncompatibleArtifactError(f"{path} cannot be read as a {arch} GGUF file: {str(e)[:200]}") from None
    check_gguf_reading(path, arch, facts, config)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    except Exception as e:
        raise IncompatibleArtifactError(f"{path} cannot be read as a {arch} GGUF file: {str(e)[:200]}") from None
    if facts.get("attention.sliding_window") and not config.get("sliding_window"):
        config["sliding_window"] = facts["attention.sliding_window"]   # llama.cpp's; transformers maps phi3's not
    tensors = model.state_dict()
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)   # the same tensor as the embedding
    tokenizer = _tokenizer_from_transformers(
        lambda t: t.from_pretrained(str(path.parent), gguf_file=path.name), path.name)
    source = Source(str(path), "gguf", config, lambda name: _float(tensors.get(name)), sorted(tensors), tokenizer,
                    (str(path.parent), path.name))
    source.reference = model
    return source


def check_gguf_reading(path: Path, arch: str, facts: dict, config: dict) -> None:
    """Refuse a GGUF whose model transformers' reader would get wrong: it ignores llama.cpp's RoPE scaling
    (metadata and factor tensors) and partial rotary dims, and takes Gemma 3's query scale from a default. The
    parity check compares with transformers' reading, so it could not see these; they are named here."""
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    problems = []
    if facts["rope_factor_tensors"]:
        problems.append(f"its RoPE frequency factors ({facts['rope_factor_tensors'][0]}: Llama 3.1+ or Phi-3 "
                        "LongRoPE scaling)")
    if facts.get("rope.scaling.type") not in (None, "none") or facts.get("rope.scaling.factor", 1.0) not in (0.0, 1.0):
        kind, factor = facts.get("rope.scaling.type"), facts.get("rope.scaling.factor")
        problems.append(f"its rope scaling ({kind}, factor {factor})")
    if facts.get("rope.dimension_count") not in (None, head):
        problems.append(f"its partial rotary embedding (rope.dimension_count {facts['rope.dimension_count']} of "
                        f"{head} dims)")
    if facts.get("attention.key_length") not in (None, head):
        problems.append(f"its head size (attention.key_length {facts['attention.key_length']}, read as {head})")
    if arch == "gemma3":   # llama.cpp: 1/sqrt(head size), but 1/sqrt(n_embd / n_head) for the 62-layer 27B
        scale_dim = head if facts.get("block_count") != 62 else config["hidden_size"] // config["num_attention_heads"]
        if config.get("query_pre_attn_scalar") != scale_dim:
            problems.append(f"its attention scale (1/sqrt({scale_dim}) in llama.cpp, read as 1/sqrt("
                            f"{config.get('query_pre_attn_scalar')}))")
    if problems:
        raise BadInputError(f"{path}: transformers' GGUF reader does not read {problems[0]}, so it would build "
                            "another model than llama.cpp's; convert the Hugging Face folder instead")


def _float(t) -> torch.Tensor | None:
    return None if t is None else t.detach().float()


def check_gguf(path: Path) -> tuple[str, dict]:
    """(the GGUF's architecture, the metadata facts check_gguf_reading needs), after checking magic, metadata and
    that every tensor lies inside the file."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BadInputError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        import gguf
    except ImportError:
        raise MissingBackendError("reading GGUF files needs the gguf package: pip install 'infini-deploy[convert]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
        arch = _gguf_value(reader, "general.architecture")
        size = path.stat().st_size
        short = [t.name for t in reader.tensors if int(t.data_offset) + int(t.n_bytes) > size]
        facts = {key: _gguf_value(reader, f"{arch}.{key}") for key in GGUF_FACTS}
        facts["rope_factor_tensors"] = [t.name for t in reader.tensors if t.name in ROPE_FACTOR_TENSORS]
    except Exception as e:   # the reader fails with ValueError/IndexError/KeyError on a cut or damaged file
        raise IncompatibleArtifactError(f"{path} is truncated or corrupt: the GGUF reader fails with "
                                        f"{type(e).__name__}: {str(e)[:120]}") from None
    if short:
        raise IncompatibleArtifactError(f"{path} is truncated: tensor {short[0]} ends past the end of the file")
    if arch not in GGUF_ARCHITECTURES:
        raise BadInputError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                            f"{', '.join(GGUF_ARCHITECTURES)} (Llama 2/3, SmolLM, Mistral, Qwen2/2.5, Qwen3, Gemma 3, "
                            "Phi-3/4; infini convert --list)")
    if (facts.get("expert_count") or 0) > 0:
        raise BadInputError(f"{path}: a mixture-of-experts model ({arch}.expert_count > 0) is not supported")
    return arch, {k: v for k, v in facts.items() if v is not None}


GGUF_FACTS = ("expert_count", "rope.scaling.type", "rope.scaling.factor", "rope.dimension_count",
              "attention.key_length", "attention.sliding_window", "block_count")


def _gguf_value(reader, key: str):
    """A scalar or string field of a GGUF's metadata, None when absent."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(part).decode()
    return part[0].item() if hasattr(part[0], "item") else part[0]
