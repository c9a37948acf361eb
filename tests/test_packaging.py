"""`pyflyte package` of the whole pipeline, offline, and what the packaged specs carry.

The package is built once per module in a subprocess, exactly as CI would run it, then unpacked and the
serialized protobufs (flyteidl ``TaskSpec`` / ``WorkflowSpec`` / ``LaunchPlan``) are checked against the
code: images, requests, Ray configs, the Elastic (torchrun) training tasks, cache settings, workflows and launch
plans. The training tasks' launch shape is fixed at registration from $KREA2_TRAIN_*, so a second package is
built at the same time (each run is one mostly single-threaded process) with a 2-node x 8-GPU shape.

Images: every task names ``containers/images.py:DATA_IMAGE`` or, for training, ``TRAIN_IMAGE`` (flytekit
ImageSpecs). When serializing, flytekit resolves an ImageSpec by first looking its ``id`` up in the image config
(``--image <id>=<fqn>``) and only if it is not there hands it to ``ImageBuildEngine.build``, which asks a Docker
daemon / the registry whether ``<registry>/<name>:<tag>`` exists and builds and pushes it when told it does not.
So the test passes ``--image <id>=<image_name()>`` for both, which is flytekit's own lookup for an already built
ImageSpec, and nothing is built or looked up. In case some task ever names another ImageSpec, which would miss
that lookup, ``DOCKER_HOST`` points at a socket that does not exist and ``FLYTE_IMG_FAST_FAIL=1`` makes the
inconclusive existence check fail the packaging rather than guess or build.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from flyteidl.admin import launch_plan_pb2, task_pb2, workflow_pb2
from flyteidl.core import tasks_pb2, workflow_pb2 as core_workflow_pb2
from google.protobuf.json_format import MessageToDict

REPO = Path(__file__).resolve().parents[1]
# Not the default (localhost:30000): the packaged image must follow $KREA2_IMAGE_REGISTRY.
REGISTRY = "registry.ci.example/krea2"

RAY_TASKS = {"tasks.curation.ingest", "tasks.curation.ingest_folder", "tasks.curation.ingest_uri_table",
             "tasks.curation.score_images"}
TRAIN_STAGE = "tasks.pretrain.train_stage"  # pretraining's resolution stages, midtraining, SFT
# the Elastic (torchrun) training tasks, each declared with tasks.pretrain.TRAIN_TASK
TRAIN_TASKS = {TRAIN_STAGE, "tasks.post.preference_stage", "tasks.post.rl_stage", "tasks.post.distill_stage"}
# the tasks that only sample and score checkpoints, with tasks.pretrain.SAMPLE_RESOURCES
SAMPLE_TASKS = {"tasks.post.merge_sft", "tasks.post.preference_pairs", "tasks.post.annotation_pairs",
                "tasks.post.reward_model"}
# the prompt expander's tasks: one process each, with SAMPLE_RESOURCES (one GPU when training has GPUs)
EXPANDER_TASKS = {"tasks.expander.expander_data", "tasks.expander.expander_sft", "tasks.expander.expander_rl"}
TRAIN_IMAGE_TASKS = TRAIN_TASKS | SAMPLE_TASKS | EXPANDER_TASKS  # the only tasks on the train image
CACHED_TASKS = {
    "tasks.curation.build_world_pool", *RAY_TASKS, "tasks.curation.select_images", "tasks.captioning.caption_images",
    "tasks.captioning.scene_captions", "tasks.semantic.embed_images", "tasks.semantic.semantic_select",
    "tasks.pretrain.pack_images", "tasks.post.pack_midtrain", "tasks.post.sft_data", *TRAIN_IMAGE_TASKS,
}
# entry points (a preset, a YAML file and inline YAML overrides, resolved by tasks.pipeline.resolve_config) -> the
# dynamic workflow that builds their stages' graph from the stage specs at run time (workflows/graph.py)
ENTRY_POINTS = {
    "workflows.end_to_end.krea2_pipeline": "workflows.end_to_end.pipeline_stages",
    "workflows.curation.curation": "workflows.curation.curate_raw_pool",
    "workflows.curation.curation_from_uris": "workflows.curation.curate_raw_pool",
    "workflows.captioning.captioning": "workflows.captioning.captioning_stages",
    "workflows.semantic_curation.semantic_curation": "workflows.semantic_curation.semantic_curation_stages",
    "workflows.pretraining.pretraining": "workflows.pretraining.pretraining_stages",
    "workflows.post_training.post_training": "workflows.post_training.post_training_stages",
    "workflows.expander.prompt_expander": "workflows.expander.prompt_expander_stages",
}
DYNAMIC_TASKS = set(ENTRY_POINTS.values())
# the dynamics that compile training tasks: the launch shape the training tasks were registered with is in their env
TRAINING_DYNAMICS = {"workflows.end_to_end.pipeline_stages", "workflows.pretraining.pretraining_stages",
                     "workflows.post_training.post_training_stages"}
UNCACHED_TASKS = {"tasks.pipeline.resolve_config", "tasks.pipeline.start_pipeline", "tasks.pipeline.finish_pipeline",
                  *DYNAMIC_TASKS}
PIPELINE_TASKS = CACHED_TASKS | UNCACHED_TASKS
WORKFLOWS = set(ENTRY_POINTS)
# the training tasks' launch shape, read from the environment when tasks/pretrain.py is imported
LAUNCH_ENV = ("KREA2_TRAIN_NNODES", "KREA2_TRAIN_NPROC_PER_NODE", "KREA2_TRAIN_GPUS_PER_NODE")
MULTI_NODE = {"KREA2_TRAIN_NNODES": "2", "KREA2_TRAIN_NPROC_PER_NODE": "8", "KREA2_TRAIN_GPUS_PER_NODE": "8"}
# flytekit puts the serialization settings into the env of dynamic (and eager) tasks only, so that they
# can compile their workflow at run time: flytekit.configuration.SERIALIZED_CONTEXT_ENV_VAR.
SERIALIZED_CONTEXT_ENV_VAR = "_F_SS_C"
CPU, MEMORY, GPU = tasks_pb2.Resources.CPU, tasks_pb2.Resources.MEMORY, tasks_pb2.Resources.GPU


@dataclass(frozen=True)
class Package:
    image: str  # DATA_IMAGE.image_name() under REGISTRY
    image_id: str  # DATA_IMAGE.id
    train_image: str  # TRAIN_IMAGE.image_name() under REGISTRY
    train_image_id: str  # TRAIN_IMAGE.id
    tasks: dict[str, tasks_pb2.TaskTemplate]
    workflows: dict[str, workflow_pb2.WorkflowSpec]
    launch_plans: dict[str, launch_plan_pb2.LaunchPlan]
    fast_files: set[str]  # files in the fast-registration archive (code shipped next to the image)


def _images(registry: str) -> ModuleType:
    """containers/images.py as it is with $KREA2_IMAGE_REGISTRY=registry (a private copy of the module, so the
    containers.images the other tests imported is left as it is)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("KREA2_IMAGE_REGISTRY", registry)
        spec = importlib.util.spec_from_file_location("_krea2_images_for_packaging", REPO / "containers" / "images.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _start_package(tmp: Path, launch: dict[str, str]) -> tuple[subprocess.Popen[bytes], list[str], Path]:
    """`pyflyte package` of the whole project, with the training launch shape ``launch`` ($KREA2_TRAIN_*)."""
    images = _images(REGISTRY)
    output = tmp / "flyte-package.tgz"
    env = {
        **{k: v for k, v in os.environ.items() if k not in LAUNCH_ENV},
        **launch,
        "HOME": str(tmp),  # no ~/.flyte config of whoever runs the tests
        "KREA2_IMAGE_REGISTRY": REGISTRY,
        "KREA2_OUTPUT_ROOT": str(tmp / "krea2-outputs"),
        "RAY_AUTH_MODE": "disabled",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DOCKER_HOST": f"unix://{tmp}/no-docker.sock",
        "FLYTE_IMG_FAST_FAIL": "1",
    }
    for name in ("MLFLOW_TRACKING_URI", "FLYTE_FORCE_PUSH_IMAGE_SPEC"):
        env.pop(name, None)
    pyflyte = Path(sys.executable).with_name("pyflyte")
    # --copy all is `pyflyte register`'s default: the code travels in a fast-registration archive, and the
    # ImageSpec is not given a source root, so its tag depends on the spec alone (what register pushes).
    command = [str(pyflyte), "--pkgs", "workflows", "package", "--source", str(REPO), "--output", str(output),
               "--force", "--copy", "all"]
    for image in (images.DATA_IMAGE, images.TRAIN_IMAGE):
        command += ["--image", f"{image.id}={image.image_name()}"]
    with (tmp / "pyflyte.log").open("wb") as log:  # a file, not a pipe that could fill while the other run is read
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, command, output


def _read_package(process: subprocess.Popen[bytes], command: list[str], output: Path) -> Package:
    process.wait(timeout=300)
    log = (output.parent / "pyflyte.log").read_text()
    assert process.returncode == 0, f"{' '.join(command)}\n{log}"
    assert "not found. building" not in log
    tmp = output.parent
    images = _images(REGISTRY)

    tasks, workflows, launch_plans, fast_files = {}, {}, {}, set()
    with tarfile.open(output) as archive:
        for member in archive.getmembers():
            data = archive.extractfile(member).read()
            if member.name.endswith("_1.pb"):
                spec = task_pb2.TaskSpec.FromString(data)
                tasks[spec.template.id.name] = spec.template
            elif member.name.endswith("_2.pb"):
                spec = workflow_pb2.WorkflowSpec.FromString(data)
                workflows[spec.template.id.name] = spec
            elif member.name.endswith("_3.pb"):
                plan = launch_plan_pb2.LaunchPlan.FromString(data)
                launch_plans[plan.id.name] = plan
            elif member.name.startswith("fast") and member.name.endswith(".tar.gz"):
                tmp_archive = tmp / member.name
                tmp_archive.write_bytes(data)
                with tarfile.open(tmp_archive) as fast:
                    fast_files = set(fast.getnames())
            else:
                raise AssertionError(f"unexpected file in the package: {member.name}")
    return Package(images.DATA_IMAGE.image_name(), images.DATA_IMAGE.id, images.TRAIN_IMAGE.image_name(),
                   images.TRAIN_IMAGE.id, tasks, workflows, launch_plans, fast_files)


@pytest.fixture(scope="module")
def packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Package]:
    """The default package and one with the multi-node launch shape, built side by side."""
    runs = {name: _start_package(tmp_path_factory.mktemp(name), launch)
            for name, launch in (("default", {}), ("multi_node", MULTI_NODE))}
    return {name: _read_package(*run) for name, run in runs.items()}


@pytest.fixture(scope="module")
def package(packages: dict[str, Package]) -> Package:
    return packages["default"]


@dataclass(frozen=True)
class Container:
    image: str
    args: list[str]
    requests: dict[int, str]  # tasks_pb2.Resources name -> quantity
    env: dict[str, str]


def _container(template: tasks_pb2.TaskTemplate) -> Container:
    """A task's container: a plain container task's, or a pod task's primary container (flytekit packages a task
    with a pod template, such as the Elastic task's shared-memory volume, as a K8s pod spec)."""
    if template.HasField("k8s_pod"):
        pod = MessageToDict(template.k8s_pod.pod_spec)
        (main,) = [c for c in pod["containers"] if c["name"] == template.config["primary_container_name"]]
        requests = main["resources"].get("requests", {})
        return Container(main["image"], main.get("args", []),
                         {tasks_pb2.Resources.ResourceName.Value(name.upper()): v for name, v in requests.items()},
                         {entry["name"]: entry["value"] for entry in main.get("env", [])})
    container = template.container
    return Container(container.image, list(container.args),
                     {entry.name: entry.value for entry in container.resources.requests},
                     {entry.key: entry.value for entry in container.env})


def _requests(template: tasks_pb2.TaskTemplate) -> dict[int, str]:
    return _container(template).requests


def _task_refs(template: core_workflow_pb2.WorkflowTemplate) -> set[str]:
    return {node.task_node.reference_id.name for node in template.nodes if node.HasField("task_node")}


def test_every_pipeline_task_is_packaged_on_its_image(package: Package) -> None:
    assert PIPELINE_TASKS <= package.tasks.keys(), sorted(PIPELINE_TASKS - package.tasks.keys())
    assert package.image.startswith(f"{REGISTRY}/krea2-data:") and package.image.split(":")[-1]
    assert package.train_image.startswith(f"{REGISTRY}/krea2-train:") and package.train_image.split(":")[-1]
    assert package.train_image.split(":")[-1] != package.image.split(":")[-1]
    for name, template in package.tasks.items():
        container = _container(template)
        assert container.image == (package.train_image if name in TRAIN_IMAGE_TASKS else package.image), name
        # fast registration: the container runs the code from the archive below, on that image
        assert container.args[:1] == ["pyflyte-fast-execute"], name
    assert {"containers/images.py", "tasks/common.py", "tasks/curation.py", "tasks/pipeline.py", "tasks/semantic.py",
            "tasks/captioning.py", "tasks/pretrain.py", "tasks/post.py", "workflows/graph.py",
            "workflows/end_to_end.py", "workflows/curation.py", "workflows/captioning.py", "krea2_core/presets.py",
            "workflows/semantic_curation.py", "workflows/pretraining.py", "workflows/post_training.py",
            "tasks/expander.py", "workflows/expander.py", "krea2_core/config.py"} <= package.fast_files


def test_requests_match_the_code(package: Package) -> None:
    import tasks.captioning
    import tasks.curation
    import tasks.expander
    import tasks.pipeline
    import tasks.post
    import tasks.pretrain
    import tasks.semantic
    import workflows.captioning
    import workflows.curation
    import workflows.end_to_end
    import workflows.expander
    import workflows.post_training
    import workflows.pretraining
    import workflows.semantic_curation

    checked = set()
    for module in (tasks.captioning, tasks.curation, tasks.pipeline, tasks.semantic, tasks.pretrain, tasks.post,
                   tasks.expander, workflows.captioning, workflows.curation, workflows.end_to_end, workflows.expander,
                   workflows.post_training, workflows.pretraining, workflows.semantic_curation):
        for task in vars(module).values():
            name = getattr(task, "name", None)
            if not (isinstance(name, str) and name in package.tasks):
                continue
            checked.add(name)
            declared = task.resources.requests
            expected = {key: value for key, value in ((CPU, declared.cpu), (MEMORY, declared.mem), (GPU, declared.gpu))
                        if value is not None}
            assert _requests(package.tasks[name]) == {k: str(v) for k, v in expected.items()}, name
    assert PIPELINE_TASKS <= checked
    # spelled out for the stages whose size matters most
    assert _requests(package.tasks["tasks.curation.select_images"]) == {CPU: "2", MEMORY: "8Gi"}
    assert _requests(package.tasks["tasks.semantic.semantic_select"]) == {CPU: "4", MEMORY: "16Gi"}
    assert _requests(package.tasks["tasks.pipeline.resolve_config"]) == {}
    assert _requests(package.tasks["tasks.pretrain.pack_images"]) == {CPU: "4", MEMORY: "16Gi"}
    assert _requests(package.tasks["tasks.post.pack_midtrain"]) == {CPU: "2", MEMORY: "8Gi"}
    for name in TRAIN_IMAGE_TASKS:  # no GPU by default, see test_gpu_request_is_a_run_time_override
        assert _requests(package.tasks[name]) == {CPU: "2", MEMORY: "8Gi"}, name


def test_ray_tasks_carry_the_rayjob_spec(package: Package) -> None:
    for name in RAY_TASKS:
        template = package.tasks[name]
        assert template.type == "ray", name
        assert _requests(template) == {CPU: "2", MEMORY: "4Gi"}, name  # the driver (submitter) pod
        job = MessageToDict(template.custom)
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] == 300, name
        (workers,) = job["rayCluster"]["workerGroupSpec"]
        assert workers["groupName"] == "cpu", name
        assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4, name
        (worker,) = workers["k8sPod"]["podSpec"]["containers"]
        assert worker["resources"]["requests"] == {"cpu": "8", "memory": "16Gi"}, name
        (head,) = job["rayCluster"]["headGroupSpec"]["k8sPod"]["podSpec"]["containers"]
        assert head["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}, name
    assert all(package.tasks[name].type == "python-task" for name in PIPELINE_TASKS - RAY_TASKS)


def test_cache_settings(package: Package) -> None:
    from tasks.common import CACHE

    assert CACHE.version
    for name in CACHED_TASKS:
        metadata = package.tasks[name].metadata
        assert metadata.discoverable, name
        assert metadata.discovery_version == CACHE.version, name
        # flytekit 1.16 records Cache(ignored_inputs=...) in TaskMetadata.cache_ignore_input_vars: what changes no
        # output (tests/test_stage_specs.py checks each task's inputs against its stage spec)
        assert list(metadata.cache_ignore_input_vars) == ["parent_run_id", "parallel", "annotations"], name
        assert "parent_run_id" in package.tasks[name].interface.inputs.variables, name
    for name in UNCACHED_TASKS:
        metadata = package.tasks[name].metadata
        assert not metadata.discoverable and not metadata.discovery_version, name


def test_gpu_request_is_a_run_time_override(package: Package) -> None:
    """Nothing in the default package ($KREA2_TRAIN_GPUS_PER_NODE unset) asks for a GPU: the training and
    sampling tasks ask for GPUs only when registered with them (test_multi_node_launch_shape_is_a_pytorchjob), and
    the stages' graph is compiled at run time by a dynamic workflow, which gives the captioning and embedding nodes a
    GPU when the config's device is "cuda" (tests/test_stage_specs.py compiles it). What the package can show is that
    each dynamic is packaged as one, on the data image, with the settings it needs to compile those nodes on both
    images, and that the model tasks themselves are CPU-only."""
    for name, template in package.tasks.items():
        assert GPU not in _requests(template), name
    from flytekit.configuration import SerializationSettings

    for model_task in ("tasks.semantic.embed_images", "tasks.captioning.caption_images"):
        model = package.tasks[model_task]
        assert _requests(model) == {CPU: "4", MEMORY: "16Gi"}, model_task
        assert not model.container.resources.limits and not model.HasField("extended_resources"), model_task
    for dynamic_name in DYNAMIC_TASKS:
        dynamic = package.tasks[dynamic_name]
        assert dynamic.type == "python-task" and not _requests(dynamic), dynamic_name
        assert _container(dynamic).image == package.image, dynamic_name
        env = _container(dynamic).env
        assert SERIALIZED_CONTEXT_ENV_VAR in env, f"{dynamic_name} is not packaged as a dynamic task"
        settings = SerializationSettings.from_transport(env[SERIALIZED_CONTEXT_ENV_VAR])
        # the run-time nodes resolve DATA_IMAGE and TRAIN_IMAGE to the same images
        for image_id, full in ((package.image_id, package.image), (package.train_image_id, package.train_image)):
            image = settings.image_config.find_image(image_id)
            assert image is not None and image.full == full, (dynamic_name, image_id)
        assert settings.fast_serialization_settings.enabled, dynamic_name
    for name, template in package.tasks.items():
        if name not in DYNAMIC_TASKS:
            assert SERIALIZED_CONTEXT_ENV_VAR not in _container(template).env, name


def test_workflows_and_launch_plans(package: Package) -> None:
    assert WORKFLOWS <= package.workflows.keys(), sorted(WORKFLOWS - package.workflows.keys())
    assert WORKFLOWS <= package.launch_plans.keys(), sorted(WORKFLOWS - package.launch_plans.keys())
    for name in WORKFLOWS:
        assert package.launch_plans[name].spec.workflow_id.name == name

    # the pipeline: resolve the config, open the parent run, build and run the stages' graph, close the parent run
    pipeline = package.workflows["workflows.end_to_end.krea2_pipeline"].template
    stages = ENTRY_POINTS["workflows.end_to_end.krea2_pipeline"]
    assert _task_refs(pipeline) == {"tasks.pipeline.resolve_config", "tasks.pipeline.start_pipeline", stages,
                                    "tasks.pipeline.finish_pipeline"}
    nodes = {node.task_node.reference_id.name: node for node in pipeline.nodes}
    sources = {b.var: b.binding.promise.node_id for b in nodes[stages].inputs}
    assert sources == {"config": nodes["tasks.pipeline.resolve_config"].id,
                       "parent_run_id": nodes["tasks.pipeline.start_pipeline"].id}
    finish = {b.var: b.binding.promise for b in nodes["tasks.pipeline.finish_pipeline"].inputs}
    for output in ("curated", "midtrain", "pretrained", "final", "distilled", "expander"):
        assert (finish[output].node_id, finish[output].var) == (nodes[stages].id, output), output
    # every task any packaged workflow runs is itself in the package
    for name, spec in package.workflows.items():
        for template in (spec.template, *spec.sub_workflows):
            assert _task_refs(template) <= package.tasks.keys(), name

    # every entry point reads its preset, YAML file and inline overrides through the CLI's loader, then runs its
    # dynamic on the resolved config; the file is a FlyteFile (a blob: `pyflyte run` uploads it, so a remote pod
    # reads it from the object store), by default none, on the tiny preset without overrides
    for name, block in ENTRY_POINTS.items():
        template = package.workflows[name].template
        assert {"tasks.pipeline.resolve_config", block} <= _task_refs(template), name
        interface = template.interface.inputs.variables
        assert interface["config"].type.union_type.variants[0].blob.dimensionality == 0, name  # a single file
        defaults = MessageToDict(package.launch_plans[name].spec.default_inputs)["parameters"]
        assert {key: defaults[key]["default"]["scalar"]["primitive"]["stringValue"] for key in ("preset", "overrides")
                } == {"preset": "tiny", "overrides": ""}, name
        assert "noneType" in defaults["config"]["default"]["scalar"], name
    curation = _task_refs(package.workflows["workflows.curation.curation"].template)
    assert "tasks.curation.ingest_folder" in curation
    assert "tasks.curation.ingest_uri_table" in _task_refs(package.workflows["workflows.curation.curation_from_uris"]
                                                           .template)


def test_training_tasks_are_elastic_torchrun_tasks_on_the_train_image(package: Package) -> None:
    """By default ($KREA2_TRAIN_* unset) one pod runs torchrun with 2 processes: flytekit packages a single-node
    Elastic task as a plain pod task (no PyTorchJob, so no custom config), with a shared-memory /dev/shm. Every
    training task (pretraining, midtraining / SFT, preference optimisation, RL, distillation) is declared and packaged
    the same way."""
    import tasks.post
    import tasks.pretrain
    from flytekitplugins.kfpytorch import Elastic

    if set(LAUNCH_ENV) & os.environ.keys():
        pytest.skip(f"this process has {sorted(set(LAUNCH_ENV) & os.environ.keys())} set")
    declared = {task.name: task for task in (tasks.pretrain.train_stage, tasks.post.preference_stage,
                                             tasks.post.rl_stage, tasks.post.distill_stage)}
    assert declared.keys() == TRAIN_TASKS
    for name, task in declared.items():
        assert isinstance(task.task_config, Elastic), name
        assert (task.task_config.nnodes, task.task_config.nproc_per_node) == (1, 2), name
        template = package.tasks[name]
        assert template.type == "python-task" and not template.HasField("custom"), name
        assert _container(template).image == package.train_image, name
        assert _requests(template) == {CPU: "2", MEMORY: "8Gi"}, name
        pod = MessageToDict(template.k8s_pod.pod_spec)
        assert {"name": "shm", "emptyDir": {"medium": "Memory"}} in pod["volumes"], name
        assert list(template.metadata.cache_ignore_input_vars) == ["parent_run_id", "parallel", "annotations"], name
    for name in SAMPLE_TASKS:  # sampling needs no torchrun: a plain container task
        template = package.tasks[name]
        assert template.type == "python-task" and template.HasField("container"), name
        assert not template.HasField("k8s_pod"), name


def _strip(template: tasks_pb2.TaskTemplate, request: int | None = None, env: bool = False) -> tasks_pb2.TaskTemplate:
    """A copy of a container task's template without the ``request`` resource request and, with ``env``, its env."""
    stripped = tasks_pb2.TaskTemplate()
    stripped.CopyFrom(template)
    kept = [entry for entry in stripped.container.resources.requests if entry.name != request]
    del stripped.container.resources.requests[:]
    stripped.container.resources.requests.extend(kept)
    if env:
        del stripped.container.env[:]
    return stripped


def test_multi_node_launch_shape_is_a_pytorchjob(packages: dict[str, Package]) -> None:
    """KREA2_TRAIN_NNODES=2 KREA2_TRAIN_NPROC_PER_NODE=8 KREA2_TRAIN_GPUS_PER_NODE=8 at registration: every training
    task is a PyTorchJob of 2 worker pods with an ElasticConfig of 8 processes each, 8 GPUs requested per pod; the
    sampling and expander tasks request 1 GPU; the dynamics that compile training tasks get the launch shape
    (test_launch_shape_reaches_the_pod); nothing else changes."""
    default, multi = packages["default"], packages["multi_node"]
    for name in TRAIN_TASKS:
        template = multi.tasks[name]
        assert template.type == "pytorch", name
        assert MessageToDict(template.custom) == {
            "elasticConfig": {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 2, "nprocPerNode": 8},
            "workerReplicas": {"replicas": 2}}, name
        assert _requests(template) == {CPU: "2", MEMORY: "8Gi", GPU: "8"}, name
        assert _container(template).image == multi.train_image == default.train_image, name
        assert template.metadata == default.tasks[name].metadata, name  # cached the same way
    for name in SAMPLE_TASKS | EXPANDER_TASKS:
        template = multi.tasks[name]
        assert _requests(template) == {CPU: "2", MEMORY: "8Gi", GPU: "1"}, name
        assert _strip(template, request=GPU) == default.tasks[name], name
    for name in TRAINING_DYNAMICS:
        assert _container(multi.tasks[name]).env == {**_container(default.tasks[name]).env, **MULTI_NODE}, name
        assert _strip(multi.tasks[name], env=True) == _strip(default.tasks[name], env=True), name
    assert multi.tasks.keys() == default.tasks.keys()
    for name in default.tasks.keys() - TRAIN_IMAGE_TASKS - TRAINING_DYNAMICS:
        assert multi.tasks[name] == default.tasks[name], name


def test_launch_shape_reaches_the_pod(packages: dict[str, Package]) -> None:
    """A training pod runs ``pyflyte-execute``, which imports the task's module, and so tasks.pretrain, again to
    find the task; its Elastic launch (nnodes, nproc_per_node) comes from that import, so the registered shape must
    be in the container's env. The dynamics that compile training nodes serialize those tasks in their own pod at run
    time, from the same import, so their env carries the shape too."""
    for name, launch in (("default", {"KREA2_TRAIN_NNODES": "1", "KREA2_TRAIN_NPROC_PER_NODE": "2"}),
                         ("multi_node", MULTI_NODE)):
        for task_name in (*TRAIN_TASKS, *TRAINING_DYNAMICS):
            env = _container(packages[name].tasks[task_name]).env
            assert {key: env.get(key) for key in launch} == launch, (name, task_name)
