"""One module per ``saescope`` subcommand; shared argument parsers live here."""

from __future__ import annotations

from saescope.settings import at_least, finite, positive_int

__all__ = ["at_least", "finite", "positive_int", "port"]

#: a TCP port to listen on (0: any free one)
port = at_least(0, high=65535)
