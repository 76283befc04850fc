"""Serving a trained model: an OpenAI-compatible HTTP API (``openai_api``) and a web UI (``webui``)."""
