"""Listening TCP sockets of one process tree, read from ``/proc`` (Linux), as ``ss -ltnp``
would show them, but only for the processes a test started."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path


def process_tree(pid: int) -> set[int]:
    """``pid`` and all its descendants alive now (``/proc/<pid>/task/*/children``)."""
    seen, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # the task or process ended meanwhile
                continue
    return seen


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def _address(hex_addr: str) -> str:
    """A ``/proc/net/tcp{,6}`` address field (little-endian words) as text."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ip)


def listeners(pids: set[int]) -> list[tuple[int, str, int]]:
    """``(pid, address, port)`` of every TCP socket in LISTEN state held by ``pids``."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state != "0A" or inode not in owner:  # 0A: LISTEN
                continue
            addr, port = local.split(":")
            found.append((owner[inode], _address(addr), int(port, 16)))
    return sorted(found)


def exposed(pids: set[int]) -> list[tuple[int, str, int, str]]:
    """The listeners of ``pids`` reachable from another host: not on a loopback address;
    with the process's command line, for the message."""
    out = []
    for pid, addr, port in listeners(pids):
        if not ipaddress.ip_address(addr).is_loopback:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmd = "?"
            out.append((pid, addr, port, cmd[:120]))
    return out
