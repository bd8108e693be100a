"""Image features from a folder of item images (file name = item token) with a local model.

The model is any ``torch.nn.Module`` loaded from a local file — a TorchScript file
(``torch.jit.save``; e.g. a traced CLIP vision tower or a ResNet without its classifier), or a
torchvision ``state_dict`` together with its architecture name when torchvision is installed.
Nothing is downloaded. Images are read with PIL, converted to RGB, resized so the shorter side is
``size``, centre-cropped to ``size x size`` and normalised with the model family's mean/std.

Items without an image (or with an unreadable one) get a zero row in ``<m>_feat.npy`` and
``False`` in ``<m>_mask.npy``: the mask, not the zeros, says the feature is missing.
"""

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: per-channel mean and std the model was trained with
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
WEIGHTS_HELP = ("pass --weights FILE: a TorchScript file (torch.jit.script(model).save(FILE) or torch.jit.trace) "
                "whose forward maps a [B, 3, size, size] batch to [B, dim] features, or a torchvision state_dict "
                "together with --arch NAME (e.g. resnet50; needs torchvision). Nothing is downloaded")


class ImageModelError(ValueError):
    """No usable image model."""


def load_image_encoder(weights: Optional[str], arch: Optional[str] = None) -> torch.nn.Module:
    """The image model in eval mode, on CPU, from a local file (see the module docstring)."""
    if not weights:
        raise ImageModelError(f"no image model given: {WEIGHTS_HELP}.")
    path = Path(weights)
    if not path.is_file():
        raise ImageModelError(f"{path}: no such file; {WEIGHTS_HELP}.")
    if arch:
        return _torchvision_model(arch, path)
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except RuntimeError as err:
        raise ImageModelError(f"{path}: not a TorchScript file ({str(err).splitlines()[0]}); {WEIGHTS_HELP}.") from err


def _torchvision_model(arch: str, path: Path) -> torch.nn.Module:
    try:
        import torchvision.models
    except ImportError as err:  # PyPI's torchvision must match the torch build exactly
        raise ImageModelError(f"--arch {arch} needs torchvision, which does not import here ({err}); export the "
                              "model as TorchScript where torchvision works and pass that file instead") from err
    model = getattr(torchvision.models, arch)(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    # The classifier head is dropped: the features are the penultimate layer's output.
    for head in ("fc", "classifier", "heads", "head"):
        if hasattr(model, head):
            setattr(model, head, torch.nn.Identity())
            break
    return model.eval()


def find_images(folder: Path) -> Dict[str, Path]:
    """Item token -> image file, for every image in ``folder`` (not recursive)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    images: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in images:
            raise ValueError(f"item '{path.stem}' has two images, {images[path.stem].name} and {path.name}; keep one")
        images[path.stem] = path
    return images


def load_image(path: Path, size: int) -> torch.Tensor:
    """``[3, size, size]`` floats in [0, 1]: shorter side resized to ``size``, centre crop."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


@torch.inference_mode()
def _embed(model: torch.nn.Module, batch: List[torch.Tensor], normalization: str) -> np.ndarray:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[normalization])
    out = model((torch.stack(batch) - mean) / std)
    if out.ndim > 2:  # a feature map: average over its spatial positions
        out = out.flatten(2).mean(dim=2)
    return out.float().numpy()


def encode_item_images(tokens: Sequence[str], images: Dict[str, Path], model: torch.nn.Module, size: int = 224,
                       normalization: str = "imagenet",
                       batch_size: int = 32) -> Tuple[np.ndarray, np.ndarray, List[Path]]:
    """Features for the items ``tokens`` (``.item`` row order): ``(feat [n, dim] float32,
    mask [n] bool, unreadable files)``. Rows of items without a readable image are zeros and
    masked out."""
    todo = [(row, images[t]) for row, t in enumerate(tokens) if t in images]
    if not todo:
        example = ", ".join(f"{t}.jpg" for t in list(tokens)[:3])
        raise FileNotFoundError(f"none of the {len(tokens)} items has an image in the folder (expected file names "
                                f"like {example})")
    rows, chunks, unreadable = [], [], []
    for start in tqdm(range(0, len(todo), batch_size), desc="images", unit="batch"):
        batch, batch_rows = [], []
        for row, path in todo[start:start + batch_size]:
            try:
                batch.append(load_image(path, size))
                batch_rows.append(row)
            except OSError:  # PIL's UnidentifiedImageError is an OSError
                unreadable.append(path)
        if batch:
            chunks.append(_embed(model, batch, normalization))
            rows += batch_rows
    if not chunks:
        raise ValueError(f"none of the {len(todo)} images could be read, e.g. {unreadable[:3]}")
    if unreadable:
        logging.getLogger(__name__).warning(f"{len(unreadable)} unreadable images are masked, e.g. {unreadable[:3]}")
    emb = np.concatenate(chunks)
    feat = np.zeros((len(tokens), emb.shape[1]), dtype=np.float32)
    mask = np.zeros(len(tokens), dtype=bool)
    feat[rows], mask[rows] = emb, True
    return feat, mask, unreadable
