"""`xpdiff export RUN DIR` (issue 12, section 6): the folder loads in diffusers'
DiffusionPipeline, holds the EMA weights and the run's DDIM sampler, and samples as
xpdiff does.  diffusers and torch are imported inside the tests (skipped without them)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_RUN

from xpdiff.digits.cli import main
from xpdiff.digits.training import TrainConfig, Trainer, load_for_sampling
from xpdiff.nn.module import no_grad

TINY = dict(TINY_RUN, sample_steps=5, guidance_scale=1.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    Trainer(TrainConfig(**TINY), path, progress=False).train()
    return path


@pytest.mark.oracle
def test_export_loads_in_diffusers_and_samples_as_xpdiff(run, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    out = tmp_path / "pipe"
    assert main(["export", str(run), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        "DDIMScheduler",
    ]

    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    model, cfg = load_for_sampling(run)  # EMA weights by default
    sched = cfg.sampling_scheduler("ddim")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.clip_sample is False is cfg.clip_sample
    assert pipe.scheduler.config.beta_schedule == cfg.beta_schedule
    theirs = pipe.unet.state_dict()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(theirs[key].numpy(), value, err_msg=key)

    readme = (out / "README.md").read_text()
    assert f"class {cfg.null_class} is the null" in readme
    assert f"guidance = {cfg.guidance_scale}" in readme and "DiffusionPipeline" in readme
    assert f"eta={cfg.eta}, generator=gen" in readme  # the run's DDIM noise weight

    # the README's guided DDIM loop in diffusers against the same loop in xpdiff, at eta 0
    # (with eta > 0 the two libraries draw different noise)
    labels = np.array([0, 7], dtype=np.int64)
    null = np.full_like(labels, cfg.null_class)
    x0 = np.random.default_rng(0).standard_normal((2, 1, 14, 14)).astype(np.float32)
    sched.set_timesteps(5)
    pipe.scheduler.set_timesteps(5)
    assert sched.timesteps.tolist() == pipe.scheduler.timesteps.tolist()
    x, xt = x0, torch.from_numpy(x0.copy())
    g = cfg.guidance_scale
    with no_grad(), torch.no_grad():
        for t in sched.timesteps:
            both = model(np.concatenate([x, x]), t, np.concatenate([labels, null]))
            eps = both[2:] + g * (both[:2] - both[2:])
            x = sched.step(eps, t, x).prev_sample
            bt = pipe.unet(
                torch.cat([xt, xt]),
                int(t),
                class_labels=torch.from_numpy(np.concatenate([labels, null])),
            ).sample
            xt = pipe.scheduler.step(bt[2:] + g * (bt[:2] - bt[2:]), int(t), xt).prev_sample
    np.testing.assert_allclose(xt.numpy(), x, rtol=0, atol=1e-4)


def test_export_of_a_missing_run_is_one_error_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_export_readme_guides_in_the_run_interval_with_its_eta(tmp_path):
    """The README's snippet carries the run's eta and guidance interval, and is valid Python."""
    from xpdiff.pipelines import export_pipeline

    model, cfg = load_for_sampling_tiny(tmp_path)
    out = export_pipeline(
        model,
        cfg.sampling_scheduler("ddim"),
        tmp_path / "pipe",
        null_class=cfg.null_class,
        guidance_scale=2.0,
        eta=1.0,
        guidance_interval=(0, 600),
    )
    readme = (out / "README.md").read_text()
    assert "Guidance scale of the run: 2.0, at timesteps 0 to 600 only." in readme
    assert "        if not 0 <= t <= 600:\n            eps = cond\n" in readme
    assert "eta=1.0, generator=gen" in readme
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    compile(code, "README.md", "exec")
    sched = cfg.sampling_scheduler("ddim")
    with pytest.raises(
        ValueError, match=r"export_pipeline: expected guidance_interval to be a pair"
    ):
        export_pipeline(model, sched, tmp_path / "p2", guidance_interval=5)
    for bad in ((600, 0), (0, 1000), (-1, 5)):  # out of order, past T - 1, negative
        with pytest.raises(ValueError, match=r"export_pipeline: .*guidance_interval\["):
            export_pipeline(model, sched, tmp_path / "p3", guidance_interval=bad)
    assert not (tmp_path / "p2").exists() and not (tmp_path / "p3").exists()  # nothing written


def load_for_sampling_tiny(tmp_path):
    path = tmp_path / "run"
    Trainer(TrainConfig(**TINY), path, progress=False).train()
    return load_for_sampling(path)
