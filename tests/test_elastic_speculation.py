"""Self-speculative decoding with a nested variant (issue 12): `model.generate(ids, assistant_model=model.as_draft(v))`.

A nested variant drafts on prefix views of the full model's weights (or on a contiguous copy), with a KV cache of its
own; transformers' assisted generation verifies. Greedy output equals plain greedy, sampling keeps the target's
distribution (a chi-square test over many seeds on a tiny vocabulary), acceptance is counted per verification step,
bad input fails in one sentence, and the shipped remote code does the same without hf_slim.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import textwrap

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_elastic import VARIANTS, _greedy, _stats, tiny_config  # noqa: E402

from hf_slim.elastic import ElasticBudget, ElasticConfig, make_elastic  # noqa: E402
from hf_slim.hub import run_without_hf_slim, save_for_hub  # noqa: E402
from hf_slim.models.slim_moe import SlimMoeForCausalLM  # noqa: E402
from hf_slim.models.slim_moe.generation_slim_moe import (  # noqa: E402
    SlimMoeElasticDraft,
    SpeculationStats,
    nested_drafts,
)


def _elastic(**overrides) -> SlimMoeForCausalLM:
    torch.manual_seed(0)
    full = SlimMoeForCausalLM(tiny_config(**overrides)).eval()
    return make_elastic(full, ElasticConfig(variants=VARIANTS), _stats(full), layer_method="block_influence").eval()


@pytest.fixture(scope="module")
def model():
    return _elastic()


@pytest.fixture(scope="module")
def sliding_model():
    # sliding-window layers with a window the decoding crosses: cropping the draft's cache then needs past recording
    return _elastic(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])


def _prompt(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _check_stats(stats: SpeculationStats, new_tokens: int) -> None:
    assert stats.steps >= 1 and sum(stats.new_tokens) == new_tokens
    assert all(0 <= a <= d for a, d in zip(stats.accepted, stats.drafted))
    assert all(n in (a, a + 1) for a, n in zip(stats.accepted, stats.new_tokens))
    drafting = [a for a, d in zip(stats.accepted, stats.drafted) if d]
    assert stats.accepted_per_step == pytest.approx(sum(drafting) / len(drafting))
    assert stats.to_dict()["accepted_per_step"] == stats.accepted_per_step
    assert stats.tokens_per_step == pytest.approx(new_tokens / stats.steps)
    drafted = sum(stats.drafted)
    assert stats.acceptance_rate == pytest.approx(sum(stats.accepted) / drafted if drafted else 0.0)
    assert 0 < stats.draft_seconds < stats.total_seconds


# ---- greedy: equal to plain greedy --------------------------------------------------------------------------------
@pytest.mark.parametrize("contiguous", [False, True], ids=["views", "contiguous"])
@pytest.mark.parametrize("variant", ["small", "medium"])
@pytest.mark.parametrize("fixture", ["model", "sliding_model"])
def test_greedy_equals_plain_greedy(request, fixture, variant, contiguous):
    model = request.getfixturevalue(fixture)
    for length, k in ((5, 1), (9, 3), (4, 8)):
        ids = _prompt(length, seed=length)
        plain = model.generate(ids, do_sample=False, max_new_tokens=18)
        draft = model.as_draft(variant, contiguous=contiguous, num_assistant_tokens=k, assistant_confidence_threshold=0.0)
        out = model.generate(ids, do_sample=False, max_new_tokens=18, assistant_model=draft)
        assert torch.equal(out, plain), (length, k)
        assert draft.stats.draft_variant == variant and draft.stats.target_variant == "full"
        _check_stats(draft.stats, 18)
        assert max(draft.stats.drafted) == k  # the confidence threshold 0 never stops a draft early
    # and plain greedy is the model's own loop of full forwards without a cache
    assert plain[0].tolist() == ids[0].tolist() + _greedy(model, ids[0].tolist(), "full", 18)


def test_each_round_drafts_the_variant_greedy_continuation(sliding_model):
    """The draft's own cache is cropped back to the accepted tokens every round: what it proposes is exactly the
    variant's greedy continuation of the current sequence (a loop of full forwards of the variant, no cache)."""
    model = sliding_model
    draft = model.as_draft("small", num_assistant_tokens=3, assistant_confidence_threshold=0.0)
    rounds = []
    generate = draft.generate

    def recording(*args, **kwargs):
        out = generate(*args, **kwargs)
        rounds.append((kwargs["input_ids"][0].tolist(), out.sequences[0].tolist()))
        return out

    draft.generate = recording
    ids = _prompt(6)
    out = model.generate(ids, do_sample=False, max_new_tokens=16, assistant_model=draft)
    assert len(rounds) >= 3 and rounds[0][0] == ids[0].tolist()
    for prefix, proposed in rounds:
        assert proposed[: len(prefix)] == prefix
        assert proposed[len(prefix) :] == _greedy(model, prefix, "small", len(proposed) - len(prefix))
        assert out[0, : len(prefix)].tolist() == prefix  # every round starts from tokens the target kept
    assert draft.stats.drafted[: len(rounds)] == [len(p) - len(q) for q, p in rounds]


def test_eos_and_a_target_variant(model):
    ids = _prompt(7)
    plain = model.generate(ids, do_sample=False, max_new_tokens=14)
    eos = int(plain[0, 7 + 5])  # a token the target writes at step 6
    want = model.generate(ids, do_sample=False, max_new_tokens=14, eos_token_id=eos, pad_token_id=0)
    draft = model.as_draft("small", num_assistant_tokens=4, assistant_confidence_threshold=0.0)
    got = model.generate(ids, do_sample=False, max_new_tokens=14, eos_token_id=eos, pad_token_id=0, assistant_model=draft)
    assert torch.equal(got, want) and int(got[0, -1]) == eos
    _check_stats(draft.stats, got.shape[1] - 7)
    # the target may itself be a variant: "small" drafts for "medium", as a keyword or inside the context manager
    want = model.generate(ids, do_sample=False, max_new_tokens=12, elastic_variant="medium")
    got = model.generate(ids, do_sample=False, max_new_tokens=12, elastic_variant="medium", assistant_model=draft)
    assert torch.equal(got, want) and draft.stats.target_variant == "medium"
    with model.elastic_variant("medium"):
        assert torch.equal(model.generate(ids, do_sample=False, max_new_tokens=12, assistant_model=draft), want)
    assert model.active_elastic_variant == "full"


def test_return_dict_scores_and_logging(model, caplog):
    ids = _prompt(5)
    plain = model.generate(ids, do_sample=False, max_new_tokens=8, return_dict_in_generate=True, output_scores=True)
    draft = model.as_draft("medium", num_assistant_tokens=2)
    with caplog.at_level(logging.INFO, logger="transformers"):
        out = model.generate(
            ids, do_sample=False, max_new_tokens=8, return_dict_in_generate=True, output_scores=True,
            assistant_model=draft,
        )
    assert torch.equal(out.sequences, plain.sequences) and len(out.scores) == 8
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(plain.scores), atol=1e-5, rtol=1e-5)
    assert any("elastic speculation: 'medium' drafts for 'full'" in r.getMessage() for r in caplog.records)


def test_the_draft_owns_no_weights(model):
    draft = model.as_draft("small")
    assert isinstance(draft, SlimMoeElasticDraft) and not isinstance(draft, torch.nn.Module)
    assert not draft.contiguous and draft.device == model.device
    assert draft.config.hidden_size == 16 and draft.config.num_hidden_layers == 2
    assert draft.generation_config is not model.generation_config
    assert "prefix views" in repr(draft)
    copied = model.as_draft("small", contiguous=True)
    assert copied.contiguous and sum(p.numel() for p in copied._copy.parameters()) < sum(
        p.numel() for p in model.parameters()
    )
    assert nested_drafts(model.config) == ["small", "medium"]
    assert nested_drafts(model.config, "medium") == ["small"] and nested_drafts(model.config, "small") == []


# ---- sampling: speculative sampling keeps the target's distribution ---------------------------------------------
def _exact(model, prompt, variant, new, temperature):
    """Exact probability of every continuation of `new` tokens under `variant` (float64 softmax)."""
    vocab = model.config.vocab_size
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=new):
            p, tokens = 1.0, list(prompt)
            for token in seq:
                logits = model(torch.tensor([tokens]), elastic_variant=variant, use_cache=False).logits[0, -1]
                p *= float(torch.softmax(logits.double() / temperature, -1)[token])
                tokens.append(token)
            probs[seq] = p
    return probs


def _chi_square_p(counts: dict, probs: dict, n: int) -> float:
    """p-value of Pearson's chi-square test, cells with an expected count under 5 pooled into one."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for seq, p in probs.items():
        expected, observed = n * p, counts.get(seq, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat, cells = stat + (observed - expected) ** 2 / expected, cells + 1
    if pooled_exp > 0:
        stat, cells = stat + (pooled_obs - pooled_exp) ** 2 / pooled_exp, cells + 1
    df = cells - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def test_speculative_sampling_keeps_the_target_distribution():
    vocab, new, temperature, samples = 4, 3, 1.0, 2000
    # large initial weights: peaked distributions on which the small variant and the full model disagree a lot, so
    # the draft is often rejected and the residual distribution is exercised
    model = _elastic(vocab_size=vocab, pad_token_id=0, initializer_range=0.3)
    prompt = [1, 2, 3]
    target = _exact(model, prompt, "full", new, temperature)
    proposal = _exact(model, prompt, "small", new, temperature)
    assert 0.5 * sum(abs(target[s] - proposal[s]) for s in target) > 0.3  # the draft alone would be far off
    draft = model.as_draft("small", num_assistant_tokens=new, assistant_confidence_threshold=0.0)
    counts, drafted, accepted = {}, 0, 0
    for seed in range(samples):
        torch.manual_seed(seed)
        out = model.generate(
            torch.tensor([prompt]), do_sample=True, temperature=temperature, top_k=None, max_new_tokens=new,
            assistant_model=draft,
        )
        seq = tuple(out[0, len(prompt) :].tolist())
        counts[seq] = counts.get(seq, 0) + 1
        drafted, accepted = drafted + sum(draft.stats.drafted), accepted + sum(draft.stats.accepted)
    assert 0 < accepted < drafted  # both acceptance and rejection happened
    assert _chi_square_p(counts, target, samples) > 1e-3
    assert _chi_square_p(counts, proposal, samples) < 1e-9  # the test tells the two apart


# ---- bad input ------------------------------------------------------------------------------------------------------
def test_bad_input_fails_in_one_sentence(model):
    with pytest.raises(KeyError, match=r"as_draft\('tiny'\): 'tiny' is not a variant of this model; drafts: \['small', 'medium'\]"):
        model.as_draft("tiny")
    with pytest.raises(ValueError, match=r"as_draft\('full'\): the draft must be a nested variant smaller .*\['small', 'medium'\]"):
        model.as_draft("full")
    with pytest.raises(TypeError, match=r"not GenerationConfig fields: \['num_draft_tokens'\]"):
        model.as_draft("small", num_draft_tokens=3)
    plain = SlimMoeForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match=r"has no elastic variants"):
        plain.as_draft("small")
    ids = _prompt(4)
    with pytest.raises(ValueError, match=r"as_draft\('medium'\) cannot draft for elastic_variant='small'.*drafts for 'small': \[\]"):
        model.generate(ids, max_new_tokens=3, elastic_variant="small", assistant_model=model.as_draft("medium"))
    with pytest.raises(ValueError, match=r"drafts for 'medium': \['small'\]"):
        model.generate(ids, max_new_tokens=3, elastic_variant="medium", assistant_model=model.as_draft("medium"))
    with pytest.raises(ValueError, match=r"use_mtp=True or a nested draft as assistant_model, not both"):
        model.generate(ids, max_new_tokens=3, use_mtp=True, assistant_model=model.as_draft("small"))
    with pytest.raises(ValueError, match=r"elastic_budget or assistant_model, not both"):
        model.generate(
            ids, max_new_tokens=3, assistant_model=model.as_draft("small"),
            elastic_budget=ElasticBudget("small", end_think_token_id=5),
        )
    # transformers' assisted generation (any assistant) decodes one sequence at a time: its own error
    batch = torch.randint(1, 128, (2, 5))
    with pytest.raises(ValueError, match=r"assisted generate is only supported for batch_size = 1"):
        model.generate(batch, max_new_tokens=3, assistant_model=model.as_draft("small"))


# ---- the shipped remote code, without hf_slim -----------------------------------------------------------------------
def test_remote_code_self_speculation_without_hf_slim(model, tmp_path):
    folder = save_for_hub(model, tmp_path / "export")
    ids = _prompt(6)
    want = model.generate(ids, do_sample=False, max_new_tokens=12)
    torch.save({"ids": ids, "want": want}, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        for contiguous in (False, True):
            draft = model.as_draft("small", contiguous=contiguous, num_assistant_tokens=3)
            assert type(draft).__module__.startswith("transformers_modules"), type(draft).__module__
            out = model.generate(ref["ids"], do_sample=False, max_new_tokens=12, assistant_model=draft)
            assert torch.equal(out, ref["want"]), (out, ref["want"])
            assert sum(draft.stats.new_tokens) == 12 and draft.stats.steps >= 1
        try:
            model.as_draft("tiny")
        except KeyError as error:
            print("ERROR", error)
        print("REMOTE_SPECULATION_OK")
        """
    )
    result = run_without_hf_slim(script, env={"HF_HOME": str(tmp_path / "hf_home")})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_SPECULATION_OK" in result.stdout
    assert "drafts: ['small', 'medium']" in result.stdout
