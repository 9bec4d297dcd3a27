"""Engines that run the language model for zipchat's compressed images, behind one interface (base.py):
zipchat's own decoder (transformers.py) and vLLM fed prompt embeddings (vllm.py, with its client, launch and
export). `NAMES`: what `--engine` offers."""

NAMES = ("transformers", "vllm")
