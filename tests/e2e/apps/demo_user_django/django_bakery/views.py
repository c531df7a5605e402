"""The bakery's views: the front page, and orders (POST, JSON in and out)."""

from __future__ import annotations

import json
import time

from django.http import HttpRequest, HttpResponse, JsonResponse

#: Seconds of work per request: requests are in flight when a node stops.
WORK = 0.005


def index(request: HttpRequest) -> HttpResponse:
    time.sleep(WORK)
    return HttpResponse("the bakery is open")


def orders(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return HttpResponse(status=405, headers={"Allow": "POST"})
    try:
        order = json.loads(request.body or b"{}")
    except ValueError:
        return JsonResponse({"error": "not JSON"}, status=400)
    time.sleep(WORK)
    return JsonResponse({"created": order.get("id")}, status=201)
