"""The one exception type users see: a single line that names the problem."""


class SaescopeError(Exception):
    """Bad input or a failed precondition, reported as one readable line (the CLI prints it as is)."""
