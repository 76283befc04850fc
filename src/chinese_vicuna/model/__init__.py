"""chinese-vicuna."""
