"""Errors the command line turns into one line on stderr, without a traceback."""


class UserError(Exception):
    """A problem with what the user asked for or gave us (flags, paths, data).

    The CLI prints ``fastpretrain: error: <message>`` and exits with ``exit_code``.
    """

    exit_code = 2


class DataError(UserError):
    """The data was too broken to go on with (e.g. more bad samples than allowed)."""

    exit_code = 1
