"""SlimMoe's MTP heads decode through transformers' MTP framework: `generate(..., use_mtp=True)`.

Greedy MTP decoding equals plain greedy token for token, sampling keeps the target distribution, the drafts are what
`forward(return_mtp=True)` computes (the trained modules draft), and the same holds for the shipped remote code, for
elastic variants (at run time and loaded as one), and for checkpoints of hf-slim's first MTP layout.
"""

import json
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_slim.hub import run_without_hf_slim, save_for_hub
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
from hf_slim.models.slim_moe.mtp_slim_moe import MtpAcceptanceStats, SlimMoeMTPCandidateGenerator, mtp_drafter


V = 16
# "medium" keeps every decoder layer, "small" (nested inside it) drops one
ELASTIC = {"variants": {
    "small": {"num_hidden_layers": 1, "hidden_size": 16, "num_experts": 3, "moe_intermediate_size": 8},
    "medium": {"hidden_size": 24, "num_experts": 3},
}}


def tiny_config(**overrides) -> SlimMoeConfig:
    fields = dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        num_mtp_heads=2, max_position_embeddings=128, pad_token_id=0, mtp_loss_weight=1.0,
    )
    fields.update(overrides)
    return SlimMoeConfig(**fields)


def _walks(successor: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randint(1, V, (n, 1), generator=generator)
    for _ in range(length - 1):
        x = torch.cat([x, successor[x[:, -1:]]], dim=1)
    return x


@pytest.fixture(scope="module")
def trained():
    """Per MTP depth count, a model trained on walks of a fixed permutation of tokens 1..15: its main head and MTP heads
    predict them well, so drafts are mostly accepted (steps that accept all, some and none)."""
    g = torch.Generator().manual_seed(0)
    successor = torch.zeros(V, dtype=torch.long)
    successor[1:] = torch.randperm(V - 1, generator=g) + 1
    models = {}
    for depths in (1, 2):
        torch.manual_seed(depths)
        model = SlimMoeForCausalLM(tiny_config(num_mtp_heads=depths))
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
        for _ in range(60):
            batch = _walks(successor, 16, 20, g)
            model(batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        models[depths] = model.eval()
    return models, successor


def _prompts(successor, generator):
    walk = _walks(successor, 1, 6, generator)
    noisy = torch.randint(1, V, (1, 7), generator=generator)  # off the walks: drafts get rejected too
    return [walk, noisy, torch.cat([noisy, walk], dim=1)]


# ---- greedy ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depths", [1, 2])
def test_greedy_mtp_equals_plain_greedy(trained, depths):
    models, successor = trained
    model = models[depths]
    for prompt in _prompts(successor, torch.Generator().manual_seed(1)):
        plain = model.generate(prompt, do_sample=False, max_new_tokens=17)
        mtp = model.generate(prompt, do_sample=False, max_new_tokens=17, use_mtp=True)
        assert torch.equal(mtp, plain)
        stats = model.mtp_stats
        assert isinstance(stats, MtpAcceptanceStats) and stats.num_depths == depths and stats.variant == "full"
        assert sum(stats.new_tokens) == 17 and stats.drafted[0] == 0 and set(stats.drafted[1:-1]) == {depths}
    assert model.mtp_stats.acceptance_rate > 0.5  # trained heads, prompts on the walks


def test_greedy_with_left_padding_and_eos_equals_plain_greedy():
    model = SlimMoeForCausalLM(tiny_config()).eval()
    prompt = torch.tensor([[0, 0, 0, 5, 9, 2, 11]])
    mask = (prompt != 0).long()
    plain = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=12)
    mtp = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=12, use_mtp=True)
    assert torch.equal(mtp, plain)
    # an EOS ends MTP decoding where it ends plain greedy (drafted tokens past it are dropped)
    eos = int(plain[0, prompt.shape[1] + 5])
    plain = model.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=eos)
    mtp = model.generate(
        prompt, attention_mask=mask, do_sample=False, max_new_tokens=12, eos_token_id=eos, use_mtp=True
    )
    assert torch.equal(mtp, plain) and int(mtp[0, -1]) == eos


@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_every_length_equals_plain_greedy(cache_implementation):
    """Near `max_length` fewer tokens are drafted than there are depths (none when one token is left), so a static
    cache sized to `max_length` holds every forward."""
    model = SlimMoeForCausalLM(tiny_config()).eval()
    prompt = torch.randint(1, V, (1, 5), generator=torch.Generator().manual_seed(7))
    for new in range(1, 9):
        plain = model.generate(prompt, do_sample=False, max_new_tokens=new)
        mtp = model.generate(
            prompt, do_sample=False, max_new_tokens=new, use_mtp=True, cache_implementation=cache_implementation
        )
        assert torch.equal(mtp, plain), new
        drafted = model.mtp_stats.drafted
        assert all(prompt.shape[1] + sum(model.mtp_stats.new_tokens[:i]) + d < prompt.shape[1] + new
                   for i, d in enumerate(drafted))


def test_batch_of_two_is_refused_as_transformers_refuses_every_assisted_generation():
    model = SlimMoeForCausalLM(tiny_config()).eval()
    ids = torch.randint(1, V, (2, 5))
    with pytest.raises(ValueError) as ours:
        model.generate(ids, do_sample=False, max_new_tokens=4, use_mtp=True)
    with pytest.raises(ValueError) as stock:  # transformers' own candidate generator (prompt lookup), same check
        model.generate(ids, do_sample=False, max_new_tokens=4, prompt_lookup_num_tokens=2)
    assert str(ours.value) == str(stock.value) == "assisted generate is only supported for batch_size = 1"


# ---- the drafts are the trained modules' predictions ---------------------------------------------------------------
def _record_drafts(monkeypatch) -> list:
    records = []
    original = SlimMoeMTPCandidateGenerator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        candidates, logits = original(self, input_ids, *args, **kwargs)
        if logits is not None:
            records.append((input_ids.clone(), candidates.clone(), logits.clone()))
        return candidates, logits

    monkeypatch.setattr(SlimMoeMTPCandidateGenerator, "get_candidates", recording)
    return records


@pytest.mark.parametrize(
    "depths, variant", [(1, None), (2, None), (2, "medium"), (2, "small")], ids=["d1", "d2", "d2-medium", "d2-small"]
)
def test_drafts_are_what_forward_return_mtp_computes(monkeypatch, depths, variant):
    """Each drafting step's logits for depth k equal `forward(return_mtp=True)`'s depth-k logits at the same position
    of the sequence so far plus the k-1 tokens drafted before: what training computes is what drafts (through the
    MtpCache, its crops after rejections, and an elastic variant's prefix views)."""
    model = SlimMoeForCausalLM(tiny_config(num_mtp_heads=depths, elastic=ELASTIC)).eval()
    records = _record_drafts(monkeypatch)
    prompt = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(2))
    kwargs = {} if variant is None else {"elastic_variant": variant}
    out = model.generate(prompt, do_sample=False, max_new_tokens=20, use_mtp=True, **kwargs)
    assert torch.equal(out, model.generate(prompt, do_sample=False, max_new_tokens=20, **kwargs))
    assert len(records) >= 6 and model.mtp_stats.variant == (variant or "full")
    worst = 0.0
    with torch.no_grad():
        for input_ids, candidates, logits in records:
            n = input_ids.shape[1]
            for k in range(1, logits.shape[1] + 1):  # every depth, but where max_length leaves less room
                forward = model(candidates[:, : n + k - 1], return_mtp=True, return_mtp_logits=True, **kwargs)
                worst = max(worst, (forward.mtp_logits[k - 1][:, n - 2] - logits[:, k - 1]).abs().max().item())
    assert worst < 1e-5


def test_training_and_drafting_share_the_modules():
    model = SlimMoeForCausalLM(tiny_config()).train()
    drafter = mtp_drafter(model)
    assert drafter.layers is model.mtp.layers
    assert {id(p) for p in drafter.parameters()} <= {id(p) for p in model.parameters()}
    ids = torch.randint(1, V, (2, 9))
    model(ids, labels=ids).mtp_losses[1].backward()
    assert model.mtp.layers[1].eh_proj.weight.grad.abs().sum() > 0


# ---- sampling ----------------------------------------------------------------------------------------------------
def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampling_keeps_the_target_distribution():
    """Tokens 2 and 3 of a sampled continuation go through transformers' speculative sampling (the first comes from
    the prompt's forward, which drafts nothing). Over 1000 seeds their counts match the model's exact marginals
    (chi-square, 7 degrees of freedom, below the 0.999 quantile 24.3), while the untrained heads' draft marginal is
    far from the target (an unverified draft would be detected)."""
    torch.manual_seed(3)
    vocab = 8
    # a wider init than the default: distinct, non-uniform target and draft distributions (no rare tokens)
    model = SlimMoeForCausalLM(tiny_config(vocab_size=vocab, initializer_range=0.1)).eval()
    prompt = torch.tensor([[3, 5, 1, 6]])
    with torch.no_grad():
        p1 = model(prompt).logits[0, -1].softmax(-1)
        seq2 = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        out2 = model(seq2, return_mtp=True, return_mtp_logits=True)
        p2_given = out2.logits[:, -1].softmax(-1)  # [t1, t2]
        q2_given = out2.mtp_logits[0][:, -1].softmax(-1)  # the depth-1 draft of t2 given t1
        seq3 = torch.cat([seq2.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(vocab)[:, None]], dim=1)
        p3_given = model(seq3).logits[:, -1].softmax(-1).view(vocab, vocab, vocab)  # [t1, t2, t3]
    marginal2 = p1 @ p2_given
    marginal3 = torch.einsum("a,ab,abc->c", p1, p2_given, p3_given)
    draft2 = p1 @ q2_given
    n = 1000
    counts2, counts3 = torch.zeros(vocab), torch.zeros(vocab)
    accepted = 0
    for seed in range(n):
        torch.manual_seed(seed)
        out = model.generate(prompt, do_sample=True, top_k=0, max_new_tokens=3, use_mtp=True)
        counts2[out[0, -2]] += 1
        counts3[out[0, -1]] += 1
        accepted += sum(model.mtp_stats.accepted)
    assert _chi_square(counts2, marginal2) < 24.3
    assert _chi_square(counts3, marginal3) < 24.3
    assert min(marginal2.min(), marginal3.min()) * n > 50
    assert n * ((draft2 - marginal2) ** 2 / marginal2).sum() > 150  # the drafts alone would fail the test
    assert 0.3 * n < accepted < 1.9 * n  # speculative sampling ran: drafts were accepted and rejected


# ---- acceptance statistics ----------------------------------------------------------------------------------------
def test_acceptance_stats_arithmetic():
    stats = MtpAcceptanceStats(num_depths=2, drafted=[0, 2, 2, 2], accepted=[0, 2, 1, 0], new_tokens=[1, 3, 2, 1])
    assert stats.steps == 4 and stats.accepted_per_step == 1.0 and stats.tokens_per_step == 7 / 4
    assert stats.acceptance_rate == 3 / 6 and stats.depth_acceptance == [2 / 3, 1 / 3]
    assert json.loads(json.dumps(stats.to_dict()))["depth_acceptance"] == [2 / 3, 1 / 3]
    assert MtpAcceptanceStats(num_depths=1).to_dict()["acceptance_rate"] == 0.0


def test_acceptance_stats_of_a_generation(trained):
    models, successor = trained
    model = models[2]
    prompt = _walks(successor, 1, 5, torch.Generator().manual_seed(4))
    model.generate(prompt, do_sample=False, max_new_tokens=30, use_mtp=True)
    stats = model.mtp_stats
    assert stats.steps == len(stats.drafted) == len(stats.new_tokens) and sum(stats.new_tokens) == 30
    assert all(n == a + 1 for a, n in zip(stats.accepted, stats.new_tokens))
    assert stats.depth_acceptance[0] >= stats.depth_acceptance[1] > 0.5
    assert stats.tokens_per_step > 2.0  # ~3 tokens per forward of the model once the walk is recognised
    model.generate(prompt, do_sample=False, max_new_tokens=3, use_mtp=True)
    assert model.mtp_stats is not stats and sum(model.mtp_stats.new_tokens) == 3  # one record per call


# ---- bad input ---------------------------------------------------------------------------------------------------
def test_use_mtp_without_heads_is_one_sentence():
    model = SlimMoeForCausalLM(tiny_config(num_mtp_heads=0)).eval()
    with pytest.raises(ValueError) as error:
        model.generate(torch.randint(1, V, (1, 4)), max_new_tokens=3, use_mtp=True)
    message = str(error.value)
    assert message.startswith(
        "use_mtp=True needs MTP heads, but this SlimMoeForCausalLM has none (config.num_mtp_heads=0)"
    )
    assert message.endswith(".") and ". " not in message


def test_checkpoint_missing_declared_mtp_tensors_is_one_sentence_naming_them(tmp_path):
    SlimMoeForCausalLM(tiny_config()).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    kept = {k: v for k, v in state.items() if not k.startswith(("mtp.layers.1.", "mtp.layers.0.eh_proj"))}
    save_file(kept, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        SlimMoeForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert "num_mtp_heads=2" in message and "mtp.layers.0.eh_proj.weight" in message and "more" in message
    assert message.count(". ") == 0 and message.endswith(".")
    model = SlimMoeForCausalLM.from_pretrained(tmp_path, num_mtp_heads=0)  # what the message suggests
    assert model.mtp is None and model.config.num_mtp_heads == 0


# ---- elastic variants ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["medium", "small"])
def test_elastic_variant_decodes_with_mtp_at_run_time_and_loaded_as_one(tmp_path, variant):
    model = SlimMoeForCausalLM(tiny_config(elastic=ELASTIC)).eval()
    prompt = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(5))
    plain = model.generate(prompt, do_sample=False, max_new_tokens=12, elastic_variant=variant)
    mtp = model.generate(prompt, do_sample=False, max_new_tokens=12, elastic_variant=variant, use_mtp=True)
    assert torch.equal(mtp, plain)
    assert model.mtp_stats.variant == variant
    model.save_pretrained(tmp_path)
    loaded = SlimMoeForCausalLM.from_pretrained(tmp_path, elastic_variant=variant)
    assert loaded.config.num_mtp_heads == 2 and loaded.elastic_load_report["bytes_read"] > 0
    assert torch.equal(loaded.generate(prompt, do_sample=False, max_new_tokens=12, use_mtp=True), plain)
    assert loaded.mtp_stats.drafted[1:] == model.mtp_stats.drafted[1:]
    assert loaded.mtp_stats.accepted == model.mtp_stats.accepted


# ---- the shipped remote code ---------------------------------------------------------------------------------------
def test_remote_code_decodes_with_mtp_without_hf_slim(trained, tmp_path):
    models, successor = trained
    model = models[2]
    folder = save_for_hub(model, tmp_path / "export")
    prompt = _walks(successor, 1, 5, torch.Generator().manual_seed(6))
    expected = model.generate(prompt, do_sample=False, max_new_tokens=14, use_mtp=True)
    assert torch.equal(expected, model.generate(prompt, do_sample=False, max_new_tokens=14))
    torch.save({"prompt": prompt, "expected": expected, "accepted": model.mtp_stats.accepted}, tmp_path / "ref.pt")
    result = run_without_hf_slim(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        ref = torch.load({str(tmp_path / "ref.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        out = model.generate(ref["prompt"], do_sample=False, max_new_tokens=14, use_mtp=True)
        assert torch.equal(out, ref["expected"]), (out, ref["expected"])
        assert model.mtp_stats.accepted == ref["accepted"], model.mtp_stats
        print("REMOTE_MTP_OK", type(model.mtp_stats).__name__, model.mtp_stats.acceptance_rate)
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_MTP_OK MtpAcceptanceStats" in result.stdout


# ---- hf-slim's first MTP layout ------------------------------------------------------------------------------------
OLD_SHARED = {
    "mtp.fc.weight": (16, 32),
    "mtp.pre_fc_norm_embedding.weight": (16,),
    "mtp.pre_fc_norm_hidden.weight": (16,),
    "mtp.norm.weight": (16,),
}
# What hf-slim's previous modeling code (shared `fc` and norms, depths chaining the un-normed state) computed for the
# fixture below on `OLD_IDS`: per depth, the sum and absolute sum of `mtp_logits` and the logits at the last position.
OLD_IDS = [[3, 17, 5, 9, 30, 1, 12, 7]]
OLD_OUTPUTS = {
    1: (31.7233, 225.6067, [
        -0.3658, 2.1123, -1.4266, 0.3791, 0.7929, -0.8911, -1.2592, 0.7928, 0.0921, -1.2498, 1.6655, 0.4761, -0.0027,
        1.1266, -0.7916, 3.8099, -1.9624, 0.9227, 1.1104, 0.5305, -0.6286, -1.3792, 0.5806, 1.3857, 1.939, -0.1988,
        0.1413, 0.013, 2.1253, 0.4128, 0.5064, -0.0436,
    ]),
    2: (-45.3966, 192.1617, [
        0.762, -2.4577, 1.1602, -0.3521, -1.6777, -1.1089, -0.3698, -1.1552, 1.1318, 1.138, -0.8847, -0.5201, 1.0862,
        1.4029, -0.3266, -1.4945, 0.5302, -0.2307, -0.5673, -1.6959, -0.8549, 0.033, 1.5, -0.8002, -2.1902, -0.2945,
        0.3523, 1.4913, -1.6572, 0.9767, -0.0605, 1.7841,
    ]),
}


def _old_config(depths: int, **overrides) -> SlimMoeConfig:
    return SlimMoeConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
        num_mtp_heads=depths, max_position_embeddings=64, **overrides,
    )


def _value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
    return 1 + 0.2 * x if name.endswith("norm.weight") else 0.3 * x


def _old_checkpoint(folder, depths: int, **overrides):
    """A checkpoint in the old layout: the decoder, each depth's block under `mtp.layers.{k}.`, and `OLD_SHARED`."""
    config = _old_config(depths, **overrides)
    with torch.device("meta"):
        names = {k: tuple(v.shape) for k, v in SlimMoeForCausalLM(config).state_dict().items()}
    names = {k: s for k, s in names.items() if not k.startswith("mtp.")}
    with torch.device("meta"):
        block = SlimMoeForCausalLM(_old_config(0)).model.layers[1].state_dict()
    for k in range(depths):
        names.update({f"mtp.layers.{k}.{key}": tuple(v.shape) for key, v in block.items()})
    names.update(OLD_SHARED)
    config.save_pretrained(folder)
    save_file({k: _value(k, s) for k, s in names.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("depths", [1, 2])
def test_old_layout_checkpoint_loads_with_the_same_mtp_outputs(tmp_path, depths):
    folder = _old_checkpoint(tmp_path / "old", depths)
    model = SlimMoeForCausalLM.from_pretrained(folder).eval()
    # with two depths the old arithmetic (un-normed chaining, one shared head norm) is kept; with one they agree
    assert model.config.mtp_shared_norm == (depths > 1)
    ids = torch.tensor(OLD_IDS)
    with torch.no_grad():
        out = model(ids, return_mtp=True, return_mtp_logits=True)
    for k, logits in enumerate(out.mtp_logits, start=1):
        total, absolute, last = OLD_OUTPUTS[k]
        assert logits.sum().item() == pytest.approx(total, abs=2e-3)
        assert logits.abs().sum().item() == pytest.approx(absolute, abs=2e-3)
        torch.testing.assert_close(logits[0, -1], torch.tensor(last), atol=2e-4, rtol=0)
    assert torch.equal(
        model.generate(ids, do_sample=False, max_new_tokens=8, use_mtp=True),
        model.generate(ids, do_sample=False, max_new_tokens=8),
    )
    # saved again it is in the new layout (and loads without conversion)
    model.save_pretrained(tmp_path / "new")
    names = set(load_file(tmp_path / "new" / "model.safetensors"))
    assert not names & {"mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"}
    assert {f"mtp.layers.{k}.eh_proj.weight" for k in range(depths)} <= names
    assert ("mtp.norm.weight" in names) == (depths > 1)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "new").eval()
    with torch.no_grad():
        for a, b in zip(again(ids, return_mtp=True, return_mtp_logits=True).mtp_logits, out.mtp_logits, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_old_layout_checkpoint_loads_as_an_elastic_variant(tmp_path):
    folder = _old_checkpoint(tmp_path, 2, elastic={"variants": {"small": {"hidden_size": 8, "num_experts": 2}}})
    full = SlimMoeForCausalLM.from_pretrained(folder).eval()
    small = SlimMoeForCausalLM.from_pretrained(folder, elastic_variant="small")
    assert small.config.mtp_shared_norm and small.config.hidden_size == 8
    ids = torch.tensor(OLD_IDS)
    with torch.no_grad():
        runtime = full(ids, return_mtp=True, return_mtp_logits=True, elastic_variant="small").mtp_logits
        loaded = small(ids, return_mtp=True, return_mtp_logits=True).mtp_logits
    for a, b in zip(loaded, runtime, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert torch.equal(
        small.generate(ids, do_sample=False, max_new_tokens=6, use_mtp=True),
        full.generate(ids, do_sample=False, max_new_tokens=6, elastic_variant="small"),
    )
