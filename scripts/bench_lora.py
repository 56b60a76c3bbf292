"""Patched vs merged LoRA: per-U-Net-call cost and the cost of switching a scale.

Patched: every targeted Linear/Conv2d gets a forward hook y += s * up(down(x)) (what PEFT
and A1111's forward mode do). Merged: ldm's LoraSet (W = W0 + s dW, no per-call work).
Run from the repository root: .venv/bin/python scripts/bench_lora.py [--full]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ldm.adapters.lora import LoraSet
from ldm.checkpoints.files import save_safetensors
from ldm.config import ModelConfig
from ldm.models.layers import ResnetBlock2D, Transformer2D
from ldm.models.unet import UNet


def targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and ("attentions" in n or "resnets" in n)
            and "conv_shortcut" not in n]


def factors(m: nn.Module, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    w = m.weight
    down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.05
    up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=gen) * 0.05
    return down.to(w.dtype), up.to(w.dtype)


def patch(unet: nn.Module, rank: int, scale: float = 0.8) -> list:
    gen = torch.Generator().manual_seed(0)
    handles = []
    for _, m in targets(unet):
        down, up = factors(m, rank, gen)
        if isinstance(m, nn.Conv2d):
            def hook(mod, inp, out, down=down, up=up):
                h = F.conv2d(inp[0], down, stride=mod.stride, padding=mod.padding)
                return out + scale * F.conv2d(h, up)
        else:
            def hook(mod, inp, out, down=down, up=up):
                return out + scale * F.linear(F.linear(inp[0], down), up)
        handles.append(m.register_forward_hook(hook))
    return handles


def lora_file(unet: nn.Module, rank: int, path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for n, m in targets(unet):
        down, up = factors(m, rank, gen)
        k = "lora_unet_" + n.replace(".", "_")
        sd[k + ".lora_down.weight"], sd[k + ".lora_up.weight"] = down.float(), up.float()
    save_safetensors(sd, path)
    return path


class Blocks(nn.Module):
    """One SD1.5 resnet + transformer pair at ``channels`` (what a U-Net level repeats)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, 1280, 32, 1e-5)])
        self.attentions = nn.ModuleList([Transformer2D(channels, 8, 768)])

    def forward(self, x, temb, ctx):
        return self.attentions[0](self.resnets[0](x, temb), ctx)


def bench(name: str, model: nn.Module, config: ModelConfig, call, repeats: int, ranks=(8, 32)) -> None:
    """Per-call time plain / patched / merged, each the minimum over ``repeats`` rounds
    run in turn (so load from other processes hits every variant alike), plus the
    time to load (read + merge) and to switch the scale of a merged LoRA."""
    print(f"{name} ({len(targets(model))} target layers):")
    for rank in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            path = lora_file(model, rank, Path(tmp) / "l.safetensors")
            loras = LoraSet(model, nn.Module(), config)
            load = _time(lambda: loras.load(path, 0.8))
            switch = min(_time(lambda: loras.set_scale("l", s)) for s in (0.5, 0.7, 0.9))
            loras.unload()
            best = {"plain": float("inf"), "patched": float("inf"), "merged": float("inf")}
            for round_ in range(repeats + 1):  # round 0 warms up
                for mode in best:
                    hooks = patch(model, rank) if mode == "patched" else []
                    if mode == "merged":
                        loras.load(path, 0.8)
                    with torch.inference_mode():
                        elapsed = _time(call)
                    for h in hooks:
                        h.remove()
                    loras.unload()
                    if round_:
                        best[mode] = min(best[mode], elapsed)
        p, pa, m = best["plain"], best["patched"], best["merged"]
        print(f"  rank {rank}: plain {p * 1000:.0f} ms, patched {pa * 1000:.0f} ms ({(pa / p - 1) * 100:+.0f}%), "
              f"merged {m * 1000:.0f} ms ({(m / p - 1) * 100:+.0f}%); load+merge {load * 1000:.0f} ms, "
              f"set_scale {switch * 1000:.0f} ms")


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true", help="set_scale time on the full-size SD1.5 U-Net")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="rounds for the SD1.5 blocks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from ldm import Pipeline
    toy = Pipeline.from_pretrained(device="cpu", dtype=torch.float32)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, toy.config.unet.cross_attention_dim)
    bench("toy U-Net (weights/ldm-toy.safetensors), batch 2 (CFG), 8x8 latents", toy.unet, toy.config,
          lambda: toy.unet(x, t, ctx), 30)
    sd15 = ModelConfig()
    for channels, side in ((320, 64), (1280, 16)):
        block = Blocks(channels).eval()
        x = torch.randn(2, channels, side, side)
        temb, ctx = torch.randn(2, 1280), torch.randn(2, 77, 768)
        bench(f"SD1.5 resnet+transformer at {channels} ch, {side}x{side} (512 px), batch 2", block, sd15,
              lambda: block(x, temb, ctx), args.repeats)
    if args.full:
        unet = UNet(sd15.unet).eval()
        for rank in (8, 32):
            loras = LoraSet(unet, nn.Module(), sd15)
            with tempfile.TemporaryDirectory() as tmp:
                loras.load(lora_file(unet, rank, Path(tmp) / "l.safetensors"), 0.8)
            switch = min(_time(lambda: loras.set_scale("l", s)) for s in (0.5, 0.7))
            t_unload = _time(loras.unload)
            print(f"full SD1.5 U-Net, rank {rank} on {len(targets(unet))} layers: set_scale {switch:.2f} s, "
                  f"unload {t_unload:.2f} s")


if __name__ == "__main__":
    main()
