"""Shared fixtures: tiny reference models saved once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The parity tests compare with diffusers in float32: pin the CPU default there, whatever
# this CPU would prefer (ldm.dtypes.default_dtype; tests of the rule unset it).
os.environ["LDM_CPU_DTYPE"] = "float32"

from reference import SD1_TINY, SD2V_TINY, save_diffusers_folder  # noqa: E402


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory):
    """A tiny SD1-style diffusers folder (eps prediction) with random weights."""
    return save_diffusers_folder(SD1_TINY, tmp_path_factory.mktemp("sd1") / "model", seed=1)


@pytest.fixture(scope="session")
def sd2v_folder(tmp_path_factory):
    """A tiny SD2-v-style diffusers folder (v prediction, linear proj_in) with random weights."""
    return save_diffusers_folder(SD2V_TINY, tmp_path_factory.mktemp("sd2v") / "model", seed=2)


@pytest.fixture
def one_thread():
    """One CPU thread in this process: multi-threaded kernels crawl on a busy machine,
    and batch results are bit-identical only at a fixed thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="module")
def sd1_pipe(sd1_folder):
    """The tiny SD1 pipeline, loaded once per test module."""
    from ldm import Pipeline
    from reference import TEST_DEVICE, TEST_DTYPE

    return Pipeline.from_pretrained(sd1_folder, device=TEST_DEVICE, dtype=TEST_DTYPE)


@pytest.fixture
def sd1(sd1_pipe):
    """The tiny SD1 pipeline; every LoRA is unloaded after the test, which must restore it."""
    from test_lora_formats import changed, snapshot

    before = snapshot(sd1_pipe)
    yield sd1_pipe
    sd1_pipe.unload_lora()
    assert changed(sd1_pipe, before) == []


def _sdxl_folder_fixture(name: str, spec: str, seed: int, doc: str):
    """A session fixture that saves ``reference_sdxl``'s tiny spec ``spec`` once, as a diffusers folder."""

    def folder(tmp_path_factory):
        import reference_sdxl

        return reference_sdxl.save_sdxl_folder(getattr(reference_sdxl, spec), tmp_path_factory.mktemp(name) / "model",
                                               seed=seed)

    folder.__doc__ = doc
    return pytest.fixture(folder, scope="session", name=name)


sdxl_folder = _sdxl_folder_fixture(
    "sdxl_folder", "SDXL_TINY", 4,
    "A tiny SDXL base diffusers folder (two text encoders, text_time U-Net) with random weights.")
sdxl_refiner_folder = _sdxl_folder_fixture(
    "sdxl_refiner_folder", "SDXL_REFINER_TINY", 5,
    "A tiny SDXL refiner diffusers folder (bigG alone, aesthetic-score ids) with random weights.")


@pytest.fixture(scope="session")
def controlnet_folders(tmp_path_factory):
    """Tiny diffusers ControlNetModel folders by family, ``{"sd1": path, "sd2": path}``: copies of
    SD1_TINY's and SD2V_TINY's U-Nets (reference_controlnet.py), random weights."""
    from reference_controlnet import save_controlnet_folder

    root = tmp_path_factory.mktemp("controlnets")
    return {family: save_controlnet_folder(spec, root / family, seed=6 + i)
            for i, (family, spec) in enumerate((("sd1", SD1_TINY), ("sd2", SD2V_TINY)))}


@pytest.fixture(params=["auto", "on"])
def winograd(request):
    """A parity test as shipped and again with the CPU's convolution fast paths on wherever
    they can run, whatever the size: every eligible 3x3 convolution as Winograd
    (ldm.models.winograd) and every upsampling convolution as four phases
    (ldm.models.upsample_conv); the tiny models never reach the sizes where they run by
    default."""
    from ldm.models.upsample_conv import set_upsample_phases
    from ldm.models.winograd import set_winograd

    previous = set_winograd(request.param), set_upsample_phases(request.param)
    yield request.param
    set_winograd(previous[0])
    set_upsample_phases(previous[1])
