"""A folder of captioned pictures for LoRA training, kohya-ss's convention: ``NAME.png``
with its caption in ``NAME.txt`` beside it.

The folder is read once and checked whole before anything trains: every picture must
decode and have a caption file, and every problem is reported in one error listing the
files. Pictures are scaled (Lanczos) so the shorter side is the training resolution and
centre-cropped to a square, then encoded once by the VAE (kohya-ss's ``cache_latents``);
the posterior moments are kept, and each training sample draws its own latent from them.

Samples are drawn by global index (as :mod:`ldm.training.datasets`): sample ``n`` is
picture ``perm_e[n mod N]`` of epoch ``e = n // N``, where ``perm_e`` is a permutation
seeded by the epoch, so each epoch shows every picture once, and the data never depends
on batching or on where a run was resumed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..editing import load_image
from ..models.vae import DiagonalGaussian
from .losses import to_pixels
from .seeding import derive_seed

logger = logging.getLogger("ldm")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # kohya-ss's IMAGE_EXTENSIONS
CAPTION_SUFFIX = ".txt"
_SHOWN = 5  # files named in an error before "... (N in all)"
_REPEATS = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Example:
    """One training picture, its caption (the caption file's first non-empty line), how
    many times an epoch shows it, and whether it is a regularisation picture (kohya-ss's
    ``--reg_data_dir``: an ordinary picture that keeps the rest of the model as it was)."""

    image: Path
    caption: str
    repeats: int = 1
    reg: bool = False


def name_files(paths: list[Path], root: Path | None = None) -> str:
    """``a.png, b.png, ... (12 in all)``: the first few names of a list of files (relative
    to ``root`` when given, else their bare names)."""
    names = ", ".join(str(p.relative_to(root)) if root else p.name for p in paths[:_SHOWN])
    return names + (f", ... ({len(paths)} in all)" if len(paths) > _SHOWN else "")


def _read_caption(path: Path) -> str | None:
    """The first non-empty line of a caption file (kohya-ss reads the same), None if there is none."""
    text = path.read_bytes().decode("utf-8-sig")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        logger.warning("%s: %d lines; the caption is the first one", path, len(lines))
    return lines[0] if lines else None


def _pictures(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def picture_groups(folder: Path) -> list[tuple[Path, int]]:
    """``(folder, repeats)`` of every group of pictures: ``folder`` itself (once per epoch)
    and its subfolders named ``<repeats>_<name>`` (kohya-ss's DreamBooth layout, e.g.
    ``10_ring``: each picture 10 times per epoch). Other subfolders are not read (logged)."""
    groups = [(folder, 1)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = _REPEATS.match(sub.name)
        if match and int(match[1]) >= 1:
            groups.append((sub, int(match[1])))
        else:
            logger.info("%s: not read (only subfolders named <repeats>_<name>, such as 10_%s, are)", sub, sub.name)
    return groups


def scan_folder(folder: str | Path, caption_suffix: str = CAPTION_SUFFIX, *, reg: bool = False) -> list[Example]:
    """The captioned pictures of ``folder``: those directly in it and those of its
    ``<repeats>_<name>`` subfolders (:func:`picture_groups`), sorted by name in each.

    Raises FileNotFoundError if ``folder`` does not exist, ValueError if it is not a
    folder, holds no pictures (``IMAGE_SUFFIXES``), or has pictures whose caption file
    is missing, empty or not UTF-8 (all of them listed). ``reg``: the folder holds
    regularisation pictures (every example is marked so).
    """
    folder = Path(folder)
    if not isinstance(caption_suffix, str) or not caption_suffix.startswith("."):
        raise ValueError(f"caption suffix must start with a dot, such as '.txt', got {caption_suffix!r}")
    if not folder.exists():
        raise FileNotFoundError(f"images folder not found: {folder}")
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder (give the folder that holds the pictures and captions)")
    examples, uncaptioned, empty, undecodable = [], [], [], []
    for group, repeats in picture_groups(folder):
        for image in _pictures(group):
            caption_path = image.with_suffix(caption_suffix)
            if not caption_path.is_file():
                uncaptioned.append(image)
                continue
            try:
                caption = _read_caption(caption_path)
            except UnicodeDecodeError:
                undecodable.append(caption_path)
                continue
            if caption is None:
                empty.append(caption_path)
                continue
            examples.append(Example(image, caption, repeats, reg))
    problems = [f"{len(files)} {what}: {name_files(files, folder)}" for files, what in (
        (uncaptioned, f"picture(s) without a caption file (NAME{caption_suffix} beside NAME.png)"),
        (empty, "empty caption file(s)"), (undecodable, "caption file(s) not in UTF-8")) if files]
    if problems:
        raise ValueError(f"{folder}: {'; '.join(problems)}")
    if not examples:
        raise ValueError(f"{folder}: no pictures ({', '.join(IMAGE_SUFFIXES)}) in this folder or in "
                         "<repeats>_<name> subfolders")
    return examples


def fit_square(picture: np.ndarray, size: int) -> np.ndarray:
    """A float ``(H, W, 3)`` picture in [0, 1] as uint8 ``(size, size, 3)``: scaled (Lanczos)
    so its shorter side is ``size``, then centre-cropped."""
    image = Image.fromarray((np.clip(picture, 0, 1) * 255).round().astype(np.uint8))
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (w2 - size) // 2, (h2 - size) // 2
        image = image.resize((w2, h2), Image.LANCZOS).crop((left, top, left + size, top + size))
    return np.asarray(image)


def load_pictures(examples: list[Example], size: int) -> np.ndarray:
    """Every example's picture as uint8 ``(N, size, size, 3)`` (see :func:`fit_square`);
    pictures that cannot be read are listed in one ValueError."""
    if not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"resolution must be a multiple of 8 and at least 8, got {size!r}")
    out, unreadable, resized = [], [], 0
    for ex in examples:
        try:
            picture = load_image(ex.image, "image")
        except (OSError, ValueError) as exc:
            logger.debug("cannot read %s: %s", ex.image, exc)
            unreadable.append(ex.image)
            continue
        resized += picture.shape[:2] != (size, size)
        out.append(fit_square(picture, size))
    if unreadable:
        raise ValueError(f"{len(unreadable)} picture(s) cannot be read as images: "
                         f"{name_files(unreadable, Path(os.path.commonpath([p.parent for p in unreadable])))}")
    if resized:
        logger.info("%d of %d pictures scaled and centre-cropped to %dx%d", resized, len(examples), size, size)
    return np.stack(out)


def dataset_digest(pictures: np.ndarray, examples: list[Example]) -> str:
    """SHA-256 of what is trained on: the pictures as prepared, their captions and repeats, in order."""
    digest = hashlib.sha256()
    for picture, ex in zip(pictures, examples, strict=True):
        digest.update(np.ascontiguousarray(picture).tobytes())
        digest.update(f"{ex.repeats}\0{ex.caption}\0{'reg' if ex.reg else ''}".encode("utf-8"))
    return digest.hexdigest()


@torch.no_grad()
def encode_pictures(vae: torch.nn.Module, pictures: np.ndarray, device: torch.device | str,
                    batch_size: int = 8) -> Tensor:
    """Posterior moments (mean and log-variance, concatenated on channels) of uint8
    ``(N, H, W, 3)`` pictures, float32 on the CPU."""
    chunks = []
    dtype = next(vae.parameters()).dtype
    for lo in range(0, len(pictures), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(pictures[lo:lo + batch_size])).permute(0, 3, 1, 2)
        posterior = vae.encode(to_pixels(batch).to(device, dtype))
        chunks.append(torch.cat([posterior.mean, posterior.logvar], 1).float().cpu())
    return torch.cat(chunks)


class CaptionedLatents(Dataset):
    """``{"latents", "caption", "picture"}`` samples: a latent drawn from a picture's
    posterior, scaled by the VAE's ``scaling_factor``, the picture's index, and the index
    of its caption, or ``len(moments)``
    (the empty caption) for a fraction ``caption_dropout`` of samples (kohya-ss's
    ``caption_dropout_rate``, which keeps the unconditional prediction of guidance in
    step with the new weights). An epoch shows picture ``j`` ``repeats[j]`` times
    (default once each), in an order drawn for the epoch."""

    def __init__(self, moments: Tensor, scaling_factor: float, seed: int, stream: int, first: int, count: int,
                 caption_dropout: float = 0.0, repeats: list[int] | None = None) -> None:
        if not 0.0 <= caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        if first < 0 or count < 0:
            raise ValueError(f"first and count must be >= 0, got {first} and {count}")
        repeats = [1] * len(moments) if repeats is None else list(repeats)
        if len(repeats) != len(moments) or any(not isinstance(r, int) or r < 1 for r in repeats):
            raise ValueError(f"repeats must be {len(moments)} integers >= 1, got {repeats!r:.80}")
        self.moments, self.scaling_factor = moments, scaling_factor
        self.seed, self.stream, self.first, self.count = seed, stream, first, count
        self.caption_dropout = caption_dropout
        self.pictures = np.repeat(np.arange(len(moments)), repeats)  # one epoch, in picture order
        self._epoch: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.count

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng(derive_seed(self.seed, self.stream, 0, epoch))
            self._epoch = (epoch, rng.permutation(self.pictures))
        return self._epoch[1]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        n = self.first + i
        epoch, position = divmod(n, len(self.pictures))
        j = int(self._order(epoch)[position])
        rng = np.random.default_rng(derive_seed(self.seed, self.stream, 1, n))
        noise = torch.Generator().manual_seed(int(rng.integers(2**62)))
        z = DiagonalGaussian(self.moments[j : j + 1]).sample(noise)[0]
        caption = len(self.moments) if rng.random() < self.caption_dropout else j
        return {"latents": z * self.scaling_factor, "caption": torch.tensor(caption), "picture": torch.tensor(j)}
