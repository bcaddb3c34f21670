"""Locations and messages without their secrets: a URL's user info and query string, a pipe's
command line after its first word. Every line that may reach a log, wandb or a report passes here."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def redact(location: str) -> str:
    """``location`` without what may be a secret: a URL's user info and query string, a pipe's
    command line after its first word."""
    if location.startswith("pipe:"):
        words = location[5:].split()
        return f"pipe:{words[0]} ..." if words else "pipe:"
    if not _URL.match(location):
        return location
    parts = urlsplit(location)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Text that may quote URLs or a pipe: command (a message, a command-line argument), with
    their secrets removed."""
    text = re.sub(r"pipe:.*", lambda m: redact(m.group(0)), text)
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: redact(m.group(0)), text)
