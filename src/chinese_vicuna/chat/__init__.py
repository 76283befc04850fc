"""Multi-turn chat: ``session.ChatSession`` (history, token budget, undo/regenerate, save/load) and
the terminal chat ``repl``.

Nothing is imported here: ``chat.commands`` is loaded for every ``--help`` and must stay light.
"""
