"""CLIP score of generated images against their captions, with a CLIP model from a local folder.

Convention (torchmetrics' ``CLIPScore``): for an image ``I`` and its caption ``C``, with ``E_I`` and ``E_C``
the image and text embeddings of the *same* CLIP (transformers ``CLIPModel.get_image_features`` /
``get_text_features``),

    CLIPScore(I, C) = 100 * max(cos(E_I, E_C), 0)

and a set's score is the mean over its image-caption pairs. Preprocessing is that of the folder's
``CLIPProcessor``, as torchmetrics applies it: uint8 RGB pixels are resized (shortest edge, bicubic),
centre-cropped to the model's input size, scaled to [0, 1] and normalised with the processor's mean and std;
captions are tokenized with padding and, when longer than the text model's positions (77 for OpenAI's CLIPs),
cut to that many tokens the way torchmetrics cuts them (the ids are sliced, so the end-of-text token is cut
too: the pooled embedding then comes from another position, for a current config the start token, which makes
every over-long caption embed alike). :class:`CLIPScorer` equals
``torchmetrics.multimodal.clip_score.CLIPScore`` on the same weights (within 1e-4, see the tests) with one
difference that only shows when some pair's cosine is negative: torchmetrics' ``CLIPScore`` *class* clamps the
mean (``max(mean(100 * cos), 0)``) while its functional ``clip_score`` of one pair, and this module, clamp each
pair. With trained CLIPs image-caption cosines are positive (about 0.15 to 0.4), so the two agree.

What it is comparable to: a CLIP score depends entirely on the CLIP model; only numbers from the same CLIP
weights (and the same preprocessing) compare. Published text-to-image numbers mostly use OpenAI's ViT-L/14
(``openai/clip-vit-large-patch14``, torchmetrics' default) or ViT-B/16 (``openai/clip-vit-base-patch16``),
and the two give different values for the same images. Nothing is downloaded here, so the user names the
model by giving its folder; :meth:`CLIPScorer.describe` records the folder, a hash of its weights and the
model's sizes to store with every result.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tread_scale.errors import ConfigError

log = logging.getLogger(__name__)

#: The convention recorded with every result.
CONVENTION = "torchmetrics CLIPScore: 100 * max(cos, 0)"
#: Files of a tokenizer: either a fast tokenizer's ``tokenizer.json`` or a CLIP BPE's vocabulary and merges.
_TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _check_folder(folder: str | os.PathLike) -> Path:
    """Check that ``folder`` holds a CLIP model, its image processor and its tokenizer; raise ConfigError if not."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"CLIP folder {str(root)!r} does not exist (or is not a folder); give a local folder "
                          "written by CLIPModel.save_pretrained and CLIPProcessor.save_pretrained")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"CLIP folder {str(root)!r} has no config.json: it is not a saved model")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"CLIP folder {str(root)!r}: config.json cannot be read ({e})") from e
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "clip":
        raise ConfigError(f"CLIP folder {str(root)!r} holds a model of type {model_type!r}, not a CLIP model "
                          "(model_type 'clip', a CLIPModel with both text and vision towers)")
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in root.iterdir() if p.is_file()):
        raise ConfigError(f"CLIP folder {str(root)!r} has no weight file (*.safetensors or *.bin)")
    if not (root / "preprocessor_config.json").is_file():
        raise ConfigError(f"CLIP folder {str(root)!r} has no image processor (preprocessor_config.json); save the "
                          "model's CLIPProcessor there too")
    if not any(all((root / name).is_file() for name in names) for names in _TOKENIZER_SETS):
        raise ConfigError(f"CLIP folder {str(root)!r} has no tokenizer (tokenizer.json, or vocab.json and "
                          "merges.txt); save the model's CLIPProcessor there too")
    return root


def _as_nchw_uint8(images: Any) -> torch.Tensor:
    """``(N, H, W, 3)`` or ``(N, 3, H, W)`` uint8 array or tensor as an ``(N, 3, H, W)`` uint8 CPU tensor.

    A shape that reads both ways (``W == 3`` and ``C == 3``) is taken as NHWC, the sampler's layout.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"images must be a uint8 numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 pixels (0..255), got dtype {images.dtype}; CLIP's processor "
                         "divides by 255, so float images in [0, 1] would be misread")
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D, (N, H, W, 3) or (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[-1] == 3:
        images = images.permute(0, 3, 1, 2)
    elif images.shape[1] != 3:
        raise ValueError(f"images must be RGB, (N, H, W, 3) or (N, 3, H, W), got shape {tuple(images.shape)}")
    return images.detach().cpu().contiguous()


class CLIPScorer:
    """CLIP score (torchmetrics' convention, ``100 * max(cos, 0)`` per pair) with a CLIP from a local folder.

    Args:
        folder: A local folder written by ``CLIPModel.save_pretrained`` and ``CLIPProcessor.save_pretrained``
            (config, weights, image processor and tokenizer). Nothing is downloaded.
        device: Where the model runs (``"cpu"``, ``"cuda"``, a ``torch.device``).
        batch_size: Image-caption pairs per forward pass.

    Raises:
        ConfigError: The folder is missing or is not a CLIP model with its processor (named in the message),
            or ``batch_size`` is not positive. Checked before anything is loaded.

    Example:
        >>> scorer = CLIPScorer("/models/clip-vit-large-patch14", device="cuda")
        >>> per_pair = scorer.scores(samples, captions)   # (N,) float64
        >>> result = {"clip_score": float(per_pair.mean()), **scorer.describe()}
    """

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu", batch_size: int = 64):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"CLIP score batch_size must be a positive integer, got {batch_size!r}")
        self.folder = _check_folder(folder)
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(self.folder, local_files_only=True)
            self.processor = CLIPProcessor.from_pretrained(self.folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"CLIP folder {str(self.folder)!r} cannot be loaded as a CLIPModel and "
                              f"CLIPProcessor: {e}") from e
        self.device = torch.device(device)
        self.model = model.to(device=self.device, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.max_positions = int(self.model.config.text_config.max_position_embeddings)

    # ------------------------------------------------------------------------------------------------ scoring
    def scores(self, images: Any, captions: Sequence[str], *, clamp: bool = True) -> torch.Tensor:
        """Per-pair CLIP scores of ``images`` against ``captions``.

        Args:
            images: ``(N, H, W, 3)`` uint8 numpy array or tensor (the sampler's layout), or an ``(N, 3, H, W)``
                uint8 tensor. Any size: the processor resizes and crops to the model's input.
            captions: ``N`` strings, ``captions[i]`` describing ``images[i]``.
            clamp: ``True`` (the convention): ``100 * max(cos, 0)``. ``False``: the unclamped ``100 * cos``
                (torchmetrics' ``CLIPScore`` class is ``max(mean(100 * cos), 0)`` of these).

        Returns:
            ``(N,)`` float64 CPU tensor of scores in ``[0, 100]`` (``[-100, 100]`` unclamped).

        Raises:
            ValueError: The counts of images and captions differ, or images are not uint8 RGB.
        """
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("captions must be a list of strings, one per image")
        captions = list(captions)
        n_images = len(images)
        if n_images != len(captions):
            raise ValueError(f"CLIP score needs one caption per image: got {n_images} images and "
                             f"{len(captions)} captions")
        pixels = _as_nchw_uint8(images)
        out = []
        truncated = 0
        for start in range(0, n_images, self.batch_size):
            stop = start + self.batch_size
            image_emb = self._image_features(pixels[start:stop])
            text_emb, cut = self._text_features(captions[start:stop])
            truncated += cut
            out.append(_cosine(image_emb, text_emb) * 100.0)
        if truncated:
            log.warning("CLIP score: %d of %d captions are longer than the text model's %d positions and were cut "
                        "to %d tokens as torchmetrics cuts them (the end-of-text token is cut too, so their text "
                        "embedding is pooled at another token: with a current CLIP config the start token, the "
                        "same for every such caption)", truncated, n_images,
                        self.max_positions, self.max_positions)
        result = torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
        return result.clamp(min=0.0) if clamp else result

    def score(self, images: Any, captions: Sequence[str]) -> float:
        """The mean of :meth:`scores` over the pairs: the set's CLIP score."""
        return float(self.scores(images, captions).mean())

    @torch.inference_mode()
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = self.processor.image_processor(images=list(pixels), return_tensors="pt",
                                               input_data_format="channels_first")
        return self.model.get_image_features(pixel_values=batch["pixel_values"].to(self.device, torch.float32))

    @torch.inference_mode()
    def _text_features(self, captions: list[str]) -> tuple[torch.Tensor, int]:
        tokens = self.processor.tokenizer(captions, padding=True, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        cut = int((mask.sum(dim=-1) > self.max_positions).sum())
        # torchmetrics' truncation: tokenize in full, then keep the first max_positions ids (and mask).
        ids, mask = ids[:, :self.max_positions], mask[:, :self.max_positions]
        emb = self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
        return emb, cut

    # ------------------------------------------------------------------------------------------------ record
    def describe(self) -> dict:
        """Facts to store with a CLIP score: which CLIP (folder and weights hash), its sizes, the convention."""
        from tread_scale.data.conversion.text_encoder import _hash_files

        files = sorted(p for p in self.folder.resolve().rglob("*") if p.is_file())
        weights = [p for p in files if p.name.endswith(_WEIGHT_SUFFIXES)]
        config = self.model.config
        crop = getattr(self.processor.image_processor, "crop_size", None)
        return {
            "folder": str(self.folder),
            "weights_sha256": _hash_files(self.folder.resolve(), weights)[:16],
            "weight_files": [p.relative_to(self.folder.resolve()).as_posix() for p in weights],
            "projection_dim": int(config.projection_dim),
            "image_size": int(config.vision_config.image_size),
            "processor_crop_size": dict(crop) if isinstance(crop, dict) else crop,
            "text_max_positions": self.max_positions,
            "convention": CONVENTION,
        }


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two ``(N, D)`` embeddings, in float64 on the CPU."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(dim=-1)


# ------------------------------------------------------------------------------------------------ tiny CLIP
class CLIPTally:
    """The CLIP score of generated batches, each image with its prompt, summed over ranks at the end.

    Args:
        scorer: The CLIP model.
        prompts: The prompt strings; a batch names its images' prompts by index.
        device: Where the running sums live (the collective's device: CUDA under NCCL).
    """

    def __init__(self, scorer: CLIPScorer, prompts: Sequence[str], device: torch.device | str) -> None:
        self.scorer = scorer
        self.prompts = prompts
        self.sums = torch.zeros(2, dtype=torch.float64, device=device)  # score sum, pairs

    def add(self, images, prompt_ids: Sequence[int]) -> None:
        """Score a batch of uint8 images against their prompts ``prompt_ids``."""
        got = self.scorer.scores(images, [self.prompts[i] for i in prompt_ids])
        self.sums += torch.tensor([float(got.sum()), len(got)], dtype=torch.float64, device=self.sums.device)

    def mean(self) -> float:
        """The mean over every rank's pairs (every rank of the process group, if any, must call it)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.sums)
        return float(self.sums[0] / self.sums[1])


def build_tiny_clip(folder: str | os.PathLike, seed: int = 0, vocab: Sequence[str] | None = None) -> str:
    """Write a tiny random ``CLIPModel`` and its ``CLIPProcessor`` to ``folder`` (``save_pretrained`` layout).

    For tests and the demo: text and vision widths 32, 2 layers, 4 heads, projection 16, 32x32 input in 8x8
    patches, 77 text positions. The tokenizer is the whole-word one of
    :func:`~tread_scale.devtools.demo_data.build_tiny_text_encoder` (nothing is downloaded); the image processor
    resizes the shortest edge to 32 and centre-crops 32x32 with OpenAI's mean and std. Deterministic.

    Args:
        folder: Output folder (created).
        seed: Seed of the random weights.
        vocab: Words the tokenizer knows (others become ``<unk>``); by default the captioned demo's words.

    Returns:
        The folder, as a string.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tread_scale.data.conversion.text_encoder import _CLIP_SPECIALS, _word_tokenizer

    if vocab is None:
        from tread_scale.devtools.demo_shapes import DEMO_CAPTION_VOCAB

        vocab = DEMO_CAPTION_VOCAB
    tok, ids = _word_tokenizer(list(vocab) + [",", "."], _CLIP_SPECIALS, "<|startoftext|> $A <|endoftext|>", 77,
                               bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                               unk_token="<unk>")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(ids), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=ids["<|startoftext|>"],
                         eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return str(out)
