"""Persistent state of a Parley deployment, in SQLite or PostgreSQL: see `parley.store.sqlite`
for usage and `parley.store.dialect` for what differs between the two."""

from parley.store.dialect import DialectError, database_errors
from parley.store.sqlite import (
    ChunkHit,
    Conversation,
    Document,
    Feedback,
    MemoryFact,
    SchemaError,
    Store,
    Turn,
    User,
)

__all__ = [
    "ChunkHit", "Conversation", "DialectError", "Document", "Feedback", "MemoryFact", "SchemaError", "Store", "Turn",
    "User", "database_errors",
]
