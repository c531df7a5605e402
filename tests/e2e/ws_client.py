"""A minimal websocket client (RFC 6455) over a plain socket, for the end-to-end tests: enough to
open a connection, send small frames and see how the server closes it."""

from __future__ import annotations

import base64
import os
import socket
import struct

__all__ = ["WebSocket"]


class WebSocket:
    """A minimal websocket client (RFC 6455) over a plain socket: enough to see the close."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.reader = self.sock.makefile("rb")
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        status = self.reader.readline()
        assert b" 101 " in status, status
        while self.reader.readline() not in (b"\r\n", b""):
            pass

    def send(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        self.sock.sendall(bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked)

    def receive(self) -> tuple[int, bytes]:
        head = self.reader.read(2)
        if len(head) < 2:
            raise ConnectionError("closed without a close frame")
        length = head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self.reader.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self.reader.read(8))[0]
        return head[0] & 0x0F, self.reader.read(length)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
