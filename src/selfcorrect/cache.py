"""A response cache shared by every run in a store, so that runs which send the same conversation (two
strategies share their first turn) generate it once.

A reply is keyed by what determines it: the backend's identity (weights and engine, or model and
endpoint), the full messages, the sampling parameters and the seed (which encodes the sample index).
"""

from __future__ import annotations

import hashlib
import json

from .models import Backend, Completion, Message
from .store import Store


def cache_key(identity: str, messages: list[Message], max_tokens: int, temperature: float, seed: int) -> str:
    payload = json.dumps([identity, messages, max_tokens, temperature, seed], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class CachedBackend:
    """Wraps a backend: a reply found in the store's cache comes back with `cached=True`; any other is
    generated and stored. Everything else (option scoring, the llama.cpp handle) passes through."""

    def __init__(self, backend: Backend, store: Store):
        self.backend, self.store = backend, store
        self.identity = backend.identity

    def complete(self, messages: list[Message], max_tokens: int, temperature: float, seed: int) -> Completion:
        key = cache_key(self.identity, messages, max_tokens, temperature, seed)
        found = self.store.cached_reply(key)
        if found is not None:
            return found
        reply = self.backend.complete(messages, max_tokens, temperature, seed)
        self.store.cache_reply(key, reply)
        return reply

    def __getattr__(self, name: str):
        return getattr(self.backend, name)
