"""risoluto-postgres: the ``postgres`` secret backend (``secrets.backend: postgres``)."""

from .store import PostgresStore

__all__ = ["PostgresStore"]
