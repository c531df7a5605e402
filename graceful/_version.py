"""The package version, in a module of its own.

Imported by name (``from ._version import __version__``) rather than read from the package
object: a ``graceful/`` folder in a server's start-up directory can stand in for the package
object, never for this module.
"""

__version__ = "0.1.0"
