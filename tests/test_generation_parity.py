"""Generation with SlimMoe against models we did not write.

The references are a stock `Qwen3MoeForCausalLM` holding the same weights (`hf_slim.convert`) and a plain loop of
full forwards without a cache. Comparing SlimMoe's `generate` with itself could not catch a bug both share: the
transformers 5.24 `cache=` rename made every cached decode step see only its own token, and a cached-vs-uncached
check on SlimMoe alone stayed green.
"""

import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, Qwen3MoeConfig, Qwen3MoeForCausalLM, StaticCache
from transformers.utils import logging as hf_logging

from hf_slim.convert import from_hf, to_hf
from hf_slim.elastic import ElasticConfig, make_elastic
from hf_slim.hub import run_without_hf_slim, save_for_hub
from hf_slim.pruning import collect_statistics


VOCAB = 97
NEW_TOKENS = 6


def _stock() -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=40,
        norm_topk_prob=True, mlp_only_layers=[1], pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).float().eval()
    with torch.no_grad():  # stock init leaves norms at one; randomise so parity means something
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:  # larger weights give peaked, well-separated logits, so greedy ties cannot flip a token
                param.normal_(0, 0.3)
    return model


@pytest.fixture(scope="module")
def stock():
    return _stock()


@pytest.fixture(scope="module", params=[0, 2], ids=["mtp0", "mtp2"])
def slim(request, stock):
    return from_hf(stock, num_mtp_heads=request.param).eval()


@pytest.fixture(scope="module")
def batch():
    """Three prompts of lengths 7, 4 and 5, left-padded to 7."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


def _greedy(model, ids, mask, **kwargs):
    kwargs = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, "eos_token_id": None, **kwargs}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, return_dict_in_generate=True, output_logits=True, **kwargs)


def _assert_same_generation(out, ref):
    assert out.sequences.tolist() == ref.sequences.tolist()
    assert len(out.logits) == len(ref.logits) == NEW_TOKENS
    for step, (a, b) in enumerate(zip(out.logits, ref.logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {step}: {m}")


def _reference_loop(model, ids, mask, steps=NEW_TOKENS, **forward_kwargs):
    """Greedy decoding by full forwards over the whole sequence, no cache: (sequences, per-step logits)."""
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            step = model(ids, attention_mask=mask, position_ids=positions, use_cache=False, **forward_kwargs)
            logits.append(step.logits[:, -1])
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
    return ids, logits


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
def test_greedy_equals_stock_qwen3_moe_with_left_padding(slim, stock, batch, use_cache):
    ids, mask = batch
    ref = _greedy(stock, ids, mask, use_cache=use_cache)
    _assert_same_generation(_greedy(slim, ids, mask, use_cache=use_cache), ref)
    # and stock itself agrees with the no-cache reference loop, so the reference is not a shared bug
    sequences, logits = _reference_loop(stock, ids, mask)
    assert sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(ref.logits, logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_static_cache_equals_stock(slim, stock, batch):
    ids, mask = batch
    ref = _greedy(stock, ids, mask)
    _assert_same_generation(_greedy(slim, ids, mask, cache_implementation="static"), ref)


def test_beam_search_with_cache_equals_stock(slim, stock, batch):
    ids, mask = batch
    kwargs = dict(num_beams=3, num_return_sequences=2, output_logits=False, output_scores=True)
    with torch.no_grad():
        ref = stock.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None,
                             return_dict_in_generate=True, **kwargs)
        out = slim.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None,
                            return_dict_in_generate=True, **kwargs)
    assert out.sequences.tolist() == ref.sequences.tolist()
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)


def test_assisted_greedy_with_same_model_equals_plain_greedy(slim, stock, batch):
    ids, mask = batch
    ids, mask = ids[:1], mask[:1]  # transformers' assisted decoding takes batch size 1
    ref = _greedy(stock, ids, mask)
    out = _greedy(slim, ids, mask, assistant_model=slim)
    assert out.sequences.tolist() == ref.sequences.tolist()
    # prompt lookup drafts tokens that are often rejected, so the cache is cropped and rewound
    out = _greedy(slim, ids, mask, prompt_lookup_num_tokens=2)
    assert out.sequences.tolist() == ref.sequences.tolist()


def test_assisted_sampling_equals_stock_assisted_sampling(slim, stock, batch):
    ids, mask = batch
    ids, mask = ids[:1], mask[:1]
    kwargs = dict(do_sample=True, temperature=1.5, max_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        torch.manual_seed(7)
        ref = stock.generate(ids, attention_mask=mask, assistant_model=stock, **kwargs)
        torch.manual_seed(7)
        out = slim.generate(ids, attention_mask=mask, assistant_model=slim, **kwargs)
    assert out.tolist() == ref.tolist()


def test_continuing_from_a_cache_equals_one_generation(slim, stock, batch):
    ids, mask = batch
    ref = _greedy(stock, ids, mask, max_new_tokens=2 * NEW_TOKENS)
    first = _greedy(slim, ids, mask)
    assert isinstance(first.cache, DynamicCache) and first.cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
    grown = torch.cat([mask, torch.ones_like(first.sequences[:, ids.shape[1]:])], dim=-1)
    second = _greedy(slim, first.sequences, grown, cache=first.cache)
    assert second.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(first.logits + second.logits, ref.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", [None, "static"])
def test_generation_from_inputs_embeds_equals_stock(slim, stock, batch, implementation):
    ids, mask = batch
    with torch.no_grad():
        embeds = stock.get_input_embeddings()(ids)
        kwargs = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None,
                      cache_implementation=implementation)
        ref = stock.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        out = slim.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    assert out.tolist() == ref.tolist() and out.shape == (3, NEW_TOKENS)


def test_elastic_variant_generation_equals_its_slice_converted_to_stock(stock, batch):
    ids, mask = batch
    slim = from_hf(stock, num_mtp_heads=2).eval()
    data = torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(2))
    stats = collect_statistics(slim, data, num_samples=4, max_length=16, batch_size=4, show_progress=False)
    small = {"num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
             "num_experts": 4, "num_experts_per_tok": 1, "moe_intermediate_size": 8, "intermediate_size": 24}
    elastic = make_elastic(slim, ElasticConfig(variants={"small": small}), stats, layer_method="block_influence")
    reference = to_hf(elastic.slice_variant("small"), "qwen3_moe").eval()
    assert type(reference) is Qwen3MoeForCausalLM and reference.config.num_hidden_layers == 2
    ref = _greedy(reference, ids, mask)
    for implementation in (None, "static"):
        out = _greedy(elastic, ids, mask, elastic_variant="small", cache_implementation=implementation)
        _assert_same_generation(out, ref)
    assert elastic.active_elastic_variant == "full"


def test_mtp_loss_follows_shift_labels():
    # Under sequence/context parallelism each rank holds a slice of the sequence and `shift_labels` (token i+1 for
    # position i, from the whole sequence). MTP depth k at position i predicts token i+k+1 = shift_labels[i+k].
    model = from_hf(_stock(), num_mtp_heads=2).eval()
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    shift = F.pad(ids[:, 1:], (0, 1), value=-100)
    shift[0, 3] = -100  # a masked target the labels alone would not show
    with torch.no_grad():
        out = model(ids, labels=ids, shift_labels=shift)
        plain = model(ids, labels=ids)
    torch.testing.assert_close(out.lm_loss, F.cross_entropy(out.logits.flatten(0, 1), shift.flatten()))
    for k, logits in enumerate(out.mtp_logits, start=1):
        targets = F.pad(shift[:, k:], (0, k), value=-100)[:, : logits.shape[1]]
        expected = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        torch.testing.assert_close(out.mtp_losses[k - 1], expected)
    assert not torch.equal(out.mtp_losses[0], plain.mtp_losses[0])
    # a shard's slice: the last k positions' depth-k targets live on the next rank, so they are ignored
    half = model(ids[:, :6], labels=ids[:, :6], shift_labels=shift[:, :6].contiguous())
    with torch.no_grad():
        logits = half.mtp_logits[0]
        targets = F.pad(shift[:, 1:6], (0, 1), value=-100)[:, : logits.shape[1]]
    torch.testing.assert_close(half.mtp_losses[0], F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_decode_step_compiles_fullgraph_with_static_cache(slim, stock):
    # `_can_compile_fullgraph = True` must be true: dynamo traces a static-cache decode step without a graph break.
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    cache = StaticCache(config=slim.config, max_cache_len=8)
    reference_cache = StaticCache(config=stock.config, max_cache_len=8)
    with torch.no_grad():
        slim(ids, cache=cache)
        stock(ids, cache=reference_cache)
        step = torch.compile(slim.forward, fullgraph=True, backend="eager")
        next_ids = torch.randint(3, VOCAB, (2, 1), generator=torch.Generator().manual_seed(6))
        positions = torch.full((2, 1), 5)
        out = step(next_ids, cache=cache, position_ids=positions)
        ref = stock(next_ids, cache=reference_cache, position_ids=positions)
    assert type(slim)._can_compile_fullgraph
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_cache_passed_under_a_name_the_model_does_not_read_is_refused(slim, batch):
    ids, _ = batch
    with pytest.raises(TypeError, match=r"cache_params=DynamicCache.*pass the KV cache as `cache=`"):
        slim(ids, cache_params=DynamicCache())
    with pytest.raises(TypeError, match=r"kv=DynamicCache"):
        slim(ids, kv=DynamicCache())
    with pytest.raises(ValueError, match=r"Both `past_key_values` and `cache`"):
        slim(ids, cache=DynamicCache(), past_key_values=DynamicCache())


def test_past_key_values_still_works_with_a_deprecation_warning(slim, batch):
    ids, mask = batch
    with torch.no_grad():
        cache = DynamicCache()
        with pytest.warns(FutureWarning, match="past_key_values"):
            first = slim(ids, attention_mask=mask, past_key_values=cache)
        assert first.cache is cache and cache.get_seq_length() == ids.shape[1]


def _deprecations(run) -> set[str]:
    """Deprecation messages (warnings and transformers' log) emitted while `run()` runs."""
    hf_logging.warning_once.cache_clear()  # a message another test already triggered would otherwise stay silent
    hf_logging.enable_propagation()
    handler = logging.Handler()
    records = []
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        hf_logging.disable_propagation()
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    return {m for m in messages if "deprecat" in m.lower()}


def test_own_code_emits_no_deprecation_warning_stock_does_not(slim, stock, batch):
    # transformers itself warns on some paths (its assisted-decoding helper passes generation_config with explicit
    # arguments); what SlimMoe's own code adds on top of the stock model for the same calls must be nothing.
    ids, mask = batch

    def calls(model):
        def run():
            _greedy(model, ids, mask)
            _greedy(model, ids, mask, cache_implementation="static")
            _greedy(model, ids[:1], mask[:1], assistant_model=model)
            with torch.no_grad():
                model(ids, attention_mask=mask, labels=ids)

        return run

    ours, theirs = _deprecations(calls(slim)), _deprecations(calls(stock))
    assert ours <= theirs, ours - theirs


def test_shipped_remote_code_generates_like_stock(tmp_path, stock, batch):
    ids, mask = batch
    ref = _greedy(stock, ids, mask)
    folder = save_for_hub(from_hf(stock, num_mtp_heads=2), tmp_path / "export")
    torch.save({"ids": ids, "mask": mask, "sequences": ref.sequences}, tmp_path / "ref.pt")
    script = f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        for implementation in (None, "static"):
            out = model.generate(ref["ids"], attention_mask=ref["mask"], max_new_tokens={NEW_TOKENS},
                                 do_sample=False, pad_token_id=0, eos_token_id=None,
                                 cache_implementation=implementation)
            assert out.tolist() == ref["sequences"].tolist(), (implementation, out.tolist())
        print("REMOTE_GENERATE_OK")
        """
    result = run_without_hf_slim(script, env={"HF_HOME": str(tmp_path / "hf_home")})  # the shipped code alone
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_GENERATE_OK" in result.stdout


def test_shipped_code_refuses_a_transformers_without_the_cache_api(tmp_path):
    # Before 5.24 the cache travelled as `past_key_values`: this code would decode with it ignored, so it refuses.
    from hf_slim.models.slim_moe import modeling_slim_moe

    script = textwrap.dedent(
        f"""
        import importlib, sys, transformers
        transformers.__version__ = "5.23.0"
        sys.path.insert(0, {os.path.dirname(os.path.dirname(modeling_slim_moe.__file__))!r})
        try:
            importlib.import_module("slim_moe.modeling_slim_moe")
        except ImportError as error:
            print("REFUSED", error)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "REFUSED SlimMoe's modeling code needs transformers>=5.24.0" in result.stdout, result.stderr[-2000:]
    assert "this environment has transformers 5.23.0" in result.stdout


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_generate_returns_the_hidden_states_and_attentions_stock_returns(batch, attention):
    ids, mask = batch
    reference, slim = _stock(), from_hf(_stock(), num_mtp_heads=2).eval()
    reference.set_attn_implementation(attention)
    slim.set_attn_implementation(attention)
    kwargs = dict(output_hidden_states=True, output_attentions=attention == "eager")
    ref, out = _greedy(reference, ids, mask, **kwargs), _greedy(slim, ids, mask, **kwargs)
    _assert_same_generation(out, ref)
    pairs = list(zip(out.hidden_states, ref.hidden_states))
    if attention == "eager":
        pairs += list(zip(out.attentions, ref.attentions))
    for step_out, step_ref in pairs:
        assert len(step_out) == len(step_ref)
        for a, b in zip(step_out, step_ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
