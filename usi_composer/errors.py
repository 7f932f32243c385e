"""User-facing errors: the command-line tools print them as one line, without a traceback.

Whether a retry can help is an attribute of the error, ``retryable``; every command's exit code
follows from it alone (``usi_composer.cli._common.fail``): 2 for a refusal that fails the same way
every time (the config, data paths, classes, weights that do not fit, an unsafe or corrupt file),
1 for anything else (the network, a lost node). Launch templates requeue on 1, never on 2.
"""


class UsiError(Exception):
    """Base of the errors a user can fix (bad config, missing data, weights that need network)."""

    retryable = False  # a class attribute: a loader worker's error is re-raised as type(e)(text)


class ConfigError(UsiError, ValueError):
    """A bad configuration, with a one-line message: ``<source>: <key.path>: <what is wrong>``.

    ``source``: the yaml file or the override that set the key, where the problem is found while
    loading; empty for what is found later (the run plan, the pre-flight, building)."""

    def __init__(self, key: str, message: str, *, source: str = "") -> None:
        self.source, self.key, self.message = source, key, message
        super().__init__(": ".join(part for part in (source, key, message) if part))


class SetupError(UsiError, RuntimeError):
    """Something the config points to cannot be built: missing data, unreachable weights."""


class UnreachableError(SetupError):
    """Something the config points to did not answer (an object store, a server, the hub; a download cut
    off): a retry may succeed."""

    retryable = True


class BadFilesError(SetupError):
    """Source files that cannot be converted (undecodable, too large, names not UTF-8, symlink
    loops): the one-line message lists every one of them."""


class LoaderWorkerError(SetupError):
    """An error raised in a data loader worker that still prints as one line.

    PyTorch re-raises a worker's exception in the main process as ``type(e)(text)``, the text
    carrying the worker's traceback; only its last line (our message) is kept.
    """

    def __init__(self, message: str) -> None:
        if "Traceback" in message:
            last = message.strip().splitlines()[-1]
            message = last.split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


class CorruptSampleError(LoaderWorkerError):
    """A sample whose bytes do not decode (truncated, not an image): names the file or the sample."""


class LostPeerError(UsiError, RuntimeError):
    """Another process of a distributed job died or became unreachable (a lost node): a retry resumes."""

    retryable = True


class CorruptFileError(SetupError):
    """A file the recipe wrote earlier that is not what was written (cut short, other bytes, unreadable)."""


class CheckpointError(SetupError):
    """Weights that cannot be loaded into the model: a missing file, or another architecture's."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code when loaded (a pickled global outside the allow-list), refused.

    ``what`` says what was refused, e.g. ``unpickle 'posix.system'``; callers add the key that opts in.
    """

    def __init__(self, path: str, what: str) -> None:
        self.path, self.what = path, what
        super().__init__(f"{path}: refusing to {what} (a checkpoint can run code when it is loaded)")


class InputSizeError(SetupError):
    """A model that cannot run at the configured image size."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of ``error``'s message (``limit``: at most that many characters),
    or its type's name when the message is empty."""
    text = str(getattr(error, "msg", None) or error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line[:limit] if limit is not None else line


def reason(error: BaseException, limit: int | None = 200) -> str:
    """``Type: first line of the message`` (``Type`` alone for an empty message), for one-line errors."""
    text = str(error).strip()
    return f"{type(error).__name__}: {first_line(error, limit)}" if text else type(error).__name__


def error_line(error: BaseException) -> str:
    """How every command prints a user-facing error: ``error: <message>`` on one line, secrets redacted."""
    from usi_composer.redaction import redact_text

    return f"error: {redact_text(' '.join(str(error).split()))}"
