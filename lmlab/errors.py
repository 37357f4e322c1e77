"""lmlab's own exceptions: each names the file, field or tensor at fault."""


class LmlabError(Exception):
    """Base class for errors that lmlab reports to the user (no deep torch traceback)."""


class ConfigError(LmlabError, ValueError):
    """A config value is missing, unknown or inconsistent."""


class CheckpointError(LmlabError):
    """A model directory or weight file cannot be read: names the file and tensor."""
