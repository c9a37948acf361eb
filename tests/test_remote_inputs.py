"""What a user hands a Flyte execution reaches its pods through the object store, not the client's disk: the config
file (a FlyteFile `pyflyte run` uploads) and the human annotation set (an object-store folder the dynamic workflow
downloads to digest it, then hands its task)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import fsspec
import pandas as pd
from flytekit import FlyteContextManager
from flytekit.core.data_persistence import FileAccessProvider
from flytekit.core.type_engine import TypeEngine
from flytekit.models.literals import LiteralMap
from flytekit.types.file import FlyteFile
from PIL import Image

from krea2_core.config import PipelineConfig, load_config
from krea2_core.data.schemas import Annotations, write_table
from krea2_core.post.annotations import TABLE_FILE, annotation_settings
from tasks.pipeline import resolve_config
from workflows.graph import localized


def _literal(value: object, python_type: type) -> object:
    context = FlyteContextManager.current_context()
    return TypeEngine.to_literal(context, value, python_type, TypeEngine.to_literal_type(python_type))


def test_the_config_file_resolves_in_a_pod_that_has_no_such_file(tmp_path: Path) -> None:
    client, store = tmp_path / "client", tmp_path / "store"
    client.mkdir()
    store.mkdir()
    (client / "mine.yaml").write_text("post: {distill: {lr: 0.00042}}\n")
    context = FlyteContextManager.current_context()
    upload = FileAccessProvider(local_sandbox_dir=str(tmp_path / "client-sandbox"), raw_output_prefix=str(store))
    with FlyteContextManager.with_context(context.with_file_access(upload)):  # what `pyflyte run --config` sends
        config = _literal(FlyteFile(str(client / "mine.yaml")), Optional[FlyteFile])
    shutil.rmtree(client)

    pod = FileAccessProvider(local_sandbox_dir=str(tmp_path / "pod"), raw_output_prefix=str(tmp_path / "pod-outputs"))
    with FlyteContextManager.with_context(context.with_file_access(pod)) as in_pod:
        inputs = LiteralMap({"preset": _literal("tiny", str), "config": config,
                             "overrides": _literal("post: {preference: {eval_prompts: 3}}", str)})
        outputs = resolve_config.dispatch_execute(in_pod, inputs)
        resolved = TypeEngine.to_python_value(in_pod, outputs.literals["o0"], PipelineConfig)
    assert resolved == load_config("tiny", {"post": {"distill": {"lr": 0.00042}, "preference": {"eval_prompts": 3}}})


def _annotation_set(folder: Path) -> None:
    (folder / "images").mkdir(parents=True)
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (32, 32), colour).save(folder / "images" / name)
    write_table(pd.DataFrame({"pair_id": ["p0"], "prompt": ["a red square"], "image_a": ["images/a.png"],
                              "image_b": ["images/b.png"], "choice": ["a"], "annotator": ["alice"]}),
                folder / TABLE_FILE, Annotations)


def test_an_annotation_set_in_the_object_store_is_digested_from_a_local_copy(tmp_path: Path) -> None:
    original = tmp_path / "annotations"
    _annotation_set(original)
    uri = f"memory://bucket-{tmp_path.name}/annotations"  # an object store (fsspec's in-memory one)
    fsspec.filesystem("memory").put(f"{original}/", uri, recursive=True)
    config = load_config("tiny", {"post": {"preference": {"annotations": uri}}})
    context = FlyteContextManager.current_context()
    pod = FileAccessProvider(local_sandbox_dir=str(tmp_path / "pod"), raw_output_prefix=str(tmp_path / "pod-outputs"))
    with FlyteContextManager.with_context(context.with_file_access(pod)):
        local = localized(config)
    copy = Path(local.post.preference.annotations)
    assert copy.is_relative_to(tmp_path / "pod") and (copy / "images" / "a.png").is_file()
    assert annotation_settings(local, copy) == annotation_settings(load_config("tiny"), original)
    assert localized(local) is local  # a local set is read where it is
