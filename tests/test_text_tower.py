"""The library's NumPy text tower (modules/text_tower.py) against the torch model, and its file."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from modules.module_clip import build_model, random_state_dict
from modules.text_tower import (TextTowerError, load_text_tower, save_text_tower, text_tower_of, text_tower_path,
                                token_ids)
from tests.cli_utils import ROOT, small_model

TEXTS = ["a dog catches a frisbee", "", "the same words, the same words, " * 6, "Ünïcode & <b>html</b> 42"]


@pytest.fixture(scope="module")
def model():
    return small_model()


def test_numpy_tower_computes_the_model_text_embedding(model):
    tower = text_tower_of(model, "fp")
    ours = tower.encode_text(TEXTS)
    with torch.inference_mode():
        expected = model.encode_text(TEXTS).numpy()
    assert ours.shape == expected.shape == (4, 512) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    assert np.abs(ours[0] - ours[2]).max() > 1e-2  # the texts give different vectors
    # a row's EOT sees only the tokens before it: the same text alone or beside longer ones
    np.testing.assert_allclose(tower.encode_text(TEXTS[:1])[0], ours[0], atol=1e-6)


def test_folded_text_lora_is_in_the_tower():
    from config import from_dict
    from tests.cli_utils import SMALL_CONFIG
    from unified_model import create_unified_model

    model = create_unified_model(config=from_dict(SMALL_CONFIG), device="cpu")
    assert model.text_lora is not None
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.text_lora.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # LoRA B starts at zero: give it a real delta
        with_lora = model.encode_text(TEXTS[:2]).numpy()
    with pytest.raises(TextTowerError, match="fold the text LoRA"):
        text_tower_of(model, "fp")
    model.merge_lora()
    np.testing.assert_allclose(text_tower_of(model, "fp").encode_text(TEXTS[:2]), with_lora, atol=1e-5)


def test_exact_gelu_activation():
    clip = build_model(random_state_dict("ViT-B/32", seed=1), activation="gelu").eval()
    fake = types.SimpleNamespace(clip=clip, text_lora=None, config=types.SimpleNamespace(max_words=32))
    tower = text_tower_of(fake, "fp")
    assert tower.activation == "gelu"
    ids = token_ids(TEXTS, 32)
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(clip.encode_text(torch.from_numpy(ids)), dim=-1).numpy()
    np.testing.assert_allclose(tower.encode(ids), expected, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_tower():
    """A 2-layer, width-64 text tower (small files: one is written per refusal case)."""
    from modules.clip_archs import small_arch

    clip = build_model(random_state_dict(small_arch(32, vision_width=64, vision_layers=1, text_width=64, text_layers=2),
                                         seed=2)).eval()
    return text_tower_of(types.SimpleNamespace(clip=clip, text_lora=None, config=types.SimpleNamespace(max_words=32)),
                         "abc123")


def test_file_round_trip_and_refusals(tiny_tower, tmp_path):
    tower = tiny_tower
    path = text_tower_path(tmp_path, "abc123")
    save_text_tower(tower, path)
    assert os.path.basename(path) == "text-tower-abc123.safetensors"
    again = load_text_tower(path, "abc123")
    assert again.sizes == tower.sizes and again.activation == tower.activation
    np.testing.assert_array_equal(again.encode_text(TEXTS), tower.encode_text(TEXTS))
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(path)]  # no temp file left

    with pytest.raises(TextTowerError, match="of model 'abc123', not of 'other'"):
        load_text_tower(path, "other")
    with pytest.raises(TextTowerError, match="No such file"):
        load_text_tower(tmp_path / "missing.safetensors")
    with pytest.raises(TextTowerError, match="not a regular file"):
        load_text_tower(tmp_path)
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(TextTowerError, match="not a regular file"):
        load_text_tower(tmp_path / "fifo.safetensors")  # refused without blocking on open
    os.unlink(tmp_path / "fifo.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(TextTowerError, match="not a readable safetensors file"):
        load_text_tower(garbage)

    from safetensors.numpy import save_file

    def variant(name, arrays=None, **header):
        meta = {"format": "unified-text-tower", "version": "1", "fingerprint_id": "abc123",
                "activation": tower.activation, "sizes": json.dumps(tower.sizes)}
        meta.update(header)
        out = tmp_path / name
        save_file(arrays if arrays is not None else tower.arrays, str(out), metadata=meta)
        return out

    with pytest.raises(TextTowerError, match="not a unified-text-tower file"):
        load_text_tower(variant("fmt.safetensors", format="something-else"))
    with pytest.raises(TextTowerError, match="unknown activation 'relu'"):
        load_text_tower(variant("act.safetensors", activation="relu"))
    with pytest.raises(TextTowerError, match="positive integers"):
        load_text_tower(variant("sizes.safetensors", sizes=json.dumps({**tower.sizes, "layers": -1})))
    fewer = dict(tower.arrays)
    del fewer["blocks.1.c_proj.bias"]
    with pytest.raises(TextTowerError, match="28 tensors, a 2-layer text tower has 29"):
        load_text_tower(variant("fewer.safetensors", fewer))
    fewer["blocks.1.c_proj.bias_"] = tower.arrays["blocks.1.c_proj.bias"]
    with pytest.raises(TextTowerError, match=r"missing \['blocks.1.c_proj.bias'\], extra \['blocks.1.c_proj.bias_'\]"):
        load_text_tower(variant("renamed.safetensors", fewer))
    dim = tower.sizes["embed_dim"]
    wrong = {**tower.arrays, "text_projection": tower.arrays["text_projection"][:, :dim // 2].copy()}
    with pytest.raises(TextTowerError, match=f"text_projection is F32 \\(64, {dim // 2}\\), expected F32 \\(64, {dim}\\)"):
        load_text_tower(variant("shape.safetensors", wrong))
    doubles = {**tower.arrays, "ln_final.bias": tower.arrays["ln_final.bias"].astype(np.float64)}
    with pytest.raises(TextTowerError, match="ln_final.bias is F64"):
        load_text_tower(variant("dtype.safetensors", doubles))
    nan = {**tower.arrays, "ln_final.weight": np.full_like(tower.arrays["ln_final.weight"], np.nan)}
    with pytest.raises(TextTowerError, match="ln_final.weight holds non-finite values"):
        load_text_tower(variant("nan.safetensors", nan))
    with open(path, "rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(header_len))
    assert header_len < 64 * 1024  # the header is small: the file is tensors

    def rewritten(name, change):
        """The saved file with its header edited by ``change`` (same data bytes)."""
        edited = json.loads(json.dumps(header))
        change(edited)
        raw = json.dumps(edited).encode()
        raw += b" " * (-len(raw) % 8)
        out = tmp_path / name
        with open(path, "rb") as fh:
            fh.seek(8 + header_len)
            out.write_bytes(struct.pack("<Q", len(raw)) + raw + fh.read())
        return out

    def past_the_end(h):
        h["ln_final.bias"]["data_offsets"] = [10**9, 10**9 + 4 * 512]

    with pytest.raises(TextTowerError, match="ln_final.bias lies outside the file"):
        load_text_tower(rewritten("extent.safetensors", past_the_end))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")  # claims a 1 TiB header
    with pytest.raises(TextTowerError, match="header of 1099511627776 bytes"):
        load_text_tower(huge)
    def meta(**changes):
        def change(h):
            h["__metadata__"].update(changes)
        return change

    sizes = dict(tower.sizes)
    for name, changes, words in [
        ("layers.safetensors", {"sizes": json.dumps({**sizes, "layers": 1 << 20})}, "positive integers within"),
        ("vocab.safetensors", {"sizes": json.dumps({**sizes, "vocab_size": 10})}, "a vocabulary of 10 tokens"),
        ("words.safetensors", {"sizes": json.dumps({**sizes, "max_words": 1})}, "inconsistent sizes"),
        ("count.safetensors", {"sizes": json.dumps({**sizes, "layers": 1})}, "a 1-layer text tower has 17"),
        ("notext.safetensors", {"sizes": {"width": 512}}, "'sizes' is not JSON text"),
        ("nested.safetensors", {"sizes": "[" * 100000 + "]" * 100000}, "'sizes' is not JSON"),
    ]:
        with pytest.raises(TextTowerError, match=words):
            load_text_tower(rewritten(name, meta(**changes)))
    deep = tmp_path / "deep.safetensors"
    raw = b"[" * 200000 + b"]" * 200000
    deep.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(TextTowerError, match="header is not JSON"):
        load_text_tower(deep)
    huge = {**tower.arrays, "blocks.0.c_fc.weight": tower.arrays["blocks.0.c_fc.weight"] * np.float32(1e30)}
    with pytest.raises(TextTowerError, match="non-finite or zero vector"):
        load_text_tower(variant("overflow.safetensors", huge)).encode_text(["a dog"])
    zero = {k: np.zeros_like(v) for k, v in tower.arrays.items()}
    with pytest.raises(TextTowerError, match="non-finite or zero vector"):
        load_text_tower(variant("zero.safetensors", zero)).encode_text(["a dog"])

    bad_row = {**tower.arrays, "token_embedding": tower.arrays["token_embedding"].copy()}
    bad_row["token_embedding"][320] = np.inf  # the id of "a"
    lazy = load_text_tower(variant("row.safetensors", bad_row))  # the table is checked as rows are read
    lazy.encode_text(["dog"])
    with pytest.raises(TextTowerError, match="token embedding holds non-finite values"):
        lazy.encode_text(["a dog"])


def test_token_ids_are_the_model_tokens():
    from modules.tokenization_clip import tokenize_for_model

    assert np.array_equal(token_ids(TEXTS, 32), tokenize_for_model(TEXTS, 32).numpy())
    code = "import sys; from modules.text_tower import token_ids; token_ids(['a dog'], 32); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False", proc.stderr


def test_saving_removes_the_temp_file_of_a_killed_writer(tiny_tower, tmp_path):
    from modules.atomic_io import temp_path

    path = text_tower_path(tmp_path, "abc123")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = temp_path(path).replace(f".{os.getpid()}.", f".{dead.pid}.")  # what a killed writer left
    open(stale, "wb").write(b"partial")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("kept")
    save_text_tower(tiny_tower, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "text-tower-abc123.safetensors"]
