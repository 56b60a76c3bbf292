"""Textual inversion against diffusers' ``load_textual_inversion`` (the reference).

Embedding files are written here in the three layouts found in the wild (A1111
``.pt`` with ``string_to_param``, ``.safetensors`` with ``emb_params``, diffusers
``learned_embeds`` with ``{token: tensor}``), single- and multi-vector, with random
vectors of the tiny models' width. diffusers loads each with
``load_textual_inversion(path, token=...)``, ldm with ``Pipeline.load_embedding``;
prompt embeddings and images (trigger in the prompt and in the negative prompt)
must agree. Token ids expected from ``units`` are built from the tokenizer's ids of
the words, by hand.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm import Pipeline
from ldm.adapters.embeddings import (
    EmbeddingError, EmbeddingTable, embedding_dirs_from_env, embedding_hash, find_embeddings,
)
from ldm.checkpoints import CheckpointError
from ldm.pngmeta import GenerationParams, format_parameters
from reference import SD1_TINY, SD2V_TINY, load_reference_pipeline

WIDTH = SD1_TINY.text["hidden_size"]
assert SD2V_TINY.text["hidden_size"] == WIDTH
PROMPT = "a cat wearing a hat, {token}, in the snow"
NEGATIVE = "{token}, blurry"
EMBEDS_TOLERANCE = 1e-5
PIXEL_TOLERANCE = 1e-3  # max abs difference on [0, 1] pixels


def _vectors(n: int | None, seed: int) -> torch.Tensor:
    """``(n, WIDTH)`` random vectors, or one ``(WIDTH,)`` vector for ``n=None``."""
    shape = (WIDTH,) if n is None else (n, WIDTH)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def write_a1111_pt(path, vectors, name="whatever"):
    """What A1111's ``Embedding.save`` writes."""
    torch.save({
        "string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vectors)},
        "name": name, "step": 1500, "sd_checkpoint": None, "sd_checkpoint_name": None,
    }, path)


def write_emb_params(path, vectors):
    """A1111-style ``.safetensors`` embedding."""
    save_file({"emb_params": vectors.contiguous()}, str(path))


def write_learned_embeds(path, vectors, token):
    """diffusers' textual-inversion training output, ``{token: vector(s)}``."""
    if path.suffix == ".safetensors":
        save_file({token: vectors.contiguous()}, str(path))
    else:
        torch.save({token: vectors}, path)


# (family, layout, vectors: None = one 1-D vector); the file name gives the token.
CASES = [
    ("sd1", "a1111.pt", 1),
    ("sd1", "a1111.pt", 3),
    ("sd1", "emb_params.safetensors", 2),
    ("sd1", "learned_embeds.safetensors", None),
    ("sd1", "learned_embeds.bin", 4),
    ("sd2v", "a1111.pt", 2),
    ("sd2v", "learned_embeds.safetensors", None),
]


def make_file(tmp_path, layout: str, n: int | None, token: str, seed: int = 0):
    vectors = _vectors(n, seed)
    if layout == "a1111.pt":
        path = tmp_path / f"{token}.pt"
        write_a1111_pt(path, vectors if vectors.ndim == 2 else vectors[None])
    elif layout == "emb_params.safetensors":
        path = tmp_path / f"{token}.safetensors"
        write_emb_params(path, vectors)
    else:
        path = tmp_path / layout
        write_learned_embeds(path, vectors, token)
    return path, vectors


@pytest.fixture(scope="module")
def pipes(sd1_folder, sd2v_folder):
    return {
        "sd1": Pipeline.from_pretrained(sd1_folder, device="cpu"),
        "sd2v": Pipeline.from_pretrained(sd2v_folder, device="cpu"),
    }


@pytest.fixture(scope="module")
def folders(sd1_folder, sd2v_folder):
    return {"sd1": sd1_folder, "sd2v": sd2v_folder}


@pytest.fixture
def sd1(pipes):
    return pipes["sd1"]


@pytest.fixture(autouse=True)
def _clean(pipes):
    """Every test starts from the model as loaded: no embeddings, no folders."""
    yield
    for pipe in pipes.values():
        pipe.unload_embedding()
        pipe.embedding_dirs = []


def _reference(folders, family):
    ref = load_reference_pipeline(folders[family])
    ref.set_progress_bar_config(disable=True)
    return ref


def _encode_units(pipe: Pipeline, text: str) -> torch.Tensor:
    """The text encoder's output for one <= 75-token prompt, through ``units``."""
    ids = [i for unit in pipe.embeddings.units(pipe.tokenizer.encode(text)) for i in unit]
    with torch.no_grad():
        return pipe.text_encoder(torch.tensor([pipe.tokenizer.pad(ids)]))


def _reference_embeds(ref, token: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ref.encode_prompt(PROMPT.format(token=token), "cpu", 1, True, NEGATIVE.format(token=token))


@pytest.mark.parametrize("family,layout,n", CASES)
def test_token_embedding_extension_matches_diffusers(pipes, folders, tmp_path, family, layout, n):
    token = "zxqstyle"
    path, _ = make_file(tmp_path, layout, n, token)
    ref = _reference(folders, family)
    assert token not in ref.tokenizer.get_vocab()  # diffusers refuses tokens it knows
    ref.load_textual_inversion(str(path), token=token)
    pipe = pipes[family]
    assert pipe.load_embedding(path, allow_pickle=True) == token
    expected_pos, expected_neg = _reference_embeds(ref, token)
    got_pos = _encode_units(pipe, PROMPT.format(token=token))
    got_neg = _encode_units(pipe, NEGATIVE.format(token=token))
    assert (got_pos - expected_pos).abs().max() <= EMBEDS_TOLERANCE
    assert (got_neg - expected_neg).abs().max() <= EMBEDS_TOLERANCE
    # The embedding must matter: the same prompt without it differs.
    pipe.unload_embedding()
    assert (_encode_units(pipe, PROMPT.format(token=token)) - expected_pos).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["sd1", "sd2v"])
def test_prompt_embeddings_match_diffusers(pipes, folders, tmp_path, family):
    """Through Pipeline.encode_prompts: a 3-vector A1111 file in the prompt and a
    1-vector diffusers file in the negative prompt, both loaded at once."""
    pipe, ref = pipes[family], _reference(folders, family)
    style, _ = make_file(tmp_path, "a1111.pt", 3, "zxqstyle", seed=1)
    neg, _ = make_file(tmp_path, "emb_params.safetensors", 1, "zxqneg", seed=2)
    for path, token in ((style, "zxqstyle"), (neg, "zxqneg")):
        ref.load_textual_inversion(str(path), token=token)
        assert pipe.load_embedding(path, allow_pickle=True) == token
    prompt, negative = "a cat wearing a hat, zxqstyle", "zxqneg, blurry"
    with torch.no_grad():
        expected_pos, expected_neg = ref.encode_prompt(prompt, "cpu", 1, True, negative)
    cond, uncond = pipe.encode_prompts([prompt], [negative])
    assert (cond.context - expected_pos).abs().max() <= EMBEDS_TOLERANCE
    assert (uncond.context - expected_neg).abs().max() <= EMBEDS_TOLERANCE


@pytest.mark.parametrize("family", ["sd1", "sd2v"])
def test_images_match_diffusers_with_trigger_in_negative_prompt(pipes, folders, tmp_path, family, one_thread):
    import diffusers

    pipe, ref = pipes[family], _reference(folders, family)
    style, _ = make_file(tmp_path, "learned_embeds.bin", 2, "zxqstyle", seed=3)
    neg, _ = make_file(tmp_path, "a1111.pt", 4, "zxqneg", seed=4)
    for path, token in ((style, "zxqstyle"), (neg, "zxqneg")):
        ref.load_textual_inversion(str(path), token=token)
        assert pipe.load_embedding(path, token=token, allow_pickle=True) == token
    prompts, negative = ["a cat wearing a hat, zxqstyle", "a red circle"], "zxqneg, blurry"
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    expected = ref(prompts, negative_prompt=[negative] * 2, num_inference_steps=4, guidance_scale=7.5,
                   generator=[torch.Generator("cpu").manual_seed(7 + k) for k in range(2)],
                   height=64, width=64, output_type="np").images
    settings = dict(steps=4, guidance_scale=7.5, seed=7, width=64, height=64, sampler="euler",
                    output="np", progress=False)
    got = pipe(prompts, negative_prompt=negative, **settings)
    assert expected.std() > 0.05
    assert np.abs(got - expected).max() <= PIXEL_TOLERANCE
    pipe.unload_embedding()
    assert np.abs(pipe(prompts, negative_prompt=negative, **settings) - expected).max() > 1e-2


def _ids(pipe, text):
    return pipe.tokenizer.encode(text)


def test_units_longest_trigger_first_and_reserved_ids(sd1):
    vocab = sd1.text_encoder.text_model.get_input_embeddings().num_embeddings
    sd1.embeddings.add("zxq", _vectors(2, 1))
    sd1.embeddings.add("zxq_v2", _vectors(3, 2))
    cat, comma = _ids(sd1, "cat"), _ids(sd1, ",")
    got = sd1.embeddings.units(_ids(sd1, "cat zxq_v2, zxq cat"))
    assert got == [cat, [vocab + 2, vocab + 3, vocab + 4], comma, [vocab, vocab + 1], cat]
    # A word that merely starts like a trigger is not it: 'zxqa' tokenizes differently.
    assert all(len(u) == 1 and u[0] < vocab for u in sd1.embeddings.units(_ids(sd1, "zxqa")))
    assert sd1.embeddings.units([]) == []


def test_units_without_embeddings_is_one_id_per_unit(sd1):
    ids = _ids(sd1, "a photo of a cat")
    assert sd1.embeddings.units(ids) == [[i] for i in ids]
    with pytest.raises(TypeError, match="token ids"):
        sd1.embeddings.units("a cat")


def test_token_embedding_rows_hold_the_vectors(sd1, tmp_path):
    layer = sd1.text_encoder.text_model.get_input_embeddings()
    vocab = layer.num_embeddings
    path, vectors = make_file(tmp_path, "emb_params.safetensors", 3, "zxqrows")
    sd1.load_embedding(path)
    assert layer.num_embeddings == layer.weight.shape[0] == vocab + 3
    assert torch.equal(sd1.text_encoder.text_model.get_input_embeddings().weight[vocab:], vectors)


def test_unload_restores_the_matrix_bit_for_bit(sd1, tmp_path):
    original = sd1.text_encoder.text_model.get_input_embeddings().weight
    sd1.unload_embedding()  # nothing loaded: nothing touched
    assert sd1.text_encoder.text_model.get_input_embeddings().weight is original
    before = original.detach().clone()
    for k, token in enumerate(("zxqa", "zxqb", "zxqc")):
        path, _ = make_file(tmp_path, "a1111.pt", k + 1, token, seed=k)
        sd1.load_embedding(path, allow_pickle=True)
    sd1.unload_embedding("zxqb")
    assert sd1.embeddings.tokens == ["zxqa", "zxqc"]
    # The remaining embeddings keep working after one is removed.
    vocab = before.shape[0]
    assert sd1.embeddings.units(_ids(sd1, "zxqc")) == [[vocab + 1, vocab + 2, vocab + 3]]
    sd1.unload_embedding()
    after = sd1.text_encoder.text_model.get_input_embeddings()
    assert after.num_embeddings == vocab and torch.equal(after.weight, before)
    assert after.weight.dtype == before.dtype


def test_embeddings_follow_the_pipeline_dtype(sd1_folder, tmp_path):
    pipe = Pipeline.from_pretrained(sd1_folder, device="cpu")  # its weights get rounded here
    path, vectors = make_file(tmp_path, "emb_params.safetensors", 2, "zxqdtype")
    pipe.load_embedding(path)
    pipe.to(dtype=torch.bfloat16)  # moves the added rows with the rest
    layer = pipe.text_encoder.text_model.get_input_embeddings()
    assert torch.equal(layer.weight[-2:], vectors.bfloat16())
    before = layer.weight[:-2].detach().clone()
    pipe.unload_embedding()
    pipe.load_embedding(path)  # rows added in the encoder's current dtype
    weight = pipe.text_encoder.text_model.get_input_embeddings().weight
    assert weight.dtype == torch.bfloat16 and torch.equal(weight[-2:], vectors.bfloat16())
    pipe.unload_embedding()
    assert torch.equal(pipe.text_encoder.text_model.get_input_embeddings().weight, before)


def test_token_defaults(sd1, tmp_path):
    a1111 = tmp_path / "MyStyle.pt"
    write_a1111_pt(a1111, _vectors(2, 0), name="stored-name-is-not-used")
    assert sd1.load_embedding(a1111, allow_pickle=True) == "MyStyle"  # the stem, as A1111
    # diffusers' default file name says nothing: its stored key is the token.
    learned = tmp_path / "learned_embeds.safetensors"
    write_learned_embeds(learned, _vectors(None, 1), "<cat-toy>")
    assert sd1.load_embedding(learned) == "<cat-toy>"
    other = tmp_path / "toy.safetensors"
    write_learned_embeds(other, _vectors(None, 2), "<other>")
    assert sd1.load_embedding(other) == "toy"
    assert sd1.load_embedding(other, token="explicit") == "explicit"
    concept = tmp_path / "concept"  # a diffusers folder stands for its learned_embeds file
    concept.mkdir()
    write_learned_embeds(concept / "learned_embeds.safetensors", _vectors(2, 3), "<concept>")
    assert sd1.load_embedding(concept) == "<concept>"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without learned_embeds"):
        sd1.load_embedding(tmp_path / "empty")
    assert sd1.embeddings.tokens == ["MyStyle", "<cat-toy>", "toy", "explicit", "<concept>"]


def test_token_collisions_are_refused(sd1, tmp_path):
    path, _ = make_file(tmp_path, "emb_params.safetensors", 1, "zxqdup")
    sd1.load_embedding(path)
    with pytest.raises(EmbeddingError, match="already loaded"):
        sd1.load_embedding(path)
    with pytest.raises(EmbeddingError, match="same word as the loaded embedding 'zxqdup'"):
        sd1.load_embedding(path, token="ZXQDUP")  # prompts are lower-cased: the same ids
    with pytest.raises(ValueError, match="non-empty"):
        sd1.load_embedding(path, token=" ")
    with pytest.raises(ValueError, match="no embedding 'nope' is loaded; loaded: \\['zxqdup'\\]"):
        sd1.unload_embedding("nope")


@pytest.mark.parametrize("width,family", [(64, None), (1024, "SD2"), (768, "SD1")])
def test_wrong_width_names_both(sd1, tmp_path, width, family):
    path = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.randn(2, width)}, str(path))
    with pytest.raises(EmbeddingError, match=f"{width} wide.*encoder is {WIDTH} wide") as info:
        sd1.load_embedding(path)
    assert str(path) in str(info.value)
    if family:
        assert family in str(info.value)
    assert sd1.embeddings.tokens == []


def test_sdxl_embedding_is_refused(sd1, tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(path))
    with pytest.raises(EmbeddingError, match="SDXL embedding.*clip_g.*clip_l.*needs an SDXL model"):
        sd1.load_embedding(path)


def test_unknown_layouts_list_the_keys(sd1, tmp_path):
    path = tmp_path / "two.safetensors"
    save_file({"alpha": torch.randn(1, WIDTH), "beta": torch.randn(1, WIDTH)}, str(path))
    with pytest.raises(EmbeddingError, match="not a textual-inversion embedding.*found keys: alpha, beta"):
        sd1.load_embedding(path)
    several = tmp_path / "several.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH), "+": torch.randn(1, WIDTH)}}, several)
    with pytest.raises(EmbeddingError, match="must map one name to one tensor"):
        sd1.load_embedding(several, allow_pickle=True)
    extra = tmp_path / "extra.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, WIDTH)}, "bias": torch.randn(WIDTH)}, extra)
    with pytest.raises(EmbeddingError, match="unexpected tensors.*bias"):
        sd1.load_embedding(extra, allow_pickle=True)
    lora = tmp_path / "lora.safetensors"  # a LoRA or a checkpoint: refused from its header
    save_file({f"lora_te_layer_{k}.alpha": torch.ones(()) for k in range(20)}, str(lora))
    with pytest.raises(EmbeddingError, match="found keys: lora_te_layer_0.alpha, .*\\(20 keys\\)"):
        sd1.load_embedding(lora)
    for name in ("notes.txt", "model.ckpt"):
        (tmp_path / name).write_text("hello")
        with pytest.raises(EmbeddingError, match=f"unknown embedding file type '{os.path.splitext(name)[1]}'"):
            sd1.load_embedding(tmp_path / name, allow_pickle=True)
    ints = tmp_path / "ints.safetensors"
    save_file({"emb_params": torch.ones(1, WIDTH, dtype=torch.int32)}, str(ints))
    with pytest.raises(EmbeddingError, match="floating point"):
        sd1.load_embedding(ints)
    assert sd1.embeddings.tokens == []


def test_missing_corrupt_and_pickle_files(sd1, tmp_path):
    with pytest.raises(FileNotFoundError, match="embedding file.*nothere.pt"):
        sd1.load_embedding(tmp_path / "nothere.pt")
    pt = tmp_path / "style.pt"
    write_a1111_pt(pt, _vectors(1, 0))
    with pytest.raises(CheckpointError, match="refusing to load a pickle.*allow_pickle=True"):
        sd1.load_embedding(pt)
    # Files that need full pickle (old ParameterDict layout) are refused even with the opt-in.
    full = tmp_path / "full.pt"
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, WIDTH))})}, full)
    with pytest.raises(EmbeddingError, match="weights_only=True"):
        sd1.load_embedding(full, allow_pickle=True)
    truncated = tmp_path / "cut.safetensors"
    write_emb_params(truncated, _vectors(2, 0))
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        sd1.load_embedding(truncated)
    assert sd1.embeddings.tokens == []


def test_non_finite_and_oversized_vectors_are_refused(sd1, tmp_path):
    vectors = _vectors(3, 0)
    vectors[1, 5] = float("nan")
    path = tmp_path / "nan.safetensors"
    write_emb_params(path, vectors)
    with pytest.raises(EmbeddingError, match="NaN or inf"):
        sd1.load_embedding(path)
    with pytest.raises(EmbeddingError, match="NaN or inf"):
        sd1.embeddings.add("inf", torch.full((WIDTH,), float("inf")))
    with pytest.raises(EmbeddingError, match="76 vectors do not fit in one 75-token"):
        sd1.embeddings.add("huge", _vectors(76, 0))
    assert sd1.embeddings.tokens == []


def test_embedding_hash_is_a1111_shorthash(sd1, tmp_path):
    path, _ = make_file(tmp_path, "emb_params.safetensors", 2, "zxqhash")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert embedding_hash(path) == expected
    sd1.load_embedding(path, token="zxq:hash")
    sd1.embeddings.add("zxqtensor", _vectors(1, 5))  # no file, no hash
    texts = ["a (zxq:hash:1.2) cat, zxqtensor", "nothing here"]
    assert sd1.embeddings.used(texts) == ["zxq:hash", "zxqtensor"]
    assert sd1.embeddings.ti_hashes(texts) == {"zxq:hash": expected}
    assert sd1.embeddings.ti_hashes(["a cat"]) == {}
    # As the web UI writes it: names without ":" and ",".
    assert 'TI hashes: "zxqhash: ' + expected + '"' in format_parameters(
        GenerationParams(prompt="a", steps=1, seed=1, ti_hashes=sd1.embeddings.ti_hashes(texts)))


def test_folders_load_a_file_when_a_prompt_names_it(sd1, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "sub").mkdir(parents=True)
    second.mkdir()
    write_emb_params(first / "sub" / "zxqneg.safetensors", _vectors(2, 0))
    write_emb_params(second / "zxqneg.safetensors", _vectors(2, 1))  # shadowed by first/
    write_emb_params(second / "zxqother.safetensors", _vectors(1, 2))
    write_a1111_pt(second / "zxqother.pt", _vectors(1, 3))  # shadowed by the .safetensors
    assert find_embeddings([first, second]) == {
        "zxqneg": first / "sub" / "zxqneg.safetensors", "zxqother": second / "zxqother.safetensors",
    }
    sd1.embedding_dirs = [first, str(second)]
    assert sd1.embeddings.tokens == []
    vocab = sd1.text_encoder.text_model.get_input_embeddings().num_embeddings
    units = sd1.embeddings.units(_ids(sd1, "zxqneg, blurry"))
    assert units[0] == [vocab, vocab + 1] and sd1.embeddings.tokens == ["zxqneg"]
    weights = sd1.text_encoder.text_model.get_input_embeddings().weight
    assert torch.equal(weights[vocab:], _vectors(2, 0))
    # Loaded once: the next mention uses the loaded rows.
    assert sd1.embeddings.units(_ids(sd1, "zxqneg"))[0] == [vocab, vocab + 1]
    assert sd1.embeddings.tokens == ["zxqneg"]
    # A file added later is found (the folder's modification time changed).
    write_emb_params(first / "zxqlate.safetensors", _vectors(1, 4))
    assert sd1.embeddings.units(_ids(sd1, "zxqlate"))[0] == [vocab + 2]


def test_folder_embedding_named_in_a_negative_prompt_loads_while_sampling(sd1, tmp_path):
    write_emb_params(tmp_path / "zxqneg.safetensors", _vectors(2, 0))
    sd1.embedding_dirs = [tmp_path]
    sd1("a cat", negative_prompt="zxqneg, blurry", steps=1, width=64, height=64, seed=0, progress=False)
    assert sd1.embeddings.tokens == ["zxqneg"]
    # Loaded under inference mode, the matrix is still an ordinary parameter afterwards.
    assert not sd1.text_encoder.text_model.get_input_embeddings().weight.is_inference()


def test_multi_vector_embedding_starts_the_next_chunk(sd1):
    from ldm.prompts import prompt_chunks

    vocab = sd1.text_encoder.text_model.get_input_embeddings().num_embeddings
    sd1.embeddings.add("zxqthree", _vectors(3, 0))
    chunks = prompt_chunks(sd1.tokenizer, "cat " * 73 + ", zxqthree", embeddings=sd1.embeddings)
    # 73 words and the comma leave 1 free place of 75: the 3 vectors go to the next chunk whole
    # (A1111's tokenize_line: ``if len(chunk.tokens) + emb_len > self.chunk_length: next_chunk()``).
    assert [len(c.ids) for c in chunks] == [74, 3]
    assert chunks[1].ids == (vocab, vocab + 1, vocab + 2)


def test_folder_file_that_cannot_load_is_an_error_when_named(sd1, tmp_path):
    save_file({"emb_params": torch.randn(1, 1024)}, str(tmp_path / "zxqwide.safetensors"))
    write_a1111_pt(tmp_path / "zxqpickle.pt", _vectors(1, 0))
    sd1.embedding_dirs = [tmp_path]
    assert sd1.embeddings.units(_ids(sd1, "a cat")) == [[i] for i in _ids(sd1, "a cat")]
    with pytest.raises(EmbeddingError, match="contains 'zxqwide'.*zxqwide.safetensors.*1024 wide"):
        sd1.embeddings.units(_ids(sd1, "a zxqwide cat"))
    with pytest.raises(EmbeddingError, match="contains 'zxqpickle'.*allow_pickle=True"):
        sd1.embeddings.units(_ids(sd1, "zxqpickle"))
    sd1.embeddings.allow_pickle = True
    try:
        assert len(sd1.embeddings.units(_ids(sd1, "zxqpickle"))) == 1
    finally:
        sd1.embeddings.allow_pickle = False


def test_embedding_dirs_validation_and_environment(sd1, tmp_path, monkeypatch, caplog):
    with pytest.raises(FileNotFoundError, match="embedding folder .*missing"):
        sd1.embedding_dirs = [tmp_path / "missing"]
    with pytest.raises(TypeError, match="list of paths"):
        sd1.embedding_dirs = str(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    env = {"LDM_EMBEDDING_DIR": os.pathsep.join([str(a), str(b), ""])}
    assert embedding_dirs_from_env(env) == [a, b]
    assert embedding_dirs_from_env({}) == []
    # From the environment, a folder that no longer exists is logged and skipped.
    a.mkdir()
    monkeypatch.setenv("LDM_EMBEDDING_DIR", os.pathsep.join([str(a), str(b)]))
    with caplog.at_level("WARNING"):
        table = EmbeddingTable(sd1.text_encoder, sd1.tokenizer)
    assert table.dirs == [a] and f"{b}, which is not a folder" in caplog.text


def test_table_checks_its_arguments(sd1):
    with pytest.raises(TypeError, match="TextEncoder"):
        EmbeddingTable(object(), sd1.tokenizer)
    with pytest.raises(TypeError, match="Tokenizer"):
        EmbeddingTable(sd1.text_encoder, object())
    with pytest.raises(TypeError, match="tensor"):
        sd1.embeddings.add("zxq", [0.0] * WIDTH)
