"""Errors that name a user mistake; the CLI prints them as one line, without a traceback."""


class FedPeftError(Exception):
    """Base class for every error caused by input (config, data, files, client updates)."""


class ConfigError(FedPeftError):
    """A configuration key is unknown, of the wrong type or out of range."""


class DataError(FedPeftError):
    """A data file, column, label set or partition is unusable."""


class UpdateRejected(FedPeftError):
    """A client update failed validation (names, shapes, dtypes, non-finite values)."""


class RunInterrupted(FedPeftError):
    """The user stopped a run (Ctrl-C, SIGTERM); its last finished round is checkpointed."""
