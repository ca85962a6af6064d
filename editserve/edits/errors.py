"""Why an edit or an undo was refused, in the edit domain's words.

The service raises these; `editserve.api.errors` maps each to one HTTP status. `param` names
the request field at fault, when one is.
"""

from __future__ import annotations


class EditRefused(Exception):
    """An edit or undo that was not carried out; nothing changed."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


class InvalidEdit(EditRefused):
    """The request itself is wrong: an unknown method or kind, a bad field, bad hparams, or a
    method that could not make the edit."""


class MethodUnavailable(EditRefused):
    """The method needs a package or files this install lacks."""


class EditNotFound(EditRefused):
    """No committed edit has this id."""


class AlreadyUndone(EditRefused):
    """The edit was undone before."""


class StorageRefused(EditRefused):
    """The state folder refused a write (full, read-only, vanished)."""
