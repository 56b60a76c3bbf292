"""A tiny CNN that tells a toy-world object's kind and whether a cat wears a hat.

Trained only on the generator's own labels (fresh random scenes every step), with
blur, noise and colour-gain augmentation so it also reads the slightly soft pictures
a VAE decodes. It sees 64x64 pictures; larger ones are box-downsampled first.

    python -m ldm.toy.classifier --out weights/toy_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .world import KINDS, make_batch

INPUT_SIZE = 64
DEFAULT_PATH = Path(__file__).resolve().parents[2] / "weights" / "toy_classifier.safetensors"


class ToyClassifier(nn.Module):
    """Conv stages (all but the first stride 2), global avg+max pool, two linear heads (~84k params)."""

    def __init__(self, channels: tuple[int, ...] = (16, 32, 48, 64, 64)) -> None:
        super().__init__()
        self.channels = tuple(channels)
        layers, c_in = [], 3
        for i, c in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(c_in, c, 3, stride, 1), nn.BatchNorm2d(c), nn.SiLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        # Average and max pooling: max keeps small local evidence (a hat on a small cat).
        self.kind = nn.Linear(2 * c_in, len(KINDS))
        self.hat = nn.Linear(2 * c_in, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: (N, 3, 64, 64) in [-1, 1] -> kind logits (N, 5), hat logit (N,)."""
        f = self.features(x)
        h = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
        return self.kind(h), self.hat(h).squeeze(1)


def to_input(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) images (array or list) -> float (N, 3, 64, 64) in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(list(images)))).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1
    if x.shape[-1] != INPUT_SIZE or x.shape[-2] != INPUT_SIZE:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="area")
    return x


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Soften like a VAE decode (random blur strength), shift colours a little, add noise.
    n = x.shape[0]
    blurred = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    mix = torch.rand(n, 1, 1, 1, generator=gen)
    x = x + mix * (blurred - x)
    gain = 1 + 0.08 * (torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1)
    noise = torch.randn(x.shape, generator=gen) * 0.05 * torch.rand(n, 1, 1, 1, generator=gen)
    return ((x + 1) * gain - 1 + noise).clamp(-1, 1)


def _labels(scenes) -> tuple[torch.Tensor, torch.Tensor]:
    kinds = torch.tensor([KINDS.index(s.kind) for s in scenes])
    hats = torch.tensor([float(s.hat) for s in scenes])
    return kinds, hats


def train_classifier(steps: int = 600, seed: int = 0, batch_size: int = 64, lr: float = 3e-3,
                     log_every: int = 0) -> ToyClassifier:
    """Train on fresh scenes (train and held-out combinations alike) every step.

    Returns the model in eval mode; its ``losses`` attribute lists the per-step loss.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ToyClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1),
                                                pct_start=0.15)
    losses = []
    model.train()
    for step in range(steps):
        # Both splits: the classifier scores held-out combinations too.
        split = "heldout" if step % 10 == 9 else "train"
        batch = make_batch(seed * 1_000_003 + step, batch_size, INPUT_SIZE, split)
        kinds, hats = _labels(batch.scenes)
        kind_logits, hat_logits = model(_augment(to_input(batch.images), gen))
        loss = F.cross_entropy(kind_logits, kinds) + F.binary_cross_entropy_with_logits(hat_logits, hats)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f}", flush=True)
    model.eval()
    model.losses = losses
    return model


@torch.no_grad()
def classify(model: ToyClassifier, images, batch_size: int = 256) -> list[dict]:
    """Per image ``{"kind": str, "hat": bool}`` (hat is False for anything but a cat)."""
    model.eval()
    out = []
    images = list(images)
    for i in range(0, len(images), batch_size):
        kind_logits, hat_logits = model(to_input(images[i:i + batch_size]))
        for k, h in zip(kind_logits.argmax(1).tolist(), (hat_logits > 0).tolist()):
            out.append({"kind": KINDS[k], "hat": bool(h) and KINDS[k] == "cat"})
    return out


def accuracy(model: ToyClassifier, n: int = 1000, seed: int = 12345, size: int = 64,
             split: str = "train") -> dict[str, float]:
    """Accuracy on ``n`` fresh rendered scenes: kind, hat (on cats), both."""
    batch = make_batch(seed, n, size, split)
    preds = classify(model, batch.images)
    kind_ok = [p["kind"] == s.kind for p, s in zip(preds, batch.scenes)]
    hat_ok = [p["hat"] == s.hat for p, s in zip(preds, batch.scenes) if s.kind == "cat"]
    both = [p["kind"] == s.kind and p["hat"] == s.hat for p, s in zip(preds, batch.scenes)]
    return {"kind": float(np.mean(kind_ok)), "hat": float(np.mean(hat_ok)),
            "all": float(np.mean(both))}


def save_classifier(model: ToyClassifier, path: str | Path) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"channels": json.dumps(model.channels),
                                          "kinds": json.dumps(KINDS)})


def load_classifier(path: str | Path) -> ToyClassifier:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no toy classifier at {path} (train one: python -m ldm.toy.classifier --out {path})")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
    if json.loads(meta.get("kinds", "null")) != list(KINDS):
        raise ValueError(f"{path}: classifier was trained for kinds {meta.get('kinds')}, expected {list(KINDS)}")
    model = ToyClassifier(tuple(json.loads(meta["channels"])))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


@lru_cache(maxsize=4)
def _load_cached(path: str) -> ToyClassifier:
    return load_classifier(path)


def get_classifier(classifier=None) -> ToyClassifier:
    """A model as given, loaded from a path, or (None) the default ``weights/`` file."""
    if isinstance(classifier, ToyClassifier):
        return classifier
    return _load_cached(str(Path(classifier) if classifier is not None else DEFAULT_PATH))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy-world kind/hat classifier.")
    parser.add_argument("--out", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model = train_classifier(args.steps, args.seed, log_every=100)
    took = time.time() - start
    acc = {split: accuracy(model, split=split) for split in ("train", "heldout")}
    acc128 = accuracy(model, n=500, size=128)
    print(f"trained in {took:.0f} s; accuracy {acc}; at 128 px {acc128}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_classifier(model, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
