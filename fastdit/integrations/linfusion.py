"""LinFusion for diffusers UNets: swap every self-attention (`attn1`) for `GeneralizedLinearAttention`.

    from fastdit.integrations import apply_linfusion, revert_linfusion
    apply_linfusion(pipe.unet, "path/to/LinFusion-1-5")   # a local folder, or a state dict
    ...
    revert_linfusion(pipe.unet)                          # the original attention modules again

Released checkpoints (methods.md section 2) are diffusers ModelMixin folders: `config.json` with
`modules_list` = [{module_name, dim_n, heads, projection_mid_dim}, ...], one entry per `attn1` of the
UNet in `unet.named_modules()` order, and weights keyed `{i}.{param}` (`0.to_q.weight`,
`0.to_q_.0.weight`, ...). Nothing is downloaded: folders and files are read locally.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from fastdit.modules.linear_attention import GeneralizedLinearAttention

__all__ = ["apply_linfusion", "revert_linfusion", "linfusion_state_dict", "linfusion_config",
           "load_linfusion_checkpoint"]

_ORIGINAL = "_fastdit_linfusion_original"
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                 "diffusion_pytorch_model.bin", "pytorch_model.bin")


def _is_attn1(name: str, module: nn.Module) -> bool:
    if name.rsplit(".", 1)[-1] != "attn1":
        return False
    if isinstance(module, GeneralizedLinearAttention):
        return True
    return all(hasattr(module, a) for a in ("to_q", "to_k", "to_v", "to_out", "heads"))


def _attn1_modules(unet: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in unet.named_modules() if _is_attn1(n, m)]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def linfusion_config(unet: nn.Module, mid_dim: Optional[int] = None) -> Dict[str, list]:
    """The released config for `unet`: {"modules_list": [{module_name, dim_n, heads,
    projection_mid_dim}, ...]} over its `attn1` modules in named_modules() order.

    For a swapped UNet, projection_mid_dim is read from the layers (None when it equals dim_n);
    otherwise it is `mid_dim`. Save it as config.json beside `linfusion_state_dict(unet)` to write
    a checkpoint folder in the released format."""
    mods = []
    for name, m in _attn1_modules(unet):
        dim = int(m.to_q.weight.shape[0])
        md = mid_dim
        if isinstance(m, GeneralizedLinearAttention):  # what the layer has (None: m = C)
            width = m.to_q_[0].out_features if isinstance(m.to_q_, nn.Sequential) else -1
            md = None if width == dim else width
        mods.append({"module_name": name, "dim_n": dim,
                     "heads": int(m.heads), "projection_mid_dim": md})
    return {"modules_list": mods}


def load_linfusion_checkpoint(path: Union[str, os.PathLike]) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """Reads a released LinFusion checkpoint from disk: (state_dict, config or None).

    `path` is a folder (config.json + diffusion_pytorch_model.safetensors / .bin) or a weights
    file (.safetensors, .bin, .pt, .pth). Only local files are read.
    """
    path = os.fspath(path)
    config = None
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                config = json.load(f)
            if "modules_list" not in config:
                raise ValueError(f"apply_linfusion: {cfg_file} has no 'modules_list'; not a LinFusion "
                                 f"checkpoint config")
        candidates = [os.path.join(path, f) for f in _WEIGHT_FILES]
        candidates += sorted(os.path.join(path, f) for f in os.listdir(path)
                             if f.endswith((".safetensors", ".bin")))
        files = [f for f in candidates if os.path.isfile(f)]
        if not files:
            raise FileNotFoundError(f"apply_linfusion: no .safetensors or .bin weights in folder {path!r}")
        weights = files[0]
    elif os.path.isfile(path):
        weights = path
    else:
        raise FileNotFoundError(f"apply_linfusion: {path!r} is neither a local folder nor a file "
                                f"(checkpoints are never downloaded; download the folder first)")
    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(weights, device="cpu")
    else:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping):
        raise ValueError(f"apply_linfusion: {weights!r} does not hold a state dict")
    return dict(sd), config


def _split_state_dict(sd: Mapping[str, torch.Tensor], count: int) -> List[Dict[str, torch.Tensor]]:
    per = [dict() for _ in range(count)]
    for key, val in sd.items():
        idx, _, rest = key.partition(".")
        if not idx.isdigit() or not rest:
            raise ValueError(f"apply_linfusion: state dict key {key!r} is not in the released "
                             f"'{{i}}.{{param}}' format (e.g. '0.to_q.weight')")
        i = int(idx)
        if i >= count:
            raise ValueError(f"apply_linfusion: state dict key {key!r} refers to attn1 module {i}, but "
                             f"the UNet has {count} attn1 modules")
        per[i][rest] = val
    return per


def _infer_mid_dim(sd: Mapping[str, torch.Tensor]) -> Optional[int]:
    w = sd.get("to_q_.0.weight")
    if w is not None:
        return int(w.shape[0])
    if "to_q.weight" in sd and not any(k.startswith(("to_q_.", "to_k_.")) for k in sd):
        return -1
    return None


def apply_linfusion(unet: nn.Module, state_dict=None, mid_dim: Optional[int] = None, *,
                    backend: Optional[str] = None, copy_weights: bool = True) -> nn.Module:
    """Replaces every `attn1` of a diffusers UNet (SD-1.5, 2.1, XL) with `GeneralizedLinearAttention`.

    Args:
        unet: a diffusers `UNet2DConditionModel` (any module whose self-attentions are named `attn1`).
        state_dict: None (keep the attention's projections, fresh residual MLPs: a starting point
            for distillation), a dict in the released `{i}.{param}` format, or a local path to a
            released checkpoint folder (config.json + weights) or weights file. Loaded strictly:
            missing or unexpected keys raise.
        mid_dim: width of the residual MLPs (None: inferred from the state dict / config, else the
            channel count as in LinFusion-1-5; -1: none). SD-XL's release uses C/16.
        backend: `fastdit.linear_attention` backend of the new layers (None: best available).
        copy_weights: with no state dict, start to_q/k/v/out from the attention's weights.
    Returns the same `unet`, modified in place; `revert_linfusion(unet)` undoes it.
    """
    config = None
    if isinstance(state_dict, (str, os.PathLike)):
        state_dict, config = load_linfusion_checkpoint(state_dict)
    elif state_dict is not None and not isinstance(state_dict, Mapping):
        raise TypeError(f"apply_linfusion: state_dict must be None, a mapping or a path, got "
                        f"{type(state_dict).__name__}")
    targets = _attn1_modules(unet)
    if not targets:
        raise ValueError("apply_linfusion: the model has no module named 'attn1' (is it a diffusers "
                         "UNet2DConditionModel?)")
    if any(isinstance(m, GeneralizedLinearAttention) for _, m in targets):
        raise ValueError("apply_linfusion: LinFusion is already applied to this UNet; call "
                         "revert_linfusion(unet) first")
    per_layer = None
    if state_dict is not None:
        per_layer = _split_state_dict(state_dict, len(targets))
    entries = None
    if config is not None:
        entries = config["modules_list"]
        if len(entries) != len(targets):
            raise ValueError(f"apply_linfusion: checkpoint config lists {len(entries)} modules, the UNet "
                             f"has {len(targets)} attn1 modules")
    new_modules = []
    for i, (name, attn) in enumerate(targets):
        md = mid_dim
        if entries is not None:
            e = entries[i]
            dim = int(attn.to_q.weight.shape[0])
            if e.get("module_name", name) != name or int(e["dim_n"]) != dim or int(e["heads"]) != int(attn.heads):
                raise ValueError(f"apply_linfusion: checkpoint entry {i} ({e}) does not match the UNet's "
                                 f"attn1 module {name!r} (dim_n={dim}, heads={attn.heads})")
            if md is None:
                md = e.get("projection_mid_dim")
        if md is None and per_layer is not None:
            md = _infer_mid_dim(per_layer[i])
        new = GeneralizedLinearAttention.from_attention(attn, md, copy_weights=copy_weights,
                                                        backend=backend)
        if per_layer is not None:
            try:
                new.load_state_dict(per_layer[i], strict=True)
            except RuntimeError as exc:
                raise ValueError(f"apply_linfusion: weights for attn1 module {i} ({name!r}) do not "
                                 f"match: {exc}") from None
        new.train(attn.training)
        new_modules.append((name, attn, new))
    # Swap only once everything loaded, so a failure leaves the UNet untouched.
    for name, attn, new in new_modules:
        object.__setattr__(new, _ORIGINAL, attn)  # kept unregistered: not in state_dict/parameters
        _set_submodule(unet, name, new)
    return unet


def revert_linfusion(unet: nn.Module) -> nn.Module:
    """Puts back the attention modules `apply_linfusion` replaced (moved to the current device and
    dtype of the LinFusion layers). Returns the same `unet`."""
    found = False
    for name, m in _attn1_modules(unet):
        if not isinstance(m, GeneralizedLinearAttention):
            continue
        orig = getattr(m, _ORIGINAL, None)
        if orig is None:
            raise ValueError(f"revert_linfusion: {name!r} was not installed by apply_linfusion; no "
                             f"original module to restore")
        w = m.to_q.weight
        orig.to(device=w.device, dtype=w.dtype)
        orig.train(m.training)
        _set_submodule(unet, name, orig)
        found = True
    if not found:
        raise ValueError("revert_linfusion: LinFusion is not applied to this UNet")
    return unet


def linfusion_state_dict(unet: nn.Module) -> Dict[str, torch.Tensor]:
    """The LinFusion weights of a swapped UNet in the released `{i}.{param}` format."""
    out = {}
    layers = _attn1_modules(unet)
    if not layers or not all(isinstance(m, GeneralizedLinearAttention) for _, m in layers):
        raise ValueError("linfusion_state_dict: apply_linfusion(unet) first")
    for i, (_, m) in enumerate(layers):
        for key, val in m.state_dict().items():
            out[f"{i}.{key}"] = val
    return out
