"""Engines that run the language model for zipchat's compressed images. The transformers engine is
zipchat's own decoder (generate.py, session.py); `vllm_*` hand vLLM the prompt as embeddings."""
