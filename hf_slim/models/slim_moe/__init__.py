from .configuration_slim_moe import SlimMoeConfig
from .modeling_slim_moe import (
    MtpAcceptanceStats,
    SlimMoeCausalLMOutputWithPast,
    SlimMoeForCausalLM,
    SlimMoeModel,
    SlimMoePreTrainedModel,
)


__all__ = [
    "MtpAcceptanceStats",
    "SlimMoeCausalLMOutputWithPast",
    "SlimMoeConfig",
    "SlimMoeForCausalLM",
    "SlimMoeModel",
    "SlimMoePreTrainedModel",
]
