"""Frozen timm encoders and their patch-token grids.

An encoder is built from explicit timm arguments (never from a hub name: those need the network
even with ``pretrained=False``) and, for real use, a local weights file. ``token_grid`` turns a
batch of tile images into a ``[B, D, h, w]`` grid of patch tokens: the prefix tokens (class and
register tokens) are dropped by count, and a remainder that is not a square grid is an error,
never a silent fall-back to global pooling.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import timm
import torch
from torch import nn

from sparsitytrap.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# YAML cannot hold classes: layer names in `kwargs` are looked up here.
LAYERS = {
    "SwiGLUPacked": timm.layers.SwiGLUPacked,
    "SwiGLU": timm.layers.SwiGLU,
    "GluMlp": timm.layers.GluMlp,
    "Mlp": timm.layers.Mlp,
    "SiLU": nn.SiLU,
    "GELU": nn.GELU,
    "ReLU": nn.ReLU,
    "LayerNorm": nn.LayerNorm,
}
_LAYER_KWARGS = ("mlp_layer", "act_layer", "norm_layer")

PRESETS = {
    # Virchow2 (ViT-H/14, 632M parameters): 1 class + 4 register tokens, 16 x 16 patches at
    # 224 px, width 1280. Weights are gated on their hub: give a local file.
    "virchow2": {
        "arch": "vit_huge_patch14_224",
        "kwargs": {
            "img_size": 224,
            "init_values": 1e-5,
            "reg_tokens": 4,
            "mlp_ratio": 5.3375,
            "global_pool": "",
            "dynamic_img_size": True,
            "mlp_layer": "SwiGLUPacked",
            "act_layer": "SiLU",
            "num_classes": 0,
        },
        "requires_weights": True,
    },
    # Small and random: 192-dim tokens on a 14 x 14 grid, fast enough for the CPU demo.
    "demo": {
        "arch": "vit_tiny_patch16_224",
        "kwargs": {"img_size": 224, "depth": 4, "num_classes": 0},
        "requires_weights": False,
    },
}

_KEYS = {"preset", "arch", "kwargs", "weights", "num_prefix_tokens", "mean", "std", "random_init", "seed"}


class FrozenEncoder(nn.Module):
    """A timm model with its input normalisation and prefix-token count; always frozen.

    Attributes
    ----------
    model
        The timm model.
    name
        The timm architecture name.
    dim
        Token width D.
    num_prefix_tokens
        Tokens before the patch tokens (class + register), dropped by `token_grid`.
    """

    def __init__(self, model, name, num_prefix_tokens, mean, std):
        super().__init__()
        self.model = model
        self.name = name
        self.dim = int(model.num_features)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode=True):
        # Frozen means eval mode too: a parent's .train() must not switch on dropout or BN updates.
        return super().train(False)

    def forward(self, images):
        """Token grid of `images`, see `token_grid`."""
        return token_grid(self, images)


def resolve_config(cfg, where="encoder"):
    """Merge a preset into an encoder config and check its keys.

    Parameters
    ----------
    cfg
        Encoder config: ``arch`` and ``kwargs``, or ``preset``; optional ``weights``,
        ``num_prefix_tokens``, ``mean``, ``std``, ``random_init``, ``seed``.
    where
        Config key named in error messages.

    Returns
    -------
    dict
        The full config (a new dict; the input is not modified).
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - _KEYS)
    if unknown:
        raise InputError(where, f"unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
    preset = cfg.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"{where}.preset", f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        base = copy.deepcopy(PRESETS[preset])
        base["kwargs"].update(cfg.pop("kwargs", None) or {})
        base.update(cfg)
        cfg = base
    if not cfg.get("arch"):
        raise InputError(f"{where}.arch", "missing: give a timm model name or a preset")
    cfg.setdefault("kwargs", {})
    cfg["kwargs"] = dict(cfg["kwargs"] or {})
    return cfg


def _timm_kwargs(kwargs, where):
    kwargs = dict(kwargs)
    if kwargs.pop("pretrained", False):
        raise InputError(f"{where}.kwargs.pretrained", "nothing is downloaded; give `weights:` a local file")
    for key in _LAYER_KWARGS:
        value = kwargs.get(key)
        if not isinstance(value, str):
            continue
        if value in LAYERS:
            kwargs[key] = LAYERS[value]
        elif key != "act_layer":  # timm resolves activation names ("gelu", "silu") itself
            raise InputError(f"{where}.kwargs.{key}", f"unknown layer {value!r}; known: {sorted(LAYERS)}")
    return kwargs


def build_timm_model(cfg, where="encoder"):
    """Build the bare timm model of an encoder config (random weights, trainable).

    Parameters
    ----------
    cfg
        Encoder config, see `resolve_config`.
    where
        Config key named in error messages.

    Returns
    -------
    torch.nn.Module
    """
    return _create(resolve_config(cfg, where), where)


def _create(cfg, where):
    arch = cfg["arch"]
    if ":" in arch:
        raise InputError(
            f"{where}.arch", f"{arch!r} is a hub name (needs the network); give a timm architecture and local weights"
        )
    kwargs = _timm_kwargs(cfg["kwargs"], where)
    try:
        with torch.random.fork_rng(devices=[]):  # reproducible random init, global RNG untouched
            torch.manual_seed(int(cfg.get("seed", 0)))
            return timm.create_model(arch, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError) as err:
        fault = f"timm cannot build {arch!r} with {cfg['kwargs']}: {err}".replace("\n", " ")
        raise InputError(f"{where}.arch", fault) from None


def load_state_dict(path):
    """Read a state dict from a .safetensors file or a torch file (``weights_only=True``).

    Parameters
    ----------
    path
        Local weights file.

    Returns
    -------
    dict
        Parameter name -> tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input fault
        raise InputError(path, f"cannot read weights: {err}".replace("\n", " ")) from None
    # Training checkpoints often nest the weights one level down.
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and set(state) == {key} and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(path, "not a state dict of tensors")
    return state


def _load_weights(model, path):
    state = load_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(
            path,
            f"keys do not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
        )
    wrong = [k for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise InputError(
            path,
            f"{len(wrong)} tensors have the wrong shape, e.g. {k}: {tuple(state[k].shape)} "
            f"vs model {tuple(own[k].shape)}",
        )
    model.load_state_dict(state, strict=True)


def build_encoder(cfg, where="encoder"):
    """Build a frozen encoder (eval mode, no gradients) from a config dict.

    Parameters
    ----------
    cfg
        ``{"arch": timm name, "kwargs": {...}}`` or ``{"preset": "virchow2" | "demo"}``, plus
        optional ``weights`` (local .safetensors / .pt / .pth state dict), ``num_prefix_tokens``
        (default: the model's own), ``mean`` / ``std`` (default ImageNet), ``random_init``
        (allow a weights-requiring preset without weights, for tests) and ``seed``.
        ``pretrained`` is always False: nothing is downloaded.
    where
        Config key named in error messages.

    Returns
    -------
    FrozenEncoder
    """
    cfg = resolve_config(cfg, where)
    weights = cfg.get("weights")
    if weights is None and cfg.get("requires_weights") and not cfg.get("random_init"):
        raise InputError(
            f"{where}.weights", f"{cfg['arch']} needs a local weights file (random weights are meaningless)"
        )
    model = _create(cfg, where)
    if weights is not None:
        _load_weights(model, weights)
    n_prefix = cfg.get("num_prefix_tokens")
    if n_prefix is None:
        n_prefix = getattr(model, "num_prefix_tokens", 0)
    mean = tuple(cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(cfg.get("std") or IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        raise InputError(f"{where}.mean", "mean and std need 3 values (R, G, B)")
    return FrozenEncoder(model, cfg["arch"], n_prefix, mean, std)


def _to_nchw_float(images):
    if images.ndim != 4:
        raise ValueError(f"images must be [B, 3, H, W] or [B, H, W, 3], got shape {tuple(images.shape)}")
    if images.shape[1] != 3 and images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    if images.shape[1] != 3:
        raise ValueError(f"images need 3 colour channels, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()  # floats are taken as already in [0, 1]


def token_grid(encoder, images):
    """Patch-token grid of a batch of tile images.

    Parameters
    ----------
    encoder
        A `FrozenEncoder` from `build_encoder`.
    images
        uint8 (0-255) or float (0-1) tensor, ``[B, 3, H, W]`` or ``[B, H, W, 3]``.

    Returns
    -------
    torch.Tensor
        float32 ``[B, D, h, w]``: the patch tokens of a ViT without its prefix tokens, or the
        feature map of a CNN.
    """
    x = _to_nchw_float(images).to(encoder.mean.device)
    x = (x - encoder.mean) / encoder.std
    with torch.no_grad():
        feats = encoder.model.forward_features(x)
    if feats.ndim == 4:  # CNN: already a [B, C, h, w] map
        return feats.float()
    tokens = feats[:, encoder.num_prefix_tokens :]
    n = tokens.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise InputError(
            f"encoder {encoder.name}",
            f"{feats.shape[1]} tokens minus {encoder.num_prefix_tokens} prefix tokens leaves {n}, "
            "not a square grid (check num_prefix_tokens)",
        )
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side).float()
