"""Atari case study: LLM-written policy programs over object-centric Atari observations.

The project (``genopt run atari --task Pong --credit-horizon 100``): the reference study's
credit-horizon finding. ``PROJECT`` (in :mod:`.project`, loaded on first access so that rollout
workers, which import this package, stay free of the library core) offers the starting policies
``single``/``modular`` and ``<Game>.single``/``<Game>.modular``; :mod:`.task` is the task.

Modules: ``games`` (the eight games: RAM/screen object extractors and descriptions), ``env``
(:class:`ObjectEnv`, a Gymnasium-style env with object observations), ``worker`` (the child side
of a rollout: emulator and policy in one sandboxed process), ``policy_runner`` (the parent side:
sends policies to workers, collects returns, traces and errors), ``policies`` (starting
policy programs), ``task`` (rollouts of the credit horizon, full-episode evaluation, export) and
``video`` (GIFs from replayed actions). Importing this package is cheap: ``ale_py`` loads when
an env is created.
"""

from .games import GAMES, Category, GameSpec, get_game

__all__ = ["GAMES", "Category", "GameSpec", "PROJECT", "get_game"]


def __getattr__(name: str):
    if name == "PROJECT":
        from .project import PROJECT

        return PROJECT
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
