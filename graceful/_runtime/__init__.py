"""The runtime layer: threads, asyncio, signals, the clock, the environment, the drain file,
files replaced whole.

Importing it (as anything of graceful does) plugs the process environment into the pure config
module, so ``graceful.Config.from_env()`` reads ``os.environ``.
"""

from . import env as env
