from pathlib import Path

import pytest
import torch

from krea2_core.artifacts import ArtifactError, publish
from krea2_core.captioning.config import SMOLLM2_GGUF
from krea2_core.captioning.llm import load_causal_lm
from krea2_core.cli import main
from krea2_core.expander import model as expander_model
from krea2_core.expander.format import Expansion
from krea2_core.expander.model import (Completions, expand, load_expander, positions, sample_completions,
                                       save_expander, token_logprobs, until_first_eos)

PROMPTS = ["a red cube", "three small blue spheres on a white background please"]


@pytest.fixture(scope="module")
def loaded(tiny_llm: Path) -> tuple:
    tokenizer, model = load_expander(str(tiny_llm), "cpu")
    return tokenizer, model.eval()


def _sample(loaded: tuple, seed: int, n: int = 2, **kwargs) -> Completions:
    return sample_completions(*loaded, PROMPTS, n=n, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=seed,
                              **kwargs)


def test_load_expander_gives_a_fresh_trainable_copy(tiny_llm: Path) -> None:
    _, first = load_expander(str(tiny_llm), "cpu")
    _, second = load_expander(str(tiny_llm), "cpu")
    assert first.training and all(p.requires_grad for p in first.parameters())
    assert first is not second and first is not load_causal_lm(str(tiny_llm), "cpu")[1]
    with torch.no_grad():
        next(first.parameters()).add_(1.0)
    assert not torch.equal(next(first.parameters()), next(second.parameters()))


def test_save_then_load_round_trips_weights_and_tokenizer(loaded: tuple, tmp_path: Path) -> None:
    tokenizer, model = loaded
    save_expander(tokenizer, model, tmp_path / "out")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    tokenizer2, model2 = load_expander(str(tmp_path / "out"), "cpu")
    assert tokenizer2("a red cube")["input_ids"] == tokenizer("a red cube")["input_ids"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values(),
                                                 strict=True))


def test_sampling_is_seeded_and_prompt_major(loaded: tuple) -> None:
    first, again, other = _sample(loaded, 3), _sample(loaded, 3), _sample(loaded, 4)
    assert torch.equal(first.input_ids, again.input_ids) and first.texts == again.texts
    assert not torch.equal(first.input_ids, other.input_ids)
    tokenizer, _ = loaded
    prompt_len = first.input_ids.shape[1] - 6
    for i, user in enumerate(PROMPTS):  # rows 2i and 2i+1 both continue prompt i (left-padded)
        expected = tokenizer(expander_model.prompt_texts(tokenizer, [user])[0], add_special_tokens=False)["input_ids"]
        for row in (2 * i, 2 * i + 1):
            real = first.input_ids[row, :prompt_len][first.attention_mask[row, :prompt_len].bool()]
            assert real.tolist() == expected
    assert not first.completion_mask[:, :prompt_len].any()
    greedy = _sample(loaded, 0, greedy=True)
    assert torch.equal(greedy.input_ids[0], greedy.input_ids[1]) and greedy.texts[2] == greedy.texts[3]


def test_completion_mask_stops_at_the_first_eos(loaded: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer, model = loaded
    eos, word = tokenizer.eos_token_id, tokenizer("cube", add_special_tokens=False)["input_ids"][0]
    generated = torch.tensor([[word, word, eos, eos, eos], [word, word, word, word, word]])
    real_generate = model.generate

    def fake_generate(input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.cat([input_ids, generated], dim=1)

    monkeypatch.setattr(model, "generate", fake_generate)
    out = sample_completions(tokenizer, model, PROMPTS, n=1, temperature=1.0, top_p=1.0, max_new_tokens=5, seed=0)
    monkeypatch.setattr(model, "generate", real_generate)
    assert out.completion_mask[:, -5:].tolist() == [[True, True, True, False, False], [True] * 5]
    assert torch.equal(out.attention_mask[:, -5:], out.completion_mask[:, -5:].long())
    assert out.texts == ["cubecube", "cube" * 5]  # the EOS is marked but not decoded
    assert until_first_eos(torch.tensor([[eos, word]]), {eos}).tolist() == [[True, False]]


def test_token_logprobs_match_a_log_softmax_gather(loaded: tuple) -> None:
    _, model = loaded
    c = _sample(loaded, 1)
    got = token_logprobs(model, c.input_ids, c.attention_mask)
    with torch.no_grad():
        logits = model(input_ids=c.input_ids, attention_mask=c.attention_mask,
                       position_ids=positions(c.attention_mask)).logits
    manual = torch.log_softmax(logits[:, :-1], -1).gather(-1, c.input_ids[:, 1:, None])[..., 0]
    assert got.shape == c.input_ids.shape and torch.all(got[:, 0] == 0)
    torch.testing.assert_close(got[:, 1:], manual, rtol=1e-5, atol=1e-5)
    assert got.requires_grad  # RL backpropagates through it


def test_greedy_completions_are_the_argmax_of_token_logprobs_positions(loaded: tuple) -> None:
    # generate and token_logprobs place left-padded rows at the same positions
    _, model = loaded
    c = _sample(loaded, 0, n=1, greedy=True)
    with torch.no_grad():
        logits = model(input_ids=c.input_ids, attention_mask=c.attention_mask,
                       position_ids=positions(c.attention_mask)).logits
    assert torch.equal(logits[:, :-1].argmax(-1)[c.completion_mask[:, 1:]], c.input_ids[:, 1:][c.completion_mask[:, 1:]])


def test_expand_parses_answers_and_falls_back_on_malformed(tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    random_model = expand(PROMPTS, str(tiny_llm), n=2, max_new_tokens=4, device="cpu")
    assert [e.prompt for e in random_model] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert all(isinstance(e, Expansion) and not e.well_formed and e.text == e.prompt for e in random_model)

    def answers(tokenizer, model, user_prompts, **kwargs) -> Completions:
        return Completions(torch.zeros(0), torch.zeros(0), torch.zeros(0),
                           [f"<think>wants {u}</think>\nA big {u}." for u in user_prompts])

    monkeypatch.setattr(expander_model, "sample_completions", answers)
    parsed = expand(PROMPTS, str(tiny_llm), device="cpu")
    assert parsed[0] == Expansion(PROMPTS[0], "wants a red cube", "A big a red cube.", well_formed=True)


def test_bad_model_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_expander(str(tmp_path / "missing"), "cpu")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_expander(str(tmp_path), "cpu")
    other = tmp_path / "other"
    other.mkdir()
    publish(other, tmp_path / "pairs", kind="expander_data")
    with pytest.raises(ArtifactError, match="expected 'expander'"):
        load_expander(str(tmp_path / "pairs"), "cpu")


def test_cli_expand_prints_expansions(tiny_llm: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["expand", "--model", str(tiny_llm), "--n", "2", "--sample", "--max-new-tokens", "4",
                 "--show-thinking", "--device", "cpu", *PROMPTS]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"prompt: {PROMPTS[0]}" and lines[5] == f"prompt: {PROMPTS[1]}"
    assert lines[1] == "  1. think: " and lines[2] == f"  1. {PROMPTS[0]}  [malformed answer: the prompt is kept]"
    assert main(["expand", "--model", str(tmp_path / "missing"), "a red cube"]) == 2
    assert "krea2: error: expander model" in capsys.readouterr().err


@pytest.mark.slow
def test_the_offline_smollm2_loads_trainable_and_saves_as_safetensors(tmp_path: Path) -> None:
    tokenizer, model = load_expander(SMOLLM2_GGUF, "cpu")
    assert model.training and not model.is_quantized  # de-quantised GGUF weights: an ordinary float model
    save_expander(tokenizer, model, tmp_path / "smollm2")
    _, again = load_expander(str(tmp_path / "smollm2"), "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
