"""The one exception type a user is meant to see.

Anything the user can fix (a flag, a file, a field) raises `UserError` with a one-line message that says
what is wrong, where, and how to fix it. The CLI prints it and exits with code 2; nothing else is written.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one actionable line."""
