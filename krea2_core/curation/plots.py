"""Report plots for semantic curation (PNG files, logged with the stage's artifacts)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def cluster_size_plot(verdicts: pd.DataFrame, path: Path) -> None:
    """Images per leaf cluster, largest first, in the input and in the sample."""
    clustered = verdicts[verdicts["leaf"] >= 0]
    before = clustered["leaf"].value_counts()
    after = clustered.loc[clustered["kept"], "leaf"].value_counts().reindex(before.index, fill_value=0)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(before)), before.to_numpy(), label="input", color="#bbbbbb")
    ax.bar(range(len(after)), after.to_numpy(), label="sample", color="#3366cc")
    ax.set_xlabel("leaf cluster (by input size)")
    ax.set_ylabel("images")
    ax.set_title("Hierarchical balanced sampling: cluster sizes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tag_count_plot(tags: pd.DataFrame, path: Path, top: int = 25) -> None:
    """Images per SAE tag (the most frequent ``top``)."""
    counts = tags.groupby("label")["images"].max().sort_values(ascending=False).head(top)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(counts.index.astype(str), counts.to_numpy(), color="#cc6633")
    ax.set_ylabel("images")
    ax.set_title("SAE feature tags")
    ax.tick_params(axis="x", labelrotation=60, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
