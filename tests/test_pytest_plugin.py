"""graceful's pytest plugin, used the way a user would: a test file of theirs run by pytester.

The plugin is loaded with ``-p graceful.pytest_plugin`` (the ``pytest11`` entry point does it
for an installed package).
"""

from __future__ import annotations

import importlib.metadata

import pytest

import graceful
from graceful._runtime import lifecycle as lifecycle_module

pytest_plugins = ["pytester"]


def _installed() -> bool:
    """Whether the ``pytest11`` entry point loads the plugin already (``-p`` would clash)."""
    points = importlib.metadata.entry_points(group="pytest11")
    return any(point.value == "graceful.pytest_plugin" for point in points)


#: The plugin is imported by this module first: pytest cannot rewrite its asserts (it has none).
PLUGIN = (
    *(() if _installed() else ("-p", "graceful.pytest_plugin")),
    *("-W", "ignore::pytest.PytestAssertRewriteWarning"),
)

USER_APP = """
import asyncio
import time

import graceful


def hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


async def hello_asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.2)  # a slow request IS the point
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


def slow_wsgi(environ, start_response):
    time.sleep(0.2)  # a slow request IS the point
    return hello(environ, start_response)


wsgi_app = graceful.WSGIMiddleware(hello, graceful.Lifecycle(graceful.Config(delay=1.0)))
asgi_app = graceful.ASGIMiddleware(hello_asgi, graceful.Lifecycle(graceful.Config(delay=1.0)))
live_wsgi = graceful.WSGIMiddleware(slow_wsgi)
live_asgi = graceful.ASGIMiddleware(hello_asgi)
naive_asgi = hello_asgi  # no graceful middleware: SIGTERM drops requests
"""


def test_the_plugin_adds_only_fixtures_and_is_inert_until_one_is_used(
    pytester: pytest.Pytester,
) -> None:
    import graceful.pytest_plugin as plugin

    hooks = [name for name in vars(plugin) if name.startswith("pytest_")]
    assert hooks == []
    pytester.makepyfile("def test_plain():\n    assert True\n")
    result = pytester.runpytest(*PLUGIN, "--fixtures")
    result.stdout.fnmatch_lines(
        [
            "*graceful_clock*",
            "*graceful_lifecycle*",
            "*graceful_drain_during_request*",
            "*graceful_live_server*",
        ]
    )
    pytester.runpytest(*PLUGIN).assert_outcomes(passed=1)


def test_graceful_lifecycle_runs_on_the_controllable_clock_and_is_restored_after(
    pytester: pytest.Pytester,
) -> None:
    before = lifecycle_module._default
    pytester.makepyfile(
        """
        import graceful
        from graceful import Phase


        def test_drain_ends_once_the_clock_passes_the_delay(graceful_lifecycle, graceful_clock):
            assert graceful.get_lifecycle() is graceful_lifecycle
            graceful_lifecycle.mark_ready()
            with graceful_lifecycle.hold("job"):
                graceful_lifecycle.drain()
                graceful_clock.advance(graceful_lifecycle.config.delay + 0.5)
                assert graceful_lifecycle.phase is Phase.DRAINING  # the job holds it open
            assert graceful_lifecycle.phase is Phase.DRAINED


        def test_the_clock_does_not_move_on_its_own(graceful_lifecycle, graceful_clock):
            graceful_lifecycle.mark_ready()
            graceful_lifecycle.drain()
            assert graceful_lifecycle.phase is Phase.DRAINING
            graceful_clock.advance(0.5)
            assert graceful_lifecycle.phase is Phase.DRAINING
        """
    )
    mine = graceful.Lifecycle(graceful.Config(delay=1.0))
    graceful.set_lifecycle(mine)
    try:
        pytester.runpytest(*PLUGIN).assert_outcomes(passed=2)
        assert lifecycle_module._default is mine
    finally:
        graceful.set_lifecycle(before)


def test_drain_during_request_reports_the_served_response_and_the_held_drain(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(user_app=USER_APP)
    pytester.makepyfile(
        """
        import pytest
        from graceful import Phase

        import user_app


        @pytest.mark.parametrize("app", [user_app.wsgi_app, user_app.asgi_app], ids=["w", "a"])
        def test_drain_mid_request(graceful_drain_during_request, app):
            outcome = graceful_drain_during_request(app, "/orders/1")
            assert outcome.served and outcome.status == 200 and outcome.body == b"hello"
            assert outcome.inflight_at_drain == 1
            assert outcome.phase_in_flight is Phase.DRAINING
            assert outcome.phase_after is Phase.DRAINED
            assert app.lifecycle.phase is Phase.SERVING  # resumed for the next test


        def test_a_request_arriving_while_draining_is_served_and_announced(
            graceful_drain_during_request,
        ):
            user_app.asgi_app.lifecycle.drain()
            outcome = graceful_drain_during_request(user_app.asgi_app, "/")
            assert outcome.status == 200
            assert outcome.header("Graceful-State") == "draining"
            assert outcome.header("Connection") == "close"


        def test_an_app_without_the_middleware_is_caught(graceful_drain_during_request):
            outcome = graceful_drain_during_request(user_app.hello, "/")
            assert outcome.status == 200
            assert outcome.phase_in_flight is Phase.DRAINING, "the request was not counted"
        """
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*test_an_app_without_the_middleware_is_caught*"])
    result.stdout.fnmatch_lines(["*the request was not counted*"])


@pytest.mark.e2e
def test_live_server_reports_no_loss_with_graceful_and_the_losses_without(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(user_app=USER_APP)
    pytester.makepyfile(
        """
        import pytest

        LOAD = dict(callers=4, load_seconds=0.6, delay=1.0)


        @pytest.mark.parametrize(
            "server, app, workers, args",
            [
                ("gunicorn", "user_app:live_wsgi", 2, ("-k", "gthread", "--threads", "4")),
                ("uvicorn", "user_app:live_asgi", 1, ()),
            ],
        )
        def test_sigterm_loses_nothing(graceful_live_server, server, app, workers, args):
            report = graceful_live_server(
                app, server=server, path="/slow", workers=workers, args=args, **LOAD
            )
            assert report.sent > 0 and report.lost == 0, report.summary()
            assert report.exit_code == 0, report.summary()
            assert report.readyz_failed_after is not None and report.readyz_failed_after < 1.0


        def test_naive_app_loses_requests(graceful_live_server):
            # More callers: a loss is a caller reconnecting in the moment between the listener's
            # close and the probe that sees it, which four callers on a busy machine can miss.
            report = graceful_live_server(
                "user_app:naive_asgi", server="uvicorn", path="/", workers=1,
                **dict(LOAD, callers=16),
            )
            assert report.lost == 0, report.summary()
        """
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*test_naive_app_loses_requests*", "*lost [1-9]*"])


USER_SHOP = """
import graceful


def shop(environ, start_response):
    if environ["REQUEST_METHOD"] == "POST":
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [b"created"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


app = graceful.WSGIMiddleware(shop)
"""


@pytest.mark.e2e
def test_the_cluster_fixture_proves_a_rolling_restart_in_a_user_s_own_tests(
    pytester: pytest.Pytester,
) -> None:
    """The README's example, in a user's test file: two gunicorn nodes of their app restarted in
    turn under load, lossless; the same nodes without the library's hooks and middleware
    (``command``: plain gunicorn) fail the same assertion."""
    pytester.makepyfile(shop=USER_SHOP)
    pytester.makepyfile(
        """
        import sys


        def test_a_rolling_restart_loses_nothing(graceful_cluster):
            cluster = graceful_cluster(
                "shop:app", server="gunicorn", nodes=2, args=("-k", "gthread"), delay=0.5
            )
            report = cluster.restart_under_load("/", post_path="/orders")
            report.assert_lossless()
            assert len(report.restarts) == 2 and report.ran


        def test_a_naive_rolling_restart_is_caught(graceful_cluster):
            def plain(app, port):
                return [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}",
                        "-k", "gthread", app]

            cluster = graceful_cluster("shop:shop", command=plain, nodes=2, ready_path="/")
            cluster.restart_under_load("/", post_path="/orders").assert_lossless()
        """
    )
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_a_naive_rolling_restart_is_caught*", "*requests failed*"])


def test_the_module_is_importable_without_a_pytest_session() -> None:
    import graceful.testing
    from graceful.pytest_plugin import FakeClock

    assert FakeClock is graceful.testing.FakeClock  # moved there, still exported here
    clock = FakeClock(50.0)
    assert graceful.Lifecycle(clock=clock).clock() == 50.0
