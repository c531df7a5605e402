"""``GET /ping``, ``POST /orders`` (recorded before the 201), ``GET /slow?seconds=N``."""

from __future__ import annotations

import asyncio
import os

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

TEXT = "text/plain; charset=utf-8"


@require_GET
def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse(b"pong", content_type=TEXT)


@csrf_exempt  # an API endpoint called by machines
@require_POST
def orders(request: HttpRequest) -> HttpResponse:
    oid = request.POST.get("id")
    if not oid:
        return HttpResponse(b"missing id\n", status=400, content_type=TEXT)
    # Recorded before the answer: an acknowledged order is on disk (one write, appended).
    path = os.path.join(os.environ.get("LOAD_RECORD_DIR", "."), f"{os.getpid()}.ids")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{oid}\n".encode())
    finally:
        os.close(fd)
    return HttpResponse(f"created {oid}\n".encode(), status=201, content_type=TEXT)


async def slow(request: HttpRequest) -> HttpResponse:
    seconds = min(float(request.GET.get("seconds", "1")), 60.0)
    await asyncio.sleep(seconds)  # the slow request IS the behaviour
    return HttpResponse(f"slept {seconds:g}\n".encode(), content_type=TEXT)
