"""Fixtures for the command-line tests: a manager root, checkpoints in it, and the CLI run
in-process with its exit status, stdout and stderr."""

import json
import time

import pytest
import torch

import shardckpt
from shardckpt import cli
from shardckpt.manage.manager import META_KEY, step_name


@pytest.fixture
def root(tmp_path):
    """A manager root folder, as a string. (Object-store backends will parametrize this.)"""
    path = tmp_path / "root"
    path.mkdir()
    return str(path)


def save_step(root: str, step: int, state, metrics=None, **kwargs) -> str:
    """A committed checkpoint laid out as CheckpointManager writes it; its path."""
    path = f"{root}/{step_name(step)}"
    meta = {META_KEY: {"step": step, "metrics": metrics, "reason": "manual",
                       "unix_time": time.time()}}
    shardckpt.save(state, path, metadata=meta, **kwargs)
    return path


class Run:
    """``run(*argv)`` -> (status, stdout, stderr); ``run.json(*argv)`` parses stdout."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *argv):
        self.capsys.readouterr()
        status = cli.main([str(a) for a in argv])
        captured = self.capsys.readouterr()
        return status, captured.out, captured.err

    def json(self, *argv, status=0):
        code, out, err = self(*argv, "--json")
        assert code == status, err
        return json.loads(out)


@pytest.fixture
def run(capsys) -> Run:
    return Run(capsys)


@pytest.fixture
def model_state():
    torch.manual_seed(0)
    return {"model": {"w": torch.randn(32, 16), "b": torch.randn(16).to(torch.bfloat16),
                      "layers": [{"k": torch.arange(10, dtype=torch.int64)}]},
            "step": 7, "lr": 0.25, "name": "run-a"}
