"""hf-slim: prune, distill and nest Mixture-of-Experts language models in the Hugging Face ecosystem.

`import hf_slim` registers the SlimMoe family with the transformers Auto classes.
"""

from .models import SlimMoeConfig, SlimMoeForCausalLM, SlimMoeModel


__version__ = "0.1.0"

__all__ = ["SlimMoeConfig", "SlimMoeForCausalLM", "SlimMoeModel", "__version__"]
