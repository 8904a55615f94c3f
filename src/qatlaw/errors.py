"""The base of every error the workflow reports as one line naming what is wrong."""


class QatlawError(ValueError):
    """A bad input (config, corpus, token data, run settings); its message is one line."""


class ConfigError(QatlawError):
    """A configuration value is wrong; the message names the key."""


class TrainError(QatlawError):
    """A run cannot start: bad settings or data."""
