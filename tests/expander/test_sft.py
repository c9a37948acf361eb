import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from krea2_core.artifacts import ArtifactError, publish, read_manifest
from krea2_core.data.schemas import ExpanderPairs, write_table
from krea2_core.expander.config import ExpanderSFTConfig, ExpansionConfig
from krea2_core.expander.data import EXPANDER_PAIRS_FILE
from krea2_core.expander.format import answer
from krea2_core.expander.model import MICRO_BATCH, expand, load_expander, prompt_texts
from krea2_core.expander.sft import (IGNORE, Example, ExpanderSFTSettings, backward_batch, batch_rows, collate,
                                     encode_pairs, run_expander_sft)

PAIRS = [("p0", "a red cube", "one red cube", "A big red cube."),
         ("p1", "two blue balls", "two blue spheres", "Two small blue spheres.")]
EVAL = ExpansionConfig(max_new_tokens=16)


def pairs_table(rows: list[tuple[str, str, str, str]], splits: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": [r[0] for r in rows], "user": [r[1] for r in rows], "thinking": [r[2] for r in rows],
                         "expansion": [r[3] for r in rows], "style": "other", "photo_medium": False, "split": splits,
                         "flags": ""})


def pairs_artifact(tmp_path: Path, table: pd.DataFrame) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir()
    write_table(table, staging / EXPANDER_PAIRS_FILE, ExpanderPairs)
    publish(staging, tmp_path / "pairs", kind="expander_data")
    return tmp_path / "pairs"


@pytest.fixture(autouse=True)
def one_thread():
    # the tiny model's matrices are small: two intra-op threads on a busy 2-core machine only thrash (3x slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_llm: Path):
    return load_expander(str(tiny_llm), "cpu")[0]


def test_labels_cover_the_answer_and_eos_only(tokenizer) -> None:
    examples, cut = encode_pairs(tokenizer, pairs_table(PAIRS, ["train", "train"]), max_tokens=192)
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    assert cut == 0 and batch["input_ids"].shape[0] == 2
    for row, (_, user, thinking, expansion) in enumerate(PAIRS):
        prompt = tokenizer(prompt_texts(tokenizer, [user])[0], add_special_tokens=False)["input_ids"]
        target = [*tokenizer(answer(thinking, expansion), add_special_tokens=False)["input_ids"],
                  tokenizer.eos_token_id]
        labels, ids = batch["labels"][row].tolist(), batch["input_ids"][row].tolist()
        assert ids[:len(prompt)] == prompt and labels[:len(prompt)] == [IGNORE] * len(prompt)
        end = len(prompt) + len(target)
        assert labels[len(prompt):end] == target and labels[end:] == [IGNORE] * (len(labels) - end)
        assert batch["attention_mask"][row].sum() == end


def test_long_examples_are_cut_and_counted(tokenizer) -> None:
    long = ("p2", "a scene", "lots of detail", " ".join(["a small green triangle near the top left"] * 20))
    table = pairs_table([*PAIRS, long], ["train"] * 3)
    examples, cut = encode_pairs(tokenizer, table, max_tokens=90)
    assert cut == 1 and len(examples[2].ids) == 90 and examples[2].ids[-1] != tokenizer.eos_token_id
    assert all(len(e.ids) < 90 for e in examples[:2])
    with pytest.raises(ValueError, match="pair 'p0': its prompt alone"):
        encode_pairs(tokenizer, table, max_tokens=40)
    assert encode_pairs(tokenizer, table.iloc[:0], max_tokens=90) == ([], 0)  # e.g. no val split


def test_micro_batches_give_the_one_pass_gradient(tiny_llm: Path) -> None:
    tokenizer, model = load_expander(str(tiny_llm), "cpu")
    rows = [(f"p{i}", f"{i + 1} red cubes" + " please" * i, "count them", "Red cubes. " * (i + 1)) for i in range(6)]
    examples, _ = encode_pairs(tokenizer, pairs_table(rows, ["train"] * 6), max_tokens=192)
    assert len(examples) > MICRO_BATCH  # more than one pass, of unequal answer lengths
    batch = collate(examples, tokenizer.pad_token_id, torch.device("cpu"))
    model(**batch).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss, tokens, n_answer = backward_batch(model, examples, tokenizer.pad_token_id)
    assert tokens == int(batch["attention_mask"].sum()) and n_answer == int((batch["labels"][:, 1:] != IGNORE).sum())
    with torch.no_grad():
        assert loss == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_batch_without_answer_tokens_is_a_clear_error(tiny_llm: Path) -> None:
    _, model = load_expander(str(tiny_llm), "cpu")
    with pytest.raises(ValueError, match="no answer tokens"):
        backward_batch(model, [Example(ids=[1, 2, 3], prompt_len=3)] * 2, pad_id=0)


def test_batches_are_a_function_of_seed_and_step() -> None:
    assert batch_rows(50, 8, 0, 3).tolist() == batch_rows(50, 8, 0, 3).tolist()
    assert batch_rows(50, 8, 0, 3).tolist() != batch_rows(50, 8, 0, 4).tolist()
    assert len(set(batch_rows(50, 8, 1, 1).tolist())) == 8 and len(batch_rows(2, 8, 0, 1)) == 8


def test_sft_memorises_pairs_and_publishes_a_loadable_expander(tiny_llm: Path, tmp_path: Path) -> None:
    table = pairs_table([*PAIRS, ("v0", "a green cone", "one green cone", "A green cone.")], ["train", "train", "val"])
    config = ExpanderSFTConfig(model_id=str(tiny_llm), steps=40, batch_size=2, lr=1e-2, warmup_steps=2,
                               eval_prompts=3, log_every=10, device="cpu")
    out = run_expander_sft({"pairs": pairs_artifact(tmp_path, table)}, ExpanderSFTSettings(config, EVAL, resolution=64))

    manifest = read_manifest(out, kind="expander")
    assert manifest.counts.items() >= {"train_pairs": 2, "val_pairs": 1, "truncated": 0, "steps": 40}.items()
    assert json.loads((out / "expander.json").read_text()) == {"format": "think-then-expand",
                                                               "base_model": str(tiny_llm)}
    curve = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == list(range(41)) and "val.loss" in curve[0] and "val.loss" in curve[-1]
    assert curve[-1]["loss"] < 0.1 * curve[1]["loss"] and curve[-1]["val.loss"] < curve[0]["val.loss"]
    assert {"lr", "grad_norm", "tokens", "answer_tokens"} <= set(curve[1])
    report = json.loads((out / "eval.json").read_text())
    assert report["prompts"] == 3 and {len(report[k]["examples"]) for k in ("base", "sft")} == {3}
    assert report["base"]["well_formed"] == 0.0  # a random model never closes a thinking trace

    memorised = expand([p[1] for p in PAIRS], str(out), device="cpu", max_new_tokens=24)
    assert [(e.thinking, e.text, e.well_formed) for e in memorised] == [(p[2], p[3], True) for p in PAIRS]


def test_bad_inputs_are_clear_errors(tiny_llm: Path, tmp_path: Path) -> None:
    config = ExpanderSFTConfig(model_id=str(tiny_llm), steps=2, warmup_steps=0, device="cpu")
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        run_expander_sft({"pairs": tmp_path / "missing"}, ExpanderSFTSettings(config, EVAL, resolution=64))
    only_val = pairs_artifact(tmp_path, pairs_table(PAIRS, ["val", "val"]))
    with pytest.raises(ValueError, match="no 'train' rows"):
        run_expander_sft({"pairs": only_val}, ExpanderSFTSettings(config, EVAL, resolution=64))
