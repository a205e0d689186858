"""Whether a str decoded from an untrusted peer is text every later use takes, and how to
show one that is not."""


def is_clean_text(text: str) -> bool:
    """No NUL (no path, name or C string holds one) and it encodes as UTF-8 (JSON's lone
    surrogates and the surrogates Python uses for undecodable bytes encode to nothing)."""
    if "\0" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# C0 and C1 controls: shown escaped, they cannot move the cursor or retitle a terminal.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}


def printable(text: str) -> str:
    """text for a terminal, a log or JSON: controls as \\xNN, and the bytes of a name that
    is not UTF-8 (undecodable bytes Python carries as surrogates) as \\xNN too."""
    text = text.translate(_CONTROLS)
    try:
        text.encode()
    except UnicodeEncodeError:
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a lone surrogate that is no undecodable byte (from JSON)
            text = text.encode("utf-8", "backslashreplace").decode()
    return text


def shown(name: bytes | str, limit: int = 80) -> str:
    """A name from an untrusted source for an error line: its repr, cut to about `limit`
    characters with its full length said, so a 16 MiB name makes no 16 MiB line."""
    return repr(name) if len(name) <= limit else f"{name[:limit]!r}{_more(name)}"


def clipped(text: str, limit: int = 200) -> str:
    """A peer's message for an error line: printable, cut to `limit` characters with its
    whole length said (a service's 300 kB error text made a 300 kB line)."""
    shown = printable(text[:limit])
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}{_more(text)}"  # (a control shows as 4 characters)


def _more(name: bytes | str) -> str:
    """What marks a name cut: its whole length."""
    return f"... ({len(name)} {'bytes' if isinstance(name, bytes) else 'characters'})"


def listed(items: list[str], limit: int = 8) -> str:
    """Names from an untrusted source listed in an error line: at most `limit`, each cut to
    80 characters, and how many there are in all (an index of 200,000 tags made a 2.4 MB
    line); "none" when there are none."""
    if not items:
        return "none"
    head = ", ".join(i if len(i) <= 80 else f"{i[:80]}{_more(i)}" for i in items[:limit])
    return head if len(items) <= limit else f"{head}, ... ({len(items)} in all)"
