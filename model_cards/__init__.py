"""Jinja model-card templates rendered with `huggingface_hub.ModelCard.from_template` (see `hf_slim.hub`)."""
