"""The `auto` codec's decision rules (csrc/core/auto_policy_test.cpp, synthetic rates), and that
whatever `auto` decides, its checkpoints are valid and bit-exact."""

import os
import shutil
import subprocess

import pytest
import torch

import shardckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORE = os.path.join(ROOT, "csrc", "core")


def test_auto_policy_rules(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler to build csrc/core/auto_policy_test.cpp")
    exe = tmp_path / "auto_policy_test"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{CORE}",
                    os.path.join(CORE, "auto_policy.cpp"),
                    os.path.join(CORE, "auto_policy_test.cpp"), "-o", str(exe), "-pthread"],
                   check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "auto_policy_test: ok" in run.stdout


def _state():
    gen = torch.Generator().manual_seed(3)
    smooth = torch.linspace(0, 1, 600_000).reshape(600, 1000)
    return {"bf16": smooth.to(torch.bfloat16), "f32": smooth.clone(),
            "noise": torch.randint(0, 256, (3 << 20,), dtype=torch.uint8, generator=gen),
            "zeros": torch.zeros(1 << 20), "small": torch.arange(7), "empty": torch.empty(0, 3)}


@pytest.mark.parametrize("write_threads", [1, 2])
@pytest.mark.parametrize("chunk_bytes", [4096, 256 << 10])
def test_auto_checkpoints_are_valid_whatever_it_decides(ckpt, write_threads, chunk_bytes):
    state = _state()
    info = shardckpt.save(state, ckpt, codec="auto", chunk_bytes=chunk_bytes,
                          write_threads=write_threads, durable=False)
    shardckpt.verify(ckpt)
    loaded = shardckpt.load_full(ckpt)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    assert info.stored_bytes <= info.raw_bytes
