"""Errors that the CLI turns into one clear line and an exit code (DESIGN.md: 1 work failed, 2 bad usage)."""


class VaeopsError(Exception):
    exit_code = 1


class UsageError(VaeopsError):
    """Bad params, a missing or mismatched input: the user must change something."""

    exit_code = 2


class WorkError(VaeopsError):
    """The work itself failed: NaN loss, parity failed, every mirror failed."""

    exit_code = 1
