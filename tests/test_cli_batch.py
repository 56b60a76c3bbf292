"""The `ldm` command: generate / info / batch, PNG metadata, resumable and sharded batches.

Runs the tiny random SD1 model (64x64 images) with 2-3 steps. Runs that compare
bytes across processes pin one CPU thread everywhere: on CPU the thread count
changes float rounding, and torchrun gives each worker one thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from subprocesses import default_sigint
from ldm.atomicio import TEMP_SUFFIX, atomic_write
from ldm.batchfile import Settings, line_seed, parse_lines
from ldm.cli import main
from ldm.grid import grid_shape
from ldm.manifest import MANIFEST
from ldm.modelref import model_hash
from ldm.pngmeta import (
    A1111_SAMPLERS, GenerationParams, parse_parameters, read_parameters, save_png,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # one CPU thread in this process too

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"a {c} {s} on a table" for c in ("red", "green", "blue") for s in ("cube", "ball", "cone", "star")]
# 12 prompts x 2 images in chunks of 2: 12 pipeline calls.
BATCH_ARGS = ["--steps", "2", "--n", "2", "--batch-size", "2", "--seed", "7", "--device", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return {**env, **extra}


def _ldm(*args: str, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300, **popen)


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("# twelve prompts\n\n" + "\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def reference_run(sd1_folder, prompt_file, tmp_path_factory) -> Path:
    """One process, one thread: the output every other run must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "out"
    r = _ldm("batch", str(prompt_file), "--model", str(sd1_folder), "-o", str(out), *BATCH_ARGS)
    assert r.returncode == 0, r.stderr
    return out


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _manifest(folder: Path) -> list[dict]:
    entries = [json.loads(line) for line in (folder / MANIFEST).read_text().splitlines()]
    for e in entries:
        e.pop("time")
    return sorted(entries, key=lambda e: (e["line"], e["index"]))


def _pixels(path: Path) -> bytes:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).tobytes()


def _expected_names() -> set[str]:
    first_line = 3  # after the comment and the blank line
    return {f"{line:05d}-{k:02d}-{line_seed(7, line) + k}.png"
            for line in range(first_line, first_line + len(PROMPTS)) for k in range(2)}


def _check_consistent(out: Path) -> list[dict]:
    entries = _manifest(out)
    keys = [(e["line"], e["index"]) for e in entries]
    assert len(keys) == len(set(keys)), "duplicate manifest entries"
    assert all((out / e["file"]).is_file() for e in entries)
    assert {e["file"] for e in entries} == _expected_names()
    assert {p.name for p in out.glob("*.png")} == _expected_names()
    assert not [p for p in out.iterdir() if p.name.endswith(TEMP_SUFFIX) or ".part-" in p.name]
    return entries


# --- metadata ------------------------------------------------------------------------


def test_infotext_format_matches_a1111():
    p = GenerationParams(prompt="a cat", negative_prompt="blurry", steps=20, sampler="dpmpp_2m",
                         schedule="karras", guidance_scale=7.5, seed=42, width=512, height=512,
                         model_hash="1a2b3c4d5e", model="name")
    text = p.to_text()
    assert text == ("a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, "
                    "Seed: 42, Size: 512x512, Model hash: 1a2b3c4d5e, Model: name")
    assert parse_parameters(text) == p
    no_negative = p.replace(negative_prompt="", sampler="euler_a", schedule="default", guidance_scale=7.0)
    assert no_negative.to_text().split("\n")[1].startswith("Steps: 20, Sampler: Euler a, CFG scale: 7, ")


def test_parse_a1111_written_text():
    text = (
        "masterpiece, a cat,\nwearing a hat\n"
        "Negative prompt: (worst quality:1.4),\nblurry\n"
        'Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 2179987202, Size: 768x512, '
        'Model hash: 93b79e09ed, Model: anything-v4.5, Clip skip: 2, Denoising strength: 0.7, '
        'Lora hashes: "detail: 1a2b3c, style: 4d5e6f", Version: v1.6.0'
    )
    p = parse_parameters(text)
    assert p.prompt == "masterpiece, a cat,\nwearing a hat"
    assert p.negative_prompt == "(worst quality:1.4),\nblurry"
    assert (p.steps, p.sampler, p.schedule, p.guidance_scale, p.seed) == (30, "dpmpp_2m", "karras", 7.0, 2179987202)
    assert (p.width, p.height, p.model, p.model_hash) == (768, 512, "anything-v4.5", "93b79e09ed")
    assert p.strength == 0.7  # an img2img's: a field, as ldm makes such images too
    assert (p.clip_skip, p.lora_hashes) == (2, {"detail": "1a2b3c", "style": "4d5e6f"})
    assert p.extra == {"Version": "v1.6.0"}
    assert p.to_kwargs()["sampler"] == "dpmpp_2m"

    # Web UI >= 1.9 writes the schedule as its own key.
    new = parse_parameters("x\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 1")
    assert (new.sampler, new.schedule) == ("dpmpp_2m", "karras")
    # A sampler ldm lacks is kept as text and refused until replaced.
    unipc = parse_parameters("x\nSteps: 20, Sampler: UniPC, CFG scale: 5, Seed: 1, Size: 64x64")
    assert unipc.sampler is None and unipc.extra["Sampler"] == "UniPC"
    with pytest.raises(ValueError, match="UniPC"):
        unipc.to_kwargs()
    assert unipc.replace(sampler="euler").to_kwargs()["sampler"] == "euler"


def test_sampler_names_and_defaults_match_the_pipeline():
    import inspect

    from ldm import Pipeline
    from ldm.samplers import SAMPLERS
    from ldm.validation import DEFAULTS

    assert set(A1111_SAMPLERS) == set(SAMPLERS)
    defaults = inspect.signature(Pipeline.generate).parameters
    assert (DEFAULTS.steps, DEFAULTS.guidance_scale, DEFAULTS.sampler, DEFAULTS.num_images) == (
        defaults["steps"].default, defaults["guidance_scale"].default, defaults["sampler"].default,
        defaults["num_images"].default)
    # A batch line that sets nothing gets the same values: one table.
    settings = Settings()
    assert (settings.steps, settings.guidance, settings.sampler, settings.schedule, settings.n) == (
        DEFAULTS.steps, DEFAULTS.guidance_scale, DEFAULTS.sampler, DEFAULTS.schedule, DEFAULTS.num_images)


def test_png_round_trip_and_atomic_write(tmp_path):
    p = GenerationParams(prompt="ein Würfel, 立方体\nzweite Zeile", negative_prompt="a: b", steps=3,
                         sampler="heun", guidance_scale=1.25, seed=5, width=8, height=8,
                         model="my, model", model_hash="abcdef0123")
    path = tmp_path / "x.png"
    save_png(Image.new("RGB", (8, 8), "red"), path, p)
    assert read_parameters(path) == p
    assert [f.name for f in tmp_path.iterdir()] == ["x.png"]

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert read_parameters(path) == p  # the old file is intact, the temp file gone
    assert [f.name for f in tmp_path.iterdir()] == ["x.png"]


def test_model_hash(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"weights")
    assert model_hash(f) == hashlib.sha256(b"weights").hexdigest()[:10]  # A1111 "AutoV2"
    folder = tmp_path / "folder"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "README.md").write_text("not part of the model")
    h = model_hash(folder)
    (folder / "README.md").write_text("edited")
    assert model_hash(folder) == h
    time.sleep(0.01)
    (folder / "unet" / "config.json").write_text('{"a": 1}')
    assert model_hash(folder) != h
    assert grid_shape(5) == (2, 3) and grid_shape(4) == (2, 2) and grid_shape(3, rows=1) == (1, 3)


# --- batch file -----------------------------------------------------------------------


def test_line_seeds_do_not_depend_on_other_lines():
    settings = Settings(seed=100)
    jobs_a, _ = parse_lines(["a", "b", "# c", "d"], settings, jsonl=False)
    jobs_b, _ = parse_lines(["other", "", "x", "d"], settings, jsonl=False)
    assert jobs_a[-1].seed == jobs_b[-1].seed == line_seed(100, 4) == 3100
    jobs, errors = parse_lines(['{"prompt": "p", "seed": 9, "size": "64x32", "n": 3, "sampler": "euler"}'],
                               settings, jsonl=True)
    assert not errors and (jobs[0].seed, jobs[0].size, jobs[0].n, jobs[0].sampler) == (9, (64, 32), 3, "euler")


def test_malformed_jsonl_lines_are_reported(sd1_folder, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join([
        '{"prompt": "a red cube", "seed": 3}',
        '{"prompt": "broken", ',
        '# a comment',
        '{"prompt": "x", "sampler": "nope"}',
        '{"prompt": "y", "colour": "red"}',
        '{"prompt": "a blue ball", "size": "64x32", "steps": 3}',
    ]) + "\n")
    out = tmp_path / "out"
    common = ["--model", str(sd1_folder), "-o", str(out), "--steps", "2", "--device", "cpu"]

    assert main(["batch", str(prompts), "--strict", *common]) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2: error: invalid JSON" in err
    assert f"{prompts}:4: error: unknown sampler 'nope'" in err
    assert f"{prompts}:5: error: unknown key(s) 'colour'" in err
    assert "--strict: nothing rendered" in err
    assert not out.exists()

    assert main(["batch", str(prompts), *common]) == 1  # rendered the good lines
    captured = capsys.readouterr()
    assert f"{prompts}:2: error: invalid JSON" in captured.err
    assert "3 bad line(s) skipped: 2, 4, 5" in captured.out
    assert sorted(p.name for p in out.glob("*.png")) == ["00001-00-3.png", f"00006-00-{line_seed(0, 6)}.png"]
    assert Image.open(out / f"00006-00-{line_seed(0, 6)}.png").size == (64, 32)
    assert [e["line"] for e in _manifest(out)] == [1, 6]


# --- generate / info / --from ---------------------------------------------------------


def test_generate_info_and_regenerate_from_png(sd1_folder, tmp_path, capsys, monkeypatch, caplog):
    out = tmp_path / "out"
    args = ["--negative", "blurry, dark", "--steps", "3", "--seed", "42", "--sampler", "euler_a",
            "--guidance", "5", "--model", str(sd1_folder), "--device", "cpu", "-o", str(out)]
    assert main(["generate", "a red cube", "--n", "2", "--grid", *args]) == 0
    printed = capsys.readouterr().out
    assert f"{out / '00000-42.png'}  seed 42" in printed and f"{out / '00001-43.png'}  seed 43" in printed
    assert (out / "grid-00000.png").is_file()

    assert main(["info", str(out / "00001-43.png")]) == 0
    text = capsys.readouterr().out.strip()
    assert text == ("a red cube\nNegative prompt: blurry, dark\nSteps: 3, Sampler: Euler a, CFG scale: 5, "
                    f"Seed: 43, Size: 64x64, Model hash: {model_hash(sd1_folder)}, Model: model, "
                    "Dtype: float32, VAE tiling: none, Batch size: 2, Batch pos: 1")  # the tests' CPU dtype (conftest)
    assert main(["info", "--json", str(out / "00001-43.png")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["seed"], info["sampler"], info["sampler_name"]) == (43, "euler_a", "Euler a")

    # Single image: --from finds the model by name in $LDM_MODEL_PATH and makes the same pixels.
    assert main(["generate", "a red cube", *args[:-2], "-o", str(tmp_path / "single")]) == 0
    single = tmp_path / "single" / "00000-42.png"
    monkeypatch.setenv("LDM_MODEL_PATH", str(sd1_folder.parent))
    again = tmp_path / "again"
    assert main(["generate", "--from", str(single), "--device", "cpu", "-o", str(again)]) == 0
    assert _pixels(again / "00000-42.png") == _pixels(single)
    assert read_parameters(again / "00000-42.png") == read_parameters(single)
    # Image 1 of a batch of 2: the batch is rendered again and image 1 kept.
    assert main(["generate", "--from", str(out / "00001-43.png"), "--device", "cpu", "-o", str(again)]) == 0
    assert _pixels(again / "00001-43.png") == _pixels(out / "00001-43.png")
    capsys.readouterr()

    # The Python equivalent.
    from ldm import Pipeline

    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu")
    image = pipe.generate(**read_parameters(single).to_kwargs(), progress=False).images[0]
    assert np.asarray(image).tobytes() == _pixels(single)
    # One seed per image: how `ldm batch` renders unrelated lines in one call.
    assert pipe.generate(["a", "b"], seed=[5, 9], steps=1, output="latent", progress=False).seeds == [5, 9]
    with pytest.raises(ValueError, match="one per image"):
        pipe.generate(["a", "b"], seed=[5], steps=1, output="latent", progress=False)

    # The dtype it was made in: again where this machine runs it natively (float32 always), so
    # the same picture even where the default is bfloat16; otherwise the default, with a warning.
    monkeypatch.setenv("LDM_CPU_DTYPE", "bfloat16")
    monkeypatch.setattr("ldm.dtypes.native_bf16", lambda device: True)
    assert main(["generate", "--from", str(single), "--device", "cpu", "-o", str(again)]) == 0
    assert _pixels(again / "00002-42.png") == _pixels(single)
    assert read_parameters(again / "00002-42.png").dtype == "float32"
    assert "made in float32: making it again in float32" in caplog.text
    as_bf16 = tmp_path / "as-bf16.png"
    save_png(Image.open(single), as_bf16, read_parameters(single).replace(dtype="bfloat16"))
    monkeypatch.setenv("LDM_CPU_DTYPE", "float32")
    monkeypatch.setattr("ldm.dtypes.native_bf16", lambda device: False)
    assert main(["generate", "--from", str(as_bf16), "--device", "cpu", "-o", str(again)]) == 0
    assert read_parameters(again / "00003-42.png").dtype == "float32"
    assert "as-bf16.png was made in bfloat16, which this cpu does not compute natively: making it in " \
           "float32 instead, so the picture will differ slightly" in caplog.text
    for name in ("00002-42.png", "00003-42.png"):
        (again / name).unlink()

    # A different model hash is warned about; overrides apply.
    params = read_parameters(single).replace(model_hash="0123456789", extra={"ENSD": "31337"})
    tampered = tmp_path / "tampered.png"
    save_png(Image.open(single), tampered, params)
    assert main(["generate", "--from", str(tampered), "--model", str(sd1_folder), "--steps", "2",
                 "--device", "cpu", "-o", str(again)]) == 0
    assert "model hash differs" in caplog.text and "ENSD: 31337" in caplog.text
    assert read_parameters(again / "00002-42.png").steps == 2


# --- resuming and sharding ------------------------------------------------------------


def test_resume_reconciles_manifest_and_files(sd1_folder, prompt_file, reference_run, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["batch", str(prompt_file), "--model", str(sd1_folder), "-o", str(out), *BATCH_ARGS]
    assert main(args) == 0
    entries = _check_consistent(out)
    # Simulate the aftermath of crashes: an entry whose file is gone, a file whose entry
    # was never written, a half-written manifest line and an abandoned temp file.
    gone, unrecorded = entries[0]["file"], entries[5]["file"]
    (out / gone).unlink()
    lines = [line for line in (out / MANIFEST).read_text().splitlines() if unrecorded not in line]
    (out / MANIFEST).write_text("\n".join(lines) + "\n")
    (out / "manifest.part-00001.jsonl").write_text('{"line": 9, "inde')
    (out / f".{gone}.x1{TEMP_SUFFIX}").write_bytes(b"\x89PNG half")
    mtime = (out / unrecorded).stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    assert f"24 image(s) of 12 line(s) in {out}: 1 rendered, 23 already done" in capsys.readouterr().out
    _check_consistent(out)
    assert (out / unrecorded).stat().st_mtime_ns == mtime  # adopted, not rendered again
    assert _pngs(out) == _pngs(reference_run)
    assert _manifest(out) == _manifest(reference_run)

    # The PNGs and entries record the U-Net's dtype; entries written before that field existed
    # lack it and still count as done; another dtype is another setting.
    assert {e["parameters"]["dtype"] for e in entries} == {"float32"}
    assert read_parameters(out / entries[1]["file"]).dtype == "float32"
    capsys.readouterr()
    assert main([*args, "--dtype", "bfloat16"]) == 2
    assert "dtype 'float32' vs now 'bfloat16'" in capsys.readouterr().err
    older = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    for e in older:
        del e["parameters"]["dtype"]
    (out / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in older))
    assert main(args) == 0
    assert "0 rendered, 24 already done" in capsys.readouterr().out

    # They record how the VAE ran too (whole here: memory to spare), also for the adopted
    # image. That is how the run went, which the free memory decides, not a setting of the
    # batch: an entry that ran it otherwise is still done.
    assert {e["parameters"]["vae_tiling"] for e in entries} == {"none"}
    assert read_parameters(out / unrecorded).vae_tiling == "none"
    for e in older:
        e["parameters"]["vae_tiling"] = "blended"
    (out / MANIFEST).write_text("".join(json.dumps(e) + "\n" for e in older))
    assert main(args) == 0
    assert "0 rendered, 24 already done" in capsys.readouterr().out

    # Other settings for the same folder: refused, or redone with --overwrite.
    assert main([*args, "--steps", "3"]) == 2
    assert "made with other settings" in capsys.readouterr().err
    assert main([*args, "--steps", "3", "--overwrite"]) == 0
    assert {e["parameters"]["steps"] for e in _check_consistent(out)} == {3}


def test_killed_run_resumes_without_loss_or_duplicates(sd1_folder, prompt_file, reference_run, tmp_path):
    out = tmp_path / "out"
    args = ["batch", str(prompt_file), "--model", str(sd1_folder), "-o", str(out), *BATCH_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "ldm", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.png")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 0 < len(list(out.glob("*.png"))) < len(_expected_names())

    assert main(args) == 0
    _check_consistent(out)
    assert _pngs(out) == _pngs(reference_run)
    assert _manifest(out) == _manifest(reference_run)


def test_two_processes_give_the_same_files(sd1_folder, prompt_file, reference_run, tmp_path):
    out = tmp_path / "out"
    r = _ldm("batch", str(prompt_file), "--model", str(sd1_folder), "-o", str(out), *BATCH_ARGS,
             "--num-processes", "2", "--grid")
    assert r.returncode == 0, r.stderr
    assert "rank 1" in r.stderr  # both ranks rendered
    grid = out / "grid.png"
    rows, cols = grid_shape(24)
    assert Image.open(grid).size == (cols * 64, rows * 64)
    grid.unlink()
    _check_consistent(out)
    assert _pngs(out) == _pngs(reference_run)
    assert _manifest(out) == _manifest(reference_run)


# --- one writer, interruptions, full disk ----------------------------------------------


def test_two_runs_on_one_folder_one_refuses(tmp_path, capsys):
    """The shipped model, six prompts, one step: the second run finds the first's lock."""
    from ldm.batchlock import LOCK_FILE

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:6]) + "\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), "--model", str(REPO / "weights" / "ldm-toy.safetensors"), "-o", str(out),
            "--steps", "1", "--device", "cpu", "--batch-size", "1"]
    first = subprocess.Popen([sys.executable, "-m", "ldm", *args], cwd=REPO, env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid
        assert main(args) == 2
        assert f"a run is active in {out}: pid {first.pid}" in capsys.readouterr().err
    finally:
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert "6 image(s) of 6 line(s)" in stdout and "0 already done" in stdout
    entries = _manifest(out)
    names = {f"{line:05d}-00-{line_seed(0, line)}.png" for line in range(1, 7)}
    assert [e["file"] for e in entries] == sorted(names)  # every planned image exactly once
    assert {p.name for p in out.iterdir()} == names | {MANIFEST}  # no file without an entry, lock gone


def test_ctrl_c_keeps_finished_images_and_says_so(sd1_folder, prompt_file, reference_run, tmp_path):
    out = tmp_path / "out"
    args = ["batch", str(prompt_file), "--model", str(sd1_folder), "-o", str(out), *BATCH_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "ldm", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
    finally:
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    files = {p.name for p in out.glob("*.png")}
    assert 0 < len(files) < len(_expected_names())
    assert stderr.strip().splitlines()[-1] == (
        f"ldm batch: stopped; {len(files)} image(s) kept in {out} (rerun the same command to continue)")
    assert {e["file"] for e in _manifest(out)} == files  # merged: every finished image recorded
    assert not list(out.glob("manifest.part-*")) and not (out / ".ldm-batch.lock").exists()

    assert main(args) == 0
    _check_consistent(out)
    assert _pngs(out) == _pngs(reference_run)


def test_full_disk_keeps_what_was_written_and_resumes(sd1_folder, prompt_file, reference_run, tmp_path,
                                                      monkeypatch, capsys):
    import errno

    import ldm.batch

    out = tmp_path / "out"
    args = ["batch", str(prompt_file), "--model", str(sd1_folder), "-o", str(out), *BATCH_ARGS]
    real_save = ldm.batch.save_png
    saved = []

    def save_until_full(image, path, params):
        if len(saved) == 5:
            def half_written(f):
                f.write(b"\x89PNG partial")
                raise OSError(errno.ENOSPC, "No space left on device")

            return atomic_write(path, half_written)
        saved.append(path)
        return real_save(image, path, params)

    monkeypatch.setattr(ldm.batch, "save_png", save_until_full)
    assert main(args) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert {p.name for p in out.glob("*.png")} == {p.name for p in saved}
    assert not [p for p in out.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    assert not (out / ".ldm-batch.lock").exists()

    monkeypatch.setattr(ldm.batch, "save_png", real_save)
    assert main(args) == 0
    assert "5 already done" in capsys.readouterr().out
    _check_consistent(out)
    assert _pngs(out) == _pngs(reference_run)
    assert _manifest(out) == _manifest(reference_run)
