"""Config and batch files read as hostile data: one-line errors naming the file, exit 2, bounded reads."""
from __future__ import annotations

import os

import pytest

from config import ConfigError, read_json_object
from modules.cli_support import UsageError
from modules.json_input import JSONInputError, read_json_file, read_output_json
from tests.cli_utils import describe, no_traceback, run_script

HOSTILE = {
    "deeply_nested": (b"[" * 100_000 + b"]" * 100_000, "nested more than"),
    "nested_objects": (b'{"a":' * 200 + b"1" + b"}" * 200, "nested more than"),
    "huge_integer": (b'{"top_k": ' + b"9" * 5000 + b"}", "5000 digits"),
    "not_utf8": (b'{"query": "caf\xe9"}', "not UTF-8"),
    "nan": (b'{"top_k": NaN}', "NaN is not standard JSON"),
    "duplicate_key": (b'{"top_k": 1, "top_k": 2}', "key 'top_k' appears twice"),  # silently the last before
}


def _hostile_files(folder):
    paths = {}
    for name, (data, words) in HOSTILE.items():
        paths[name] = (folder / f"{name}.json", words)
        paths[name][0].write_bytes(data)
    if hasattr(os, "mkfifo"):
        os.mkfifo(folder / "fifo.json")  # opening it for reading would block without O_NONBLOCK
        paths["fifo"] = (folder / "fifo.json", "FIFO")
    if os.path.exists("/dev/zero"):
        os.symlink("/dev/zero", folder / "zero.json")  # reading it would never end
        paths["dev_zero"] = (folder / "zero.json", "character device")
    return paths


@pytest.mark.timeout(60)
def test_config_and_batch_readers_refuse_hostile_files_in_one_line(tmp_path):
    from modules.retrieval import load_batch_file

    for name, (path, words) in _hostile_files(tmp_path).items():
        for reader, error in ((read_json_object, ConfigError), (load_batch_file, UsageError)):
            with pytest.raises(error) as info:
                reader(path)
            message = str(info.value)
            assert words in message and str(path) in message and "\n" not in message, (name, message)


@pytest.mark.timeout(60)
def test_output_folder_reader_refuses_the_same_files_but_reads_what_json_dump_writes(tmp_path):
    """read_output_json (the project's own files): the same refusals, except NaN / Infinity."""
    for name, (path, words) in _hostile_files(tmp_path).items():
        if name == "nan":
            assert read_output_json(path, "video record")["top_k"] != 0  # NaN
            continue
        with pytest.raises(JSONInputError) as info:
            read_output_json(path, "video record")
        assert words in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value), name
    with pytest.raises(JSONInputError, match="video record not found"):
        read_output_json(tmp_path / "missing.json", "video record")
    read: list = []
    assert read_output_json(tmp_path / "nan.json", "video record", stat=read) and read[0].st_size == 14


def test_size_cap(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[" + ",".join(["1"] * 1000) + "]")
    assert len(read_json_file(path)) == 1000
    with pytest.raises(JSONInputError, match="larger than 100 bytes"):
        read_json_file(path, max_bytes=100)


@pytest.mark.timeout(240)
def test_scripts_exit_2_on_hostile_config_and_batch_files(tmp_path):
    files = _hostile_files(tmp_path)
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    for name in ("deeply_nested", "huge_integer", "fifo"):
        path = files[name][0]
        for script, args in (("inference.py", ["--batch_file", path]),
                             ("extract_video_embeddings.py", ["--video_dir", tmp_path, "--output_dir",
                                                              tmp_path / "out", "--config_path", path])):
            proc = run_script(script, args, timeout=60)
            assert proc.returncode == 2, (name, script, describe(proc))
            no_traceback(proc)
            assert str(path) in proc.stderr and files[name][1] in proc.stderr, describe(proc)
