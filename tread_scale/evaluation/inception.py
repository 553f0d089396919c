"""The FID Inception-v3 network, built locally and loaded from a local weight file (nothing is downloaded).

The architecture is torchvision's Inception-v3 with the changes of the TensorFlow FID graph
(``inception-2015-12-05``) as ported to PyTorch by pytorch-fid: 1008 logits, average pools that do not
count padding in the A, C and first E blocks, and a max pool in the last E block's pool branch. Weight
files may be:

* pytorch-fid's ``pt_inception-2015-12-05-*.pth`` (a state dict in torchvision's key layout);
* any ``.pth`` / ``.pt`` state dict with those keys (read with ``torch.load(weights_only=True)``);
* a ``.safetensors`` file with those keys (what :func:`save_inception` writes).

Pickled model objects (NVIDIA's ``inception-2015-12-05.pkl``) are not loaded: they run code on load.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

from tread_scale.errors import CheckpointError

FEATURE_DIM = 2048
SPATIAL_CHANNELS = 7  # sFID: the first 7 channels of Mixed_6e (7 x 17 x 17 = 2023 values), as in ADM's suite


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _FIDInceptionA(tv.InceptionA):
    def _forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [b1, b5, b3, self.branch_pool(_avg3(x))]


class _FIDInceptionC(tv.InceptionC):
    def _forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return [b1, b7, bd, self.branch_pool(_avg3(x))]


class _FIDInceptionE(tv.InceptionE):
    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__(in_channels)
        self.max_pool = max_pool

    def _forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return [b1, b3, bd, self.branch_pool(pooled)]


class FIDInception(nn.Module):
    """Inception-v3 returning pool3 features (2048), logits (1008) and sFID spatial features (2023).

    Input: ``(B, 3, H, W)`` uint8 images (any size; resized bilinearly to 299).
    """

    def __init__(self) -> None:
        super().__init__()
        net = tv.Inception3(num_classes=1008, aux_logits=False, transform_input=False, init_weights=False)
        net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = _FIDInceptionE(1280, max_pool=False)
        net.Mixed_7c = _FIDInceptionE(2048, max_pool=True)
        self.net = net

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.net
        x = images.to(torch.float32)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = x / 127.5 - 1.0
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c", "Mixed_6d", "Mixed_6e"):
            x = getattr(n, name)(x)
        spatial = x[:, :SPATIAL_CHANNELS].flatten(1)
        for name in ("Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = n.fc(pool)
        return {"pool": pool, "logits": logits, "spatial": spatial}


def save_inception(model: FIDInception, path: str | Path) -> Path:
    """Write the weights as safetensors (torchvision key layout)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))
    return path


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInception:
    """Load FID Inception weights from a local file (see the module docstring for the formats).

    Raises:
        CheckpointError: If the file is missing, pickled code, or its keys do not fit the network.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Inception weights {str(p)!r} not found (nothing is downloaded; pass a local "
                              "pt_inception-2015-12-05 .pth or a .safetensors file)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    elif p.suffix in (".pth", ".pt"):
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickles with code land here
            raise CheckpointError(f"{p}: not a plain state dict ({type(e).__name__}); pickled models are refused "
                                  "because loading them runs code") from None
    else:
        raise CheckpointError(f"{p}: unsupported Inception weight format {p.suffix!r} (.pth, .pt or .safetensors)")
    model = FIDInception()
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("AuxLogits")]
    if missing or unexpected:
        raise CheckpointError(f"{p}: keys do not fit the FID Inception network "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval()
