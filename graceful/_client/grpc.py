"""One gRPC channel over a service's nodes, built from gRPC's own features only.

- target: the nodes as one ``ipv4:`` (or ``ipv6:``) address list, a static resolver built into
  gRPC (or any target of your own, such as ``dns:///orders:50051``, passed as the one node);
- ``round_robin`` over every node;
- client-side health checking (``healthCheckConfig``): each node's standard health service is
  ``Watch``-ed over its own connection, and a node that says NOT_SERVING (a drain started) gets
  no new calls until it says SERVING again. A node without the health service counts as
  healthy (gRPC's rule for UNIMPLEMENTED).
- retries: gRPC's transparent retry re-sends, for every method, a call that never left the
  client or that the server refused unseen (a stream refused, or past a GOAWAY's last stream);
  a ``retryPolicy`` on UNAVAILABLE is added only for the methods named idempotent, which may
  have run before the error. A non-idempotent call that may have run is never sent again.

Nothing here runs code of its own on a call: the channel's service config does it all.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

try:
    import grpc
    import grpc.aio
except ImportError as exc:  # pragma: no cover - the extra is installed in the test runs
    raise ImportError(
        f"graceful.grpc needs grpcio ({exc}): pip install 'graceful-drain[grpc]'"
    ) from exc

from .._core.errors import GracefulError

__all__ = [
    "ChannelError",
    "aio_channel",
    "channel",
    "channel_options",
    "service_config",
    "target",
]

#: Targets gRPC resolves itself, taken as they are when given as the one node.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")
#: gRPC caps a retry policy's attempts at five.
MAX_ATTEMPTS = 5
#: Reconnect quickly to a node that restarts (gRPC's defaults: 1 s, growing to 120 s).
RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


class ChannelError(GracefulError, ValueError):
    """The nodes or method names given to :func:`channel` cannot be used."""


def target(nodes: str | Sequence[str]) -> str:
    """The channel target for ``nodes``: ``"ip:port"`` strings (IPv4 or bracketed IPv6), or
    one target of gRPC's own (``dns:///name:port``)."""
    listed = [nodes] if isinstance(nodes, str) else list(nodes)
    if not listed:
        raise ChannelError("no nodes: give the service's nodes as 'ip:port' strings")
    if len(listed) == 1 and listed[0].startswith(_SCHEMES):
        return listed[0]
    versions = {_ip_version(node) for node in listed}
    if len(versions) > 1:
        raise ChannelError(
            "IPv4 and IPv6 nodes cannot share a channel's address list: give one kind, or a "
            "name that resolves to both ('dns:///name:port')"
        )
    return f"ipv{versions.pop()}:{','.join(listed)}"


def _ip_version(node: str) -> int:
    host, _, port = node.rpartition(":")
    if not port.isdigit():
        raise ChannelError(f"node {node!r} has no port: write it as 'ip:port'")
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).version
    except ValueError:
        raise ChannelError(
            f"node {node!r} is not an IP address: give 'ip:port' strings, or one target that "
            f"gRPC resolves itself, such as 'dns:///{node}'"
        ) from None


def _method_name(method: str) -> dict[str, str]:
    """``/pkg.Service/Method`` (or ``pkg.Service/*``: every method) as a service config name."""
    service, _, name = method.strip("/").partition("/")
    if not service or not name or "/" in name:
        raise ChannelError(
            f"idempotent method {method!r}: name it as '/package.Service/Method', or "
            "'/package.Service/*' for every method of a service"
        )
    return {"service": service} if name == "*" else {"service": service, "method": name}


def service_config(
    idempotent_methods: Iterable[str] = (),
    *,
    health_service: str | None = "",
    max_attempts: int = MAX_ATTEMPTS,
) -> dict[str, Any]:
    """The service config :func:`channel` gives gRPC (round robin, health checking, retries).

    ``health_service``: the health service name each node is asked about (None: no health
    checking). ``max_attempts``: of an idempotent call, the first included (2 to 5)."""
    if not 2 <= max_attempts <= MAX_ATTEMPTS:
        raise ChannelError(f"max_attempts={max_attempts}: give 2 to {MAX_ATTEMPTS} (gRPC's cap)")
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if health_service is not None:
        config["healthCheckConfig"] = {"serviceName": health_service}
    names = [_method_name(method) for method in idempotent_methods]
    if names:
        config["methodConfig"] = [
            {
                "name": names,
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return config


def channel_options(
    config: Mapping[str, Any], options: Iterable[tuple[str, Any]] = ()
) -> list[tuple[str, Any]]:
    """The channel options: the service config, retries on, quick reconnects; ``options``
    (yours) replace any of them."""
    merged: dict[str, Any] = {
        "grpc.service_config": json.dumps(config),
        "grpc.enable_retries": 1,
        **dict(RECONNECT_OPTIONS),
    }
    merged.update(dict(options))
    if merged.get("grpc.inhibit_health_checking") and "healthCheckConfig" in config:
        raise ChannelError(
            "grpc.inhibit_health_checking turns off the health checking the channel relies "
            "on: drop the option, or pass health_service=None"
        )
    return list(merged.items())


def _target_and_options(
    nodes: str | Sequence[str],
    idempotent_methods: Iterable[str],
    health_service: str | None,
    max_attempts: int,
    options: Iterable[tuple[str, Any]],
) -> tuple[str, list[tuple[str, Any]]]:
    """What :func:`channel` and :func:`aio_channel` give gRPC: the target and the options."""
    config = service_config(
        idempotent_methods, health_service=health_service, max_attempts=max_attempts
    )
    return target(nodes), channel_options(config, options)


def channel(
    nodes: str | Sequence[str],
    *,
    idempotent_methods: Iterable[str] = (),
    health_service: str | None = "",
    max_attempts: int = MAX_ATTEMPTS,
    credentials: grpc.ChannelCredentials | None = None,
    options: Iterable[tuple[str, Any]] = (),
) -> grpc.Channel:
    """One ``grpc.Channel`` over ``nodes`` that leaves a draining node alone.

    ``idempotent_methods``: the methods (``"/pkg.Service/Method"``, or ``"/pkg.Service/*"``)
    safe to run twice: retried on UNAVAILABLE. ``credentials``: a secure channel with them.
    ``options``: more channel options (yours win)."""
    where, opts = _target_and_options(
        nodes, idempotent_methods, health_service, max_attempts, options
    )
    if credentials is None:
        return grpc.insecure_channel(where, options=opts)
    return grpc.secure_channel(where, credentials, options=opts)


def aio_channel(
    nodes: str | Sequence[str],
    *,
    idempotent_methods: Iterable[str] = (),
    health_service: str | None = "",
    max_attempts: int = MAX_ATTEMPTS,
    credentials: grpc.ChannelCredentials | None = None,
    options: Iterable[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """:func:`channel` for asyncio: a ``grpc.aio.Channel``."""
    where, opts = _target_and_options(
        nodes, idempotent_methods, health_service, max_attempts, options
    )
    if credentials is None:
        return grpc.aio.insecure_channel(where, options=opts)
    return grpc.aio.secure_channel(where, credentials, options=opts)
