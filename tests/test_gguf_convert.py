"""GGUF conversion on a tiny Gemma 3 GGUF written here with llama.cpp's own writer (`gguf`), so the
conversion runs on every machine, whatever its cache holds: the folder's weights and tokenizer are
what transformers reads from the GGUF directly, the file is parsed once (not once for the config,
once for the weights and once for the tokenizer), and `HookedVLM` loads the `.gguf` path itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from flipscope.errors import FlipscopeError  # noqa: E402
from flipscope.model import HookedVLM, PromptSpec  # noqa: E402
from flipscope.model.gguf import gguf_folder  # noqa: E402
from flipscope.model.hook_points import is_pattern_hook  # noqa: E402

# Gemma's special tokens first (control: 3, unknown: 2), then a few words (normal: 1)
TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "\n", "▁", "▁yes", "▁no",
          "▁is", "▁there", "▁an", "▁effusion", "?", "user", "model"]  # fmt: skip
TYPES = [3, 3, 3, 2, 3, 3] + [1] * (len(TOKENS) - 6)


def write_tiny_gemma3_gguf(path: Path, *, d: int = 16, layers: int = 2, ffn: int = 32, head_dim: int = 8) -> Path:
    """A float32 Gemma 3 text GGUF with the keys and tensor names llama.cpp writes for gemma-3-270m."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_name("tiny gemma 3")
    writer.add_context_length(64)
    writer.add_embedding_length(d)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10_000.0)
    writer.add_sliding_window(16)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_scores([0.0] * len(TOKENS))
    writer.add_token_types(TYPES)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    shapes = {"token_embd": (len(TOKENS), d), "output_norm": (d,)}
    for i in range(layers):
        block = {"attn_q": (2 * head_dim, d), "attn_k": (head_dim, d), "attn_v": (head_dim, d),
                 "attn_output": (d, 2 * head_dim), "attn_q_norm": (head_dim,), "attn_k_norm": (head_dim,),
                 "attn_norm": (d,), "post_attention_norm": (d,), "ffn_norm": (d,), "post_ffw_norm": (d,),
                 "ffn_gate": (ffn, d), "ffn_up": (ffn, d), "ffn_down": (d, ffn)}  # fmt: skip
        shapes.update({f"blk.{i}.{name}": shape for name, shape in block.items()})
    for name, shape in shapes.items():
        writer.add_tensor(f"{name}.weight", (0.1 * rng.standard_normal(shape)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every `GGUFReader` constructed from here on, by path (transformers imports it at each call)."""
    opened: list[str] = []
    original = gguf.GGUFReader

    def counting(path, *args, **kwargs):
        opened.append(str(path))
        return original(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    return opened


def test_the_converted_folder_is_what_transformers_reads_from_the_gguf(tmp_path: Path, reads: list[str]) -> None:
    source = write_tiny_gemma3_gguf(tmp_path / "tiny.gguf")
    folder = gguf_folder(source, cache=tmp_path / "cache")
    assert reads == [str(source)]  # one parse serves the config, the weights and the tokenizer
    reader = gguf.GGUFReader  # restored after the conversion: a later load parses afresh
    direct = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=source.name, dtype=torch.float32)
    assert gguf.GGUFReader is reader and len(reads) > 1
    converted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected, got = direct.state_dict(), converted.state_dict()
    assert sorted(got) == sorted(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    text = "is there an effusion?\nyes"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    read_directly = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=source.name)
    assert tokenizer(text).input_ids == read_directly(text).input_ids
    assert tokenizer.chat_template is not None  # Gemma 3's, which a GGUF's tokenizer lacks


def test_a_gguf_path_loads_as_gemma3_text_with_the_plain_forward(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLIPSCOPE_CACHE", str(tmp_path / "cache"))
    source = write_tiny_gemma3_gguf(tmp_path / "tiny.gguf")
    vlm = HookedVLM.from_pretrained(str(source))
    assert vlm.family.name == "gemma3_text" and (vlm.n_layers, vlm.d_model) == (2, 16)
    inputs = vlm.prompts.build([PromptSpec(question="is there an effusion?", condition="none")])
    with torch.no_grad():
        plain = vlm.hf_model(**vlm.family.forward_kwargs(vlm.hf_model, inputs.as_kwargs()), use_cache=False)
        hooked = vlm.run_with_hooks(inputs, fwd_hooks=[(lambda name: not is_pattern_hook(name), lambda x, hook: x)])
    assert torch.equal(hooked, plain.logits)


def test_a_failed_conversion_leaves_the_reader_as_it_was(tmp_path: Path, reads: list[str]) -> None:
    reader = gguf.GGUFReader  # the failure is raised inside the conversion's shared-reader block
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but not a gguf file")
    with pytest.raises(FlipscopeError, match="cannot be read by transformers"):
        gguf_folder(bad, cache=tmp_path / "cache")
    assert gguf.GGUFReader is reader
