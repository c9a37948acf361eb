"""The offline aesthetic reward model (report, "Reinforcement learning": "finetuning ... on the preference data
collected during the PO stage"): a small MLP head on a frozen image embedder, trained with the Bradley-Terry loss
-log sigmoid(s_winner - s_loser) on the PO stage's preference pairs (synthetic and calibration tables).

A seeded fraction of the pairs is held out; the pairwise accuracy (winner scored higher) and loss on both parts are
logged per step (``metrics.jsonl``, MLflow) and kept in the artifact.

Artifact (kind ``reward_model``): ``head.safetensors`` (the MLP), ``reward_model.json`` (embedder config, embedding
dim, hidden units, final metrics), ``metrics.jsonl``. ``load_reward_model`` turns it back into a scorer.
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from krea2_core.common.layout import METRICS_FILE
from krea2_core.artifacts import read_manifest, to_plain
from krea2_core.config import PipelineConfig
from krea2_core.curation.config import EmbedderConfig
from krea2_core.post.config import RewardModelConfig
from krea2_core.curation.embedders import Embedder, make_embedder
from krea2_core.evaluation.stats import share
from krea2_core.post.pairs import PAIRS_FILE, read_pairs
from krea2_core.stage_spec import StageSpec
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.tracking import MetricsLog, StageRun

HEAD_FILE = "head.safetensors"
REWARD_INFO_FILE = "reward_model.json"
LOG_EVERY = 25  # steps between MLflow points of the curves (metrics.jsonl has every step)

Log = Callable[[int, dict[str, float]], None]


def preference_head(dim: int, hidden: int) -> nn.Sequential:
    """Embedding -> scalar score."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))


@dataclass
class RewardModel:
    """A frozen embedder and the trained head: ``score(images)`` -> float64 (n,), higher = preferred."""

    embedder: Embedder
    head: nn.Sequential

    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.empty(0)
        with torch.inference_mode():
            return self.head(torch.from_numpy(self.embedder.embed(images)))[:, 0].double().numpy()


def load_reward_model(artifact: Path) -> RewardModel:
    """The scorer of a ``reward_model`` artifact (ArtifactError for another kind)."""
    artifact = Path(artifact)
    read_manifest(artifact, kind="reward_model")
    info = json.loads((artifact / REWARD_INFO_FILE).read_text())
    embedder = make_embedder(EmbedderConfig.from_dict(info["embedder"]))
    if embedder.dim != info["dim"]:
        raise ValueError(f"{artifact}: the head expects {info['dim']}-d embeddings, {embedder.name} gives "
                         f"{embedder.dim}")
    head = preference_head(info["dim"], info["hidden"])
    head.load_state_dict(load_file(artifact / HEAD_FILE))
    return RewardModel(embedder, head.eval().requires_grad_(False))


def _decode(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def embed_pairs(pairs: pd.DataFrame, embedder: Embedder, batch_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(winner rows, loser rows, distinct images embedded): each distinct image is decoded and embedded once."""
    pngs = list(dict.fromkeys([*pairs["winner"], *pairs["loser"]]))
    chunks = [embedder.embed([_decode(b) for b in pngs[i:i + batch_size]])
              for i in tqdm(range(0, len(pngs), batch_size), desc="reward model: embed", mininterval=5)]
    vectors = np.concatenate(chunks)
    row = {png: i for i, png in enumerate(pngs)}
    return vectors[[row[b] for b in pairs["winner"]]], vectors[[row[b] for b in pairs["loser"]]], len(pngs)


def _margins(head: nn.Module, winners: torch.Tensor, losers: torch.Tensor) -> torch.Tensor:
    """Each pair's winner score minus its loser score."""
    return head(winners)[:, 0] - head(losers)[:, 0]


def _pairwise(head: nn.Module, winners: torch.Tensor, losers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Bradley-Terry loss, accuracy: the fraction of pairs whose winner scores higher)."""
    margin = _margins(head, winners, losers)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


@contextmanager
def _one_thread() -> Iterator[None]:
    # the head's matrices are tiny: intra-op threads only synchronise, and thrash on a busy machine (300 steps on
    # 2 loaded cores: ~1.2 s on one thread, 14-28 s on two)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_head(winners: np.ndarray, losers: np.ndarray, config: RewardModelConfig, log: Log | None = None
               ) -> tuple[nn.Sequential, dict[str, float], int]:
    """Fit the head on the pairs' embeddings, ``config.val_fraction`` of them held out (seeded). Returns the head,
    the final ``train.*`` / ``val.*`` loss and accuracy (held-out accuracy with its 95% CI; no ``val.*`` without
    held-out pairs), and the number of
    held-out pairs. ``log(step, metrics)`` gets every step's."""
    n = len(winners)
    order = np.random.default_rng(config.seed).permutation(n)
    n_val = min(round(config.val_fraction * n), n - 1)
    split = {"train": order[n_val:], "val": order[:n_val]} if n_val else {"train": order}
    data = {part: (torch.from_numpy(winners[rows]), torch.from_numpy(losers[rows])) for part, rows in split.items()}
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        head = preference_head(winners.shape[1], config.hidden)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            out = {part: _pairwise(head, *pair) for part, pair in data.items()}
        return {f"{part}.{name}": float(value) for part, (loss, acc) in out.items()
                for name, value in (("loss", loss), ("accuracy", acc))}

    with _one_thread():
        for step in range(1, config.steps + 1):
            loss, _ = _pairwise(head, *data["train"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if log is not None:
                log(step, evaluate())
        metrics = evaluate()
    if n_val:  # pairs are judged independently: the held-out accuracy's interval resamples pairs
        with torch.no_grad():
            correct = (_margins(head, *data["val"]) > 0).float().numpy()
        accuracy = share(correct, np.ones_like(correct))
        metrics.update({"val.accuracy.low": accuracy.low, "val.accuracy.high": accuracy.high})
    return head.eval().requires_grad_(False), metrics, n_val


def load_pair_tables(pairs: Sequence[Path]) -> pd.DataFrame:
    """Every pair of the ``preference_pairs`` artifacts, in order; none at all is an error."""
    if not pairs:
        raise ValueError("the reward model needs at least one preference_pairs artifact")
    for path in pairs:
        read_manifest(path, kind="preference_pairs")
    table = pd.concat([read_pairs(Path(path)) for path in pairs], ignore_index=True)
    if table.empty:
        raise ValueError(f"no preference pairs in {[str(Path(p) / PAIRS_FILE) for p in pairs]}: nothing to train "
                         "the reward model on")
    return table


def run_reward_model(inputs: Mapping[str, Path], settings: RewardModelConfig, parent_run_id: str = "",
                     root: Path | None = None) -> Path:
    """Train and publish the aesthetic reward model on the pairs of the ``preference_pairs`` artifacts
    ``pairs.0``, ``pairs.1``, ... (in that order)."""
    table = load_pair_tables([inputs[name] for name in sorted(inputs, key=lambda name: int(name.split(".")[1]))])

    def body(paths: dict[str, Path], staging: Path, run: StageRun) -> StageOutput:
        embedder = make_embedder(settings.embedder)
        winners, losers, n_images = embed_pairs(table, embedder, settings.embedder.batch_size)
        log = MetricsLog(staging / METRICS_FILE, run, every=LOG_EVERY, last=settings.steps)
        head, metrics, n_val = train_head(winners, losers, settings, log)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()}, staging / HEAD_FILE)
        info = {"embedder": to_plain(settings.embedder), "dim": embedder.dim, "hidden": settings.hidden,
                "metrics": metrics}
        (staging / REWARD_INFO_FILE).write_text(json.dumps(info, indent=2))
        return StageOutput(counts={"pairs": len(table), "train_pairs": len(table) - n_val, "val_pairs": n_val,
                                   "images": n_images}, metrics=metrics)

    return execute_stage(REWARD_MODEL.name, REWARD_MODEL.kind, body, config=settings, inputs=dict(inputs),
                         parent_run_id=parent_run_id, root=root)[0]


def trains_reward_model(config: PipelineConfig) -> bool:
    """RL weighs the aesthetic reward and names no model for it: the pipeline trains one on the PO pairs."""
    rewards = config.post.rl.rewards
    return rewards.weights.get("aesthetic", 0.0) > 0 and not rewards.aesthetic_model


REWARD_MODEL = StageSpec("reward_model", "reward_model",
                         {"pairs.0": "preference_pairs", "pairs.1": "preference_annotations"},
                         lambda p: p.post.rl.reward_model, run_reward_model)
