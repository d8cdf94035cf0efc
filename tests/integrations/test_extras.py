"""Optional dependencies stay optional: the core and the CLI never import a framework, and a
missing extra gets one line naming the pip command."""

import subprocess
import sys

import pytest

from shardckpt.errors import MissingExtraError

FRAMEWORKS = ("lightning", "pytorch_lightning", "accelerate", "transformers", "tensorboard",
              "matplotlib", "safetensors", "mlflow", "wandb", "keras", "torchtitan")


def test_core_and_cli_import_no_framework():
    code = ("import sys, shardckpt, shardckpt.cli, shardckpt.ops.export, shardckpt.integrations; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module,extra,blocked", [
    ("lightning", "lightning", "lightning"),
    ("accelerate", "accelerate", "accelerate"),
    ("tensorboard", "tensorboard", "tensorboard"),
    ("mlflow", "mlflow", "mlflow"),
    ("wandb", "wandb", "wandb"),
    ("transformers", "transformers", "transformers"),
    ("keras", "keras", "keras"),
    ("torchtitan", "torchtitan", "torchtitan.components.checkpointer.base"),
])
def test_missing_extra_is_one_line_with_the_pip_command(monkeypatch, module, extra, blocked):
    # As if not installed: the package and any of its submodules an earlier test imported
    # (``import lightning.pytorch`` is found in sys.modules even when ``lightning`` is blocked).
    for name in [blocked] + [m for m in sys.modules if m.startswith(blocked + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, f"shardckpt.integrations.{module}", raising=False)
    with pytest.raises(MissingExtraError) as info:
        mod = __import__(f"shardckpt.integrations.{module}", fromlist=["x"])
        if module == "tensorboard":
            mod.TensorBoardEvents("unused")  # its writer is made on construction
    message = str(info.value)
    assert "\n" not in message and f"pip install 'shardckpt[{extra}]'" in message
    assert isinstance(info.value, ImportError)
