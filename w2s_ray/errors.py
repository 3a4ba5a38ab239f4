"""User-facing errors: the CLI prints their message and exits 2, without a traceback."""


class W2SError(Exception):
    """An error the user can fix; its message names the key, file or column at fault."""


class ConfigError(W2SError):
    pass


class MissingArtifact(W2SError):
    """A stage's file is neither on this node nor in the run's store (`RunDir.need`)."""


class DataError(W2SError):
    pass
