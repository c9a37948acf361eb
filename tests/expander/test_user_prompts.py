import re

import numpy as np
import pytest

from krea2_core.expander.faithfulness import parse_requirements
from krea2_core.expander.user_prompts import TEMPLATES, user_prompts
from krea2_core.world.captions import captions, rubric_for
from krea2_core.world.config import SceneDomainConfig
from krea2_core.world.scene import BACKGROUNDS, ROWS, COLS, SIZES, sample_scene

SCENES = SceneDomainConfig(max_shapes=5, text_prob=0.5)


def _scenes(n: int, seed: int, scenes: SceneDomainConfig) -> list:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, 64, 64, **scenes.sample_kwargs()) for _ in range(n)]


def test_deterministic_per_seed() -> None:
    a, b = user_prompts(30, 5, SCENES, 64), user_prompts(30, 5, SCENES, 64)
    assert a == b and len(a) == 30
    assert [p.text for p in user_prompts(30, 6, SCENES, 64)] != [p.text for p in a]
    assert user_prompts(0, 5, SCENES, 64) == []


def test_rubric_is_what_the_text_states_of_its_scene() -> None:
    prompts, scenes = user_prompts(300, 1, SCENES, 64), _scenes(300, 1, SCENES)
    for prompt, scene in zip(prompts, scenes, strict=True):
        assert prompt.rubric == parse_requirements(prompt.text)
        stated = {r.kind for r in prompt.rubric}
        assert {"count", "color"} <= stated <= {"count", "color", "background", "text"}
        assert prompt.rubric == tuple(r for r in rubric_for(scene) if r.kind in stated), prompt.text
    # under-specified: the background is mentioned sometimes, the word usually, the scene's long caption always
    share = np.mean([any(r.kind == "background" for r in p.rubric) for p in prompts])
    assert 0.2 < share < 0.5
    with_text = [p for p, s in zip(prompts, scenes, strict=True) if s.text]
    assert 0.5 < np.mean([any(r.kind == "text" for r in p.rubric) for p in with_text]) < 0.9
    assert np.mean([len(p.text) for p in prompts]) < 0.6 * np.mean([len(captions(s)["long"]) for s in scenes])


def test_templates_vary_and_never_state_positions_or_sizes() -> None:
    prompts = user_prompts(200, 2, SCENES, 64)
    used = {t for t in TEMPLATES for p in prompts
            if re.fullmatch(re.escape(t).replace(r"\{what\}", ".+").replace(r"\{extra\}", ".*"), p.text.lower())}
    assert len(used) >= 6
    assert len({p.text for p in prompts}) > 190
    forbidden = re.compile(rf"\b({'|'.join((*ROWS, *COLS, *SIZES))})\b", re.IGNORECASE)
    for p in prompts:
        bare = p.text
        for bg in BACKGROUNDS:
            bare = bare.replace(bg, "")
        assert not forbidden.search(bare), p.text


def test_scene_domain_is_respected() -> None:
    only_red_circles = SceneDomainConfig(max_shapes=2, text_prob=0.0,
                                         weights={"kind": {"square": 0, "triangle": 0},
                                                  "color": {c: 0 for c in ("orange", "yellow", "green", "cyan",
                                                                           "blue", "purple")}})
    for p in user_prompts(20, 3, only_red_circles, 32):
        assert re.search(r"red circles?", p.text) and "square" not in p.text and '"' not in p.text


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n >= 0"):
        user_prompts(-1, 0, SCENES, 64)
    with pytest.raises(ValueError, match="resolution"):
        user_prompts(1, 0, SCENES, 0)
