"""The one exception type for mistakes a user can fix; the CLI prints it as one line and exits 2."""

# Set to 1 to see the traceback behind a one-line error, and orbax's own error logs.
DEBUG_ENV = "ANYCHIP_DEBUG"


class UserError(Exception):
    """Bad input: a config value, a path, a corrupt file, a full or read-only disk. Internal bugs raise
    anything else."""


def require(ok: bool, message: str) -> None:
    """Raise UserError(message) unless `ok`: the one-line form of every input check."""
    if not ok:
        raise UserError(message)
