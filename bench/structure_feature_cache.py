"""Structure conditions' frozen-feature cache: one epoch of frozen image + semantic features with the cache warm vs
computed every epoch, in the same run.

    python bench/structure_feature_cache.py [--images 32] [--image-size 224] [--batch 4] [--epochs 3] [--json out.json]

Both frozen encoders are randomly initialised at real-model widths that a CPU runs in seconds (DINOv3 ViT-S/16:
384 wide, 12 layers; Mask2Former over a Swin-T-sized backbone, pixel decoder 256, levels 1/32 + 1/16), so the
figure is the ratio, not the seconds of ViT-L / Swin-L (which only make the cache's win larger). Epoch 1 with the
cache computes and writes every image (cold); the later epochs read (warm). The baseline computes every epoch.
Each epoch is `frozen_features` over the images in batches, the call the structure task makes per step.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench._report import row, write_json
from interiorfusion_structure.conditions import build_frozen_encoders, frozen_features
from interiorfusion_structure.config import ConditioningConfig
from interiorfusion_structure.feature_cache import open_feature_caches


def epoch(frozen: Any, images: torch.Tensor, batch: int, caches: Any) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        frozen_features(frozen, {"rgb": images[i: i + batch]}, caches)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224, help="resize side (multiple of 32)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3, help="epochs per mode (the first cached one is cold)")
    ap.add_argument("--hidden", type=int, default=384, help="DINOv3 width (ViT-S: 384)")
    ap.add_argument("--layers", type=int, default=12, help="DINOv3 depth (ViT-S: 12)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ConditioningConfig.model_validate({
        "image_size": args.image_size, "image_dim": args.hidden, "semantic_dim": 256,
        "image_encoder": {"source": "bench/dinov3", "random_init": True},
        "image_encoder_config": {"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                                 "num_hidden_layers": args.layers, "num_attention_heads": max(args.hidden // 64, 1)},
        "semantic_encoder": {"source": "bench/mask2former", "random_init": True},
        "semantic_encoder_config": {"backbone_config": {
            "model_type": "swin", "embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24],
            "window_size": 7, "out_features": ["stage1", "stage2", "stage3", "stage4"]},
            "encoder_layers": 6},
    })
    frozen = build_frozen_encoders(cfg)
    images = torch.rand(args.images, 3, 256, 256)  # a rendered view's size; resized to image_size inside
    with torch.no_grad(), tempfile.TemporaryDirectory(prefix="bench-feature-cache-") as tmp:
        uncached = [epoch(frozen, images, args.batch, None) for _ in range(args.epochs)]
        caches = open_feature_caches(Path(tmp) / "feature_cache", frozen)
        cached = [epoch(frozen, images, args.batch, caches) for _ in range(args.epochs)]
        entry_bytes = sum(p.stat().st_size for p in Path(tmp).rglob("*.safetensors"))
        stats = {k: c.stats() for k, c in caches.items()}
    base = min(uncached)
    warm = min(cached[1:]) if len(cached) > 1 else float("nan")
    results: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "epoch_s": {"uncached": uncached, "cached": cached}, "cache_stats": stats,
        "bytes_per_image": entry_bytes / args.images,
        "headline": {"uncached_epoch_s": round(base, 3), "cold_epoch_s": round(cached[0], 3),
                     "warm_epoch_s": round(warm, 3), "warm_over_uncached": round(warm / base, 4),
                     "cold_over_uncached": round(cached[0] / base, 3)},
    }
    h = results["headline"]
    print(f"\nFrozen features, {args.images} images → {args.image_size} px, batch {args.batch}, "
          f"{args.threads} thread(s), DINOv3 {args.hidden}×{args.layers} + Mask2Former (Swin-T-sized)")
    print(f"{'mode':<22}{'epoch s':>10}")
    print(f"{'no cache (best)':<22}{base:>10.3f}")
    print(f"{'cache, cold (epoch 1)':<22}{cached[0]:>10.3f}")
    print(f"{'cache, warm (best)':<22}{warm:>10.3f}")
    print(f"warm / no cache: {h['warm_over_uncached']:.4f}; cold / no cache: {h['cold_over_uncached']:.3f}; "
          f"{results['bytes_per_image'] / 1e6:.2f} MB per image on disk")
    if args.json:
        what = f"{args.images} images at {args.image_size} px, DINOv3 {args.hidden}×{args.layers} + Mask2Former"
        rows = [
            row(f"frozen-feature epoch, {what}, cache warm", warm, "s", "no cache", base),
            row("frozen-feature epoch, cache cold (compute + write)", cached[0], "s", "no cache", base),
        ]
        write_json(args.json, "structure_feature_cache", rows, results, headline=h)
    return results


if __name__ == "__main__":
    main()
