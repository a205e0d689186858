"""Whether a str decoded from an untrusted peer is text every later use takes."""


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
