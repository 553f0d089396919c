"""The FID Inception-v3 network with ADM's input pipeline, loaded from a local weight file (nothing is downloaded).

ADM's evaluation suite (openai/guided-diffusion ``evaluations/evaluator.py``) runs the frozen TensorFlow graph
``classify_image_graph_def.pb`` of ``inception-2015-12-05``. This module reproduces what that graph computes:

* **Input**: float images in [0, 255] (NHWC in ADM; NCHW here), any size.
* **Resize**: the graph's ``ResizeBilinear`` op to 299 x 299, TF1 semantics (``align_corners=False`` and no
  half-pixel centres: source coordinate = ``dst * in / out``). PyTorch's ``interpolate`` uses half-pixel
  centres and gives different pixels (:func:`resize_bilinear_tf1`).
* **Normalise**: the graph's ``Sub`` (128) and ``Mul`` (1/128) ops: ``(x - 128) / 128``.
* **Network**: Inception-v3 as ported to PyTorch by pytorch-fid (``pt_inception-2015-12-05``): 1008 logits,
  average pools that do not count padding in the A, C and first E blocks, a max pool in the last E block's
  pool branch.
* **Outputs** (``forward``):

  - ``pool``: ``pool_3:0``, 2048 features (FID, precision/recall);
  - ``logits``: ``pool_3 @ W`` with ``W = softmax/weights`` and **no bias**, the input of ADM's softmax for the
    Inception Score (ADM's ``_create_softmax_graph`` multiplies by the ``softmax/logits/MatMul`` weight only);
  - ``spatial``: ``mixed_6/conv:0`` (the sFID features), its first 7 channels flattened channels-last, as ADM's
    ``spatial[..., :7]`` then ``reshape(N, -1)`` on an NHWC tensor: 17 x 17 x 7 = 2023 values.

Which PyTorch tensor ``mixed_6/conv:0`` is:

* The graph's blocks ``mixed``, ``mixed_1`` … ``mixed_10`` are torchvision's ``Mixed_5b`` … ``Mixed_7c`` in
  order, so ``mixed_6`` is ``Mixed_6d``. torch-fidelity's converter of the TF graph
  (``utils/util_convert_inception_weights.py``, table ``map_tf_to_pt``) maps ``mixed_6/conv/conv2d_params`` to
  ``Mixed_6d.branch1x1.conv`` and ``mixed_6/conv/batchnorm`` to ``Mixed_6d.branch1x1.bn``: ``mixed_6/conv`` is the
  1x1 branch of ``Mixed_6d`` (192 channels at 17 x 17).
* Within such a scope the graph's ops run ``conv/Conv2D`` → ``conv/batchnorm`` (BatchNormWithGlobalNormalization)
  → ``conv/CheckNumerics`` → ``conv/control_dependency`` → ``conv`` (the op list of the graph as printed in
  Tensorflex's documentation of ``get_graph_ops`` for ``classify_image_graph_def.pb``). The op named exactly
  ``…/conv`` is the last of the layer, after the batch norm: its ReLU. So ``mixed_6/conv:0`` is
  ``relu(bn(conv(x)))`` of ``Mixed_6d.branch1x1``: the output of that ``BasicConv2d`` (conv, batch norm, ReLU),
  which is also the first 192 channels of ``Mixed_6d``'s output.

Weight files may be pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` is the same file), any ``.pth``/``.pt`` state dict with those keys
(read with ``torch.load(weights_only=True)``), or ``.safetensors``. Only the standard file (checked by SHA-256,
:data:`STANDARD_WEIGHTS_SHA256`) gives numbers comparable to published ones; others load with a warning.
Pickled model objects (NVIDIA's ``inception-2015-12-05.pkl``) are refused: loading them runs code.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv

from tread_scale.errors import CheckpointError

log = logging.getLogger(__name__)

FEATURE_DIM = 2048
NUM_LOGITS = 1008
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # ADM: spatial[..., :7] of mixed_6/conv:0 (Mixed_6d.branch1x1), 17 x 17 x 7 = 2023 values
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS

# SHA-256 of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (95,628,359 bytes), the PyTorch port of the TF
# graph's weights; torch-fidelity publishes the same file as weights-inception-2015-12-05-6726825d.pth. The
# maintainers publish only the 8-hex prefix, in the file name (torch.hub's convention: the prefix of the file's
# SHA-256, which torch.hub checks on download). The full digest below is the one several independent projects
# record for both files (it starts with that prefix); it is not from the maintainers themselves.
STANDARD_WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
STANDARD_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TensorFlow 1's ``ResizeBilinear`` with ``align_corners=False`` (no half-pixel centres).

    Output pixel ``i`` reads source coordinate ``i * in / out`` (the scale in float32, as TF computes it), takes
    its floor and the next pixel (clamped to the edge) and interpolates first along x, then along y, all in
    float32. This is what ADM's TF graph does to every image; it is not PyTorch's ``interpolate``
    (``align_corners=False`` there means half-pixel centres: ``(i + 0.5) * in / out - 0.5``).

    Args:
        x: ``(B, C, H, W)`` floats.
        size: Output height and width.

    Returns:
        ``(B, C, size, size)`` float32.
    """
    x = x.to(torch.float32)

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(n_in / size, dtype=torch.float32)  # == float32(n_in) / size, correctly rounded
        src = torch.arange(size, dtype=torch.float32, device=x.device) * scale.to(x.device)
        lo = src.floor()
        frac = src - lo
        lo = lo.long().clamp_max(n_in - 1)
        hi = (lo + 1).clamp_max(n_in - 1)
        return lo, hi, frac

    y0, y1, fy = taps(x.shape[2])
    x0, x1, fx = taps(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]
    fx = fx.view(1, 1, 1, -1)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy.view(1, 1, -1, 1)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """ADM's graph input pipeline: TF1 bilinear resize to 299, then ``(x - 128) / 128``.

    Args:
        images: ``(B, 3, H, W)`` in [0, 255] (uint8 or float).
    """
    x = resize_bilinear_tf1(images.to(torch.float32), INPUT_SIZE)
    return (x - 128.0) / 128.0  # the graph multiplies by 0.0078125 = 1/128: the same float32 result


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
    """Inception-v3 of the TF FID graph with ADM's pipeline: pool3 (2048), unbiased logits (1008), sFID (2023).

    Input: ``(B, 3, H, W)`` images in [0, 255] (uint8), any size. See the module docstring for what each
    output is in ADM's graph.

    Attributes:
        weights_sha256: SHA-256 of the loaded weight file (``None`` until :func:`load_inception` sets it).
        standard_weights: Whether that file is the standard ``pt_inception-2015-12-05`` port.
    """

    def __init__(self) -> None:
        super().__init__()
        net = tv.Inception3(num_classes=NUM_LOGITS, aux_logits=False, transform_input=False, init_weights=False)
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
        self.weights_sha256: str | None = None
        self.standard_weights = False

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The network on already preprocessed ``(B, 3, 299, 299)`` input (see :func:`preprocess`)."""
        n = self.net
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                     "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                     "Mixed_6c"):
            x = getattr(n, name)(x)
        branches = n.Mixed_6d._forward(x)  # branches[0] is Mixed_6d.branch1x1 = the TF graph's mixed_6/conv
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # channels-last, as ADM
        x = torch.cat(branches, 1)
        for name in ("Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
        logits = pool @ n.fc.weight.T  # ADM: pool_3 @ softmax weights, without the bias
        return {"pool": pool, "logits": logits, "spatial": spatial}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(preprocess(images))


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save_inception(model: FIDInception, path: str | Path) -> Path:
    """Write the weights as safetensors (torchvision key layout), atomically, with the usual file mode."""
    from safetensors.torch import save_file

    from tread_scale.files import replace_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(tmp))
    return replace_atomically(tmp, path)  # safetensors creates its file 0600


def load_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInception:
    """Load FID Inception weights from a local file (see the module docstring for the formats).

    The file's SHA-256 is compared with :data:`STANDARD_WEIGHTS_SHA256`; another file loads with a warning
    naming the expected digest, and ``standard_weights`` is ``False`` on the returned model.

    Raises:
        CheckpointError: If the file is missing, pickled code, or its keys do not fit the network.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"Inception weights {str(p)!r} not found (nothing is downloaded; pass a local "
                              f"{STANDARD_WEIGHTS_FILE} or a .safetensors file)")
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
    model.weights_sha256 = file_sha256(p)
    model.standard_weights = model.weights_sha256 == STANDARD_WEIGHTS_SHA256
    if not model.standard_weights:
        log.warning("Inception weights %s have SHA-256 %s, not the standard pt_inception-2015-12-05 port (%s, "
                    "SHA-256 %s): FID, sFID, IS and precision/recall from them are not comparable to published "
                    "numbers", p, model.weights_sha256, STANDARD_WEIGHTS_FILE, STANDARD_WEIGHTS_SHA256)
    return model.to(device).eval()
