"""Fixtures of the launcher tests: network-namespace hosts (skipped, with the reason, where
they cannot be made: no root, no iproute2)."""

import subprocess

import pytest


def make_hosts(n: int, root):
    """A :class:`~shardckpt.testing.hosts.Hosts` of ``n`` hosts, or skip the test."""
    from shardckpt.testing.hosts import Hosts, remove_stale, unavailable
    reason = unavailable(install=True)
    if reason:
        pytest.skip(reason)
    remove_stale()
    return Hosts(n, root=root)


@pytest.fixture
def two_hosts(tmp_path):
    """Two hosts, removed after the test, which also checks nothing of them is left."""
    hosts = make_hosts(2, tmp_path / "hosts")
    try:
        yield hosts
    finally:
        hosts.close()
        spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert hosts.tag not in spaces and hosts.tag not in links
