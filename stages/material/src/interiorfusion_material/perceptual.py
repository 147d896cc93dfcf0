"""LPIPS for the perceptual loss and the held-out image metric, with the `lpips` package.

The package ships its linear calibration layers (lpips/weights/v0.1/<net>.pth) but takes the backbone from
torchvision, which downloads ImageNet weights at construction. Here the backbone is built random
(`pnet_rand=True`) and its weights are loaded from torchvision's own checkpoint file: a configured path, or
`torchvision` = torch.hub's checkpoint folder ($TORCH_HOME/hub/checkpoints, where torchvision itself caches it).
A real config whose file is missing is one clear error before anything is built; `random_init: true` (tests and
smoke configs) keeps the random backbone and logs that it did, so its LPIPS numbers are not ImageNet-calibrated.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from interiorfusion_core.config.base import PretrainedRef
from interiorfusion_core.errors import UserError

log = logging.getLogger("interiorfusion_material")
CONFIG_KEY = "lpips_weights"
# torchvision's checkpoint file names (the ImageNet weights the lpips package's linear layers were fitted on).
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth",
                  "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def backbone_path(ref: PretrainedRef, network: str) -> Path:
    """Where the backbone's torchvision weights file must be for `ref` (a file, a folder holding it, or
    `torchvision`: torch.hub's checkpoint folder)."""
    name = BACKBONE_FILES[network]
    if ref.source in ("torchvision", f"torchvision:{network}"):
        return Path(torch.hub.get_dir()) / "checkpoints" / name
    path = Path(ref.source).expanduser()
    return path / name if path.is_dir() else path


def check_lpips_weights(ref: PretrainedRef, network: str) -> None:
    """One sentence now, not after a model build, when a real config's backbone file is missing."""
    if ref.random_init:
        return
    path = backbone_path(ref, network)
    if not path.is_file():
        raise UserError(
            f"{CONFIG_KEY}: LPIPS ({network}) needs torchvision's ImageNet weights {BACKBONE_FILES[network]}, and "
            f"there is no file at {path} (set {CONFIG_KEY}.source to the file or its folder, or put it under "
            f"$TORCH_HOME/hub/checkpoints; {CONFIG_KEY}.random_init: true is for test and smoke configs only)")


def build_lpips(ref: PretrainedRef, network: str = "vgg") -> nn.Module:
    """The frozen LPIPS network (eval mode, no grad, fp32 on CPU). Inputs in [−1, 1], NCHW."""
    import lpips

    check_lpips_weights(ref, network)
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=False`
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net=network, pnet_rand=True, verbose=False)
    if ref.random_init:
        log.warning("LPIPS with a random-initialised %s backbone (%s.random_init): a test/smoke config; its values "
                    "are not comparable with published LPIPS", network, CONFIG_KEY)
    else:
        path = backbone_path(ref, network)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # any unreadable file is the same user error
            raise UserError(f"{CONFIG_KEY}: {path} is not a readable torchvision checkpoint ({exc})") from None
        load_backbone(net.net, state, path)
    net.eval().requires_grad_(False)
    return net


def load_backbone(backbone: nn.Module, state: dict[str, torch.Tensor], where: Path | str) -> None:
    """Copy torchvision's `features.<i>.*` tensors into the lpips backbone, whose slices keep torchvision's layer
    index as the module name (slice1.0, slice2.4, …)."""
    by_index = {}
    for slice_name, module in backbone.named_children():
        if slice_name.startswith("slice"):
            for index, _ in module.named_children():
                by_index[index] = slice_name
    mapped = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1] in by_index:
            mapped[f"{by_index[parts[1]]}.{'.'.join(parts[1:])}"] = value
    own = backbone.state_dict()
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise UserError(f"{CONFIG_KEY}: {where} lacks the backbone tensors {', '.join(missing[:4])}… (is it "
                        "torchvision's ImageNet checkpoint of this network?)")
    bad = [k for k in own if own[k].shape != mapped[k].shape]
    if bad:
        raise UserError(f"{CONFIG_KEY}: {where}: {bad[0]} has shape {tuple(mapped[bad[0]].shape)}, expected "
                        f"{tuple(own[bad[0]].shape)}")
    backbone.load_state_dict({k: mapped[k] for k in own})


# The backbones pool 4 times before their last feature level: smaller images are upsampled to this side first.
MIN_SIDE = 32


def lpips_distance(net: nn.Module, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS of images [B, 3, H, W] in [0, 1] (the network takes [−1, 1]); images with a side below 32 px
    are upsampled (nearest) to 32 first, the size the backbones' deepest level needs."""
    dtype = next(net.parameters()).dtype
    side = min(pred.shape[-2:])
    if side < MIN_SIDE:
        scale = MIN_SIDE / side
        pred = torch.nn.functional.interpolate(pred, scale_factor=scale, mode="nearest")
        target = torch.nn.functional.interpolate(target, scale_factor=scale, mode="nearest")
    d = net(pred.to(dtype) * 2 - 1, target.to(dtype) * 2 - 1)
    return d.float().mean()
