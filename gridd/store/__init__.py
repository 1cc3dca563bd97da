"""Durable state: one Deferred-returning interface, an SQLite and a memory implementation."""

__all__ = ["open_store"]

from gridd.store.base import open_store
