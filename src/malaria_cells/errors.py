"""The one exception type for mistakes a user can fix (bad path, bad flag, bad file).

The command line prints these as a single ``error: ...`` line instead of a traceback;
anything else escaping is a bug in malaria-cells and keeps its traceback.
"""


class MalariaCellsError(Exception):
    """A problem with the user's input, explained in one line."""
