"""``chinese-vicuna board``: one Gradio app over the CLI's code paths (see ``app.py``)."""
