"""shardckpt.testing.hosts: hosts of their own (name, address, link), a shared root, and
nothing left behind, also when the block fails."""

import subprocess
import sys

import pytest

from shardckpt.testing.hosts import Hosts, unavailable

REASON = unavailable(install=True)
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))

CONNECT = ("import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), "
           "timeout=2); print('connected')")
LISTEN = ("import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 0)); s.listen(); "
          "print(s.getsockname()[1], flush=True); time.sleep(120)")


def leftovers(tag: str) -> str:
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return "\n".join(line for line in (spaces + links).splitlines() if tag in line)


def test_hosts_have_their_own_names_addresses_and_folders(tmp_path):
    with Hosts(2, root=tmp_path) as hosts:
        a, b = hosts
        assert a.run(["hostname"]).stdout.strip() == "host0"
        assert b.run(["hostname"]).stdout.strip() == "host1"
        assert b.addr in b.run(["ip", "-o", "addr", "show", "eth0"]).stdout
        assert b.run(["getent", "hosts", "host0"]).stdout.split()[0] == a.addr
        assert "default" not in a.run(["ip", "route"]).stdout  # nothing leaves the bridge
        assert hosts.shared.is_dir() and a.local_dir != b.local_dir and b.local_dir.is_dir()
        (hosts.shared / "x").write_text("seen by all")
        assert b.run(["cat", str(hosts.shared / "x")]).stdout == "seen by all"


def test_cut_restore_and_kill(tmp_path):
    with Hosts(2, root=tmp_path) as hosts:
        a, b = hosts
        server = b.popen([sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True)
        port = server.stdout.readline().strip()
        assert a.run([sys.executable, "-c", CONNECT, "host1", port]).stdout == "connected\n"
        b.cut()
        assert a.run([sys.executable, "-c", CONNECT, "host1", port]).returncode != 0
        b.restore()
        assert a.run([sys.executable, "-c", CONNECT, "host1", port]).stdout == "connected\n"
        assert b.pids()
        b.kill()
        assert not b.pids() and server.poll() is not None


def test_everything_is_removed_even_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with Hosts(2, root=tmp_path) as hosts:
            hosts[1].popen(["sleep", "300"])
            assert leftovers(hosts.tag)
            raise RuntimeError("the test failed")
    assert leftovers(hosts.tag) == ""
    assert not hosts[1].pids()
