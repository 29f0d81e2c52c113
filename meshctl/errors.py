"""User errors (exit 1) versus internal errors (exit 2), and their one renderer."""

from __future__ import annotations


class MeshctlError(Exception):
    """Base class of every error meshctl reports to a user."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def render(self) -> str:
        """One line: `where: error: message (hint)`."""
        head = f"{self.where}: " if self.where else ""
        tail = f" (hint: {self.hint})" if self.hint else ""
        return f"{head}error: {self.message}{tail}"


class UserError(MeshctlError):
    """Something the user can fix: a bad file, a missing data file, a dead domain."""

    exit_code = 1


class InternalError(MeshctlError):
    """A bug in meshctl."""

    exit_code = 2
