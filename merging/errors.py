"""The one exception type for mistakes a user can fix (bad config, bad input, existing output)."""


class AlloyError(Exception):
    """A user-facing error: the message is one line that names the culprit (file, tensor or config key)."""


class ConfigError(AlloyError):
    pass


class InputError(AlloyError):
    pass


class OutputError(AlloyError):
    pass
