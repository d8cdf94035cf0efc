"""The Keras 3 callbacks with real Keras on the torch backend and a small model: a fit
interrupted by an exception or by SIGTERM continues from its backup (weights, optimizer
variables, epoch) with ShardCkptBackupAndRestore; ShardCkptCheckpoint's save_best_only writes
only the epochs whose metric improved, save_weights_only leaves the optimizer out, save_freq
counts batches and max_to_keep prunes."""

import importlib.util
import os
import signal

import numpy as np
import pytest

import shardckpt

pytestmark = pytest.mark.skipif(importlib.util.find_spec("keras") is None,
                                reason="needs shardckpt[keras]")
os.environ.setdefault("KERAS_BACKEND", "torch")


@pytest.fixture(scope="module")
def keras():
    import keras
    if keras.backend.backend() != "torch":
        pytest.skip("keras was imported with another backend")
    return keras


def _data():
    g = np.random.default_rng(0)
    x = g.random((64, 4), dtype=np.float32)
    return x, x @ np.arange(1, 5, dtype=np.float32)[:, None]


def _model(keras):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _fit(model, callbacks, epochs=6):
    x, y = _data()
    return model.fit(x, y, epochs=epochs, batch_size=8, shuffle=False, verbose=0,
                     callbacks=callbacks)


def _values(keras, model):
    return [keras.ops.convert_to_numpy(v.value).copy()
            for v in model.weights + model.optimizer.variables]


def _steps(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith("step-"))


def _stop_at(keras, epoch, how):
    """A callback that stops fit in ``epoch``: an exception at its start, or SIGTERM after its
    third batch."""
    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            self.epoch = e
            if e == epoch and how == "raise":
                raise RuntimeError("interrupted")

        def on_train_batch_end(self, batch, logs=None):
            if how == "term" and self.epoch == epoch and batch == 2:
                os.kill(os.getpid(), signal.SIGTERM)
    return Stop()


def test_an_interrupted_fit_continues_from_the_backup_bit_exactly(keras, tmp_path):
    from shardckpt.integrations.keras import ShardCkptBackupAndRestore
    reference = _model(keras)
    _fit(reference, [])
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(_model(keras), [ShardCkptBackupAndRestore(tmp_path / "backup"),
                             _stop_at(keras, 3, "raise")])
    model = _model(keras)  # a new process would build it again the same way
    callback = ShardCkptBackupAndRestore(tmp_path / "backup")
    history = _fit(model, [callback])
    assert callback.restored_epoch == 3 and len(history.history["loss"]) == 3
    for a, b in zip(_values(keras, reference), _values(keras, model)):
        assert np.array_equal(a, b)  # weights and Adam's moments and iteration count
    assert not (tmp_path / "backup").exists()  # delete_checkpoint after a completed fit


def test_sigterm_backs_up_stops_fit_and_the_next_fit_resumes(keras, tmp_path):
    from shardckpt.integrations.keras import ShardCkptBackupAndRestore
    callback = ShardCkptBackupAndRestore(tmp_path / "backup")
    history = _fit(_model(keras), [callback, _stop_at(keras, 2, "term")])
    assert callback.preempted and len(history.history["loss"]) == 3
    # The batch after the signal (2 epochs of 8 batches, then 4) backs up; fit stops there.
    assert _steps(tmp_path / "backup") == ["step-00000020"]
    resumed = ShardCkptBackupAndRestore(tmp_path / "backup")
    model = _model(keras)
    history = _fit(model, [resumed])
    assert resumed.restored_epoch == 2 and len(history.history["loss"]) == 4
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 20 + 4 * 8


def test_save_best_only_writes_only_improving_epochs(keras, tmp_path):
    from shardckpt.integrations.keras import ShardCkptCheckpoint
    scores = [3.0, 2.0, 2.5, 1.0, 4.0, 0.5]
    score = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: logs.__setitem__("score", scores[epoch]))
    _fit(_model(keras), [score, ShardCkptCheckpoint(tmp_path / "best", monitor="score",
                                                    mode="min", save_best_only=True)])
    # Epochs 1, 2, 4 and 6 improved (8 batches an epoch); epochs 3 and 5 wrote nothing.
    assert _steps(tmp_path / "best") == ["step-00000008", "step-00000016", "step-00000032",
                                         "step-00000048"]
    full = shardckpt.load_full(tmp_path / "best" / "step-00000048")
    assert full["epoch"] == 6 and len(full["keras"]["optimizer"]) > 0
    # The best value lives in the folder: a new run must beat 0.5 to write anything.
    again = ShardCkptCheckpoint(tmp_path / "best", monitor="score", mode="min",
                                save_best_only=True)
    _fit(_model(keras), [score, again], epochs=2)
    assert len(_steps(tmp_path / "best")) == 4
    # initial_value_threshold: nothing is written until the score beats 1.5.
    _fit(_model(keras), [score, ShardCkptCheckpoint(tmp_path / "t", monitor="score", mode="min",
                                                    save_best_only=True,
                                                    initial_value_threshold=1.5)])
    assert _steps(tmp_path / "t") == ["step-00000032", "step-00000048"]


def test_weights_only_batch_frequency_and_max_to_keep(keras, tmp_path):
    from shardckpt.integrations.keras import ShardCkptCheckpoint
    model = _model(keras)
    _fit(model, [ShardCkptCheckpoint(tmp_path / "w", save_weights_only=True, save_freq=5,
                                     max_to_keep=2)], epochs=3)
    # 24 batches: saves after 5, 10, 15 and 20; the newest 2 stay.
    assert _steps(tmp_path / "w") == ["step-00000015", "step-00000020"]
    full = shardckpt.load_full(tmp_path / "w" / "step-00000020")
    assert set(full["keras"]) == {"trainable", "non_trainable"}
    assert [tuple(t.shape) for t in full["keras"]["trainable"]] == \
        [tuple(v.shape) for v in model.trainable_variables]


def test_arguments_are_checked(keras, tmp_path):
    from shardckpt.integrations.keras import ShardCkptBackupAndRestore, ShardCkptCheckpoint
    with pytest.raises(ValueError, match="save_freq"):
        ShardCkptCheckpoint(tmp_path, save_freq="batch")
    with pytest.raises(ValueError, match="mode"):
        ShardCkptCheckpoint(tmp_path, mode="up")
    with pytest.raises(ValueError, match="backup_dir"):
        ShardCkptBackupAndRestore("")


def test_a_killed_fit_process_continues_in_the_next_one(tmp_path):
    import subprocess
    import sys
    job = os.path.join(os.path.dirname(__file__), "keras_job.py")

    def run(backup, out, *kill):
        return subprocess.run([sys.executable, job, str(tmp_path / backup), str(tmp_path / out),
                               *kill], capture_output=True, text=True, timeout=300)
    assert run("ref", "ref.npz").returncode == 0
    killed = run("backup", "never.npz", "3")
    assert killed.returncode == -signal.SIGKILL  # no cleanup ran: its lease is still there
    assert run("backup", "resumed.npz").returncode == 0  # the dead holder's lease is taken
    ref, resumed = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
    # The backup of epoch 3 is written in the background: a kill right after it may find it
    # uncommitted, and the one of epoch 2 is used. Either way the run ends the same.
    restored = int(resumed["restored"])
    assert restored in (2, 3) and int(resumed["epochs"]) == 5 - restored
    for key in ref.files:
        if key.startswith("arr_"):
            assert np.array_equal(ref[key], resumed[key]), key
