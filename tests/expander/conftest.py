"""The tiny random LLM every expander test loads by directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from expander._llm import save_tiny_qwen3


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory of a ~1.6 M-parameter random Qwen3 model + tokenizer: pass it as a ``model_id``."""
    return save_tiny_qwen3(tmp_path_factory.mktemp("tiny-qwen3") / "model")
