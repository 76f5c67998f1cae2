"""The SQLite backend: the embedded default store (see backend.py)."""

from qbroker.store.sqlite.backend import SQLiteStore as SQLiteStore
