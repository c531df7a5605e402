"""Making client-supplied text safe to log: one line, no terminal escapes, bounded length.

A request path arrives percent-decoded (``%0A`` is a newline), so logging it as received lets a
caller forge log lines or send escape sequences to an operator's terminal.
"""

from __future__ import annotations

__all__ = ["escape"]

_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(value: str, limit: int = 200) -> str:
    """``value`` with backslashes and every unprintable character escaped, cut to ``limit``.

    Printable text, non-ASCII letters included, is kept as it is; control characters, line
    separators and format characters become ``\\n``, ``\\x1b``, ``\\u2028`` ...; a cut value
    ends with ``...``.
    """
    text = value[:limit]
    if not text.isprintable() or "\\" in text:
        text = "".join(_escaped(ch) for ch in text)
    return text + "..." if len(value) > limit else text
