"""Resolving, downloading, verifying and reading CLIP weights (local HTTP server, no internet)."""
from __future__ import annotations

import hashlib
import http.server
import logging
import os
import socket
import threading
import warnings

import pytest
import torch

from modules import clip_weights as module_clip
from modules.clip_weights import WeightsError, load_clip_state_dict, resolve_clip_weights
from modules.module_clip import CLIP, build_model

TINY = dict(
    embed_dim=16, image_resolution=32, vision_layers=1, vision_width=64, vision_patch_size=16,
    context_length=8, vocab_size=50, transformer_width=32, transformer_heads=1,
    transformer_layers=1,
)


@pytest.fixture(scope="module")
def tiny_state_dict():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return CLIP(**TINY).state_dict()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_state_dict):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny_state_dict, path)
    return path


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


class _Server:
    """Serves fixed bytes at fixed paths on 127.0.0.1 and counts requests."""

    def __init__(self) -> None:
        self.files: dict = {}
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests += 1
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                # A "truncated" file announces more bytes than it sends, then hangs up.
                extra = 1000 if "truncated" in self.path else 0
                self.send_header("Content-Length", str(len(body) + extra))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._serve(Handler)

    def _serve(self, handler) -> None:
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/clip/models"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(tiny_file):
    srv = _Server()
    data = tiny_file.read_bytes()
    srv.sha256 = hashlib.sha256(data).hexdigest()
    srv.files[f"/clip/models/{srv.sha256}/ViT-B-32.pt"] = data
    # The same bytes under a path whose "hash" is wrong.
    srv.files[f"/clip/models/{'0' * 64}/ViT-B-32.pt"] = data
    srv.files[f"/truncated/clip/models/{srv.sha256}/ViT-B-32.pt"] = data
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ("UNIFIED_CLIP_WEIGHTS", "UNIFIED_CLIP_URL_BASE", "UNIFIED_CLIP_CACHE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def served(server, monkeypatch):
    """ViT-B/32 resolves to the tiny checkpoint on the local server."""
    monkeypatch.setitem(module_clip.OPENAI_MODELS, "ViT-B/32", f"{server.sha256}/ViT-B-32.pt")
    monkeypatch.setenv("UNIFIED_CLIP_URL_BASE", server.url)
    return server


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/clip/models"


def test_official_url_table():
    assert module_clip.OPENAI_URL_BASE == "https://openaipublic.azureedge.net/clip/models"
    for name, relative in module_clip.OPENAI_MODELS.items():
        sha, filename = relative.split("/")
        assert len(sha) == 64 and int(sha, 16) >= 0
        assert filename == name.replace("/", "-") + ".pt"


def test_download_then_reuse_cache(served, tmp_path, tiny_state_dict):
    cache = tmp_path / "cache"
    before = served.requests
    sd = load_clip_state_dict("ViT-B/32", cache_dir=str(cache))
    assert served.requests == before + 1
    assert _same(sd, tiny_state_dict)
    assert os.listdir(cache) == ["ViT-B-32.pt"]  # no temp file left behind
    assert hashlib.sha256((cache / "ViT-B-32.pt").read_bytes()).hexdigest() == served.sha256
    # Second call: verified cache, no network.
    sd = load_clip_state_dict("ViT-B-32", cache_dir=str(cache), download=False)
    sd = load_clip_state_dict("ViT-B/32", cache_dir=str(cache))
    assert served.requests == before + 1
    assert _same(sd, tiny_state_dict)
    assert build_model(sd).config == TINY


def test_cache_dir_from_env(served, tmp_path, monkeypatch):
    monkeypatch.setenv("UNIFIED_CLIP_CACHE", str(tmp_path / "envcache"))
    load_clip_state_dict("ViT-B/32")
    assert (tmp_path / "envcache" / "ViT-B-32.pt").is_file()


def test_corrupt_cached_file_is_downloaded_again(served, tmp_path, tiny_state_dict):
    (tmp_path / "ViT-B-32.pt").write_bytes(b"truncated download")
    before = served.requests
    sd = load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path))
    assert served.requests == before + 1
    assert _same(sd, tiny_state_dict)
    assert hashlib.sha256((tmp_path / "ViT-B-32.pt").read_bytes()).hexdigest() == served.sha256


def test_sha256_mismatch_leaves_nothing(served, tmp_path, monkeypatch):
    monkeypatch.setitem(module_clip.OPENAI_MODELS, "ViT-B/32", f"{'0' * 64}/ViT-B-32.pt")
    with pytest.raises(WeightsError) as info:
        load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path))
    message = str(info.value)
    assert message.startswith(f"sha256 mismatch for {served.url}/{'0' * 64}/ViT-B-32.pt")
    assert f"expected {'0' * 64} got {served.sha256}" in message
    assert os.listdir(tmp_path) == []


def test_unreachable_server(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIFIED_CLIP_URL_BASE", _dead_url())
    with pytest.raises(WeightsError) as info:
        load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not download ViT-B/32 from http://127.0.0.1:")
    assert "--clip_weights PATH" in message and "UNIFIED_CLIP_WEIGHTS" in message
    assert os.listdir(tmp_path) == []


def test_http_error(served, monkeypatch, tmp_path):
    monkeypatch.setitem(module_clip.OPENAI_MODELS, "ViT-B/32", f"{'1' * 64}/ViT-B-32.pt")
    with pytest.raises(WeightsError, match=r"\(HTTP 404 .*--clip_weights"):
        load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_interrupted_download_leaves_nothing(served, monkeypatch, tmp_path):
    base = served.url.replace("/clip/models", "/truncated/clip/models")
    monkeypatch.setenv("UNIFIED_CLIP_URL_BASE", base)
    expected = r"could not download ViT-B/32 .*\(connection closed after \d+ of \d+ bytes\)"
    with pytest.raises(WeightsError, match=expected + ".*--clip_weights"):
        load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_unwritable_cache(served, tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_bytes(b"")
    with pytest.raises(WeightsError, match="cannot write to the CLIP cache directory"):
        load_clip_state_dict("ViT-B/32", cache_dir=str(not_a_dir / "sub"))


def test_no_download_and_not_cached(served, tmp_path):
    before = served.requests
    with pytest.raises(WeightsError, match="not cached.*download=False"):
        load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path), download=False)
    assert served.requests == before


def test_missing_path_and_unknown_name(tmp_path):
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(WeightsError, match="weights file not found: .*weights.pt"):
        load_clip_state_dict(str(missing))
    with pytest.raises(WeightsError, match="weights file not found"):
        load_clip_state_dict("weights.pt")
    with pytest.raises(WeightsError, match="unknown CLIP model 'ViT-H/14'.*ViT-B/32, ViT-B/16"):
        load_clip_state_dict("ViT-H/14")


def test_corrupt_and_non_clip_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(WeightsError) as info:
        load_clip_state_dict(str(junk))
    assert "not a CLIP checkpoint or is corrupt" in str(info.value)
    assert str(junk) in str(info.value) and "\n" not in str(info.value)

    other = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(WeightsError, match="not a CLIP checkpoint"):
        load_clip_state_dict(str(other))

    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "args": _Unsafe()}, pickled)
    with pytest.raises(WeightsError, match="Unsupported global"):
        load_clip_state_dict(str(pickled))


class _Unsafe:
    """An arbitrary class: refused by torch.load(weights_only=True)."""


def test_plain_and_wrapped_state_dicts(tmp_path, tiny_file, tiny_state_dict):
    assert _same(load_clip_state_dict(str(tiny_file)), tiny_state_dict)
    wrapped = tmp_path / "train_ckpt.pt"
    torch.save(
        {"epoch": 3, "state_dict": {"module." + k: v for k, v in tiny_state_dict.items()}},
        wrapped,
    )
    assert _same(load_clip_state_dict(str(wrapped)), tiny_state_dict)


def test_torchscript_archive(tmp_path, tiny_state_dict):
    model = CLIP(**TINY).eval()
    model.load_state_dict(tiny_state_dict)
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings
        traced = torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 32, 32)})
        traced.save(str(path))
    sd = load_clip_state_dict(str(path))
    # TorchScript keeps non-persistent buffers; build_model drops them.
    assert _same({k: v for k, v in sd.items() if k != "attn_mask"}, tiny_state_dict)
    rebuilt = build_model(sd)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt.encode_image(images), model.encode_image(images))


def test_env_weights_override(monkeypatch, tiny_file, tiny_state_dict, tmp_path):
    monkeypatch.setenv("UNIFIED_CLIP_WEIGHTS", str(tiny_file))
    monkeypatch.setenv("UNIFIED_CLIP_URL_BASE", _dead_url())  # proves no download happens
    assert _same(load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path)), tiny_state_dict)
    assert _same(resolve_clip_weights(None).state_dict, tiny_state_dict)
    assert os.listdir(tmp_path) == []
    monkeypatch.setenv("UNIFIED_CLIP_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(WeightsError, match="weights file not found: .*UNIFIED_CLIP_WEIGHTS"):
        load_clip_state_dict("ViT-B/32")


def test_env_weights_random_means_random_weights(monkeypatch, caplog, tmp_path):
    """Issue 11.9: UNIFIED_CLIP_WEIGHTS=random means what --clip_weights random means
    (failed before: "weights file not found: random (from UNIFIED_CLIP_WEIGHTS)")."""
    monkeypatch.setenv("UNIFIED_CLIP_WEIGHTS", "random")
    monkeypatch.setenv("UNIFIED_CLIP_URL_BASE", _dead_url())  # no download either
    with caplog.at_level(logging.WARNING, logger="modules.clip_weights"):
        sd = load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path))
    assert "UNIFIED_CLIP_WEIGHTS=random" in caplog.text
    assert _same(sd, resolve_clip_weights("random").state_dict)  # the same random weights (same seed)
    assert resolve_clip_weights(None).state_dict["visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert os.listdir(tmp_path) == []


def test_resolve_clip_weights_random_and_files(caplog, tiny_file, tiny_state_dict):
    with caplog.at_level(logging.WARNING, logger="modules.clip_weights"):
        sd = resolve_clip_weights("random").state_dict
    assert "random CLIP weights: embeddings are not semantic" in caplog.text
    assert sd["visual.conv1.weight"].shape == (768, 3, 32, 32)
    assert sd["token_embedding.weight"].shape == (49408, 512)
    assert len(sd) == 302
    assert _same(resolve_clip_weights(str(tiny_file)).state_dict, tiny_state_dict)


# ----------------------------------------------------------------------------- TorchScript as data


def _evil_archive(path, marker) -> None:
    """A scripted module whose __setstate__ creates ``marker`` (torch.jit.load runs it)."""
    from typing import Tuple

    class Evil(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(2))
            self.path = str(marker)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
            return (self.weight, self.path, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
            self.weight = state[0]
            self.path = state[1]
            self.training = state[2]
            self.weight = self.weight + torch.from_file(self.path, shared=True, size=1).sum() * 0

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Evil()).save(str(path))


def test_torchscript_code_never_runs(tmp_path, monkeypatch):
    """A crafted "ViT-B-32.pt" is refused; its __setstate__ (which would create a file) never runs."""
    marker = tmp_path / "pwned"
    archive = tmp_path / "ViT-B-32.pt"
    _evil_archive(archive, marker)
    assert not marker.exists()
    with pytest.raises(WeightsError) as info:
        load_clip_state_dict(str(archive))
    assert "__setstate__" in str(info.value) and str(archive) in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv("UNIFIED_CLIP_WEIGHTS", str(archive))  # the same file behind an official name
    with pytest.raises(WeightsError):
        resolve_clip_weights(None).state_dict
    assert not marker.exists()


def test_torchscript_is_never_jit_loaded(tmp_path, tiny_state_dict, monkeypatch):
    model = CLIP(**TINY).eval()
    model.load_state_dict(tiny_state_dict)
    path = tmp_path / "ViT-tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 32, 32)}).save(str(path))
        expected = torch.jit.load(str(path)).state_dict()  # what the old loader returned

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    weights = module_clip.load_clip_weights(str(path))
    assert set(weights.state_dict) == set(expected)
    assert all(torch.equal(weights.state_dict[k], expected[k]) for k in expected)
    assert weights.activation == "quick_gelu"  # the traced code shows QuickGELU


def test_non_finite_clip_weights_are_refused(tmp_path, tiny_state_dict):
    bad = dict(tiny_state_dict)
    bad["visual.proj"] = bad["visual.proj"].clone()
    bad["visual.proj"][0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(bad, path)
    with pytest.raises(WeightsError, match=r"nan.pt: tensor visual.proj holds NaN or infinite values"):
        load_clip_state_dict(str(path))


def test_fifo_and_folder_without_config_are_refused(tmp_path):
    fifo = tmp_path / "weights.pt"
    os.mkfifo(fifo)
    with pytest.raises(WeightsError, match="not a regular file"):
        load_clip_state_dict(str(fifo))  # returns at once instead of blocking on the FIFO
    with pytest.raises(WeightsError, match="no config.json"):
        load_clip_state_dict(str(tmp_path))


# ----------------------------------------------------------------------------- downloads


def test_verified_bytes_are_the_bytes_loaded(served, tmp_path, monkeypatch, tiny_state_dict):
    """Swapping the cached file right after it was verified does not change what is loaded."""
    other = {k: torch.zeros_like(v) for k, v in tiny_state_dict.items()}
    swapped = tmp_path / "swapped.pt"
    torch.save(other, swapped)
    real_replace = os.replace

    def replace_then_swap(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("ViT-B-32.pt"):
            real_replace(swapped, dst)  # an attacker's file lands under the verified name

    monkeypatch.setattr(os, "replace", replace_then_swap)
    sd = load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path / "cache"))
    assert _same(sd, tiny_state_dict)


class _NoLengthServer(_Server):
    """Streams ``size`` bytes with no Content-Length (HTTP/1.0 style, closed at the end)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(outer.size // 65536):
                        self.wfile.write(b"\0" * 65536)
                        outer.sent += 65536
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args) -> None:
                pass

        self._serve(Handler)


def test_download_without_length_is_capped(tmp_path, monkeypatch):
    endless = _NoLengthServer(64 << 20)
    try:
        monkeypatch.setenv("UNIFIED_CLIP_URL_BASE", endless.url)
        monkeypatch.setitem(module_clip.OPENAI_MAX_BYTES, "ViT-B/32", 1 << 20)
        with pytest.raises(WeightsError, match=r"could not download ViT-B/32 .*more than the 1048576 bytes expected"):
            load_clip_state_dict("ViT-B/32", cache_dir=str(tmp_path))
        assert os.listdir(tmp_path) == []
        assert endless.sent < 32 << 20  # stopped near the cap, not at the end of the stream
    finally:
        endless.close()


# ----------------------------------------------------------------------------- checkpoints naming weights


def test_checkpoint_naming_a_file_is_not_followed(tmp_path):
    from modules.clip_weights import checkpoint_clip_weights

    assert checkpoint_clip_weights(None, "ck.pth", None) is None
    assert checkpoint_clip_weights("ViT-B/16", "ck.pth", None) == "ViT-B/16"
    assert checkpoint_clip_weights("random", "ck.pth", None) == "random"
    assert checkpoint_clip_weights("open_clip:ViT-B-32/laion2b_s34b_b79k", "ck.pth", None).startswith("open_clip:")
    assert checkpoint_clip_weights("/tmp/evil.pt", "ck.pth", "/tmp/evil.pt") == "/tmp/evil.pt"  # the user's word
    with pytest.raises(WeightsError, match=r"ck.pth was trained with clip_weights '/tmp/evil.pt'.*--clip_weights /tmp/evil.pt"):
        checkpoint_clip_weights("/tmp/evil.pt", "ck.pth", None)
    with pytest.raises(WeightsError):
        checkpoint_clip_weights("open_clip:hf-hub:someone/model", "ck.pth", None)


def _small_checkpoint(tmp_path, **config_changes):
    from config import from_dict
    from modules.clip_archs import small_arch
    from modules.module_clip import random_state_dict
    from modules.training import small_config_dict
    from unified_model import UnifiedTempMeSTOPModel

    model = UnifiedTempMeSTOPModel(from_dict(small_config_dict(32, vision_layers=2)),
                                   random_state_dict(small_arch(32, vision_width=64, vision_layers=2, text_width=64,
                                                                text_layers=2)))
    payload = model.checkpoint_payload()
    payload["config"].update(config_changes)
    return payload


def test_checkpoint_naming_a_crafted_file_does_not_open_it(tmp_path):
    """A harmless-looking checkpoint whose config names a crafted archive: nothing runs."""
    from unified_model import create_unified_model

    marker = tmp_path / "pwned"
    evil = tmp_path / "ViT-B-32.pt"
    _evil_archive(evil, marker)
    path = tmp_path / "model.pth"
    torch.save(_small_checkpoint(tmp_path, clip_weights=str(evil)), path)
    with pytest.raises(WeightsError, match=rf"trained with clip_weights '{evil}'.*pass the weights yourself: --clip_weights"):
        create_unified_model(checkpoint=str(path), device="cpu")
    assert not marker.exists()
    from modules.clip_archs import small_arch
    from modules.module_clip import random_state_dict

    mine = tmp_path / "mine.pt"
    torch.save(random_state_dict(small_arch(32, vision_width=64, vision_layers=2, text_width=64, text_layers=2)), mine)
    model = create_unified_model(checkpoint=str(path), device="cpu", clip_weights=str(mine))  # the user's word
    assert model.config.clip_weights == str(mine)


def test_checkpoint_with_non_finite_tensors_is_refused(tmp_path):
    from unified_model import CheckpointError, create_unified_model

    payload = _small_checkpoint(tmp_path)
    name = next(iter(payload["trainable"]))
    payload["trainable"][name] = torch.full_like(payload["trainable"][name], float("inf"))
    path = tmp_path / "inf.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=rf"inf.pth: tensor {name} holds NaN or infinite values"):
        create_unified_model(checkpoint=str(path), device="cpu", clip_weights="random")
