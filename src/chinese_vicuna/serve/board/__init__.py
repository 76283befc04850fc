"""``chinese-vicuna board``: one Gradio app over the CLI's code paths (``Board`` in ``app.py``, the page
in ``ui.py``, one module per tab in ``tabs/``)."""
