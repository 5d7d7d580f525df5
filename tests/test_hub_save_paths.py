"""Every save path of a SlimMoe model ships its code (`register_for_auto_class`): `save_pretrained`, Trainer
checkpoints, `trainer.save_model`, a distillation stage, a partially loaded variant and a PEFT-merged model each write
a folder that `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` loads where hf_slim cannot be
imported, with the logits of the model that wrote it."""

import json
import os

import pytest
import torch
from datasets import Dataset
from test_distillation import distill_args, tiny_config, tiny_student, tiny_tokenizer
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_slim.data import packed_lm_dataset
from hf_slim.hub import AUTO_MAP, REMOTE_CODE_FILES, run_without_hf_slim
from hf_slim.models.slim_moe import SlimMoeConfig, SlimMoeForCausalLM
from trainers import SlimDistillationTrainer


VOCAB = 128
PATHS = (
    "save_pretrained", "trainer_checkpoint", "trainer_save_model", "distill_stage", "elastic_variant", "peft_merged",
)  # fmt: skip


def _model(**overrides) -> SlimMoeForCausalLM:
    fields = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=8, mlp_layer_types=["sparse", "dense"], num_mtp_heads=1,
    )  # fmt: skip
    fields.update(overrides)
    return SlimMoeForCausalLM(SlimMoeConfig(**fields)).eval()


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 7), generator=torch.Generator().manual_seed(7))


def _trainer_paths(root) -> dict:
    """A `transformers.Trainer` run saving `checkpoint-2/` (`save_steps`), then `trainer.save_model`."""
    model = _model()
    rows = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0)).tolist()
    args = TrainingArguments(
        output_dir=str(root / "trainer"), max_steps=2, save_strategy="steps", save_steps=2, learning_rate=1e-2,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows, "labels": rows}))
    trainer.train()
    trainer.save_model(str(root / "trainer_final"))
    return {
        "trainer_checkpoint": (root / "trainer" / "checkpoint-2", model),
        "trainer_save_model": (root / "trainer_final", model),
    }


def _distill_stage(root) -> tuple:
    """What `hf-slim distill` writes per stage (`trainers/progressive.py`): `SlimDistillationTrainer.save_model`."""
    texts, tokenizer = tiny_tokenizer()
    dataset = packed_lm_dataset(texts[:40], tokenizer, 32)
    torch.manual_seed(0)
    teacher = SlimMoeForCausalLM(tiny_config(len(tokenizer))).eval()
    student = tiny_student(len(tokenizer))
    trainer = SlimDistillationTrainer(
        model=student, teacher_model=teacher, args=distill_args(root / "distill", max_steps=1), train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    trainer.save_model(str(root / "distill_stage"))
    return root / "distill_stage", student


def _elastic_variant(root) -> tuple:
    """`save_pretrained` of a variant loaded with `from_pretrained(..., elastic_variant=...)`."""
    variants = {"small": {"hidden_size": 16, "num_attention_heads": 2, "num_experts": 2, "num_experts_per_tok": 1}}
    _model(elastic={"variants": variants}).save_pretrained(root / "elastic")
    small = AutoModelForCausalLM.from_pretrained(root / "elastic", elastic_variant="small")
    small.save_pretrained(root / "elastic_variant")
    return root / "elastic_variant", small


def _peft_merged(root) -> tuple:
    """`save_pretrained` of `merge_and_unload()` after LoRA on the attention projections."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # lora_B starts at zero: make the merge change the weights
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    merged = peft_model.merge_and_unload().eval()
    assert type(merged) is SlimMoeForCausalLM
    merged.save_pretrained(root / "peft_merged")
    return root / "peft_merged", merged


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    """`{path name: (folder, input ids, logits of the model that wrote it)}`."""
    root = tmp_path_factory.mktemp("save_paths")
    torch.manual_seed(0)
    plain = _model()
    plain.save_pretrained(root / "save_pretrained")
    folders = {"save_pretrained": (root / "save_pretrained", plain), **_trainer_paths(root)}
    folders.update(distill_stage=_distill_stage(root), elastic_variant=_elastic_variant(root))
    folders["peft_merged"] = _peft_merged(root)
    out = {}
    for name, (folder, model) in folders.items():
        ids = _ids(model.config.vocab_size)
        with torch.no_grad():
            out[name] = (folder, ids, model.eval()(ids).logits)
    return out


@pytest.mark.parametrize("name", PATHS)
def test_save_path_ships_the_code_and_auto_map(saved, name):
    folder = saved[name][0]
    assert {file for file in os.listdir(folder) if file.endswith(".py")} == set(REMOTE_CODE_FILES)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_every_save_path_loads_without_hf_slim(saved, tmp_path):
    torch.save({name: (str(folder), ids, logits) for name, (folder, ids, logits) in saved.items()}, tmp_path / "ref.pt")
    result = run_without_hf_slim(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        for name, (folder, ids, logits) in torch.load({str(tmp_path / "ref.pt")!r}).items():
            model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), (name, type(model).__module__)
            with torch.no_grad():
                torch.testing.assert_close(model(ids).logits, logits, atol=1e-6, rtol=0, msg=name)
            print("LOADED", name)
        base = AutoModel.from_pretrained({str(saved["save_pretrained"][0])!r}, trust_remote_code=True)
        print("BASE", type(base).__name__)
        # the shipped code saves again what it loaded, code and auto_map included
        model.save_pretrained({str(tmp_path / "again")!r})
        again = AutoModelForCausalLM.from_pretrained({str(tmp_path / "again")!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            assert torch.equal(again(ids).logits, model(ids).logits)
        print("AGAIN", sorted(again.config.auto_map.items()))
        """,
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(f"LOADED {name}" in result.stdout for name in PATHS), result.stdout
    assert "BASE SlimMoeModel" in result.stdout
    assert f"AGAIN {sorted(AUTO_MAP.items())}" in result.stdout
    assert {file for file in os.listdir(tmp_path / "again") if file.endswith(".py")} == set(REMOTE_CODE_FILES)


def test_config_alone_and_a_wrapped_model_ship_the_code(tmp_path):
    model = _model()
    model.config.save_pretrained(tmp_path / "config")
    # FSDP2 swaps a model's class for a subclass defined in torch (FSDPSlimMoeForCausalLM): the family's code ships
    model.__class__ = type("FSDPSlimMoeForCausalLM", (SlimMoeForCausalLM,), {"__module__": "torch.distributed.fsdp"})
    model.save_pretrained(tmp_path / "wrapped")
    for folder in (tmp_path / "config", tmp_path / "wrapped"):
        assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
        assert {file for file in os.listdir(folder) if file.endswith(".py")} == set(REMOTE_CODE_FILES)
