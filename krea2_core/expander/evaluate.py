"""Held-out evaluation of the prompt expander through the images its expansions produce.

Held-out user prompts (``prompt_set("held_out")``, the set SFT evaluates on) are rendered three ways with the same image noise:
(a) the raw user prompt, (b) the SFT expander's greedy expansion, (c) the RL expander's greedy expansion. Each image
is scored by the world's checker against the USER prompt's rubric (what the user asked for, not what the expansion
says). For (b) and (c) also: faithfulness (the share of the user's requirements the expansion states) and the gate
pass rate (krea2_core/expander/faithfulness.py). Diversity: ``diversity_samples`` sampled expansions of each of the
first ``diversity_prompts`` prompts -> images -> the mean pairwise embedding distance within each prompt's group
(post/diversity.group_diversity); for the raw prompt the group is the prompt rendered with the group's noises, the
spread noise alone gives (the baseline an expander's variety adds to).

The rendering and expansion helpers here are shared with the RL trainer (krea2_core/expander/rl.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

from krea2_core.expander.config import ExpanderRLConfig, ExpansionConfig
from krea2_core.training.config import PretrainConfig
from krea2_core.curation.embedders import make_embedder
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.expander.faithfulness import judge
from krea2_core.expander.format import Expansion, parse
from krea2_core.expander.model import Completions, expand_loaded, sample_completions
from krea2_core.expander.user_prompts import prompt_set
from krea2_core.post.diversity import group_diversity
from krea2_core.post.pairs import call_seed
from krea2_core.evaluation.prompt_following import image_grid, score_images
from krea2_core.world.captions import Prompt

IMAGE_BATCH = 16  # images per generate call (part of the noise: call seeds hash the batch number)
EXAMPLES = 4  # prompts shown in samples.png and listed in eval.json
SETTINGS = ("raw", "sft", "rl")

Expander = tuple[Any, Any]  # (tokenizer, model)


def render(pipe: TextToImage, texts: Sequence[str], config: ExpanderRLConfig, pretrain: PretrainConfig,
           resolution: int, salt: str) -> list[Image.Image]:
    """One image per text, square at ``resolution``, with the config's sampler. Image i's noise depends only on
    (``config.seed``, ``salt``, i): the same salt gives any list of texts the same noises."""
    images: list[Image.Image] = []
    for batch, start in enumerate(range(0, len(texts), IMAGE_BATCH)):
        images += pipe.generate(list(texts[start:start + IMAGE_BATCH]), width=resolution, height=resolution,
                                steps=config.image_steps, cfg_scale=config.image_cfg, shift=pretrain.eval.shift,
                                seed=call_seed(config.seed, salt, batch))
    return images


def sample_expansions(expander: Expander, prompts: Sequence[Prompt], config: ExpanderRLConfig,
                      expansion: ExpansionConfig, *, n: int, seed: int, greedy: bool = False
                      ) -> tuple[Completions, list[Expansion]]:
    """``n`` answers per prompt (prompt-major) with the config's sampling settings, parsed into expansions."""
    tokenizer, model = expander
    completions = sample_completions(tokenizer, model, [p.text for p in prompts], n=n,
                                     temperature=config.temperature, top_p=config.top_p,
                                     max_new_tokens=expansion.max_new_tokens, seed=seed, greedy=greedy)
    users = [p.text for p in prompts for _ in range(n)]
    return completions, [parse(user, text) for user, text in zip(users, completions.texts, strict=True)]


def expand_prompts(expander: Expander, prompts: Sequence[Prompt], config: ExpanderRLConfig,
                   expansion: ExpansionConfig, *, n: int, salt: str, greedy: bool = False) -> list[Expansion]:
    """``n`` expansions per prompt (prompt-major) with the config's sampling settings, generated in chunks of at
    most one training round's rows (bounded memory), seeded by (``config.seed``, ``salt``)."""
    tokenizer, model = expander
    return expand_loaded(tokenizer, model, [p.text for p in prompts], n=n, greedy=greedy,
                         temperature=config.temperature, top_p=config.top_p, max_new_tokens=expansion.max_new_tokens,
                         seed=call_seed(config.seed, f"{salt}/answers", 0),
                         batch_size=max(1, config.prompts_per_step * config.group_size // n))


def evaluate_expander(expanders: Mapping[str, Expander], pipe: TextToImage, config: ExpanderRLConfig,
                      expansion: ExpansionConfig, pretrain: PretrainConfig, resolution: int
                      ) -> tuple[dict[str, Any], Image.Image]:
    """(eval.json content, samples.png) for ``expanders`` {"sft": ..., "rl": ...}: ``raw``: {score, pass_rate,
    diversity}; each expander: {score, pass_rate, faithfulness, gate_pass, diversity}; ``examples``: the first
    prompts' expansions and scores. samples.png: a row per setting (raw, SFT, RL), a column per example prompt."""
    if set(expanders) != set(SETTINGS[1:]):
        raise ValueError(f"evaluate_expander needs the expanders {list(SETTINGS[1:])}, got {sorted(expanders)}")
    n_div = config.diversity_prompts
    prompts = prompt_set("held_out", max(config.eval_prompts, n_div), expansion, resolution)
    held_out, few = prompts[:config.eval_prompts], prompts[:n_div]
    expansions = {name: expand_prompts(e, held_out, config, expansion, n=1, salt="eval", greedy=True)
                  for name, e in expanders.items()}
    texts = {"raw": [p.text for p in held_out], **{name: [e.text for e in ex] for name, ex in expansions.items()}}
    images = {name: render(pipe, t, config, pretrain, resolution, salt="eval") for name, t in texts.items()}
    report: dict[str, Any] = {}
    for name in SETTINGS:
        result = score_images(images[name], held_out)
        report[name] = {"score": result.score, "pass_rate": result.pass_rate}
    judged = {name: judge(held_out, ex, expansion) for name, ex in expansions.items()}
    for name, j in judged.items():
        report[name].update(faithfulness=j.mean_faithfulness, gate_pass=j.gate_pass)

    embedder = make_embedder(config.embedder)
    k = config.diversity_samples
    sampled = {"raw": [p.text for p in few for _ in range(k)],
               **{name: [e.text for e in expand_prompts(ex, few, config, expansion, n=k, salt="diversity")]
                  for name, ex in expanders.items()}}
    for name, t in sampled.items():
        shown = render(pipe, t, config, pretrain, resolution, salt="diversity")
        report[name]["diversity"] = group_diversity([shown[i:i + k] for i in range(0, len(shown), k)], embedder)

    report["examples"] = [
        {"prompt": p.text, "rubric": [r.to_dict() for r in p.rubric],
         "raw": {"score": score_images([images["raw"][i]], [p]).score},
         **{name: {"thinking": ex[i].thinking, "expansion": ex[i].text, "well_formed": ex[i].well_formed,
                   "score": score_images([images[name][i]], [p]).score,
                   "gates": judged[name].gates[i]}
            for name, ex in expansions.items()}}
        for i, p in enumerate(held_out[:EXAMPLES])]
    shown = min(EXAMPLES, len(held_out))
    grid = image_grid([image for name in SETTINGS for image in images[name][:shown]], columns=shown)
    return report, grid


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """``eval.<setting>.<metric>`` of the finite numbers in an ``evaluate_expander`` report."""
    return {f"eval.{name}.{key}": float(value) for name in SETTINGS for key, value in report[name].items()
            if value is not None and math.isfinite(value)}
