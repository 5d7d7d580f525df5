"""Model families shipped with hf-slim, registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .slim_moe import SlimMoeConfig, SlimMoeForCausalLM, SlimMoeModel


def register_auto_classes() -> None:
    """Register SlimMoe with `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` (idempotent)."""
    AutoConfig.register(SlimMoeConfig.model_type, SlimMoeConfig, exist_ok=True)
    AutoModel.register(SlimMoeConfig, SlimMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(SlimMoeConfig, SlimMoeForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = ["SlimMoeConfig", "SlimMoeForCausalLM", "SlimMoeModel", "register_auto_classes"]
