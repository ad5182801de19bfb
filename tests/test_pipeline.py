"""Sampling loop: shapes, range, determinism, guidance arithmetic, trajectories, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import TINY_UNET

from xpdiff import backend
from xpdiff.digits.images import SEPARATOR, grid, save_gif, save_grid
from xpdiff.models import UNet2DModel
from xpdiff.nn import init
from xpdiff.pipelines import generate
from xpdiff.schedulers import DDIMScheduler, DDPMScheduler

CFG = TINY_UNET


def model_on(xp, dtype="float32"):
    init.manual_seed(0)
    return UNet2DModel(**CFG, dtype=dtype, xp=xp)


@pytest.mark.parametrize("kind", [DDIMScheduler, DDPMScheduler])
def test_generate_shapes_range_namespace(xp, kind):
    m = model_on(xp)
    res = generate(
        m,
        kind(),
        [0, 1, 2],
        num_inference_steps=4,
        guidance_scale=2.0,
        null_class=3,
        seed=1,
        return_trajectory=True,
    )
    assert backend.get_namespace(res.images) is xp or backend.library_name(
        backend.get_namespace(res.images)
    ) == backend.library_name(xp)
    assert tuple(res.images.shape) == (3, 1, 6, 6)
    assert backend.dtype_name(res.images.dtype) == "float32"
    a = backend.to_numpy(res.images)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert len(res.trajectory) == 5 and len(res.timesteps) == 4


def test_generate_is_deterministic_and_seed_dependent():
    xp = backend.namespace_for("numpy")
    m = model_on(xp)
    a = generate(m, DDIMScheduler(), [1, 2], num_inference_steps=3, seed=5).images
    b = generate(m, DDIMScheduler(), [1, 2], num_inference_steps=3, seed=5).images
    c = generate(m, DDIMScheduler(), [1, 2], num_inference_steps=3, seed=6).images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_guidance_combines_conditional_and_null_predictions(monkeypatch):
    """With guidance w the step sees eps_null + w (eps_label - eps_null)."""
    xp = backend.namespace_for("numpy")
    m = model_on(xp, "float64")
    seen = []
    sched = DDIMScheduler()
    real_step = sched.step

    def spy(eps, t, x, **kw):
        seen.append((eps, x, t))
        return real_step(eps, t, x, **kw)

    monkeypatch.setattr(sched, "step", spy)
    generate(m, sched, [1, 2], num_inference_steps=2, guidance_scale=3.0, null_class=3, seed=0)
    eps, x, t = seen[0]
    cond = m(x, t, np.array([1, 2]))
    null = m(x, t, np.array([3, 3]))
    np.testing.assert_allclose(eps, null + 3.0 * (cond - null), rtol=1e-10, atol=1e-12)


def test_guidance_interval_guides_only_inside_it(monkeypatch):
    """Inside [t_low, t_high] the step sees the guided prediction, outside the conditional
    one alone; an interval covering every timestep is plain guidance."""
    xp = backend.namespace_for("numpy")
    m = model_on(xp, "float64")
    sched = DDIMScheduler()
    sched.set_timesteps(4)
    ts = [int(t) for t in sched.timesteps]  # 750, 500, 250, 0
    seen = []
    real_step = sched.step

    def spy(eps, t, x, **kw):
        seen.append((eps, x, int(t)))
        return real_step(eps, t, x, **kw)

    monkeypatch.setattr(sched, "step", spy)
    kw = dict(num_inference_steps=4, guidance_scale=3.0, null_class=3, seed=0)
    generate(m, sched, [1, 2], guidance_interval=(ts[2], ts[1]), **kw)
    for eps, x, t in seen:
        cond = m(x, t, np.array([1, 2]))
        want = cond
        if ts[2] <= t <= ts[1]:
            null = m(x, t, np.array([3, 3]))
            want = null + 3.0 * (cond - null)
        np.testing.assert_allclose(eps, want, rtol=1e-10, atol=1e-12, err_msg=f"t={t}")
    monkeypatch.undo()
    full = generate(m, DDIMScheduler(), [1, 2], **kw).images
    covering = generate(m, DDIMScheduler(), [1, 2], guidance_interval=(0, 999), **kw).images
    np.testing.assert_array_equal(full, covering)


def test_guidance_interval_between_sampled_timesteps_is_warned():
    """DDIM 50 samples t = 980, 960, ..., 20, 0: (5, 9) holds none of them."""
    m = model_on(backend.namespace_for("numpy"))
    kw = dict(num_inference_steps=50, guidance_scale=2.0, null_class=3)
    with pytest.warns(UserWarning) as caught:
        res = generate(m, DDIMScheduler(), [1], guidance_interval=(5, 9), **kw)
    assert res.timesteps[-2:] == [20, 0]
    assert len(caught) == 1 and caught[0].filename == __file__
    text = str(caught[0].message)
    assert "guidance_interval (5, 9)" in text and "of the 50 sampled timesteps, got none" in text
    assert "the nearest: 0 below and 20 above" in text and "no step is guided" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # an interval holding a sampled step, or no guidance at all: nothing to warn about
        generate(m, DDIMScheduler(), [1], guidance_interval=(5, 20), **kw)
        generate(m, DDIMScheduler(), [1], guidance_interval=(5, 9), **{**kw, "guidance_scale": 1})


@pytest.mark.parametrize(
    "interval,message",
    [
        ((5, 2), r"guidance_interval\[1\] to be an integer >= 5 and <= 999, got 2"),
        ((-1, 2), r"guidance_interval\[0\] to be an integer >= 0, got -1"),
        ((0, 1000), r"guidance_interval\[1\] to be an integer >= 0 and <= 999, got 1000"),
        ((1.5, 2), r"guidance_interval\[0\] to be an integer"),
        (7, r"guidance_interval to be a pair \(t_low, t_high\) or None, got 7"),
        ((1, 2, 3), r"a pair \(t_low, t_high\) or None, got \(1, 2, 3\)"),
    ],
)
def test_guidance_interval_errors(interval, message):
    m = model_on(backend.namespace_for("numpy"))
    with pytest.raises(ValueError, match=message):
        generate(
            m, DDIMScheduler(), [1], guidance_scale=2.0, null_class=3, guidance_interval=interval
        )


def test_batches_larger_than_max_batch_give_the_same_images():
    xp = backend.namespace_for("numpy")
    m = model_on(xp, "float64")
    labels = [0, 1, 2, 0, 1]
    a = generate(
        m, DDIMScheduler(), labels, num_inference_steps=2, guidance_scale=2.0, null_class=3, seed=0
    ).images
    b = generate(
        m,
        DDIMScheduler(),
        labels,
        num_inference_steps=2,
        guidance_scale=2.0,
        null_class=3,
        seed=0,
        max_batch=2,
    ).images
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_generate_errors():
    xp = backend.namespace_for("numpy")
    m = model_on(xp)
    with pytest.raises(ValueError, match=r"expected labels in \[0, 4\), got \[7\]"):
        generate(m, DDIMScheduler(), [7])
    with pytest.raises(ValueError, match="needs class_labels and null_class"):
        generate(m, DDIMScheduler(), [1], guidance_scale=2.0)
    with pytest.raises(ValueError, match="class-conditional"):
        generate(m, DDIMScheduler(), batch_size=2)
    with pytest.raises(ValueError, match="expected a DDPMScheduler or DDIMScheduler"):
        generate(m, object(), [1])


def test_grid_and_files(tmp_path):
    hx = backend.namespace_for("numpy")
    imgs = hx.ones((3, 1, 4, 5), dtype=hx.float32)
    g = grid(imgs, nrow=2, pad=1)
    assert g.shape == (2 * 5 + 1, 2 * 6 + 1) and int(g.max()) == 255
    # grey separators, and the empty fourth cell grey too
    assert int(g[0, 0]) == SEPARATOR and int(g[-2, -2]) == SEPARATOR
    assert int(g[1, 1]) == 255
    save_grid(imgs, tmp_path / "g.png", nrow=2)
    save_gif([imgs, -imgs], tmp_path / "g.gif", nrow=2)
    from PIL import Image

    assert Image.open(tmp_path / "g.gif").n_frames == 2
    with pytest.raises(ValueError, match=r"expected \(N, 1, H, W\) or \(N, 3, H, W\)"):
        grid(hx.ones((3, 4, 5)), nrow=2)
    with pytest.raises(ValueError, match=r"expected \(N, 1, H, W\) or \(N, 3, H, W\)"):
        grid(hx.ones((3, 2, 4, 5)), nrow=2)


def test_rgb_grid_keeps_the_colours(tmp_path):
    hx = backend.namespace_for("numpy")
    red = hx.stack([hx.ones((4, 5)), -hx.ones((4, 5)), -hx.ones((4, 5))])  # (3, H, W)
    imgs = hx.stack([red, -red])  # red, then cyan
    g = grid(imgs, nrow=2, pad=1, scale=2)
    assert g.shape == (2 * (4 + 2), 2 * (2 * 5 + 3), 3) and g.dtype == hx.uint8
    assert g[2, 2, :].tolist() == [255, 0, 0] and g[2, 14, :].tolist() == [0, 255, 255]
    assert g[0, 0, :].tolist() == [SEPARATOR] * 3
    save_grid(imgs, tmp_path / "rgb.png", nrow=2, row_labels=["a"])
    from PIL import Image

    assert Image.open(tmp_path / "rgb.png").mode == "RGB"


def test_labels_title_and_gif_titles(tmp_path):
    from PIL import Image

    hx = backend.namespace_for("numpy")
    imgs = -hx.ones((4, 1, 6, 6), dtype=hx.float32)
    save_grid(imgs, tmp_path / "plain.png", nrow=2, scale=4)
    save_grid(imgs, tmp_path / "rows.png", nrow=2, scale=4, row_labels=["0", "1"])
    save_grid(imgs, tmp_path / "all.png", nrow=2, scale=4, title="t", col_labels=["a", "b"])
    plain = Image.open(tmp_path / "plain.png")
    rows = Image.open(tmp_path / "rows.png")
    both = Image.open(tmp_path / "all.png")
    assert plain.size == (2 * 7 * 4 + 4, 2 * 7 * 4 + 4)
    assert rows.size[1] == plain.size[1] and rows.size[0] > plain.size[0]  # a left margin
    assert both.size[0] == plain.size[0] and both.size[1] > plain.size[1]  # lines above, below
    margin = hx.asarray(rows.convert("L"))[:, : rows.size[0] - plain.size[0]]
    assert int(hx.min(margin)) < 128 and int(hx.max(margin)) == 255  # dark text on white
    save_gif([imgs, imgs], tmp_path / "t.gif", nrow=2, titles=["step 0/1", "step 1/1"])
    assert Image.open(tmp_path / "t.gif").n_frames == 2
    with pytest.raises(ValueError, match=r"one title per frame \(2\), got 1"):
        save_gif([imgs, imgs], tmp_path / "u.gif", nrow=2, titles=["x"])


def test_generate_progress_bar(capsys):
    m = model_on(backend.namespace_for("numpy"))
    generate(m, DDIMScheduler(), [1, 2], num_inference_steps=3, progress=True)
    err = capsys.readouterr().err
    assert "sampling" in err
    generate(m, DDIMScheduler(), [1, 2], num_inference_steps=3)
    assert capsys.readouterr().err == ""
