"""chinese-vicuna: LoRA/QLoRA instruction and chat tuning of LLaMA-family models for Chinese."""

__version__ = "0.1.0"
