"""A TCP client made of raw packets on a TUN device, for the handshake a filter could cut.

Run as root in a network namespace of its own (``unshare -n python tests/_tun_handshake.py``):
it plays the client of a real listening socket on 10.9.0.1 and chooses when each packet of the
handshake arrives, which no real client on loopback lets a test do. It prints one JSON object:

- ``counted_half_open``: :func:`graceful._servers.backlog.queued` once the SYN-ACK went out (the
  handshake under way is counted);
- ``answer_to_ack``: what the server sent after the client's last ACK and request, which arrived
  after :func:`graceful._servers.backlog.block_new_connections`;
- ``queued_after_ack``: the listener's queue then;
- ``accepted``: the request read from the accepted connection (null: nothing to accept);
- ``answer_to_new_syn``: what a brand-new SYN got once blocked.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
import subprocess
import time

from graceful._servers import backlog as _backlog

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
SERVER, CLIENT, PORT = "10.9.0.1", "10.9.0.2", 8080
SYN, RST, PSH, ACK = 0x02, 0x04, 0x08, 0x10
REQUEST = b"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def packet(sport: int, seq: int, ack: int, flags: int, payload: bytes = b"") -> bytes:
    """An IPv4 TCP segment from the client to the server."""
    src, dst = socket.inet_aton(CLIENT), socket.inet_aton(SERVER)
    tcp = struct.pack("!HHIIBBHHH", sport, PORT, seq, ack, 5 << 4, flags, 65535, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp) + len(payload))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp + payload)) + tcp[18:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0, 64, 6, 0, src, dst
    )
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return ip + tcp + payload


def answers(tun: int, sport: int, seconds: float) -> list[tuple[str, int]]:
    """The server's segments to ``sport`` within ``seconds``: (flags, sequence number)."""
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and select.select([tun], [], [], left)[0]:
        data = os.read(tun, 4096)
        if data[0] >> 4 != 4 or data[9] != socket.IPPROTO_TCP:
            continue
        offset = (data[0] & 0xF) * 4
        _, dport, seq, _, _, flags = struct.unpack_from("!HHIIBB", data, offset)
        if dport == sport:
            names = [n for bit, n in ((SYN, "SYN"), (RST, "RST"), (ACK, "ACK")) if flags & bit]
            seen.append(("|".join(names), seq))
    return seen


def main() -> None:
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", b"tun0", IFF_TUN | IFF_NO_PI))
    for command in (
        ["ip", "link", "set", "lo", "up"],
        ["ip", "addr", "add", f"{SERVER}/24", "dev", "tun0"],
        ["ip", "link", "set", "tun0", "up"],
    ):
        subprocess.run(command, check=True)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((SERVER, PORT))
        listener.listen(16)
        os.write(tun, packet(40000, 1000, 0, SYN))
        server_seq = answers(tun, 40000, 1.0)[0][1]
        counted = _backlog.queued(listener)
        _backlog.block_new_connections(listener)
        os.write(tun, packet(40000, 1001, server_seq + 1, PSH | ACK, REQUEST))
        answer = answers(tun, 40000, 0.5)
        queued = _backlog.queued(listener)
        listener.settimeout(2)
        try:
            accepted, _ = listener.accept()
        except TimeoutError:
            request = None
        else:
            with accepted:
                request = accepted.recv(4096).decode()
        os.write(tun, packet(40001, 5000, 0, SYN))
        new_syn = answers(tun, 40001, 0.5)
    result = {
        "counted_half_open": counted,
        "answer_to_ack": [flags for flags, _ in answer],
        "queued_after_ack": queued,
        "accepted": request,
        "answer_to_new_syn": [flags for flags, _ in new_syn],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
