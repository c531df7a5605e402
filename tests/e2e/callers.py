"""Threads that call a site through nginx like clients would: keep-alive, never resent by the
client, bounded in count and in time. A test's :class:`Callers` subclass says what one call
is (:meth:`Callers.call`) and how it counts what went wrong."""

from __future__ import annotations

import dataclasses
import http.client
import secrets
import threading
import time
from typing import ClassVar

import requests


def get_once(connection: http.client.HTTPConnection, target: str) -> tuple[int, bytes]:
    """``GET target`` on ``connection``, then closed: the status and the body."""
    try:
        connection.request("GET", target)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def may_send(stop: threading.Event, sent: int, max_requests: int, deadline: float) -> bool:
    """Whether a caller may send one more call (ask under the callers' lock): not once ``stop``
    is set, nor past ``max_requests`` sent; past the ``deadline``, ``stop`` is set for all."""
    if stop.is_set() or sent >= max_requests:
        return False
    if time.monotonic() >= deadline:
        stop.set()
        return False
    return True


@dataclasses.dataclass
class Callers:
    url: str
    deadline: float
    tag: str = dataclasses.field(default_factory=lambda: secrets.token_hex(3))
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    sent: int = 0
    acked: list[str] = dataclasses.field(default_factory=list)
    threads: list[threading.Thread] = dataclasses.field(default_factory=list)

    #: At most this many calls in all.
    max_requests: ClassVar[int] = 20_000
    #: How long past the deadline :meth:`finish` waits for a caller's last call.
    finish_slack: ClassVar[float] = 20.0

    def call(self, session: requests.Session, sequence: int, order: str) -> None:
        """One call: the ``sequence``-th of its caller; ``order`` is an id no other call has."""
        raise NotImplementedError

    def start(self, callers: int) -> None:
        for number in range(callers):
            thread = threading.Thread(target=self.caller, args=(number,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(max(0.0, self.deadline - time.monotonic()) + self.finish_slack)
        assert not any(t.is_alive() for t in self.threads), "a caller never finished"

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)

    def ticket(self) -> bool:
        with self.lock:
            if not may_send(self.stop, self.sent, self.max_requests, self.deadline):
                return False
            self.sent += 1
            return True

    def caller(self, number: int) -> None:
        session = requests.Session()
        session.trust_env = False  # straight to 127.0.0.1, never through a proxy
        sequence = 0
        try:
            while self.ticket():
                sequence += 1
                self.call(session, sequence, f"{self.tag}-{number}-{sequence}")
        finally:
            session.close()
