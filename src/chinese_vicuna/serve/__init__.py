"""Serving a trained model: an OpenAI-compatible HTTP API (``openai_api``, its routers assembled by
``create_app``) and the board (``board/``, one module per tab)."""
