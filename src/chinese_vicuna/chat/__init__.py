"""Multi-turn chat: ``session.ChatSession`` (history, token budget, undo/regenerate, save/load),
the terminal chat ``repl`` and the Gradio chat UI ``webui``.

Nothing is imported here: ``chat.commands`` is loaded for every ``--help`` and must stay light.
"""
