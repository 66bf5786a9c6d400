"""Errors that reach the user as one line: each names the key, file or value at fault."""


class MoEDistError(Exception):
    """Base class: the CLI prints these as a single line and exits with status 2."""


class ConfigError(MoEDistError):
    """An invalid configuration: unknown key, bad value, inconsistent sizes."""


class DataError(MoEDistError):
    """A dataset that is missing, corrupt (checksum mismatch) or malformed."""


class CheckpointError(MoEDistError):
    """A checkpoint that is missing, truncated, tampered with or incompatible."""
