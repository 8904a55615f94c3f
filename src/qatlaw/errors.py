"""The base of every error the workflow reports as one line naming what is wrong."""


class QatlawError(ValueError):
    """A bad input (config, corpus, token data, run settings); its message is one line."""
