"""A Keras fit with ShardCkptBackupAndRestore that can kill its own process (SIGKILL, no
cleanup at all) at the start of an epoch; it saves its final weights for the test to compare.

Usage: python keras_job.py BACKUP_DIR OUT.npz [KILL_AT_EPOCH]
"""

import os
import signal
import sys

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402

from shardckpt.integrations.keras import ShardCkptBackupAndRestore  # noqa: E402


class Kill(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    backup, out = sys.argv[1], sys.argv[2]
    kill = [Kill(int(sys.argv[3]))] if len(sys.argv) > 3 else []
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    g = np.random.default_rng(0)
    x = g.random((64, 4), dtype=np.float32)
    y = x @ np.arange(1, 5, dtype=np.float32)[:, None]
    callback = ShardCkptBackupAndRestore(backup, delete_checkpoint=False)
    history = model.fit(x, y, epochs=5, batch_size=8, shuffle=False, verbose=0,
                        callbacks=[callback] + kill)
    np.savez(out, *[keras.ops.convert_to_numpy(v.value)
                    for v in model.weights + model.optimizer.variables],
             epochs=len(history.history["loss"]), restored=callback.restored_epoch or 0)


if __name__ == "__main__":
    main()
