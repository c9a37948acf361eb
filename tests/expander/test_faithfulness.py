import math

import numpy as np
import pytest

from krea2_core.expander.config import ExpansionConfig
from krea2_core.expander.faithfulness import faithfulness, gate_failures, judge, parse_requirements
from krea2_core.expander.format import Expansion
from krea2_core.world.captions import Prompt, Requirement, captions, rubric_for
from krea2_core.world.scene import sample_scene

R = Requirement.make
STATED = {"short": ("count", "color"), "medium": ("count", "color", "background", "text"),
          "long": ("count", "color", "background", "text")}


def test_every_caption_variant_parses_to_the_rubric_it_states() -> None:
    rng = np.random.default_rng(0)
    for _ in range(400):
        scene = sample_scene(rng, 64, 64, max_shapes=9, text_prob=0.5)
        rubric, texts = rubric_for(scene), captions(scene)
        for variant, kinds in STATED.items():
            assert parse_requirements(texts[variant]) == tuple(r for r in rubric if r.kind in kinds), texts[variant]


@pytest.mark.parametrize("text, n", [("a red circle", 1), ("an orange circle", 1), ("one red circle", 1),
                                     ("two red circles", 2), ("Nine red circles", 9), ("3 red circles", 3),
                                     ("12 red circles", 12), ("two small bright red circles", 2),
                                     ("the red circle", 1), ("red circle", 1)])
def test_numbers_articles_and_plurals(text: str, n: int) -> None:
    color = "orange" if "orange" in text else "red"
    assert parse_requirements(text) == (R("count", shape="any", n=n), R("count", shape="circle", n=n),
                                        R("color", shape="circle", color=color, n=n))


def test_groups_sum_per_kind_and_in_total() -> None:
    reqs = parse_requirements("two blue squares, a red circle and 3 green squares on grey sand")
    assert reqs == (R("count", shape="any", n=6), R("count", shape="square", n=5), R("count", shape="circle", n=1),
                    R("color", shape="square", color="blue", n=2), R("color", shape="circle", color="red", n=1),
                    R("color", shape="square", color="green", n=3), R("background", background="grey sand"))


@pytest.mark.parametrize("text", ['the word "SALE"', 'a sign that reads "SALE"', 'it says "sale"', "says “Sale”"])
def test_quoted_words_are_text_in_upper_case(text: str) -> None:
    assert parse_requirements(text) == (R("text", text="SALE"),)


def test_references_restate_nothing_and_conflicting_counts_state_both() -> None:
    text = ("Two blue squares and a red circle. The red circle is small; two blue squares: a large one and a small "
            "one. Each blue square is flat, the blue squares shine and blue squares are nice.")
    assert parse_requirements(text) == parse_requirements("two blue squares and a red circle")
    # a different count is a second claim about the group: no total is stated for its kind nor overall
    assert parse_requirements("a red circle, a blue square and three red circles") == (
        R("count", shape="square", n=1), R("color", shape="circle", color="red", n=1),
        R("color", shape="circle", color="red", n=3), R("color", shape="square", color="blue", n=1))
    # a plural without a number names the group but states no count
    assert parse_requirements("red circles and a blue square") == (
        R("count", shape="square", n=1), R("color", shape="square", color="blue", n=1))


@pytest.mark.parametrize("text", ["", "a cozy cabin in the woods at dusk", "reddish circles", "three circles",
                                  "a red balloon", "a large one in the top left", "it's a 'quoted' thing"])
def test_unrelated_text_states_nothing(text: str) -> None:
    assert parse_requirements(text) == ()


USER = parse_requirements('two red circles and a blue square on grey sand with the word "SALE"')


def test_faithfulness_on_hand_cases() -> None:
    assert len(USER) == 7
    full = ('A picture of two large red circles and a small blue square on a grey sand background. The red circles '
            'sit in the top row. The word "SALE" is written below.')
    assert faithfulness(USER, full) == 1.0
    dropped = "two red circles on a grey sand background, the word \"SALE\""  # blue square, totals of any/square
    assert faithfulness(USER, dropped) == pytest.approx(4 / 7)  # count(circle), color(red circle), bg, text
    changed = 'three red circles and a blue square on grey sand, the word "SALE"'
    assert faithfulness(USER, changed) == pytest.approx(4 / 7)  # the any/circle counts and the red group change
    assert faithfulness(USER, "a cozy cabin") == 0.0
    assert math.isnan(faithfulness((), "anything"))
    with pytest.raises(ValueError, match="position"):
        faithfulness([R("position", shape="circle", color="red", position="center")], "a red circle")


def _expansion(text: str, thinking: str = "they want shapes", well_formed: bool = True) -> Expansion:
    return Expansion("user", thinking, text, well_formed)


GOOD = 'Two red circles and a small blue square in the center on a grey sand background; the word "SALE" on top.'


@pytest.mark.parametrize("text, thinking, well_formed, config, reasons", [
    (GOOD, "ok", True, ExpansionConfig(), []),
    # adding positions and sizes passes
    ('two large red circles in the top left and a tiny blue square at the bottom on grey sand, "SALE" above', "",
     True, ExpansionConfig(), []),
    (GOOD, "", False, ExpansionConfig(), ["malformed"]),
    (GOOD, "", True, ExpansionConfig(max_words=10), ["too_long"]),
    (GOOD + " A Gun lies nearby.", "", True, ExpansionConfig(), ["blocked_word"]),
    (GOOD, "maybe some blood", True, ExpansionConfig(), ["blocked_word"]),  # thinking is checked too
    (GOOD + " Gunmetal tones.", "", True, ExpansionConfig(), []),  # whole words only
    # an extra group also changes the user's total count
    (GOOD + " A green triangle.", "", True, ExpansionConfig(), ["unprompted_shape", "contradiction"]),
    (GOOD.replace("grey sand", "beige gradient"), "", True, ExpansionConfig(), ["contradiction"]),
    (GOOD.replace("SALE", "OPEN"), "", True, ExpansionConfig(), ["contradiction"]),
    (GOOD.replace("Two", "Three"), "", True, ExpansionConfig(), ["contradiction"]),
    (GOOD + " Later three red circles.", "", True, ExpansionConfig(), ["contradiction"]),
    (GOOD.replace("Two red", "Three red") + " A green triangle.", "kill", False, ExpansionConfig(max_words=5),
     ["malformed", "too_long", "blocked_word", "unprompted_shape", "contradiction"]),
])
def test_gate_reasons(text: str, thinking: str, well_formed: bool, config: ExpansionConfig,
                      reasons: list[str]) -> None:
    assert gate_failures(USER, _expansion(text, thinking, well_formed), config) == reasons


def test_gate_passes_what_the_user_left_open() -> None:
    user = parse_requirements("a red circle")
    added = 'a red circle on lavender haze with the word "MOON"'
    assert gate_failures(user, _expansion(added), ExpansionConfig()) == []
    # shapes are only checked when the user named a group
    user = parse_requirements('something with the word "SALE"')
    assert gate_failures(user, _expansion('a green triangle and the word "SALE"'), ExpansionConfig()) == []
    assert gate_failures(user, _expansion("a green triangle"), ExpansionConfig()) == []  # adds nothing contrary


def test_judge_summarises_faithfulness_and_gates_per_prompt() -> None:
    prompts = [Prompt("two red circles", parse_requirements("two red circles")),
               Prompt("anything", ()),  # no requirement: faithfulness undefined, left out of the mean
               Prompt("a blue square on grey sand", parse_requirements("a blue square on grey sand"))]
    expansions = [Expansion(p.text, "", text, True) for p, text in zip(prompts, (
        "two red circles, large, on the left", "a calm scene",
        "a blue square on lavender haze"), strict=True)]  # the last keeps the square, contradicts the background
    judged = judge(prompts, expansions, ExpansionConfig())
    assert judged.faithfulness[0] == 1.0 and math.isnan(judged.faithfulness[1])
    assert judged.faithfulness[2] == 0.75  # 3 of its 4 requirements stated
    assert judged.mean_faithfulness == 0.875
    assert judged.gates == [[], [], ["contradiction"]] and judged.gate_pass == pytest.approx(2 / 3)
    assert judge(prompts[1:2], expansions[1:2], ExpansionConfig()).mean_faithfulness is None
    with pytest.raises(ValueError, match="one expansion per prompt"):
        judge(prompts, expansions[:2], ExpansionConfig())
