"""Retention rules as properties of the pure ``to_keep`` function."""

from hypothesis import given, strategies as st

from shardckpt.manage.retention import best_steps, metric_value, to_keep

steps_st = st.lists(st.integers(0, 60), unique=True, max_size=12)
metric_st = st.one_of(st.none(), st.floats(-5, 5), st.just(float("nan")), st.integers(-5, 5))
limit_st = st.one_of(st.none(), st.integers(1, 5))


@given(steps_st, st.data(), limit_st, limit_st, st.sampled_from(["min", "max"]))
def test_keeps_exactly_the_union_of_last_and_best(steps, data, keep_last, keep_best, mode):
    metrics = {s: {"loss": data.draw(metric_st)} for s in steps}
    protect = set(data.draw(st.lists(st.sampled_from(steps), max_size=2))) if steps else set()
    keep = to_keep(steps, metrics, keep_last=keep_last, keep_best=keep_best, monitor="loss",
                   mode=mode, protect=protect)
    ordered = sorted(steps)
    if keep_last is None and keep_best is None:
        assert keep == set(steps)
        return
    expected = set(protect)
    expected |= set(ordered[-1:])
    expected |= set(ordered[-keep_last:]) if keep_last else set()
    scored = [s for s in ordered if metric_value(metrics[s], "loss") is not None]
    if keep_best:
        ranked = best_steps(ordered, metrics, "loss", mode)
        assert sorted(ranked) == scored  # exactly the steps with a usable metric
        expected |= set(ranked[:keep_best])
        # every kept-for-best step is at least as good as every scored step dropped
        sign = 1 if mode == "min" else -1
        kept_vals = [sign * metric_value(metrics[s], "loss") for s in ranked[:keep_best]]
        dropped = [sign * metric_value(metrics[s], "loss") for s in ranked[keep_best:]]
        assert not kept_vals or not dropped or max(kept_vals) <= min(dropped)
    assert keep == expected
    assert keep <= set(steps)


def test_metric_values_that_do_not_rank():
    assert metric_value({"loss": float("nan")}, "loss") is None
    assert metric_value({"loss": True}, "loss") is None
    assert metric_value({"loss": "1.0"}, "loss") is None
    assert metric_value({"acc": 1.0}, "loss") is None
    assert metric_value(None, "loss") is None
    assert metric_value({"loss": 2}, "loss") == 2.0


def test_ties_prefer_the_newer_step_and_steps_without_metric_count_for_last_only():
    metrics = {1: {"loss": 1.0}, 2: {"loss": 1.0}, 3: None, 4: {"loss": 3.0}, 5: None}
    assert best_steps(metrics, metrics, "loss", "min") == [2, 1, 4]
    assert to_keep(metrics, metrics, keep_last=1, keep_best=1, monitor="loss") == {5, 2}
    assert to_keep(metrics, metrics, keep_last=None, keep_best=2, monitor="loss",
                   mode="max") == {5, 4, 2}
