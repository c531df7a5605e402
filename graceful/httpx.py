"""Drain-aware httpx transports: a client *has* a transport that spreads its requests over a
service's nodes and stays away from the ones going away.

::

    import httpx
    from graceful.httpx import AsyncPoolTransport

    nodes = ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
    client = httpx.AsyncClient(transport=AsyncPoolTransport(nodes), base_url="http://orders")
    response = await client.get("/orders/1")  # the base URL's host only names the service
    await client.aclose()  # stops the transport's watchers and prober

:class:`PoolTransport` is the twin for ``httpx.Client``. The rules (which node, when a node
leaves rotation and comes back, which requests are sent again) are those of
:class:`graceful.client.Pool`; ``http2=True`` and the other ``httpx.HTTPTransport`` options
pass through to the inner transport.
"""

from __future__ import annotations

from ._client.httpx_async import AsyncPoolTransport
from ._client.httpx_common import NoNodeAvailable
from ._client.httpx_sync import PoolTransport
from ._core.membership import NodeState, NodeStatus

__all__ = ["AsyncPoolTransport", "NoNodeAvailable", "NodeState", "NodeStatus", "PoolTransport"]
