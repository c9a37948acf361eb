"""TDM distillation: the objective's gradient, the interval sampling, the student's sampler, a short training run,
exact resume, the published stage with its one-run evaluation, and bad input."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file, save_file

from krea2_core.artifacts import ArtifactError, read_manifest
from krea2_core.diffusion.flow import VelocityFn, add_noise, flow_loss
from krea2_core.diffusion.sampling import ModelFn, euler_sample, guided, inference_timesteps
from krea2_core.diffusion.text_to_image import TextToImage
from krea2_core.post.config import DistillConfig
from krea2_core.post.distill import (
    DISTILL_FILE,
    EVAL_FILE,
    DistillSettings,
    draw_samples,
    rank_slots,
    run_distill_stage,
    student_fake_teacher,
    train_distill,
    training_prompts,
)
from krea2_core.post.tdm import (
    dmd_gradient,
    fake_score_loss,
    few_step_sample,
    interval_times,
    student_rollout,
    student_x0,
    tdm_loss,
)
from krea2_core.stages import StageOutput, execute_stage
from krea2_core.training.config import FinetuneConfig
from krea2_core.training.diffusers_format import DIFFUSERS_CONFIG_FILE, DIFFUSERS_WEIGHTS_FILE
from krea2_core.training.launch import launch_local
from krea2_core.training.parallel import init_distributed
from krea2_core.training.pretrain import METRICS_FILE
from krea2_core.training.image_model import ModelIndex, load_text_to_image, new_model

from ._checkpoints import PRETRAIN, RESOLUTION, TRAINER

CPU = torch.device("cpu")
TOKENS = (64, 192)  # a 32 px image: 8 x 8 tokens of 4x4 pixel space-to-depth x 2x2 patches


def _config(**overrides: object) -> DistillConfig:
    base = {"student_steps": 2, "teacher_cfg": 3.0, "steps": 4, "batch": 4, "lr": 1e-3, "fake_lr": 1e-3,
            "warmup_steps": 0, "n_prompts": 8, "seed": 3, "eval_prompts": 4, "teacher_eval_steps": 8,
            "log_every": 2}
    return DistillConfig.from_dict({**base, **overrides})


def _settings(config: DistillConfig | None = None, trainer: FinetuneConfig = TRAINER,
              resolution: int = RESOLUTION) -> DistillSettings:
    return DistillSettings(distill=config or _config(), resolution=resolution, trainer=trainer)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose velocity depends on the prompt (a fresh DiT's zero-initialised output layer ignores it, so
    CFG would change nothing): every weight perturbed by seeded noise."""
    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        generator = torch.Generator().manual_seed(0)
        state = {k: v + 0.1 * torch.randn(v.shape, generator=generator)
                 for k, v in new_model(PRETRAIN.model, CPU, seed=PRETRAIN.seed).state_dict().items()}
        save_file(state, staging / DIFFUSERS_WEIGHTS_FILE)
        ModelIndex.of(PRETRAIN).write(staging)
        return StageOutput(counts={})

    return execute_stage("test_teacher", "checkpoint", body, config={},
                         root=tmp_path_factory.mktemp("distill_inputs"))[0]


# --------------------------------------------------------------------------- the objective


def test_interval_times_stay_inside_each_student_steps_interval() -> None:
    u = torch.tensor([0.0, 0.25, 0.5, 0.999999])
    for steps, shift in ((1, 1.0), (2, 3.0), (4, 1.0), (4, 3.0)):
        grid = inference_timesteps(steps, shift)
        for k in range(steps):
            t = interval_times(torch.full((4,), k), u, steps=steps, shift=shift)
            assert torch.all(t <= grid[k] + 1e-6) and torch.all(t >= grid[k + 1] - 1e-6), (steps, shift, k)
            assert t[0] == pytest.approx(grid[k].item(), abs=1e-6)  # u = 0 is the step's own time
            assert torch.all(t[1:] < t[:-1])  # later u, less noise
    with pytest.raises(ValueError, match=r"student steps must be in \[0, 2\)"):
        interval_times(torch.tensor([2]), torch.tensor([0.5]), steps=2, shift=1.0)


def test_sample_draws_fall_in_the_drawn_steps_interval_and_do_not_depend_on_the_rank_split() -> None:
    config = _config(student_steps=4, fake_updates=2)
    shift = 3.0
    draws = draw_samples(torch.arange(64), seed=1, step=5, token_shape=(3, 2), n_prompts=10, config=config,
                         shift=shift)
    grid = inference_timesteps(4, shift)
    assert set(draws.step.tolist()) == {0, 1, 2, 3} and set(draws.prompt.tolist()) <= set(range(10))
    for t in (draws.t, *draws.fake_t):
        assert torch.all(t <= grid[draws.step] + 1e-6) and torch.all(t >= grid[draws.step + 1] - 1e-6)
    assert draws.fake_t.shape == (2, 64) and draws.fake_eps.shape == (2, 64, 3, 2)
    half = draw_samples(torch.arange(32, 64), seed=1, step=5, token_shape=(3, 2), n_prompts=10, config=config,
                        shift=shift)
    for field in dataclasses.fields(draws):
        whole = getattr(draws, field.name)
        assert torch.equal(getattr(half, field.name), whole[:, 32:] if field.name.startswith("fake") else whole[32:])
    other = draw_samples(torch.arange(64), seed=1, step=6, token_shape=(3, 2), n_prompts=10, config=config,
                         shift=shift)
    assert not torch.equal(other.noise, draws.noise)


def _x0_velocity(x0: torch.Tensor) -> VelocityFn:
    """A velocity field whose clean estimate is ``x0`` everywhere."""
    return lambda x_t, t: (x_t - x0) / t.view(-1, 1, 1)


def test_the_dmd_gradient_moves_the_student_towards_the_real_x0() -> None:
    generator = torch.Generator().manual_seed(0)
    student, real = torch.randn(2, 5, 3, generator=generator), torch.randn(2, 5, 3, generator=generator)
    x0_hat = student.clone().requires_grad_(True)
    t = torch.tensor([0.3, 0.8])
    noise = torch.randn(2, 5, 3, generator=generator)
    # the fake score tracks the student (its clean estimate is the student's sample), the real one does not
    loss, stats = tdm_loss(x0_hat, t, noise, _x0_velocity(real), _x0_velocity(student))
    loss.backward()
    g = dmd_gradient(student, student, real)
    scale = (student - real).abs().flatten(1).mean(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(g, (student - real) / scale)
    torch.testing.assert_close(x0_hat.grad, g / x0_hat.numel())  # 0.5 * mean squared error to sg(x0 - g)
    moved = x0_hat.detach() - 0.5 * x0_hat.numel() * x0_hat.grad
    assert torch.all((moved - real).flatten(1).norm(dim=1) < (student - real).flatten(1).norm(dim=1))
    assert stats["fake_real_gap"].item() == pytest.approx((student - real).abs().mean().item(), rel=1e-5)
    assert stats["dmd_grad_rms"].item() == pytest.approx(g.square().flatten(1).mean(1).sqrt().mean().item())


def _pipe(checkpoint: Path) -> TextToImage:
    return load_text_to_image(checkpoint, PRETRAIN.parallel, CPU, seed=PRETRAIN.seed)


def test_a_fake_equal_to_the_teacher_without_cfg_gives_no_gradient_and_cfg_does(teacher: Path) -> None:
    pipe = _pipe(teacher)
    fake = new_model(teacher, CPU, seed=PRETRAIN.seed)
    text, mask = pipe.text_encoder.encode(["three red circles", "a blue square on the left"])
    uncond = pipe.text_encoder.encode(["", ""])

    def model_fn(model: torch.nn.Module) -> ModelFn:
        runner = dataclasses.replace(pipe, model=model)
        return lambda x, t, hidden, m: runner.velocity(x, t, (8, 8), hidden, m)

    generator = torch.Generator().manual_seed(0)
    noise, eps = torch.randn(2, *TOKENS, generator=generator), torch.randn(2, *TOKENS, generator=generator)
    times = inference_timesteps(2, 1.0)
    step = torch.tensor([0, 1])
    x = student_rollout(model_fn(pipe.model), noise, step, text, mask, times=times, n_steps=1)
    t = interval_times(step, torch.tensor([0.5, 0.5]), steps=2, shift=1.0)
    fake_velocity = partial(model_fn(fake), hidden=text, m=mask)
    grads = {}
    for cfg in (1.0, 3.0):
        pipe.model.zero_grad()
        x0_hat = student_x0(model_fn(pipe.model), x, step, text, mask, times=times)
        loss, stats = tdm_loss(x0_hat, t, eps, guided(model_fn(pipe.model), (text, mask), uncond, cfg),
                               fake_velocity)
        loss.backward()
        grads[cfg] = torch.cat([p.grad.flatten() for p in pipe.model.parameters() if p.grad is not None]).norm()
        if cfg == 1.0:
            assert stats["fake_real_gap"].item() < 1e-6 and stats["dmd_grad_rms"].item() < 1e-5
        else:
            assert stats["fake_real_gap"].item() > 1e-3 and stats["dmd_grad_rms"].item() > 1e-3
    assert grads[1.0] < 1e-6 < grads[3.0]


def test_the_student_rollout_and_its_last_step_are_the_few_step_euler_sampler() -> None:
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))

    def model_fn(x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight) * (1 + t.view(-1, 1, 1)) + text

    noise = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    text, mask = torch.zeros(3, 1, 1), torch.ones(3, 1)
    times = inference_timesteps(3, 2.0)
    x = student_rollout(model_fn, noise, torch.tensor([0, 1, 2]), text, mask, times=times, n_steps=3)
    torch.testing.assert_close(x[0], noise[0])  # step 0 starts from the noise
    for k in (1, 2):  # step k starts where k Euler steps of the K-step sampler end
        expected = noise[k:k + 1]
        for j in range(k):
            expected = expected + (times[j + 1] - times[j]) * model_fn(expected, times[j].expand(1), text[:1],
                                                                         mask[:1])
        torch.testing.assert_close(x[k], expected[0])
    # the last step's clean estimate is the sampler's output (its Euler step lands on t = 0)
    last = student_rollout(model_fn, noise, torch.full((3,), 2), text, mask, times=times, n_steps=2)
    x0 = student_x0(model_fn, last, torch.full((3,), 2), text, mask, times=times)
    sampled = euler_sample(lambda z, t: model_fn(z, t, text, mask), noise, steps=3, shift=2.0)
    torch.testing.assert_close(x0, sampled)
    with pytest.raises(ValueError, match="must cover the largest student step"):
        student_rollout(model_fn, noise, torch.tensor([0, 1, 2]), text, mask, times=times, n_steps=1)


def test_few_step_sample_is_deterministic_and_shares_the_noise_of_generate(teacher: Path) -> None:
    pipe = _pipe(teacher)
    texts = ["two green triangles", "a yellow circle at the top"]
    kwargs = {"steps": 2, "shift": 1.0, "seed": 4, "width": RESOLUTION, "height": RESOLUTION}
    first, again = few_step_sample(pipe, texts, **kwargs), few_step_sample(pipe, texts, **kwargs)
    assert all(isinstance(im, Image.Image) and im.size == (RESOLUTION, RESOLUTION) for im in first)
    assert [np.asarray(a).tobytes() for a in first] == [np.asarray(b).tobytes() for b in again]
    generated = pipe.generate(texts, width=RESOLUTION, height=RESOLUTION, steps=2, cfg_scale=1.0, shift=1.0, seed=4)
    assert [np.asarray(a).tobytes() for a in first] == [np.asarray(b).tobytes() for b in generated]
    other_seed = few_step_sample(pipe, texts, **{**kwargs, "seed": 5})
    assert np.asarray(other_seed[0]).tobytes() != np.asarray(first[0]).tobytes()


class _ToyVelocity(torch.nn.Module):
    """A 2-D velocity MLP conditioned on a one-hot label (its "text"); label 4 is the empty prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128),
                                       torch.nn.SiLU(), torch.nn.Linear(128, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x.flatten(1), t[:, None], label], dim=1)).view(x.shape)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls: thread synchronisation would cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_tdm_distils_a_cfg_teacher_into_a_two_step_student_without_cfg(one_thread: None) -> None:
    """Four Gaussian modes, labels that name the right mode only 60% of the time (so CFG matters): the 2-step
    student without CFG lands on the labelled mode more often than the teacher without CFG and closer to the modes
    than the naive 2-step teacher with CFG."""
    torch.manual_seed(0)
    modes = torch.tensor([[2.0, 2.0], [2.0, -2.0], [-2.0, 2.0], [-2.0, -2.0]])

    def onehot(label: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(label, 5).float()

    teacher = _ToyVelocity()
    optimizer = torch.optim.Adam(teacher.parameters(), 1e-3)
    for _ in range(1500):
        mode = torch.randint(4, (256,))
        label = torch.where(torch.rand(256) < 0.6, mode, torch.randint(4, (256,)))
        label = torch.where(torch.rand(256) < 0.1, 4, label)
        x0, noise, t = (modes[mode] + 0.1 * torch.randn(256, 2))[:, None], torch.randn(256, 1, 2), torch.rand(256)
        loss = flow_loss(teacher(add_noise(x0, noise, t), t, onehot(label), torch.ones(256, 1)), x0, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher.requires_grad_(False)

    steps, cfg, batch = 2, 3.0, 256
    uncond = (onehot(torch.tensor([4])), torch.ones(1, 1))
    probe_label = torch.arange(2000) % 4
    probe_noise = torch.randn(2000, 1, 2, generator=torch.Generator().manual_seed(1))

    def sample(model: torch.nn.Module, scale: float) -> tuple[float, float]:
        """(fraction on the labelled mode, mean distance to the nearest mode) of ``steps``-step samples."""
        x = euler_sample(guided(model, (onehot(probe_label), torch.ones(2000, 1)), uncond, scale), probe_noise,
                         steps=steps, shift=1.0)
        distance = torch.cdist(x[:, 0], modes)
        return (distance.argmin(1) == probe_label).float().mean().item(), distance.min(1).values.mean().item()

    student, fake = (copy.deepcopy(teacher).requires_grad_(True) for _ in range(2))
    student_opt, fake_opt = (torch.optim.Adam(m.parameters(), 1e-4) for m in (student, fake))
    times = inference_timesteps(steps, 1.0)
    for _ in range(1000):
        label, mask = onehot(torch.randint(4, (batch,))), torch.ones(batch, 1)
        step = torch.randint(steps, (batch,))
        x = student_rollout(student, torch.randn(batch, 1, 2), step, label, mask, times=times, n_steps=1)
        x0_hat = student_x0(student, x, step, label, mask, times=times)
        fake_velocity = partial(fake, label=label, mask=mask)
        loss, _ = tdm_loss(x0_hat, interval_times(step, torch.rand(batch), steps=steps, shift=1.0),
                           torch.randn(batch, 1, 2), guided(teacher, (label, mask), uncond, cfg), fake_velocity)
        student_opt.zero_grad()
        loss.backward()
        student_opt.step()
        fake_loss = fake_score_loss(fake_velocity, x0_hat, interval_times(step, torch.rand(batch), steps=steps,
                                                                          shift=1.0), torch.randn(batch, 1, 2))
        fake_opt.zero_grad()
        fake_loss.backward()
        fake_opt.step()

    (student_hits, student_distance), (teacher_hits, _), (_, naive_distance) = (
        sample(student, 1.0), sample(teacher, 1.0), sample(teacher, cfg))
    assert student_hits > teacher_hits + 0.05 and student_hits > 0.95
    assert student_distance < naive_distance


# --------------------------------------------------------------------------- training


def _train(teacher: Path, config: DistillConfig, **kwargs: object) -> tuple[list[dict], dict[str, torch.Tensor]]:
    env = init_distributed("cpu")
    student, fake, frozen = student_fake_teacher(PRETRAIN, teacher, env)
    curve: list[dict] = []
    train_distill(student, fake, frozen, training_prompts(config, PRETRAIN, RESOLUTION), config, PRETRAIN, env,
                  RESOLUTION, log=lambda step, metrics: curve.append({"step": step, **metrics}), **kwargs)
    weights = {f"student.{k}": v for k, v in student.model.state_dict().items()}
    return curve, {**weights, **{f"fake.{k}": v for k, v in fake.state_dict().items()}}


RESUMABLE = _config(steps=3, fake_updates=2)


@pytest.fixture(scope="module")
def straight(teacher: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """An uninterrupted run: its curve and final (student, fake) weights."""
    return _train(teacher, RESUMABLE)


def test_a_short_run_changes_both_models_and_logs_finite_metrics(
        teacher: Path, straight: tuple[list[dict], dict[str, torch.Tensor]]) -> None:
    curve, weights = straight
    start = new_model(teacher, CPU, seed=PRETRAIN.seed).state_dict()
    for model in ("student", "fake"):
        assert any(not torch.equal(weights[f"{model}.{k}"], v) for k, v in start.items()), model
    assert [c["step"] for c in curve] == [1, 2, 3]
    for key in ("loss", "fake_loss", "dmd_grad_rms", "fake_real_gap", "grad_norm", "fake_grad_norm", "lr", "fake_lr"):
        assert all(np.isfinite(c[key]) for c in curve), key
    # the CFG teacher and the fake (the teacher without CFG at first) disagree: the student gets a gradient
    assert all(c["fake_real_gap"] > 0 and c["grad_norm"] > 0 for c in curve)


class _Crash(Exception):
    pass


def test_a_crashed_run_resumes_bitwise_from_its_checkpoint(
        teacher: Path, straight: tuple[list[dict], dict[str, torch.Tensor]], tmp_path: Path) -> None:
    def crash_at_2(step: int, metrics: dict) -> None:
        if step == 2:
            raise _Crash

    env = init_distributed("cpu")
    student, fake, frozen = student_fake_teacher(PRETRAIN, teacher, env)
    with pytest.raises(_Crash):
        train_distill(student, fake, frozen, training_prompts(RESUMABLE, PRETRAIN, RESOLUTION), RESUMABLE, PRETRAIN,
                      env, RESOLUTION, checkpoints=tmp_path, log=crash_at_2, checkpoint_every_s=1e-9)
    resumed, weights = _train(teacher, RESUMABLE, checkpoints=tmp_path, checkpoint_every_s=1e-9)
    curve, final = straight
    assert [c["step"] for c in resumed] == [2, 3]  # from the step-1 checkpoint
    assert resumed == curve[1:]
    assert weights.keys() == final.keys() and all(torch.equal(weights[k], final[k]) for k in final)


# --------------------------------------------------------------------------- the stage


def test_stage_publishes_the_student_with_its_sampling_recipe_and_one_run_evaluation(teacher: Path,
                                                                                    tmp_path: Path) -> None:
    config = _config(steps=2, eval_prompts=2)
    out = run_distill_stage({"teacher": teacher}, _settings(config), root=tmp_path)
    assert out is not None
    manifest = read_manifest(out, kind="checkpoint")
    assert manifest.counts == {"steps": 2, "student_steps": 2}
    assert {DIFFUSERS_WEIGHTS_FILE, DIFFUSERS_CONFIG_FILE, METRICS_FILE, DISTILL_FILE, EVAL_FILE, "samples.png"} <= \
        {p.name for p in out.iterdir()}
    new_model(out, CPU, seed=PRETRAIN.seed)  # loadable like any checkpoint: the student alone
    trained, start = load_file(out / DIFFUSERS_WEIGHTS_FILE), load_file(teacher / DIFFUSERS_WEIGHTS_FILE)
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
    assert json.loads((out / DISTILL_FILE).read_text()) == {"student_steps": 2, "shift": PRETRAIN.eval.shift,
                                                            "cfg_scale": 1.0}

    curve = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [c["step"] for c in curve] == [1, 2]
    evaluation = json.loads((out / EVAL_FILE).read_text())
    for sampler in ("student", "teacher", "teacher_few_step"):
        assert 0.0 <= evaluation[f"eval.{sampler}.score"] <= 1.0
        assert f"eval.{sampler}.count" in evaluation  # per requirement kind
    # both samplers timed, in one run (their speed is measured in benchmarks/, not asserted in a timed test)
    assert evaluation["latency.teacher_s_per_image"] > 0 and evaluation["latency.student_s_per_image"] > 0
    assert evaluation["latency.ratio"] == pytest.approx(
        evaluation["latency.teacher_s_per_image"] / evaluation["latency.student_s_per_image"])
    with Image.open(out / "samples.png") as grid:
        assert grid.size == (2 * RESOLUTION, 3 * RESOLUTION)  # teacher, student, naive few-step teacher

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = client.get_run(manifest.mlflow_run_id).data.metrics
    for key in ("loss", "fake_loss", "dmd_grad_rms", "fake_real_gap", "eval.student.score", "eval.teacher.score",
                "eval.teacher_few_step.score", "latency.ratio"):
        assert key in metrics, key
    for teacher_name in ("teacher", "teacher_few_step"):  # the student's paired change against each, with its CI
        change = f"eval.student_vs_{teacher_name}.score"
        assert metrics[change] == pytest.approx(metrics["eval.student.score"] - metrics[f"eval.{teacher_name}.score"])
        assert metrics[f"{change}.low"] <= metrics[change] <= metrics[f"{change}.high"]
    assert sorted(m.step for m in client.get_metric_history(manifest.mlflow_run_id, "loss")) == [2]


@pytest.mark.slow
def test_two_ranks_with_fsdp_follow_the_single_process_curve(teacher: Path, tmp_path: Path) -> None:
    single = run_distill_stage({"teacher": teacher}, _settings(), root=tmp_path / "one")
    two = dataclasses.replace(TRAINER, parallel=dataclasses.replace(TRAINER.parallel, nproc_per_node=2))
    out = launch_local(two.parallel, run_distill_stage, {"teacher": teacher}, _settings(trainer=two), "",
                       tmp_path / "two")

    def curve(artifact: Path) -> list[dict]:
        return [json.loads(line) for line in (artifact / METRICS_FILE).read_text().splitlines()]

    for a, b in zip(curve(out), curve(single), strict=True):
        for key in ("loss", "fake_loss", "dmd_grad_rms", "fake_real_gap", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (a["step"], key)


def test_bad_input_fails_before_anything_is_written(teacher: Path, tmp_path: Path) -> None:
    def body(inputs: dict[str, Path], staging: Path, run: object) -> StageOutput:
        (staging / "pairs.parquet").write_text("")
        return StageOutput(counts={})

    not_a_checkpoint = execute_stage("test_pairs", "preference_pairs", body, config={}, root=tmp_path / "in")[0]
    with pytest.raises(ArtifactError, match="expected 'checkpoint'"):
        run_distill_stage({"teacher": not_a_checkpoint}, _settings(), root=tmp_path)
    two_ranks = dataclasses.replace(TRAINER, parallel=dataclasses.replace(TRAINER.parallel, nproc_per_node=2))
    with pytest.raises(RuntimeError, match="launched with 1 processes but parallel.nnodes x nproc_per_node is 2"):
        run_distill_stage({"teacher": teacher}, _settings(trainer=two_ranks), root=tmp_path)
    with pytest.raises(ValueError, match="must be a multiple of 8"):
        run_distill_stage({"teacher": teacher}, _settings(resolution=36), root=tmp_path)
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "work").exists()
    assert not (tmp_path / "mlflow.db").exists()
    with pytest.raises(ValueError, match=r"distill.batch \(6\) must be divisible by the data-parallel size \(4\)"):
        rank_slots(6, 0, 4)
    assert rank_slots(8, 1, 2).tolist() == [4, 5, 6, 7]
