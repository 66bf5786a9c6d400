"""Errors that reach the user as one line: each names the key, file or value at fault."""


class MoEDistError(Exception):
    """Base class: the CLI prints these as a single line and exits with status 2."""


class ConfigError(MoEDistError, ValueError):
    """An invalid configuration: unknown key, bad value, inconsistent sizes. Also a
    ValueError: modules built without a config (MoE, NormalizedGD, PatchExpert) raise it for
    the config's rules (moe_dist.config.check_*), where they raised ValueError before."""


class DataError(MoEDistError):
    """A dataset that is missing, corrupt (checksum mismatch) or malformed."""


class CheckpointError(MoEDistError):
    """A checkpoint that is missing, truncated, tampered with or incompatible."""


class CollectiveError(MoEDistError):
    """A collective that timed out (``parallel.timeout_s``) or lost its connection to another
    rank: one of the ranks died or hangs. The process group is then unusable; the run's last
    checkpoint is complete, so the same command resumes once every rank is healthy."""
