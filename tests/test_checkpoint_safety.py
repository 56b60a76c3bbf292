"""What a checkpoint can hold that must never load silently, and what convert must never touch.

One section per class of problem: non-finite weights, detection from shapes,
corrupt headers and dtypes, non-regular paths, convert's destination, the atomic
writer, unknown keys, the dtype table, dead code, memory at load.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import stat
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ldm.checkpoints
import ldm.checkpoints.files
import ldm.config
from ldm import dtypes
from ldm.atomicio import atomic_path, is_temp_file
from ldm.checkpoints import CheckpointError, convert, load_model, read_safetensors_header
from ldm.checkpoints.detect import DERIVABLE, METADATA_CONFIG_KEY
from ldm.checkpoints.diffusers_folder import diffusers_mappings
from ldm.checkpoints.keymap import apply_mapping, check_keys
from ldm.checkpoints.loading import original_mappings
from ldm.cli import build_parser, main
from ldm.config import SD1, SD2, TOY, ModelConfig, load_config
from ldm.limits import MemoryLimitError

ROOT = Path(__file__).resolve().parent.parent
TOY_WEIGHTS = ROOT / "weights" / "ldm-toy.safetensors"
UNET_W = "model.diffusion_model.input_blocks.0.0.weight"


@contextmanager
def deadline(seconds: int = 10):
    """Fail instead of hanging (a FIFO read blocks forever)."""
    def expired(*_):
        raise TimeoutError(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def singles(sd1_folder, sd2v_folder, tmp_path_factory):
    """Original-layout files of the tiny models (with ldm's config metadata)."""
    out = tmp_path_factory.mktemp("singles")
    return {"sd1": convert(sd1_folder, out / "sd1.safetensors"),
            "sd2v": convert(sd2v_folder, out / "sd2v.safetensors")}


def edited(single: Path, dst: Path, *, keep_metadata: bool = True, **changes: torch.Tensor) -> Path:
    """A copy of ``single`` with some tensors replaced (``changes``: key -> tensor)."""
    state = load_file(single)
    with safe_open(str(single), "pt") as fh:
        meta = fh.metadata()
    state.update(changes)
    save_file(state, dst, metadata=meta if keep_metadata else {"format": "pt"})
    return dst


# --- 1. non-finite weights ---------------------------------------------------------


def test_nan_weight_refused_with_name_and_path(singles, tmp_path):
    w = load_file(singles["sd1"])[UNET_W]
    path = edited(singles["sd1"], tmp_path / "nan.safetensors", **{UNET_W: w.clone().fill_(float("nan"))})
    with pytest.raises(CheckpointError, match=r"1 weight\(s\) hold NaN or infinite") as err:
        load_model(path)
    assert str(path) in str(err.value) and UNET_W in str(err.value)
    with pytest.raises(CheckpointError, match="NaN"):
        convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_inf_in_many_text_weights_of_a_folder_counted(sd1_folder, tmp_path):
    folder = Path(shutil.copytree(sd1_folder, tmp_path / "m"))
    weights = folder / "text_encoder" / "model.safetensors"
    state = load_file(weights)
    keys = [k for k in state if k.endswith("weight")][:7]
    for key in keys:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("inf")
    save_file(state, weights)
    with pytest.raises(CheckpointError, match=r"7 weight\(s\) hold NaN or infinite.*\(7 in all\)") as err:
        load_model(folder)
    assert str(folder) in str(err.value)


def test_weight_overflowing_float16_refused(singles, tmp_path):
    w = load_file(singles["sd1"])[UNET_W]
    path = edited(singles["sd1"], tmp_path / "big.safetensors", **{UNET_W: w.clone().fill_(1e6)})
    assert load_model(path).unet.conv_in.weight.max() == 1e6  # finite in float32
    with pytest.raises(CheckpointError, match="overflow float16"):
        load_model(path, dtype=torch.float16)
    with pytest.raises(CheckpointError, match="overflow float16"):
        convert(path, tmp_path / "half.safetensors", dtype="float16")
    assert not (tmp_path / "half.safetensors").exists()


# --- 2. detection from shapes, never a wrong guess -------------------------------------


@pytest.fixture(scope="module")
def toy_without_metadata(tmp_path_factory):
    """The shipped model re-saved by another tool, which dropped ldm's metadata."""
    path = tmp_path_factory.mktemp("toy") / "toy-plain.safetensors"
    save_file(load_file(TOY_WEIGHTS), path)
    return path


def test_toy_without_metadata_detected_as_toy(toy_without_metadata, tmp_path, caplog):
    with caplog.at_level("INFO", logger="ldm"):
        model = load_model(toy_without_metadata)
    assert model.config == TOY and model.config.unet.cross_attention_dim == 128
    assert "toy preset" in caplog.text
    out = convert(toy_without_metadata, tmp_path / "again.safetensors")
    with safe_open(str(out), "pt") as fh:
        assert ModelConfig.from_dict(json.loads(fh.metadata()[METADATA_CONFIG_KEY])) == TOY


@pytest.mark.parametrize("name", ["sd1", "sd2v"])
def test_unknown_architecture_refused_with_its_shapes(singles, name, tmp_path):
    path = edited(singles[name], tmp_path / "plain.safetensors", keep_metadata=False)
    with pytest.raises(CheckpointError, match="fit no known model family") as err:
        load_model(path)
    text = str(err.value)
    assert str(path) in text and "context width 32" in text and "channels (32, 64)" in text
    assert "config=" in text and "--config" in text
    with pytest.raises(CheckpointError, match="fit no known model family"):
        convert(path, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    config = load_model(singles[name]).config
    assert load_model(path, config=config).config == config


def test_config_one_text_layer_too_deep_refused(singles, tmp_path):
    """An OpenCLIP tower's last block is dropped by the key map, so a config one layer
    deeper would load it (zeros) without a key mismatch."""
    config = load_model(singles["sd2v"]).config
    deeper = ldm.config.with_changes(
        config, text=ldm.config.with_changes(config.text, num_hidden_layers=config.text.num_hidden_layers + 1))
    with pytest.raises(CheckpointError, match=r"text.num_hidden_layers: weights 3, config 4"):
        load_model(singles["sd2v"], config=deeper)
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        convert(singles["sd2v"], tmp_path / "out.safetensors", config=deeper)
    assert not (tmp_path / "out.safetensors").exists()


def test_config_fields_not_in_the_shapes_are_still_checked(singles):
    data = load_model(singles["sd1"]).config.to_dict()
    bad_heads = json.loads(json.dumps(data))
    bad_heads["unet"]["num_attention_heads"] = [3, 4]
    with pytest.raises(CheckpointError, match="32 channels cannot be split into 3 attention heads") as err:
        load_model(singles["sd1"], config=bad_heads)
    assert str(singles["sd1"]) in str(err.value)
    bad_text = json.loads(json.dumps(data))
    bad_text["text"]["num_attention_heads"] = 5
    with pytest.raises(CheckpointError, match="cannot be split into 5 attention heads"):
        load_model(singles["sd1"], config=bad_text)
    bad_size = json.loads(json.dumps(data))
    bad_size["unet"]["sample_size"] = 7
    with pytest.raises(CheckpointError, match="sample_size 7 must be a positive multiple of 2"):
        load_model(singles["sd1"], config=bad_size)


def test_every_preset_is_distinguishable_by_shapes():
    from ldm.checkpoints.detect import architecture_of

    arch = {name: architecture_of(config) for name, config in ldm.config.PRESETS.items()}
    assert arch["sd2"] == arch["sd2-v"]  # told apart by the v rule, not by shapes
    assert len({json.dumps(a, sort_keys=True, default=list) for a in arch.values()}) == len(arch) - 1
    assert all(f"{c}.{f}" in arch["sd1"] for c, fields in DERIVABLE.items() for f in fields)


# --- 3. corrupt headers and non-float weights ---------------------------------------------


def write_raw(path: Path, header: object, data: bytes = b"\0" * 16) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("entry, message", [
    ({"dtype": "F32", "shape": ["2", "2"], "data_offsets": [0, 16]}, "not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}, "not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [[2], 2], "data_offsets": [0, 16]}, "not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}, "not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}, "not a list of non-negative integers"),
    ({"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}, "not a list of non-negative integers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16]}, "not a pair of integers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": ["0", "16"]}, "not a pair of integers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 32]}, "not a pair of integers"),
    ({"dtype": "f32", "shape": [4], "data_offsets": [0, 16]}, "unsupported dtype"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "extra": 1}, "expected the fields"),
    ([1, 2], "expected the fields"),
])
def test_bad_header_entries(tmp_path, entry, message):
    path = write_raw(tmp_path / "bad.safetensors", {"w": entry})
    with pytest.raises(CheckpointError, match=message) as err:
        read_safetensors_header(path)
    assert str(path) in str(err.value) and "'w'" in str(err.value)


def test_bad_header_structure(tmp_path):
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    overlap = {"a": entry, "b": {**entry, "data_offsets": [4, 12]}}
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        read_safetensors_header(write_raw(tmp_path / "o.safetensors", overlap))
    path = tmp_path / "dup.safetensors"
    raw = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(CheckpointError, match="'a' appears twice"):
        read_safetensors_header(path)
    for meta in ([1], {"k": 1}, "text"):
        with pytest.raises(CheckpointError, match="__metadata__") as err:
            load_model(write_raw(tmp_path / "m.safetensors", {"__metadata__": meta, "a": entry}))
        assert str(tmp_path / "m.safetensors") in str(err.value)
    deep = "[" * 100000 + "]" * 100000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(deep)) + deep.encode())
    with pytest.raises(CheckpointError, match="not JSON"):
        load_model(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_integer_weight_refused_by_name(singles, tmp_path, dtype):
    w = load_file(singles["sd1"])[UNET_W]
    path = edited(singles["sd1"], tmp_path / "int.safetensors", **{UNET_W: torch.zeros(w.shape, dtype=dtype)})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"stored as integers or bool.*{UNET_W} \({name}\)") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_integer_weight_in_a_pickle_refused(singles, tmp_path):
    state = load_file(singles["sd1"])
    state["first_stage_model.quant_conv.bias"] = torch.ones_like(state["first_stage_model.quant_conv.bias"],
                                                               dtype=torch.int64)
    path = tmp_path / "model.ckpt"
    torch.save(state, path)
    config = load_model(singles["sd1"]).config
    with pytest.raises(CheckpointError, match=r"quant_conv.bias \(int64\)"):
        load_model(path, allow_pickle=True, config=config)


# --- 4. FIFOs, folders and other non-regular paths -------------------------------------------


def test_fifo_checkpoint_refused_not_hung(tmp_path):
    for name, kwargs in (("pipe.safetensors", {}), ("pipe.ckpt", {"allow_pickle": True})):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        with deadline(), pytest.raises(CheckpointError, match="is a FIFO") as err:
            load_model(fifo, **kwargs)
        assert str(fifo) in str(err.value)


def test_fifo_inside_a_diffusers_folder_refused(sd1_folder, tmp_path):
    folder = Path(shutil.copytree(sd1_folder, tmp_path / "m"))
    for part in ("vae/config.json", "unet/diffusion_pytorch_model.safetensors"):
        target = folder / part
        saved = target.read_bytes()
        target.unlink()
        os.mkfifo(target)
        with deadline(), pytest.raises(CheckpointError, match=f"{part}: is a FIFO"):
            load_model(folder)
        target.unlink()
        target.write_bytes(saved)


def test_fifo_yaml_config_and_folder_named_like_a_file(singles, tmp_path):
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with deadline(), pytest.raises(ValueError, match="is a FIFO"):
        load_config(fifo)
    with deadline(), pytest.raises(CheckpointError, match="config.yaml: is a FIFO"):
        load_model(singles["sd1"], config=str(fifo))
    folder = tmp_path / "model.safetensors"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="is a folder"):
        ldm.checkpoints.files.open_tensor_file(folder)
    link = tmp_path / "gone.safetensors"
    link.symlink_to(tmp_path / "nowhere.safetensors")
    with pytest.raises(FileNotFoundError, match="broken symbolic link"):
        load_model(link)


# --- 5. convert never touches what is not its own -------------------------------------------


def test_convert_never_deletes_its_source(singles, sd1_folder, tmp_path):
    src = Path(shutil.copy(singles["sd1"], tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="source"):
        convert(src, src, overwrite=True)
    with pytest.raises(ValueError, match="source"):
        convert(src, tmp_path, layout="diffusers", overwrite=True)  # a folder holding the source
    link = tmp_path / "link.safetensors"
    link.symlink_to(src)
    with pytest.raises(ValueError, match="source"):
        convert(src, link, overwrite=True)
    folder = Path(shutil.copytree(sd1_folder, tmp_path / "f"))
    with pytest.raises(ValueError, match="source"):
        convert(folder, folder / "unet", overwrite=True)  # inside the source folder
    assert src.is_file() and (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_overwrite_replaces_only_previous_outputs(singles, tmp_path):
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="not a safetensors checkpoint"):
        convert(singles["sd1"], notes, overwrite=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.png").write_bytes(b"png")
    with pytest.raises(FileExistsError, match="not a diffusers model folder"):
        convert(singles["sd1"], photos, overwrite=True)
    assert notes.read_text() == "my notes" and (photos / "cat.png").is_file()
    out = convert(singles["sd1"], tmp_path / "out")
    convert(singles["sd1"], out, overwrite=True)  # a previous output: replaced
    assert load_model(out).config == load_model(singles["sd1"]).config
    with pytest.raises(FileExistsError, match="already exists"):
        convert(singles["sd1"], out)


def test_destination_name_decides_file_or_folder(singles, tmp_path):
    with pytest.raises(ValueError, match="must not end in .safetensors"):
        convert(singles["sd1"], tmp_path / "x.safetensors", layout="diffusers")
    with pytest.raises(ValueError, match="must end in .safetensors"):
        convert(singles["sd1"], tmp_path / "x", layout="original")
    assert list(tmp_path.iterdir()) == []


def test_killed_convert_temps_cleaned_on_next_run(singles, tmp_path, monkeypatch):
    dst = tmp_path / "out.safetensors"
    left_file = tmp_path / ".out.safetensors.k1.ldm-tmp"
    left_file.write_bytes(b"half")
    left_folder = tmp_path / ".out.safetensors.k2.ldm-tmp"
    (left_folder / "unet").mkdir(parents=True)
    other = tmp_path / ".other.safetensors.k3.ldm-tmp"
    other.write_bytes(b"not ours")
    convert(singles["sd1"], dst)
    assert not left_file.exists() and not left_folder.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, dst.name]


def test_cli_convert_refusal_is_one_line(singles, tmp_path, capsys):
    notes = tmp_path / "notes.safetensors"
    notes.write_text("my notes")
    assert main(["convert", str(singles["sd1"]), str(notes), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(notes) in err and "not replaced" in err
    assert main(["convert", str(singles["sd1"]), str(tmp_path / "x.safetensors"), "--layout", "diffusers"]) == 2


# --- 6. one atomic writer -------------------------------------------------------------------


def test_atomic_path_file_and_folder(tmp_path):
    dst = tmp_path / "w.safetensors"
    with atomic_path(dst) as tmp:
        assert is_temp_file(tmp) and tmp.parent == tmp_path
        save_file({"a": torch.zeros(2)}, str(tmp))
    assert load_file(dst)["a"].shape == (2,)
    assert stat.S_IMODE(dst.stat().st_mode) == 0o666 & ~_umask()
    folder = tmp_path / "model"
    for round_ in range(2):  # the second replaces the first
        with atomic_path(folder, folder=True) as tmp:
            assert is_temp_file(tmp) and tmp.is_dir()
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.txt").write_text(str(round_))
    assert (folder / "sub" / "f.txt").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_path(folder, folder=True) as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "w.safetensors"]
    assert not hasattr(ldm.checkpoints.files, "atomic_path")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# --- 7. one rule for unknown keys -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["original", "diffusers"])
@pytest.mark.parametrize("config", [SD1, SD2], ids=["sd1", "sd2"])
def test_every_key_map_reports_unknown_keys_under_their_own_name(layout, config):
    """Every map: a key it does not know is unexpected by its source name, never renamed
    into the model (an internal name fed to an original map would otherwise load)."""
    maps = original_mappings(config) if layout == "original" else diffusers_mappings()
    t = torch.zeros(2)
    strangers = ["mystery.weight", "text_model.embeddings.token_embedding.weight",
                 "model.transformer.resblocks.0.bogus.weight", "middle_block.9.weight"]
    for name, mapping in maps.items():
        expected = {"text_model.embeddings.token_embedding.weight": (2,)} if name == "text_encoder" else {}
        keys = [k for k in strangers if not (layout == "diffusers" and k in expected)]
        mapped = apply_mapping({k: t for k in keys}, mapping)
        report = check_keys(mapped, expected)
        assert sorted(report.unexpected) == sorted(keys), (layout, name)
        assert not set(mapped) & set(expected), (layout, name)


# --- 8. one dtype table ----------------------------------------------------------------------


def test_one_dtype_table(singles):
    from ldm.checkpoints import loading

    assert loading.parse_dtype is dtypes.parse_dtype and not hasattr(loading, "_DTYPES")
    convert_parser = build_parser()._subparsers._group_actions[0].choices["convert"]
    dtype_action = next(a for a in convert_parser._actions if a.dest == "dtype")
    assert tuple(dtype_action.choices) == dtypes.DTYPE_NAMES
    assert load_model(singles["sd1"], dtype="half").unet.conv_in.weight.dtype == torch.float16
    with pytest.raises(ValueError, match="float32"):
        load_model(singles["sd1"], dtype=torch.int8)


# --- 9. dead code and imports ------------------------------------------------------------------


def test_no_dead_entry_points_and_models_import_only_their_configs():
    assert not hasattr(ldm.checkpoints, "main_convert") and "main_convert" not in ldm.checkpoints.__all__
    assert not hasattr(ldm.config, "register_preset")
    for path in (ROOT / "ldm" / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 2:
                assert node.module == "config", f"{path.name} imports ldm.{node.module}"


# --- 10. memory at load --------------------------------------------------------------------------


def test_huge_native_size_refused_at_load(singles, tmp_path):
    data = load_model(singles["sd1"]).config.to_dict()
    data["unet"]["sample_size"] = 100000
    with pytest.raises(MemoryLimitError, match="native size 800000x800000") as err:
        load_model(singles["sd1"], config=data)
    assert str(singles["sd1"]) in str(err.value) and "GiB" in str(err.value)
    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(MemoryLimitError, match="unet.sample_size 100000"):
        load_model(singles["sd1"], config=str(path))


def test_finite_check_takes_the_fast_sum_and_never_refuses_a_finite_tensor_whose_sum_overflows():
    from ldm.checkpoints.loading import is_finite

    big = torch.full((4,), 3e38)  # finite, but the float32 sum overflows to inf
    assert is_finite(big) and is_finite(big.half().float()) is False  # 3e38 is inf in float16
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = torch.ones(1000, dtype=dtype)
        assert is_finite(t)
        for bad in (float("nan"), float("inf"), float("-inf")):
            t[537] = bad
            assert not is_finite(t), (dtype, bad)
            t[537] = 1
    assert is_finite(torch.tensor([1, 2, 3]))  # integers are always finite


def test_weights_converted_on_load_are_read_into_their_own_memory(tmp_path):
    from ldm.checkpoints.files import open_tensor_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).half(),
               "c": torch.arange(4), "empty": torch.zeros(0, 2)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    f = open_tensor_file(tmp_path / "w.safetensors")
    for key, value in tensors.items():
        mapped, copied = f.get(key), f.get(key, copy=True)
        assert torch.equal(mapped, value) and torch.equal(copied, value) and copied.dtype == value.dtype, key
        copied.zero_()  # its own memory: the file's view is untouched
        assert torch.equal(f.get(key), value), key


def test_buffer_reads_are_views_of_one_block_and_loaded_weights_never_share_it(singles, sd1_folder, tmp_path):
    from ldm.checkpoints.files import ReadBuffer, open_tensor_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=gen), "b": torch.randn(7, generator=gen).half(), "empty": torch.zeros(0, 2)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    f = open_tensor_file(tmp_path / "w.safetensors")
    buffer = ReadBuffer(max(f.nbytes(k) for k in tensors))
    assert [f.nbytes(k) for k in tensors] == [60, 14, 0]
    a = f.get("a", copy=True, buffer=buffer)
    assert torch.equal(a, tensors["a"])
    b = f.get("b", copy=True, buffer=buffer)  # the same block: a is overwritten, as documented
    assert torch.equal(b, tensors["b"]) and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert f.get("empty", copy=True, buffer=buffer).shape == (0, 2)
    # Loading converts every weight out of the buffer into memory of its own: each holds the
    # stored value (cast), none shares storage with another (the buffer is reused per tensor),
    # also for weights the key maps split (SD2's fused qkv) or reshape (the VAE's 1x1 convs).
    for source in (singles["sd1"], singles["sd2v"], sd1_folder):
        stored = load_model(source, dtype=torch.float32)
        for dtype in (torch.bfloat16, torch.float16):
            loaded = load_model(source, dtype=dtype, channels_last=("unet", "vae"))
            for name, module in loaded.modules().items():
                reference = dict(stored.modules()[name].state_dict())
                pointers = set()
                for key, value in module.state_dict().items():
                    assert value.dtype == dtype and torch.equal(value, reference[key].to(dtype)), (source, key)
                    pointers.add(value.untyped_storage().data_ptr())
                assert len(pointers) == len(module.state_dict()), (source, name)
