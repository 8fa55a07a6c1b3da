"""Registries that installed packages extend: a package lists a module under an entry point group
('selfcorrect.strategies', 'selfcorrect.tasks', 'selfcorrect.recipes'), and the module registers its entries
when it is imported."""

from __future__ import annotations

from importlib.metadata import entry_points


def load_plugins(group: str, registered: dict) -> None:
    """Import the modules listed under entry point `group` whose name is not in `registered` yet."""
    for entry in entry_points(group=group):
        if entry.name not in registered:
            entry.load()
