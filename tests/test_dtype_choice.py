"""bfloat16 on a CPU that only emulates it is warned about (the capability check mocked)."""

from __future__ import annotations

import logging

import torch

from ldm import Pipeline
from ldm import pipeline as pipeline_module


def test_emulated_bfloat16_is_warned_about_and_native_is_not(sd1_folder, monkeypatch, caplog):
    monkeypatch.setattr(pipeline_module, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="ldm"):
        pipe = Pipeline.from_pretrained(sd1_folder, device="cpu", dtype="bfloat16")
    assert "bfloat16 on this CPU is emulated" in caplog.text and "use dtype float32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm"):
        pipe.to(dtype=torch.float32)
        pipe.to(dtype=torch.bfloat16)
    assert caplog.text.count("emulated") == 1  # float32 is not warned about, bfloat16 again is
    monkeypatch.setattr(pipeline_module, "native_bf16", lambda device: True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm"):
        Pipeline.from_pretrained(sd1_folder, device="cpu", dtype="bfloat16")
    assert "emulated" not in caplog.text
