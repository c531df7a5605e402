"""gRPC: a server that drains on SIGTERM, and a channel that leaves a draining node alone.

The public face of :mod:`graceful._servers.grpc` (the server) and :mod:`graceful._client.grpc`
(the channel), where the code lives. Needs ``pip install 'graceful-drain[grpc]'``::

    server = grpc.server(ThreadPoolExecutor(16), interceptors=[graceful.grpc.Interceptor()])
    add_OrdersServicer_to_server(Orders(), server)
    server.add_insecure_port("[::]:50051")
    graceful.grpc.serve(server, control_port=8081)  # start, wait; SIGTERM drains

    channel = graceful.grpc.channel(
        ["10.0.0.5:50051", "10.0.0.6:50051"], idempotent_methods=["/shop.Orders/Get"]
    )
"""

from __future__ import annotations

from ._client.grpc import ChannelError as ChannelError
from ._client.grpc import aio_channel as aio_channel
from ._client.grpc import channel as channel
from ._client.grpc import service_config as service_config
from ._servers.grpc import AsyncInterceptor as AsyncInterceptor
from ._servers.grpc import ControlServer as ControlServer
from ._servers.grpc import HealthLink as HealthLink
from ._servers.grpc import Interceptor as Interceptor
from ._servers.grpc import serve as serve
from ._servers.grpc import serve_async as serve_async

__all__ = [
    "AsyncInterceptor",
    "ChannelError",
    "ControlServer",
    "HealthLink",
    "Interceptor",
    "aio_channel",
    "channel",
    "serve",
    "serve_async",
    "service_config",
]
