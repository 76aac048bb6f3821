"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""

# Set to 1 to see the traceback behind a one-line error, and orbax's own error logs.
DEBUG_ENV = "ANYCHIP_DEBUG"
# Every character str.splitlines() breaks at: a message quoting the user's text (an override, a YAML key)
# shows these escaped, so that it stays one line.
_LINE_BREAKS = {c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class UserError(Exception):
    """Bad input: a config value, a path, a corrupt file, a full or read-only disk. Internal bugs raise
    anything else."""

    def __init__(self, message: str = "") -> None:
        super().__init__(str(message).translate(str.maketrans(_LINE_BREAKS)))


def require(ok: bool, message: str) -> None:
    """Raise UserError(message) unless `ok`: the one-line form of every input check."""
    if not ok:
        raise UserError(message)
