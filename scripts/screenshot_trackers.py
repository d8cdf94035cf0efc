"""The MLflow UI with a run's checkpoints, photographed in headless Chromium (run by
``scripts/screenshot_trackers.sh``, which installs chromium first).

Starts ``mlflow server`` on loopback (tests/integrations/tracker_servers.py), trains a small
model for 12 steps with a CheckpointManager (save every 2 steps, keep the last 2 and the best by
``val_loss``) registering into a run through ``MLflowCheckpoints``, and saves two PNGs: the
experiment's *Models* list and the best checkpoint's page.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import torch


def train(url: str, root: str) -> tuple[str, str]:
    """(experiment id, model id of the best checkpoint) of a short training run."""
    import mlflow

    import shardckpt
    from shardckpt.integrations.mlflow import MLflowCheckpoints
    mlflow.set_tracking_uri(url)
    exp = mlflow.set_experiment("llm-pretrain")
    # the UI's "Model training" view (not GenAI) for this experiment
    mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, "mlflow.experimentKind",
                                             "custom_model_development")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(256, 32), torch.randn(256, 1)
    with mlflow.start_run(run_name="gpt-tiny") as run:
        tracker = MLflowCheckpoints()
        with shardckpt.CheckpointManager(root, every_n_steps=2, keep_last=2, keep_best=1,
                                         monitor="val_loss", on_event=tracker) as mgr:
            for step in range(1, 13):
                loss = torch.nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                val = loss.item() + (0.3 if step > 8 else 0.0)  # overfits after step 8
                mlflow.log_metric("val_loss", val, step=step)
                mgr.maybe_save(step, {"model": model, "optim": opt}, metrics={"val_loss": val})
        tracker.close(60)
        return exp.experiment_id, tracker.model_ids[tracker.aliases["best"]]


def shoot(url: str, path: str, width: int, height: int) -> None:
    """A PNG of ``url`` after the page's scripts ran (headless Chromium)."""
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--hide-scrollbars", f"--window-size={width},{height}",
                    "--virtual-time-budget=20000", f"--screenshot={os.path.abspath(path)}",
                    url], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   timeout=180)
    print("wrote", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/img")
    p.add_argument("--width", type=int, default=1500)
    args = p.parse_args()
    from tests.integrations.tracker_servers import MlflowServer
    with tempfile.TemporaryDirectory() as work:
        server = MlflowServer(work).start()
        try:
            exp, best = train(server.url, os.path.join(work, "ckpt"))
            ui = f"{server.url}/#/experiments/{exp}/models"
            view = "workflowType=machine_learning"
            shoot(f"{ui}?{view}", os.path.join(args.out, "mlflow-checkpoints.png"),
                  args.width, 560)
            shoot(f"{ui}/{best}?{view}", os.path.join(args.out, "mlflow-checkpoint-page.png"),
                  args.width, 1500)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
