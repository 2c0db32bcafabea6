"""Persistent state of a Parley deployment, in SQLite or PostgreSQL: see `parley.store.store`
for usage and `parley.store.dialect` for what differs between the two."""

from parley.store.dialect import DialectError, database_errors
from parley.store.store import (
    ChunkHit,
    Conversation,
    Document,
    Feedback,
    MemoryFact,
    Message,
    SchemaError,
    Store,
    User,
)

__all__ = [
    "ChunkHit", "Conversation", "DialectError", "Document", "Feedback", "MemoryFact", "Message", "SchemaError", "Store",
    "User", "database_errors",
]
