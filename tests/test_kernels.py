"""The portable kernels: chosen before torch loads, kept where the user chose otherwise, recorded by
every build, and (slow) what makes a rebuild of the shipped organism its bytes on this CPU."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flipscope.kernels import PORTABLE_KERNELS, NativeKernelsWarning, build_kernels, kernel_settings

HAS_AVX2 = Path("/proc/cpuinfo").is_file() and " avx2" in Path("/proc/cpuinfo").read_text()
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="the portable kernels need a CPU with AVX2")


def _fresh(code: str, **env: str) -> dict:
    """Run `code` in a new interpreter without the kernel settings in its environment (plus `env`);
    it prints one JSON line."""
    base = {k: v for k, v in os.environ.items() if k not in PORTABLE_KERNELS}
    out = subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


CHOOSE_THEN_LOAD = (
    "import json, os\nfrom flipscope.kernels import prefer_portable\nportable = prefer_portable()\nimport torch\n"
    "print(json.dumps({'portable': portable, 'aten': torch.backends.cpu.get_cpu_capability(), "
    f"'env': {{k: os.environ.get(k) for k in {list(PORTABLE_KERNELS)!r}}}}}))"
)


@needs_avx2
def test_chosen_before_torch_loads_torch_runs_them() -> None:
    got = _fresh(CHOOSE_THEN_LOAD)
    assert got == {"portable": True, "aten": "AVX2", "env": PORTABLE_KERNELS}


def test_a_setting_the_user_chose_is_kept_and_the_process_is_not_portable() -> None:
    got = _fresh(CHOOSE_THEN_LOAD, ATEN_CPU_CAPABILITY="default")
    assert got["aten"] == "DEFAULT" and not got["portable"]
    assert got["env"] == PORTABLE_KERNELS | {"ATEN_CPU_CAPABILITY": "default"}


def test_once_torch_has_loaded_nothing_is_changed() -> None:
    code = CHOOSE_THEN_LOAD.replace("from flipscope.kernels", "import torch\nfrom flipscope.kernels")
    got = _fresh(code)
    assert not got["portable"] and got["env"] == dict.fromkeys(PORTABLE_KERNELS)


def test_the_suite_runs_what_its_environment_says() -> None:
    """conftest chose the portable set unless the run's environment said otherwise
    (`make test-portable` runs ATen's default kernels)."""
    asked = os.environ["ATEN_CPU_CAPABILITY"].upper()
    if asked != "DEFAULT" and not HAS_AVX2:
        pytest.skip("this CPU has no AVX2: torch runs less than was asked for")
    settings = kernel_settings()
    assert settings["aten"] == asked
    assert settings["portable"] == (asked == "AVX2")


def test_a_build_on_native_kernels_records_them_and_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MKL_CBWR", raising=False)
    with pytest.warns(NativeKernelsWarning, match=r"organism x trained on this CPU's own kernels .*MKL_CBWR None"):
        record = build_kernels("organism x")
    assert record["MKL_CBWR"] is None and not record["portable"]


def test_a_run_on_an_accelerator_records_its_device_without_a_warning(recwarn: pytest.WarningsRecorder) -> None:
    assert build_kernels("SAE at blocks.0.hook_attn_out", "cuda:0") == {"device": "cuda:0", "portable": False}
    assert not [w for w in recwarn if issubclass(w.category, NativeKernelsWarning)]


@pytest.mark.slow
@needs_avx2
def test_the_shipped_organism_rebuilds_to_its_bytes_on_this_cpu(tmp_path: Path) -> None:
    """The recipe trained on the portable kernels gives the shipped weights byte for byte, whichever
    CPU recorded them and whichever runs this (about four minutes on two cores)."""
    from flipscope.organism import OrganismConfig, default_organism_dir, load_card
    from flipscope.organism.train import train_model

    if not kernel_settings()["portable"]:
        pytest.skip(f"this run's kernels are not the portable set: {kernel_settings()}")
    card = load_card(default_organism_dir())
    vlm, _ = train_model(OrganismConfig.from_dict(card["config"]), progress=False)
    vlm.hf_model.save_pretrained(tmp_path, safe_serialization=True)
    digest = hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()
    assert digest == card["sha256"]["model.safetensors"]
