"""The one exception type users see: a single line that names the problem."""


class SaescopeError(Exception):
    """Bad input or a failed precondition, reported as one readable line (the CLI prints it as is)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (library errors can span pages)."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
