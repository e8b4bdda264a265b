"""Frozen timm encoders: prefix tokens dropped by count, weights from local files, frozen."""

import os

import pytest
import torch
from safetensors.torch import save_file

from sparsitytrap.encoder import build_encoder, build_timm_model, token_grid
from sparsitytrap.errors import InputError

# The Virchow2 architecture at toy widths: same prefix tokens (1 class + 4 register), patch 14.
TINY_VIRCHOW = {"preset": "virchow2", "kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "random_init": True}


def _images(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 224, 224, 3), generator=g, dtype=torch.uint8)


def test_prefix_tokens_dropped_by_count():
    enc = build_encoder(TINY_VIRCHOW)
    assert enc.num_prefix_tokens == 5 and enc.dim == 32
    images = _images()
    grid = token_grid(enc, images)
    assert grid.shape == (2, 32, 16, 16)
    # Independent check: grid cell (i, j) is token 5 + 16 i + j of the normalised image.
    x = images.permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        tokens = enc.model.forward_features(x)
    assert tokens.shape[1] == 261
    for i, j in [(0, 0), (3, 7), (15, 15)]:
        torch.testing.assert_close(grid[:, :, i, j], tokens[:, 5 + 16 * i + j])
    # Channel-first input gives the same grid.
    torch.testing.assert_close(token_grid(enc, images.permute(0, 3, 1, 2)), grid)


def test_non_square_remainder_raises():
    # Dropping only the class token leaves 260 tokens: the seed wrapper's silent fault.
    enc = build_encoder({**TINY_VIRCHOW, "num_prefix_tokens": 1})
    with pytest.raises(InputError, match="260.*not a square"):
        token_grid(enc, _images(1))


def test_cnn_feature_map_passes_through():
    enc = build_encoder({"arch": "resnet18", "kwargs": {"num_classes": 0}})
    grid = token_grid(enc, _images(1))
    assert grid.shape == (1, 512, 7, 7)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip(tmp_path, suffix):
    source = build_encoder({**TINY_VIRCHOW, "seed": 1})
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_encoder({**TINY_VIRCHOW, "seed": 2, "weights": str(path)})
    different = build_encoder({**TINY_VIRCHOW, "seed": 2})
    images = _images(1)
    torch.testing.assert_close(token_grid(loaded, images), token_grid(source, images))
    assert not torch.allclose(token_grid(different, images), token_grid(source, images))


def test_missing_or_mismatched_weights_raise(tmp_path):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(InputError, match="absent.safetensors: weights file not found"):
        build_encoder({**TINY_VIRCHOW, "weights": str(missing)})
    other = build_encoder({**TINY_VIRCHOW, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}})
    path = tmp_path / "deeper.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(InputError, match="deeper.safetensors: keys do not match"):
        build_encoder({**TINY_VIRCHOW, "weights": str(path)})


def test_bad_configs_raise():
    with pytest.raises(InputError, match=r"encoder.weights: .*needs a local weights file"):
        build_encoder({"preset": "virchow2"})
    with pytest.raises(InputError, match="hub name"):
        build_encoder({"arch": "hf-hub:paige-ai/Virchow2"})
    with pytest.raises(InputError, match="encoder.arch"):
        build_encoder({"arch": "no_such_model_xyz"})
    with pytest.raises(InputError, match="pretrained"):
        build_encoder({"arch": "resnet18", "kwargs": {"pretrained": True}})
    with pytest.raises(InputError, match="unknown layer"):
        build_encoder({**TINY_VIRCHOW, "kwargs": {"mlp_layer": "NoSuchMlp"}})


def test_frozen_and_eval():
    enc = build_encoder(TINY_VIRCHOW)
    parent = torch.nn.Sequential(enc)
    parent.train()  # a training loop switching everything to train mode
    assert not enc.training and not enc.model.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert not token_grid(enc, _images(1)).requires_grad


def test_demo_preset_grid():
    enc = build_encoder({"preset": "demo"})
    assert token_grid(enc, _images(1)).shape == (1, 192, 14, 14)


def test_virchow2_parameter_count_on_meta_device():
    # Shapes only (no memory): the exact Virchow2 architecture has 631M parameters, 16 x 16 x 1280.
    with torch.device("meta"):
        model = build_timm_model({"preset": "virchow2"})
        enc = build_encoder({"preset": "virchow2", "random_init": True})
        grid = token_grid(enc, torch.zeros(1, 3, 224, 224, device="meta"))
    assert sum(p.numel() for p in model.parameters()) == 631_239_424
    assert grid.shape == (1, 1280, 16, 16)


@pytest.mark.skipif(
    not os.environ.get("SPARSITYTRAP_FULL_ENCODER"), reason="3 GB, slow: set SPARSITYTRAP_FULL_ENCODER=1"
)
def test_virchow2_full_size():
    enc = build_encoder({"preset": "virchow2", "random_init": True})
    n = sum(p.numel() for p in enc.parameters())
    assert 6.2e8 < n < 6.4e8
    assert token_grid(enc, _images(1)).shape == (1, 1280, 16, 16)
