# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe generation beyond `GenerationMixin`: decoding as one elastic variant, and budget-controlled generation
(a small variant thinks, a large one answers), mixed into `SlimMoeForCausalLM` as `SlimMoeGenerationMixin`.

This file is copied next to the weights by `hf_slim.hub.save_for_hub`, so it imports nothing from hf_slim.
"""

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin
from transformers.utils import ModelOutput, logging

from .variants_slim_moe import FULL_VARIANT


# Under transformers' logger hierarchy, so `transformers.logging.set_verbosity_*` governs these messages as it does
# the library's own (a logger named after this module alone would sit outside it, as TRL's and remote code's do).
logger = logging.get_logger(f"transformers.{__name__}")


@dataclass
class ElasticBudget:
    """Budget-controlled generation over two nested variants (see `SlimMoeForCausalLM.generate`).

    Args:
        think_variant (`str`): variant that writes the thinking trace (e.g. the smallest).
        end_think_token_id (`int`): token that closes the thinking trace (e.g. the id of `</think>`).
        max_thinking_tokens (`int`, defaults to 1024): thinking budget; when it runs out the end token is forced.
        answer_variant (`str`, defaults to `"full"`): variant that is prefilled over prompt + thinking and answers.
    """

    think_variant: str
    end_think_token_id: int
    max_thinking_tokens: int = 1024
    answer_variant: str = FULL_VARIANT

    def __post_init__(self):
        if isinstance(self.end_think_token_id, bool) or not isinstance(self.end_think_token_id, int):
            raise ValueError(f"ElasticBudget.end_think_token_id must be a token id (int), got {self.end_think_token_id!r}.")
        if isinstance(self.max_thinking_tokens, bool) or not isinstance(self.max_thinking_tokens, int) or (
            self.max_thinking_tokens < 1
        ):
            raise ValueError(f"ElasticBudget.max_thinking_tokens must be an integer >= 1, got {self.max_thinking_tokens!r}.")


@dataclass
class ElasticGenerateOutput(ModelOutput):
    r"""
    sequences (`torch.LongTensor` of shape `(batch_size, length)`): prompt + thinking (+ forced end token) + answer,
        left-padded per row.
    thinking_tokens (`torch.LongTensor` of shape `(batch_size,)`): tokens the think variant wrote (its own end
        token included, a forced one not).
    forced_end (`torch.BoolTensor` of shape `(batch_size,)`): rows whose end-of-thinking token was forced.
    answer_tokens (`torch.LongTensor` of shape `(batch_size,)`): tokens the answer variant wrote (up to and including
        EOS).
    thinking_seconds (`float`): wall time of the thinking phase.
    answer_seconds (`float`): wall time of the answer phase (prefill over prompt + thinking included).
    """

    sequences: torch.LongTensor | None = None
    thinking_tokens: torch.LongTensor | None = None
    forced_end: torch.BoolTensor | None = None
    answer_tokens: torch.LongTensor | None = None
    thinking_seconds: float | None = None
    answer_seconds: float | None = None


def _until(tokens: torch.Tensor, stop: set[int]) -> int:
    """Length of `tokens` up to and including the first token in `stop` (all of it when none occurs)."""
    for i, token in enumerate(tokens.tolist()):
        if token in stop:
            return i + 1
    return len(tokens)


def _wants_static_cache(generation_config, default_config, kwargs: dict) -> bool:
    """Whether `generate` will build a compilable cache itself (then a variant must not get a dynamic one)."""
    implementation = kwargs.get("cache_implementation")
    for config in (generation_config, default_config):
        if implementation is None and config is not None:
            implementation = getattr(config, "cache_implementation", None)
    return implementation is not None and implementation != "dynamic"


class SlimMoeGenerationMixin(GenerationMixin):
    """`GenerationMixin` with SlimMoe's additions to `generate`: decoding as one elastic variant, and budget-controlled
    generation. Mixed into `SlimMoeForCausalLM` (it uses the model's `active_elastic_variant` and variant plans)."""

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, *args, elastic_budget=None, **kwargs):
        r"""
        `GenerationMixin.generate`, plus:

        elastic_variant (`str`, *optional*):
            Decode with this nested variant (its own KV cache layout is created for it).
        elastic_budget (`ElasticBudget`, *optional*):
            Budget-controlled generation: `think_variant` writes the thinking trace until it emits
            `end_think_token_id` or `max_thinking_tokens` run out (then the token is forced); `answer_variant` is then
            prefilled over prompt + thinking and writes the answer under the usual generation settings
            (`max_new_tokens` counts answer tokens). Greedy or sampled, any batch size; a streamer sees both phases.
            Returns the sequences, or with `return_dict_in_generate=True` an `ElasticGenerateOutput` with per-phase
            token counts and times (which are also logged at INFO level).
        """
        if elastic_budget is not None:
            return _generate_with_budget(self, inputs, generation_config, args, elastic_budget, kwargs)
        variant = kwargs.pop("elastic_variant", None) or self.active_elastic_variant
        if variant != FULL_VARIANT:
            # every forward computes as the variant; unless the caller brings a cache, turns caching off or asks for
            # a compilable one, the cache is a dynamic one laid out for the variant's layers
            kwargs["elastic_variant"] = variant
            user_cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if user_cache is None and kwargs.get("use_cache", True) is not False and not _wants_static_cache(
                generation_config, self.generation_config, kwargs
            ):
                kwargs["cache"] = DynamicCache(config=self._plan_for(variant).config)
        return super().generate(inputs, generation_config, *args, **kwargs)


def _generate_with_budget(model, inputs, generation_config, args, budget, kwargs) -> torch.Tensor | ElasticGenerateOutput:
    for attribute in ("think_variant", "answer_variant", "end_think_token_id", "max_thinking_tokens"):
        if not hasattr(budget, attribute):
            raise TypeError(f"elastic_budget must be an ElasticBudget, got {type(budget).__name__} without {attribute!r}.")
    end = budget.end_think_token_id
    if not 0 <= end < model.config.vocab_size:
        raise ValueError(
            f"ElasticBudget.end_think_token_id={end} is not in the vocabulary (ids 0..{model.config.vocab_size - 1}); "
            "pass the id of the end-of-thinking token, e.g. tokenizer.convert_tokens_to_ids('</think>')."
        )
    for variant in (budget.think_variant, budget.answer_variant):
        model.config.elastic_variant_sizes(variant)  # unknown names fail before any decoding
    input_ids = inputs if inputs is not None else kwargs.pop("input_ids")
    attention_mask = kwargs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    defaults = generation_config if generation_config is not None else model.generation_config
    return_dict = kwargs.pop("return_dict_in_generate", None)
    return_dict = defaults.return_dict_in_generate if return_dict is None else return_dict
    eos = kwargs.get("eos_token_id", defaults.eos_token_id)
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    pad = kwargs.pop("pad_token_id", defaults.pad_token_id)
    pad = pad if pad is not None else (min(eos) if eos else 0)

    think_kwargs = {k: v for k, v in kwargs.items() if k not in ("max_length", "min_length", "min_new_tokens")}
    think_kwargs.update(max_new_tokens=budget.max_thinking_tokens, eos_token_id=end, return_dict_in_generate=False)
    start = time.perf_counter()
    thought = model.generate(
        input_ids, generation_config, *args, attention_mask=attention_mask, pad_token_id=pad,
        elastic_variant=budget.think_variant, **think_kwargs,
    )
    thinking_seconds = time.perf_counter() - start
    written = thought[:, input_ids.shape[1] :]
    rows, thinking_tokens, forced = [], [], []
    for b in range(input_ids.shape[0]):
        prompt = input_ids[b][attention_mask[b].bool()]
        count = _until(written[b], {end})
        thinking = written[b, :count]
        forced.append(count == 0 or int(thinking[-1]) != end)
        if forced[-1]:
            thinking = torch.cat([thinking, thinking.new_tensor([end])])
        rows.append(torch.cat([prompt, thinking]))
        thinking_tokens.append(count)
    width = max(len(r) for r in rows)
    second_ids = input_ids.new_full((len(rows), width), pad)
    second_mask = torch.zeros_like(second_ids)
    for b, row in enumerate(rows):
        second_ids[b, width - len(row) :] = row
        second_mask[b, width - len(row) :] = 1
    start = time.perf_counter()
    answer = model.generate(
        second_ids, generation_config, *args, attention_mask=second_mask, pad_token_id=pad,
        elastic_variant=budget.answer_variant, return_dict_in_generate=False, **kwargs,
    )
    answer_seconds = time.perf_counter() - start
    answer_tokens = [_until(row, eos) for row in answer[:, width:]]
    logger.info(
        "elastic budget: thinking %s tokens with %r (%.3fs, forced end in %d rows), answer %s tokens with %r (%.3fs)",
        thinking_tokens, budget.think_variant, thinking_seconds, sum(forced), answer_tokens, budget.answer_variant,
        answer_seconds,
    )
    if not return_dict:
        return answer
    return ElasticGenerateOutput(
        sequences=answer,
        thinking_tokens=torch.tensor(thinking_tokens),
        forced_end=torch.tensor(forced),
        answer_tokens=torch.tensor(answer_tokens),
        thinking_seconds=thinking_seconds,
        answer_seconds=answer_seconds,
    )


__all__ = ["ElasticBudget", "ElasticGenerateOutput", "SlimMoeGenerationMixin"]
