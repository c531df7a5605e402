"""Every private attribute of a server that graceful still touches, in one place.

Each entry names the server versions it was checked against and fails with a clear error
(naming the server, its version and what to do) when the installed version lacks it. Anything
a server offers publicly (an ASGI message, a documented hook or setting) is used directly by
its adapter instead.
"""

from __future__ import annotations

# -- uvicorn -----------------------------------------------------------------------------------

# -- gunicorn ----------------------------------------------------------------------------------
