"""Persistent state of a Parley deployment: see `parley.store.sqlite` for usage."""

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

__all__ = ["ChunkHit", "Conversation", "Document", "Feedback", "MemoryFact", "SchemaError", "Store", "Turn", "User"]
