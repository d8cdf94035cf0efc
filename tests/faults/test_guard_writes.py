"""Case 1 (issue 25): a guarded tensor written outside ``step()`` while a guarded async_save
copies it. Every way of writing it must give the values at the call or StateChangedError with
nothing committed. ``p.data`` has a version counter of its own, so the guard also watches the
tensor's pages (guard.py)."""

import os
import threading

import pytest
import torch

import shardckpt

MIB = 1 << 20


def _alias_by_set(p):
    return torch.empty(0, dtype=p.dtype).set_(p.untyped_storage(), p.storage_offset(),
                                              p.shape, p.stride())


def _in_thread(fn):
    def run(p):
        t = threading.Thread(target=fn, args=(p,))
        t.start()
        t.join()
    return run


# Each way writes the guarded tensor ``p`` (a parameter or an Adam moment) in place.
WAYS = {
    "data": lambda p: p.data.mul_(2),
    "detach": lambda p: p.detach().mul_(2),
    "no_grad": lambda p: p.mul_(2),
    "copy_into_view": lambda p: p[1:3].copy_(torch.full_like(p[1:3], 7.0)),
    "data_copy_into_view": lambda p: p.data[1:3].copy_(torch.full_like(p[1:3], 7.0)),
    "set_alias": lambda p: _alias_by_set(p).add_(1),
    "set_swap": lambda p: p.set_(p.detach() * 2),
    "view_of_view": lambda p: p[1:][0:2].add_(1),
    "data_view_of_view": lambda p: p.data[1:][0:2].add_(1),
    "numpy": lambda p: p.detach().numpy().__imul__(2),
    "data_other_thread": _in_thread(lambda p: p.data.mul_(2)),
    "data_last_element": lambda p: p.data.view(-1)[-1:].add_(1),
    "data_first_element": lambda p: p.data.view(-1)[:1].add_(1),
}


def _trained(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(384, 384) for _ in range(4)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(8, 384)).square().mean().backward()
    opt.step()
    return model, opt


def _values(model, opt) -> dict:
    out = {f"model/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(model.parameters()):
        for k, v in opt.state[p].items():
            out[f"optim/{i}/{k}"] = v.detach().clone()
    return out


def _loaded(path, model) -> dict:
    saved = shardckpt.load_full(path)
    out = {f"model/{k}": v for k, v in saved["model"].items()}
    for i, s in saved["optim"]["state"].items():
        for k, v in s.items():
            out[f"optim/{i}/{k}"] = v
    return out


def trial(tmp_path, way: str, seed: int, faults=None) -> str:
    """One save raced by one write; 'failed' or 'committed' (values checked), else raises."""
    model, opt = _trained(seed)
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    victims = params + [opt.state[p]["exp_avg"] for p in params]
    p = victims[int(torch.randint(len(victims), (1,), generator=gen))]
    at_call = _values(model, opt)
    path = tmp_path / f"{way}-{seed}"
    release = tmp_path / f"release-{way}-{seed}"
    if faults is not None:  # hold the first write so that the copy is certainly not done
        faults.stall_in_write(release)
    handle = shardckpt.async_save({"model": model, "optim": opt}, path,
                                  staging_budget_bytes=1 * MIB)
    with torch.no_grad():
        WAYS[way](p)
    open(release, "w").close()
    if faults is not None:
        faults.mp.undo()
    try:
        handle.result(timeout=120)
    except shardckpt.StateChangedError:
        assert not path.exists() and not any(x.name.startswith(path.name + ".")
                                             for x in tmp_path.iterdir())
        return "failed"
    saved = _loaded(path, model)
    torn = [k for k in at_call if not torch.equal(saved[k], at_call[k])]
    assert not torn, f"{way}: committed values that are not those at the call: {torn}"
    return "committed"


@pytest.mark.parametrize("way", sorted(WAYS))
def test_a_write_before_the_copy_fails_the_save_or_keeps_the_call_values(tmp_path, faults,
                                                                           way):
    outcomes = [trial(tmp_path, way, seed, faults) for seed in range(2)]
    assert set(outcomes) <= {"failed", "committed"}


def test_data_write_before_the_copy_is_reported(tmp_path, faults):
    """The attack of the issue: ``p.data.mul_(2)`` on a parameter whose copy is held back."""
    model, opt = _trained(0)
    release = tmp_path / "release"
    faults.stall_in_write(release)
    handle = shardckpt.async_save({"model": model, "optim": opt}, tmp_path / "c",
                                  staging_budget_bytes=1 * MIB)
    model[3].weight.data.mul_(2)
    open(release, "w").close()
    with pytest.raises(shardckpt.StateChangedError, match="model/3.weight"):
        handle.result(timeout=120)
    assert not (tmp_path / "c").exists()
    model(torch.randn(8, 384)).square().mean().backward()
    opt.step()  # the pages are writable again after the failure
    shardckpt.async_save({"model": model, "optim": opt}, tmp_path / "d").result(timeout=120)
    assert torch.equal(shardckpt.load_full(tmp_path / "d")["model"]["3.weight"], model[3].weight)


@pytest.mark.slow
@pytest.mark.parametrize("way", sorted(WAYS))
def test_soak_100_trials_per_way(tmp_path, way):
    trials = int(os.environ.get("SHARDCKPT_GUARD_TRIALS", "100"))
    counts = {"failed": 0, "committed": 0}
    for seed in range(trials):
        counts[trial(tmp_path, way, seed)] += 1
        for x in tmp_path.iterdir():
            if x.is_dir():
                import shutil
                shutil.rmtree(x)
    print(f"\n{way}: {counts}")
