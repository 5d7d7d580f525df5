# Copyright 2026 The hf-slim developers. Licensed under the Apache License, Version 2.0.
"""SlimMoe generation beyond `GenerationMixin`: decoding as one elastic variant, budget-controlled generation (a small
variant thinks, a large one answers) and self-speculative decoding (a nested variant drafts for transformers' assisted
generation), mixed into `SlimMoeForCausalLM` as `SlimMoeGenerationMixin`.

This file is copied next to the weights by `hf_slim.hub.save_for_hub`, so it imports nothing from hf_slim.

Transformers touch points of the nested draft (`SlimMoeElasticDraft`), each checked by
`tests/test_transformers_touchpoints.py` (hf_slim's `integrations` room cannot hold them: this file may not import it):
- `AssistedCandidateGenerator` duck-types its `assistant_model`: it reads `device`, `generation_config` (deep-copied;
  `num_assistant_tokens`, `num_assistant_tokens_schedule`, `assistant_confidence_threshold`), `config`
  (`is_encoder_decoder`, `get_text_config()`), calls the private `_supports_logits_to_keep()` (because the target's
  model kwargs hold `logits_to_keep`), and calls `generate(input_ids=..., generation_config=..., **target_kwargs)`
  with `return_dict_in_generate=True`, reading `sequences`, `scores` and `cache` from the result and passing that
  `cache` back on the next round; the draft's `generate` must ignore the target's `elastic_variant` in those kwargs.
- `Cache.activate_past_recording()`: what `generate` calls on a cache it builds for an assistant (sliding-window layers
  keep their past until `crop`); the draft builds its own variant-shaped cache, so it calls it too.
- Acceptance is counted by a `StoppingCriteria` added to the target's `stopping_criteria`: assisted decoding calls the
  criteria once per verification step, after the accepted tokens were appended.
"""

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache
from transformers.generation import GenerationMixin, StoppingCriteria, StoppingCriteriaList
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
    """`GenerationMixin` with SlimMoe's additions to `generate`: decoding as one elastic variant, budget-controlled
    generation, and nested variants as drafts of assisted generation (`as_draft`). Mixed into `SlimMoeForCausalLM` (it
    uses the model's `active_elastic_variant`, variant plans and `slice_variant`)."""

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
        assistant_model (`SlimMoeElasticDraft` or `PreTrainedModel`, *optional*):
            transformers' assisted generation. With `assistant_model=model.as_draft("small")` a nested variant of
            this model drafts on prefix views of its weights (see `as_draft`); its acceptance counts are then in
            `assistant_model.stats` (`SpeculationStats`) and logged at INFO level. The draft must nest inside the
            variant being decoded (`elastic_variant`, default the full model).
        """
        if elastic_budget is not None:
            if kwargs.get("assistant_model") is not None:
                raise ValueError(
                    "generate() takes elastic_budget or assistant_model, not both: budget generation switches "
                    "variants between phases, while assisted generation verifies one draft against one target."
                )
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
        draft = kwargs.get("assistant_model")
        if not hasattr(draft, "_begin_speculation"):  # no assistant, or one that is not a nested draft
            return super().generate(inputs, generation_config, *args, **kwargs)
        use_mtp = kwargs.get("use_mtp", getattr(generation_config or self.generation_config, "use_mtp", None))
        if use_mtp:
            raise ValueError(
                "generate() takes use_mtp=True or a nested draft as assistant_model, not both: transformers would "
                "draft with the MTP heads and never call the draft."
            )
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_length = prompt.shape[-1] if prompt is not None and not prompt.is_floating_point() else 0
        steps = draft._begin_speculation(self, variant, prompt_length)
        if len(args) >= 2:  # stopping_criteria given positionally (after logits_processor)
            args = (args[0], StoppingCriteriaList([*(args[1] or []), steps]), *args[2:])
        else:
            kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), steps])
        try:
            return super().generate(inputs, generation_config, *args, **kwargs)
        finally:
            draft._end_speculation(steps)

    def as_draft(self, variant: str, *, contiguous: bool = False, **generation_config_kwargs) -> "SlimMoeElasticDraft":
        r"""
        Nested variant `variant` of this model as the draft of transformers' assisted generation (self-speculative
        decoding): `model.generate(input_ids, assistant_model=model.as_draft("small"))`.

        The draft owns no weights: it decodes with `elastic_variant=variant` on prefix views of this model's
        parameters, with its own KV cache laid out for the variant's layers; the full model verifies the drafted
        tokens in one forward. Greedy output equals plain greedy decoding, and sampling (transformers' speculative
        sampling) keeps the target's distribution. Batch size 1, as every assistant in transformers.

        Args:
            variant (`str`):
                A nested variant of `config.elastic`, smaller than the model (or than the `elastic_variant` it will
                verify with).
            contiguous (`bool`, defaults to `False`):
                Draft with a contiguous copy of the variant (`slice_variant`) instead of prefix views: the variant's
                weights in memory once more, and a snapshot (later changes to this model's weights do not reach it).
            generation_config_kwargs:
                Set on the draft's own `generation_config`, which is where transformers reads assistant settings:
                `num_assistant_tokens` (tokens drafted per step, default 20), `num_assistant_tokens_schedule`
                (`"constant"` by default, `"heuristic"`), `assistant_confidence_threshold` (default 0.4: the draft
                stops early when its top probability falls below it).

        Returns:
            `SlimMoeElasticDraft`; after each assisted `generate`, `draft.stats` holds its acceptance
            (`SpeculationStats`).

        Example:
            ```python
            >>> draft = model.as_draft("small", num_assistant_tokens=6)
            >>> out = model.generate(input_ids, assistant_model=draft, max_new_tokens=128)
            >>> draft.stats.accepted_per_step, draft.stats.acceptance_rate
            ```

        Raises:
            `KeyError`: `variant` is not a variant of this model (the message lists the drafts it has).
            `ValueError`: `variant` is `"full"`, or the model has no elastic variants.
            `TypeError`: a keyword that is not a `GenerationConfig` field.
        """
        return SlimMoeElasticDraft(self, variant, contiguous=contiguous, **generation_config_kwargs)


# ---- self-speculative decoding: a nested variant drafts, the model verifies ----------------------------------------
def nested_drafts(config, target: str = FULL_VARIANT) -> list[str]:
    """Variants of `config` that can draft for `target` (those nested inside it and smaller), smallest first."""
    names = config.elastic_variant_names()  # smallest first
    inside = (config.variant_config(target).elastic or {}).get("variants", {})  # KeyError for an unknown target
    return [name for name in names if name in inside]


class SpeculationCounts:
    """What follows from the per-step counts of one speculative `generate` call; shared by the nested-variant draft's
    [`SpeculationStats`] and the MTP heads' `MtpAcceptanceStats`, which hold the lists `drafted` (tokens drafted
    before each verification step), `accepted` (drafted tokens each step accepted) and `new_tokens` (tokens each
    step appended)."""

    drafted: list[int]
    accepted: list[int]
    new_tokens: list[int]

    @property
    def steps(self) -> int:
        """Verification steps (forwards of the verifying model)."""
        return len(self.accepted)

    @property
    def accepted_per_step(self) -> float:
        """Mean drafted tokens accepted per drafting step (steps that drafted nothing left out; 0 with none)."""
        drafting = [a for a, d in zip(self.accepted, self.drafted) if d]
        return sum(drafting) / len(drafting) if drafting else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens appended per verification step (`accepted_per_step + 1` unless EOS cut a step)."""
        return sum(self.new_tokens) / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the verifying model accepted (0 when nothing was drafted)."""
        drafted = sum(self.drafted)
        return sum(self.accepted) / drafted if drafted else 0.0

    def counts_dict(self) -> dict:
        """The recorded lists and the statistics above, as plain Python values."""
        return {
            "drafted": list(self.drafted), "accepted": list(self.accepted), "new_tokens": list(self.new_tokens),
            "steps": self.steps, "accepted_per_step": self.accepted_per_step, "tokens_per_step": self.tokens_per_step,
            "acceptance_rate": self.acceptance_rate,
        }  # fmt: skip


@dataclass
class SpeculationStats(SpeculationCounts):
    r"""
    Acceptance of one assisted `generate` call with a nested draft (`SlimMoeElasticDraft.stats`).

    Each verification step is one forward of the target over the drafted tokens: it keeps the longest accepted
    prefix and adds one token of its own (the correction, or the bonus token when every draft was accepted), so
    `new tokens = accepted tokens + steps` (less where EOS or the length limit cut the last step).

    Args:
        draft_variant (`str`): the variant that drafted.
        target_variant (`str`): the variant that verified (`"full"`: the model).
        drafted (`list[int]`): tokens drafted before each verification step (0 where the draft was not asked, e.g.
            when one token was left).
        accepted (`list[int]`): drafted tokens each step accepted.
        new_tokens (`list[int]`): tokens each step appended (accepted + 1, or fewer at EOS / the length limit).
        draft_seconds (`float`): wall time spent drafting.
        total_seconds (`float`): wall time of the whole `generate` call.
    """

    draft_variant: str
    target_variant: str
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    draft_seconds: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self) -> dict:
        """The recorded lists and every derived statistic, as plain Python values."""
        return {
            "draft_variant": self.draft_variant, "target_variant": self.target_variant, **self.counts_dict(),
            "draft_seconds": self.draft_seconds, "total_seconds": self.total_seconds,
        }


class _VerificationSteps(StoppingCriteria):
    """Never stops; records the sequence length after each step (assisted decoding: after each verification)."""

    def __init__(self, prompt_length: int):
        self.lengths = [prompt_length]
        self.start = time.perf_counter()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.lengths.append(input_ids.shape[-1])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class SlimMoeElasticDraft:
    """A nested variant of a SlimMoe model as transformers' `assistant_model` (built by `model.as_draft(variant)`).

    It owns no weights (unless `contiguous=True`): its `generate` is the model's `generate(..., elastic_variant=
    variant)`, on prefix views of the shared tensors and with a KV cache of its own laid out for the variant's layers
    (transformers never shares the target's cache with an assistant). It exposes what transformers' assisted
    generation reads from an assistant (`device`, `config`, `generation_config`, `generate`); see the touch points at
    the top of this file.

    Attributes:
        model (`SlimMoeForCausalLM`): the model whose weights it drafts with.
        variant (`str`): the drafting variant.
        config (`SlimMoeConfig`): the variant's config (`model.config.variant_config(variant)`).
        generation_config (`GenerationConfig`): the draft's own copy of the model's, with the assistant settings.
        stats (`SpeculationStats` or `None`): acceptance of the last assisted `generate` it drafted for.
    """

    def __init__(self, model, variant: str, *, contiguous: bool = False, **generation_config_kwargs):
        config = model.config
        if not config.elastic:
            raise ValueError(
                f"as_draft({variant!r}): this model has no elastic variants (config.elastic is None), so no nested "
                "variant can draft for it; build them with hf_slim.elastic.make_elastic."
            )
        drafts = nested_drafts(config)
        if variant not in drafts:
            if variant == FULL_VARIANT:
                raise ValueError(
                    f"as_draft('full'): the draft must be a nested variant smaller than the model; drafts: {drafts}"
                )
            raise KeyError(f"as_draft({variant!r}): {variant!r} is not a variant of this model; drafts: {drafts}")
        self.model = model
        self.variant = variant
        self.generation_config = copy.deepcopy(model.generation_config)
        unused = self.generation_config.update(**generation_config_kwargs)
        if unused:
            raise TypeError(f"as_draft() got keywords that are not GenerationConfig fields: {sorted(unused)}")
        self._copy = model.slice_variant(variant) if contiguous else None
        self.config = self._copy.config if contiguous else config.variant_config(variant)
        self.stats: SpeculationStats | None = None
        self._drafted: dict[int, int] | None = None

    def __repr__(self) -> str:
        kind = "contiguous copy" if self._copy is not None else "prefix views"
        return f"SlimMoeElasticDraft(variant={self.variant!r}, {kind} of {type(self.model).__name__})"

    @property
    def device(self) -> torch.device:
        return self.model.device if self._copy is None else self._copy.device

    @property
    def contiguous(self) -> bool:
        """Whether it drafts with a contiguous copy of the variant (`as_draft(..., contiguous=True)`)."""
        return self._copy is not None

    def _supports_logits_to_keep(self) -> bool:
        # read by transformers' AssistedCandidateGenerator (a touch point, see the top of this file)
        return True

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs):
        r"""
        The variant's `generate` (what assisted generation calls each round): the model's `generate` with
        `elastic_variant=variant`, or the contiguous copy's. An `elastic_variant` among `kwargs` (the target's,
        which transformers copies from the target's inputs) is ignored. In assisted generation (a config with
        `is_assistant`) the first round gets a dynamic cache laid out for the variant, with past recording on so
        transformers can crop it back to the accepted tokens.
        """
        kwargs.pop("elastic_variant", None)
        if getattr(generation_config, "is_assistant", False) and kwargs.get("cache") is None:
            kwargs["cache"] = DynamicCache(config=self.config)
            kwargs["cache"].activate_past_recording()
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        start = time.perf_counter()
        if self._copy is None:
            out = self.model.generate(inputs, generation_config, elastic_variant=self.variant, **kwargs)
        else:
            out = self._copy.generate(inputs, generation_config, **kwargs)
        if self._drafted is not None and prompt is not None:
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            self._drafted[prompt.shape[-1]] = sequences.shape[-1] - prompt.shape[-1]
            self.stats.draft_seconds += time.perf_counter() - start
        return out

    def _begin_speculation(self, target, target_variant: str, prompt_length: int) -> _VerificationSteps:
        """Called by the target's `generate`: check that this draft nests inside the target, start counting."""
        if target is self.model and target_variant != FULL_VARIANT:
            drafts = nested_drafts(target.config, target_variant)
            if self.variant not in drafts:
                raise ValueError(
                    f"as_draft({self.variant!r}) cannot draft for elastic_variant={target_variant!r}: a draft must be "
                    f"a smaller variant nested inside it; drafts for {target_variant!r}: {drafts}"
                )
        self.stats = SpeculationStats(draft_variant=self.variant, target_variant=target_variant)
        self._drafted = {}
        return _VerificationSteps(prompt_length)

    def _end_speculation(self, steps: _VerificationSteps) -> None:
        stats, drafted = self.stats, self._drafted
        self._drafted = None
        for before, after in zip(steps.lengths, steps.lengths[1:]):
            stats.drafted.append(drafted.get(before, 0))
            stats.new_tokens.append(after - before)
            stats.accepted.append(max(after - before - 1, 0))
        stats.total_seconds = time.perf_counter() - steps.start
        if not stats.steps:  # generate failed before its first step
            return
        logger.info(
            "elastic speculation: %r drafts for %r: %d steps, %d drafted, %d accepted (%.2f per step, rate %.2f), "
            "%.3fs drafting of %.3fs",
            stats.draft_variant, stats.target_variant, stats.steps, sum(stats.drafted), sum(stats.accepted),
            stats.accepted_per_step, stats.acceptance_rate, stats.draft_seconds, stats.total_seconds,
        )


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


__all__ = [
    "ElasticBudget",
    "ElasticGenerateOutput",
    "SlimMoeElasticDraft",
    "SlimMoeGenerationMixin",
    "SpeculationStats",
    "nested_drafts",
]
