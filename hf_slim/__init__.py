"""hf-slim: prune, distill and nest Mixture-of-Experts language models in the Hugging Face ecosystem."""

__version__ = "0.1.0"
