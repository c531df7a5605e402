"""The few HTTP calls of the tools (CLI, rollout, demo probes), on the standard library only.

``graceful status|drain|resume|wait|rollout`` must work on a bare ``pip install graceful-drain``
(a server's install, without requests): one request, one connection, no redirects followed, no
proxy (the bearer token goes to the node and nowhere else), a bounded body.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import urllib.parse
from collections.abc import Mapping
from email.message import Message
from typing import Any

from .._core.errors import GracefulError

__all__ = ["Answer", "NoAnswer", "Unreachable", "request"]

#: The most of a body kept: a status document is a few hundred bytes; more is cut off.
BODY_LIMIT = 1024 * 1024


class Unreachable(GracefulError, ConnectionError):
    """No answer: the connection was refused, reset or closed before a response, or the name
    did not resolve. The message says which."""


class NoAnswer(GracefulError, TimeoutError):
    """The node did not connect, or answer, within the timeout."""


@dataclasses.dataclass(frozen=True)
class Answer:
    """A response: its status, reason, headers and (up to :data:`BODY_LIMIT` of) its body."""

    status_code: int
    reason: str
    headers: Message
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body as JSON; ``ValueError`` when it is not."""
        return json.loads(self.content)

    def json_object(self) -> dict[str, Any]:
        """The body as a JSON object, or ``{}`` when it is not one."""
        try:
            body = self.json()
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}


def request(
    method: str,
    url: str,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> Answer:
    """Send one request to ``url`` (``http://`` or ``https://``) and read the answer.

    ``timeout`` bounds the connect and each read, as in requests. Raises :class:`NoAnswer` or
    :class:`Unreachable`; any status is an :class:`Answer`.
    """
    parts = urllib.parse.urlsplit(url)
    target = parts.path or "/"
    query = "&".join(filter(None, [parts.query, urllib.parse.urlencode(params or {})]))
    if query:
        target += "?" + query
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    connection = kind(parts.netloc, timeout=timeout)
    try:
        connection.request(method, target, headers=dict(headers or {}))
        response = connection.getresponse()
        content = response.read(BODY_LIMIT)
        return Answer(response.status, response.reason, response.headers, content)
    except TimeoutError:  # socket.timeout is TimeoutError from Python 3.10
        raise NoAnswer(f"no answer within {timeout:g}s") from None
    except socket.gaierror:
        raise Unreachable(f"cannot resolve {parts.hostname}") from None
    except ConnectionRefusedError:
        raise Unreachable("connection refused") from None
    except (OSError, http.client.HTTPException) as exc:
        raise Unreachable(type(exc).__name__) from None
    finally:
        connection.close()
