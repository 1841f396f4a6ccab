"""SAEs through sae-lens, checked against the model they will read.

Three sources, one call (`load_sae`):

- a sae-lens folder (`cfg.json` + `sae_weights.safetensors`) → `SAE.load_from_disk`;
- a raw GemmaScope 2 folder (`params.safetensors` with `w_enc, w_dec, b_enc, b_dec, threshold`,
  optional `config.json`), converted as sae-lens's own Gemma 3 loader does: JumpReLU, no b_dec
  subtraction at the input, hook `blocks.{L}.hook_resid_post` (`hook_mlp_out`, or `attn.hook_z` for
  an attention SAE) from the folder name `.../resid_post/layer_{L}_width_...`;
- a sae-lens release and id (`gemma-scope-2-4b-it-res`, `layer_17_width_16k_l0_medium`) →
  `SAE.from_pretrained`, which needs the hub: offline, one line says what to download instead.

`check_sae` matches `d_in` to the model width and the hook name to `HookedVLM`'s table (mapping
sae-lens's HF hook path `model.layers.{L}.output`, the text model's, to `blocks.{L}.hook_resid_post`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from sae_lens import SAE, JumpReLUSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from safetensors import SafetensorError
from safetensors.torch import load_file

from flipscope.data.jsonfile import read_json_object
from flipscope.errors import FlipscopeError, first_line
from flipscope.model.hook_names import GEMMASCOPE_SITES, hook_width, resid_post
from flipscope.model.protocol import VLM

__all__ = ["check_sae", "gemmascope_folder_to_sae", "load_sae", "sae_digest"]


def sae_digest(sae: SAE) -> str:
    """sha256 over the SAE's parameters (names and float32 values): which dictionary a feature index
    belongs to, whatever folder or release it was loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(sae.state_dict().items()):
        digest.update(name.encode() + tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


RAW_KEYS = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold"}


def gemmascope_folder_to_sae(folder: str | Path, *, hook_name: str | None = None, device: str = "cpu") -> JumpReLUSAE:
    """A sae-lens `JumpReLUSAE` from a raw GemmaScope 2 folder.

    Raises:
        FlipscopeError: missing or mis-shaped tensors, or no hook name can be inferred.
    """
    folder = Path(folder)
    params = folder / "params.safetensors"
    if not params.is_file():
        raise FlipscopeError(f"{str(folder)!r} has no params.safetensors; expected a GemmaScope 2 SAE folder")
    raw = load_file(params, device=device)
    missing = sorted(set(RAW_KEYS) - set(raw))
    if missing:
        raise FlipscopeError(f"{params}: missing tensors {missing}; expected {sorted(RAW_KEYS)}")
    d_in, d_sae = raw["w_enc"].shape
    expected = {"w_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for key, shape in expected.items():
        if tuple(raw[key].shape) != shape:
            raise FlipscopeError(f"{params}: {key} has shape {tuple(raw[key].shape)}; expected {shape} from w_enc")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if config.get("architecture", "jump_relu") != "jump_relu":
        raise FlipscopeError(f"{folder}/config.json: architecture {config['architecture']!r}; expected 'jump_relu'")
    if hook_name is None:
        layer = re.search(r"layer_(\d+)", folder.name)
        site = next((s for s in GEMMASCOPE_SITES if s in folder.parent.name or s in folder.name), None)
        if layer is None or site is None:
            raise FlipscopeError(
                f"cannot infer the hook of {str(folder)!r} (expected .../resid_post/layer_L_...); pass hook_name="
            )
        hook_name = f"blocks.{layer.group(1)}.{GEMMASCOPE_SITES[site]}"
    cfg = JumpReLUSAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        dtype=str(raw["w_enc"].dtype).removeprefix("torch."),
        device=device,
        apply_b_dec_to_input=False,
        normalize_activations="none",
        metadata=SAEMetadata(
            hook_name=hook_name, model_name=config.get("model_name"), hf_hook_name=config.get("hf_hook_point_in")
        ),
    )
    sae = JumpReLUSAE(cfg)
    sae.load_state_dict({RAW_KEYS[key]: tensor for key, tensor in raw.items() if key in RAW_KEYS})
    return sae


def load_sae(source: str | Path, sae_id: str | None = None, *, device: str = "cpu") -> SAE:
    """An SAE from a sae-lens folder, a raw GemmaScope 2 folder, or a sae-lens release + id.

    Raises:
        FlipscopeError: the folder is neither format, or the release cannot be downloaded.
    """
    path = Path(source)
    if sae_id is None:
        if (path / "cfg.json").is_file():
            return _from_disk(path, device)
        if (path / "params.safetensors").is_file():
            try:
                return gemmascope_folder_to_sae(path, device=device)
            except FlipscopeError:
                raise
            except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as err:
                raise FlipscopeError(f"cannot load the GemmaScope SAE in {str(path)!r}: {first_line(err)}") from err
        raise FlipscopeError(
            f"{str(source)!r} holds neither a sae-lens SAE (cfg.json) nor a GemmaScope 2 SAE (params.safetensors)"
        )
    try:
        return SAE.from_pretrained(str(source), sae_id, device=device)
    except (OSError, ValueError) as err:
        raise FlipscopeError(_download_help(str(source), sae_id, err)) from err


def _from_disk(path: Path, device: str) -> SAE:
    """`SAE.load_from_disk`, with a bad cfg.json or weights file named rather than a traceback."""
    read_json_object(path / "cfg.json", "SAE config")
    try:
        return SAE.load_from_disk(str(path), device=device)
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, TypeError) as err:
        raise FlipscopeError(
            f"cannot load the SAE in {str(path)!r} ({type(err).__name__}: {first_line(err)}); expected "
            "cfg.json and sae_weights.safetensors as sae-lens's save_model writes them"
        ) from err


def _download_help(release: str, sae_id: str, err: Exception) -> str:
    where = ""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        entry = get_pretrained_saes_directory()[release]
        where = f" ({entry.repo_id}, folder {entry.saes_map[sae_id]})"
    except Exception:  # noqa: BLE001 - only for the message
        pass
    return (
        f"could not download SAE {sae_id!r} of release {release!r}{where}: {type(err).__name__}. "
        "Download that folder (params.safetensors, config.json) where the hub is reachable and pass its path."
    )


_HF_LAYER = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)(?:\.output)?$")


def check_sae(sae: SAE, model: VLM) -> str:
    """The hook name `sae` reads on `model`, after checking width and hook.

    Raises:
        FlipscopeError: `d_in` differs from the model's width, or the hook is not one of its hooks.
    """
    hook = sae.cfg.metadata.hook_name
    hf_model = getattr(model, "hf_model", None)
    width = model.d_model if hf_model is None else hook_width(hf_model, hook, model.d_model)
    if sae.cfg.d_in != width:
        what = "d_model" if width == model.d_model else f"{hook} width (n_heads × head_dim)"
        raise FlipscopeError(f"SAE d_in {sae.cfg.d_in} does not match the model's {what} {width}")
    if hook not in model.hook_dict:
        hf_hook = sae.cfg.metadata.hf_hook_name
        match = _HF_LAYER.match(hf_hook or "")
        if match is None:
            model.check_hook_name(hook)  # raises, listing the model's hooks
        hook = resid_post(int(match.group(1)))
    if hook not in model.hook_dict:
        model.check_hook_name(hook)
    return hook
