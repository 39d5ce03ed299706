"""A local Ray started by ``start_ray`` cannot be used by anyone without its token.

The threat (issue 11): with token authentication disabled and Ray listening on every interface,
a process on another host connected to the GCS port and ran a task inside a sweep. Here, while
the session's local Ray runs, clients without the token try exactly that, from a fresh process
whose HOME holds no token file (so nothing of ours leaks into them):

- through the machine's non-loopback address: the node listens on loopback only, so the
  connection itself fails;
- through loopback (what any other user of this machine can reach), with authentication
  disabled on the client or a wrong token: the cluster refuses them.

A client given the real token through loopback runs the same task, so the failures above come
from the cluster's defences, not from a broken client script.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLIENT = r"""
import os, sys
addr, marker = sys.argv[1:3]
try:
    import ray
    ray.init(address=addr, log_to_driver=False, logging_level="ERROR")

    @ray.remote(num_cpus=0)
    def touch(path):
        with open(path, "w") as fh:
            fh.write("ran")
        return os.getpid()

    print("RAN", ray.get(touch.remote(marker), timeout=60), flush=True)
except BaseException as exc:
    text = str(exc).strip().splitlines()
    print("REFUSED", type(exc).__name__, text[0][:300] if text else "", flush=True)
    sys.exit(3)
"""


def _ipv4_addresses() -> list[str]:
    """This machine's IPv4 addresses (SIOCGIFADDR on every interface)."""
    out = []
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # no IPv4 address on this interface
        out.append(socket.inet_ntoa(packed[20:24]))
    return out


def _non_loopback_ip() -> str:
    ips = [ip for ip in _ipv4_addresses() if not ip.startswith("127.")]
    if not ips:
        pytest.skip("this machine has no non-loopback IPv4 address to attack from")
    return ips[0]


def _clean_env(home: Path, **extra) -> dict:
    """A minimal environment: no RAY_AUTH_TOKEN*, a HOME without ~/.ray/auth_token.

    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` keeps a loopback address as it is (Ray would otherwise
    rewrite 127.0.0.1 into this machine's network address): what any local client needs.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8",
           "RAY_USAGE_STATS_ENABLED": "0", "TMPDIR": str(home), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_gcs_rpc_server_connect_timeout_s": "5", "RAY_gcs_rpc_server_reconnect_timeout_s": "5"}
    env.update(extra)
    return env


def _attack_all(attempts: dict, tmp: Path, timeout: float = 90) -> dict[str, tuple[str, bool]]:
    """Run one client per attempt, all at once; name -> (its report line, whether its task ran).

    A client still trying after ``timeout`` s (Ray keeps retrying an unreachable address) is
    stopped and reported as refused; what counts is that its task never ran.
    """
    procs = {}
    for name, (address, env) in attempts.items():
        marker = tmp / f"{name}.ran"
        procs[name] = (subprocess.Popen([sys.executable, "-c", CLIENT, address, str(marker)], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, cwd=tmp,
                                        env=_clean_env(tmp / f"home-{name}", **env)), marker)
    deadline = time.monotonic() + timeout
    out = {}
    for name, (proc, marker) in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            lines = stdout.strip().splitlines()
            report = lines[-1] if lines else f"(no output; rc {proc.returncode}) {stderr[-300:]}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            report = "REFUSED (still not connected when stopped)"
        out[name] = (report, marker.exists())
    return out


def _token_file() -> Path:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return Path(path) if path else Path.home() / ".ray" / "auth_token"


@pytest.mark.slow
def test_clients_without_the_token_cannot_run_anything(ray_local, tmp_path):
    host, port = ray_local.address.rsplit(":", 1)
    assert host == "127.0.0.1", ray_local.address  # the node itself is on loopback
    assert os.environ.get("RAY_AUTH_MODE", "token") == "token"
    outside = _non_loopback_ip()

    token = _token_file()
    assert token.is_file(), f"Ray's token auth is on but {token} is missing"
    # Nothing listens on the other address at all.
    with socket.socket() as s:
        s.settimeout(5)
        assert s.connect_ex((outside, int(port))) != 0, f"the GCS port answers on {outside}"
    wrong = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    results = _attack_all({
        # control: the same client with the token, through loopback, does run its task
        "loopback-with-token": (f"127.0.0.1:{port}", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}),
        "outside-no-auth": (f"{outside}:{port}", {"RAY_AUTH_MODE": "disabled"}),
        "outside-wrong-token": (f"{outside}:{port}", wrong),
        # loopback is reachable by every local user: the token is what keeps them out there
        "loopback-no-auth": (f"127.0.0.1:{port}", {"RAY_AUTH_MODE": "disabled"}),
        "loopback-wrong-token": (f"127.0.0.1:{port}", wrong),
    }, tmp_path)
    report, ran = results.pop("loopback-with-token")
    assert ran and report.startswith("RAN"), report
    for name, (report, ran) in results.items():
        # refused with an error, or ended by Ray itself when the GCS stays unreachable
        assert not ran and not report.startswith("RAN"), (name, report)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _listening_sockets() -> dict[str, str]:
    """inode -> local address of every listening TCP socket (IPv4 and IPv6)."""
    out = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] != "0A":  # LISTEN
                continue
            hexip, hexport = parts[1].split(":")
            if width == 8:
                ip = socket.inet_ntoa(struct.pack("<I", int(hexip, 16)))
            else:
                raw = bytes.fromhex(hexip)
                ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            out[parts[9]] = f"{ip}:{int(hexport, 16)}"
    return out


@pytest.mark.slow
def test_every_port_of_the_local_cluster_listens_on_loopback(ray_local):
    """The processes of our local Ray (descendants of this test process) listen on loopback only."""
    listening = _listening_sockets()
    found = {}
    for pid in _descendants(os.getpid()):
        try:
            name = (Path("/proc") / str(pid) / "comm").read_text().strip()
            fds = list((Path("/proc") / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = target[8:-1]
                if inode in listening:
                    found[f"{name}[{pid}] {listening[inode]}"] = listening[inode]
    assert found, "found no listening socket of the local Ray; is it running?"
    exposed = [k for k, addr in found.items() if not addr.startswith(("127.", "::1:", "::ffff:127."))]
    assert not exposed, exposed


DASHBOARD = r"""
import json, sys, urllib.request, urllib.error
from pathlib import Path
from ggufopt_ray.config import ClusterConfig
from ggufopt_ray.distributed.runtime import start_ray
busy = int(sys.argv[1])
info = start_ray(ClusterConfig(num_cpus=1, dashboard=True, dashboard_port=busy))
token = (Path.home() / ".ray" / "auth_token").read_text().strip()
codes = {}
for name, headers in (("without", {}), ("with", {"Authorization": f"Bearer {token}"})):
    try:
        codes[name] = urllib.request.urlopen(urllib.request.Request(
            f"{info.dashboard_url}/api/version", headers=headers), timeout=30).status
    except urllib.error.HTTPError as exc:
        codes[name] = exc.code
print(json.dumps({"url": info.dashboard_url, "notes": info.notes, "codes": codes}))
"""


@pytest.mark.slow
def test_a_busy_dashboard_port_falls_back_and_the_dashboard_keeps_its_token(tmp_path):
    import json

    with socket.socket() as squatter:  # another sweep's dashboard, say
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        busy = squatter.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        proc = subprocess.run([sys.executable, "-c", DASHBOARD, str(busy)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    port = int(out["url"].rsplit(":", 1)[1])
    assert out["url"].startswith("http://127.0.0.1:") and port != busy, out
    assert len(out["notes"]) == 1 and f"port {busy}" in out["notes"][0] and str(port) in out["notes"][0], out
    assert out["codes"] == {"without": 401, "with": 200}, out
