from .configuration_slim_moe import SlimMoeConfig
from .modeling_slim_moe import (
    SlimMoeCausalLMOutputWithPast,
    SlimMoeForCausalLM,
    SlimMoeModel,
    SlimMoePreTrainedModel,
)


__all__ = [
    "SlimMoeCausalLMOutputWithPast",
    "SlimMoeConfig",
    "SlimMoeForCausalLM",
    "SlimMoeModel",
    "SlimMoePreTrainedModel",
]
