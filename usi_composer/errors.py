"""User-facing errors: the command-line tools print them as one line, without a traceback."""


class UsiError(Exception):
    """Base of the errors a user can fix (bad config, missing data, weights that need network)."""


class SetupError(UsiError, RuntimeError):
    """Something the config points to cannot be built: missing data, unreachable weights."""


class LostPeerError(UsiError, RuntimeError):
    """Another process of a distributed job died or became unreachable (a lost node)."""


class CheckpointError(SetupError):
    """Weights that cannot be loaded into the model: a missing file, or another architecture's."""


class InputSizeError(SetupError):
    """A model that cannot run at the configured image size."""
