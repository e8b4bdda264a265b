"""GPU check of issue 3: Virchow2-sized encoder throughput and one bf16 training epoch per decoder.

Runs the frozen Virchow2 architecture (ViT-H/14, 631 M parameters, built without weights: the
numbers do not depend on them) over random 224 px tiles, and trains each decoder at the seeds'
size on its token grids with the Poisson loss for one epoch, under bf16 autocast. Prints tiles
per second and peak GPU memory per step, measured side by side in one run. Then the training
loader's rate at that token width (``bench/loading.py``): tiles read from zarr per batch against the
set resident on the device (``training.resident``).

    .venv/bin/python bench/gpu_check.py                       # on a GPU machine
    .venv/bin/python bench/gpu_check.py --device cpu --small --loader-tiles 16  # a smoke run of the script
"""

import argparse
import json
import tempfile
import time

import torch
from loading import measure, summary, write_synthetic

from sparsitytrap.decoders import build_decoder, count_parameters
from sparsitytrap.encoder import build_encoder, token_grid
from sparsitytrap.losses import build_loss


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def encoder_throughput(encoder, device, n_tiles, batch):
    """Tiles per second of the frozen encoder (bf16 autocast on a GPU), and the token grids."""
    images = torch.rand(n_tiles, 3, 224, 224)
    grids = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        token_grid(encoder, images[:batch].to(device))  # warm-up
        sync(device)
        start = time.perf_counter()
        for i in range(0, n_tiles, batch):
            grids.append(token_grid(encoder, images[i : i + batch].to(device)).float().cpu())
        sync(device)
    return n_tiles / (time.perf_counter() - start), torch.cat(grids)


def train_epoch(name, grids, n_genes, device, batch, widths):
    """One epoch of a decoder with the Poisson loss in bf16 autocast: tiles/s and peak memory."""
    torch.manual_seed(0)
    dec = build_decoder(name, grids.shape[1], n_genes, **widths).to(device)
    loss_fn = build_loss({"name": "poisson"})
    opt = torch.optim.AdamW(dec.parameters(), lr=1e-4)
    counts = torch.poisson(torch.full((batch, n_genes, 128, 128), 0.05))
    mask = torch.ones(batch, 128, 128, dtype=torch.bool)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(grids), batch):
        x = grids[i : i + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = dec(x)
        loss = loss_fn(out.float(), counts[: len(x)].to(device), mask[: len(x)].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    seconds = time.perf_counter() - start
    return {"decoder": name, "parameters": count_parameters(dec), "tiles_per_s": len(grids) / seconds,
            "peak_gpu_gib": peak_gib(device), "final_loss": float(loss)}  # fmt: skip


def loader_rates(grid_shape, device, n_tiles, batch):
    """Training loader tiles/s at the token grid's width: zarr (0 and 2 workers) and resident."""
    dim, grid = grid_shape[0], grid_shape[1]
    with tempfile.TemporaryDirectory() as tmp:
        tiles, feats = write_synthetic(tmp, n_tiles, dim, grid, n_genes=50)
        df = measure(tiles, feats, device, batch_size=batch, workers=2, repeats=2)
    return summary(df).to_dict(orient="records")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiles", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--genes", type=int, default=50)
    ap.add_argument("--small", action="store_true", help="a tiny ViT and tiny decoders (smoke run)")
    ap.add_argument("--loader-tiles", type=int, default=256, help="tiles of the loader check (0: skip it)")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.small:
        enc_cfg = {"arch": "vit_tiny_patch16_224", "kwargs": {"depth": 1}}
        widths = {"hist2st": {"hidden": 16, "n_heads": 2, "ff_dim": 32}, "img2st": {"width": 8}}
    else:
        enc_cfg, widths = {"preset": "virchow2", "random_init": True}, {"hist2st": {}, "img2st": {}}  # seed sizes
    encoder = build_encoder(enc_cfg).to(device).eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tiles_per_s, grids = encoder_throughput(encoder, device, a.tiles, a.batch)
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "encoder": enc_cfg,
        "tiles": a.tiles,
        "batch": a.batch,
        "encoder_tiles_per_s": tiles_per_s,
        "encoder_peak_gpu_gib": peak_gib(device),
        "token_grid": list(grids.shape[1:]),
        "decoders": [],
    }
    del encoder
    for name in ("hist2st", "img2st"):
        report["decoders"].append(train_epoch(name, grids, a.genes, device, a.batch, widths[name]))
    if a.loader_tiles:
        report["loader"] = loader_rates(report["token_grid"], device, a.loader_tiles, a.batch)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
