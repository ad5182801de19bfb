#!/usr/bin/env python
"""An independent judge of generated digits, to confirm what ``xpdiff evaluate`` reports.

    python benchmarks/judge.py SAMPLES.npz            # from `xpdiff evaluate --save-samples`
    python benchmarks/judge.py RUN_DIR [--per-digit 50] [--scheduler dpm] ...

A PyTorch CNN of another architecture than xpdiff's classifier (two VGG-style stages of two
3x3 convolutions with BatchNorm and max pooling, a 128-wide BatchNorm/dropout head; xpdiff's
has three strided convolutions and no normalisation), trained with random rotations
(+-12 degrees), scalings (0.9-1.1) and shifts (+-2/28 of the side) on the same training split
as xpdiff's classifier, so the held-out digits stay unseen by both.  Its trained weights are
cached in ``$XPDIFF_CACHE/judge`` (default ``~/.cache/xpdiff/judge``) under a key that
hashes the judge's own source (network, augmentation, training, constants), the image size,
the data and the torch version, so an edit of the judge trains a new one.

It reports the figures of ``xpdiff.digits.evaluation.evaluate_samples`` computed here
independently (its own features, its own background and Frechet code, SciPy's ``sqrtm``):
accuracy and confident accuracy (softmax >= 0.9), the worst digit, the Frechet distance of
its 128 features to real held-out half A next to the floor (half B vs half A, equal counts),
background (border mean) and the share of near-black pixels against real digits, and per
digit.  Unless ``--no-xpdiff``, xpdiff's own report on the same samples is shown next to it.

Given a run directory it first runs ``xpdiff evaluate RUN --save-samples`` (printing
xpdiff's report) and judges the file written.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without ``pip install -e .``
    sys.path.insert(0, str(ROOT))

CONFIDENCE = 0.9
INK_LEVEL = 0.1
TARGETS = {"accuracy": 0.99, "worst_digit": 0.97, "fd_ratio": 1.5, "background_ratio": 1.2}
WIDTHS = {14: (32, 64), 28: (24, 48)}
EPOCHS = 30


# ---------------------------------------------------------------------------
# the network and its training
# ---------------------------------------------------------------------------
class JudgeNet(nn.Module):
    """(B, 1, S, S) in [-1, 1] -> logits (B, 10); :meth:`features` are the 128 head units."""

    def __init__(self, size: int):
        super().__init__()
        c1, c2 = WIDTHS[size]

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )

        self.trunk = nn.Sequential(stage(1, c1), stage(c1, c2), nn.Flatten())
        side = size // 4
        self.head = nn.Sequential(
            nn.Linear(c2 * side * side, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU()
        )
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.features(x)))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random rotation, scale and shift of each image (B, 1, S, S); background stays -1."""
    b, _, s, _ = x.shape
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(12)
    scale = 0.9 + 0.2 * torch.rand(b, generator=gen)
    shift = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 / 28) * 2  # normalized coords
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0: sample x + 1 so the padding is the black background
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_judge(x: np.ndarray, y: np.ndarray, size: int, log: bool = True) -> JudgeNet:
    """Train on (N, 1, S, S) float32 in [-1, 1] and (N,) int64 labels; seed 0."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = JudgeNet(size)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    batch = 128
    steps = EPOCHS * math.ceil(len(yt) / batch)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        net.train()
        perm = torch.randperm(len(yt), generator=gen)
        correct = 0
        for i in range(0, len(yt), batch):
            idx = perm[i : i + batch]
            xb = augment(xt[idx], gen)
            logits = net(xb)
            loss = F.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == yt[idx]).sum())
        if log:
            print(
                f"judge: size {size} epoch {epoch + 1}/{EPOCHS} train acc "
                f"{correct / len(yt):.4f} ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return net.eval()


@torch.no_grad()
def run_net(net: JudgeNet, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, 10), features (N, 128)) as float64."""
    probs, feats = [], []
    for i in range(0, len(x), 500):
        f = net.features(torch.from_numpy(np.ascontiguousarray(x[i : i + 500])))
        feats.append(f.double().numpy())
        probs.append(torch.softmax(net.out(f).double(), 1).numpy())
    return np.concatenate(probs), np.concatenate(feats)


def cache_root() -> Path:
    env = os.environ.get("XPDIFF_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "xpdiff") / "judge"


def source_hash() -> str:
    """A hash of the judge's own source: its network, augmentation, training and constants."""
    parts = [inspect.getsource(obj) for obj in (JudgeNet, augment, train_judge)]
    parts.append(repr((WIDTHS, EPOCHS)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_or_train(size: int, prep) -> tuple[JudgeNet, dict]:
    """The judge for ``size``: cached under :func:`source_hash`, the size and the data."""
    from xpdiff.digits.data import fingerprint

    h = hashlib.sha256(source_hash().encode())
    h.update(f"{size} {fingerprint(*prep)} torch {torch.__version__.split('+')[0]}".encode())
    stem = cache_root() / f"judge_{size}_{h.hexdigest()[:12]}"
    weights, meta = stem.with_suffix(".pt"), stem.with_suffix(".json")
    net = JudgeNet(size)
    if weights.is_file() and meta.is_file():
        net.load_state_dict(torch.load(weights, weights_only=True))
        return net.eval(), json.loads(meta.read_text())
    print(f"training the {size}x{size} judge once; cached in {stem.parent}", file=sys.stderr)
    t0 = time.perf_counter()
    net = train_judge(prep.x_train, prep.y_train, size)
    probs, _ = run_net(net, prep.x_test)
    info = {
        "size": size,
        "heldout_accuracy": float((probs.argmax(1) == prep.y_test).mean()),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "epochs": EPOCHS,
    }
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".pt.tmp")
    torch.save(net.state_dict(), tmp)
    os.replace(tmp, weights)
    meta.write_text(json.dumps(info, indent=1))  # last: a record means complete weights
    return net, info


# ---------------------------------------------------------------------------
# the figures, computed independently of xpdiff.digits.evaluation
# ---------------------------------------------------------------------------
def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID formula (Heusel et al. 2017) with SciPy's matrix square root."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sa @ sb)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(sa + sb - 2 * covmean), 0.0))


def background(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: border mean, border share above 0.1, share of pixels <= 0.1 (in [0, 1])."""
    p = np.clip((x[:, 0].astype(np.float64) + 1) / 2, 0, 1)
    s = p.shape[1]
    w = max(1, round(s / 7))
    ring = np.ones((s, s), bool)
    ring[w : s - w, w : s - w] = False
    border = p[:, ring]
    return {
        "border_mean": border.mean(1),
        "border_ink": (border > INK_LEVEL).mean(1),
        "near_black": (p <= INK_LEVEL).reshape(len(p), -1).mean(1),
    }


def halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint halves of the real digits, stratified: alternate within each shuffled class."""
    perm = np.random.default_rng(seed).permutation(len(labels))
    members = [perm[labels[perm] == d] for d in range(10)]
    members = [m[: 2 * (len(m) // 2)] for m in members]  # an odd one out joins neither half
    return np.concatenate([m[0::2] for m in members]), np.concatenate([m[1::2] for m in members])


def judge(net: JudgeNet, images, labels, real_x, real_y, seed: int = 0) -> dict:
    """The report's figures as a dict (per-digit dicts keyed by digit)."""
    probs, feats = run_net(net, images)
    rprobs, rfeats = run_net(net, real_x)
    hit = probs.argmax(1) == labels
    sure = hit & (probs.max(1) >= CONFIDENCE)
    rhit = rprobs.argmax(1) == real_y
    ia, ib = halves(real_y, seed)
    k = min(len(images), len(ia))
    half_a = rfeats[ia[:k]]
    order = np.random.default_rng(seed + 1).permutation(len(images))
    draws = len(images) // k
    fd = np.mean([frechet(feats[order[i * k : (i + 1) * k]], half_a) for i in range(draws)])
    bg, rbg = background(images), background(real_x)
    digits = sorted(set(labels.tolist()))
    per = {
        d: {
            "count": int((labels == d).sum()),
            "accuracy": float(hit[labels == d].mean()),
            "confident": float(sure[labels == d].mean()),
            "background": float(bg["border_mean"][labels == d].mean()),
            "real_background": float(rbg["border_mean"][real_y == d].mean()),
        }
        for d in digits
    }
    out = {
        "judge_heldout_accuracy": float(rhit.mean()),
        "judge_heldout_confident": float((rhit & (rprobs.max(1) >= CONFIDENCE)).mean()),
        "accuracy": float(hit.mean()),
        "confident_accuracy": float(sure.mean()),
        "frechet_distance": float(fd),
        "real_floor": frechet(rfeats[ib[:k]], half_a),
        "fd_samples": k,
        "fd_draws": draws,
        "per_digit": per,
    }
    for key in ("border_mean", "border_ink", "near_black"):
        out[key] = float(bg[key].mean())
        out["real_" + key] = float(rbg[key].mean())
    out["fd_ratio"] = out["frechet_distance"] / out["real_floor"]
    out["background_ratio"] = out["border_mean"] / out["real_border_mean"]
    return out


def format_report(r: dict, n: int, size: int, xp_report=None) -> str:
    """The strict figures (judge, and xpdiff's next to them when given), then per digit."""
    worst = min(r["per_digit"], key=lambda d: (r["per_digit"][d]["accuracy"], d))
    t = TARGETS
    # (name, value, target text, met or None for no target)
    rows = [
        ("accuracy", r["accuracy"], f">= {t['accuracy']}", r["accuracy"] >= t["accuracy"]),
        (
            f"worst digit ({worst})",
            r["per_digit"][worst]["accuracy"],
            f">= {t['worst_digit']}",
            r["per_digit"][worst]["accuracy"] >= t["worst_digit"],
        ),
        ("confident accuracy (p >= 0.9)", r["confident_accuracy"], "", None),
        (
            "Frechet distance / floor",
            r["fd_ratio"],
            f"<= {t['fd_ratio']}",
            r["fd_ratio"] <= t["fd_ratio"],
        ),
        (
            "background / real",
            r["background_ratio"],
            f"<= {t['background_ratio']}",
            r["background_ratio"] <= t["background_ratio"],
        ),
    ]
    xp = []
    if xp_report is not None:
        xp = [
            xp_report.accuracy,
            xp_report.worst_digit[1],
            xp_report.confident_accuracy,
            xp_report.fd_ratio,
            xp_report.background_ratio,
        ]
    lines = [
        f"Independent judge: {n} samples at {size}x{size}; the judge scores "
        f"{r['judge_heldout_accuracy']:.4f} on real held-out digits "
        f"({r['judge_heldout_confident']:.4f} confident)",
        f"  {'strict figures':<31} {'judge':>7}  {'target':<7}  met"
        + (f"  {'xpdiff':>7}" if xp else ""),
    ]
    for i, (name, value, target, ok) in enumerate(rows):
        met = "" if ok is None else ("yes" if ok else "NO")
        extra = f"  {xp[i]:>7.3f}" if xp and xp[i] is not None else ""
        lines.append(f"  {name:<31} {value:>7.3f}  {target:<7}  {met:<3}{extra}")
    lines += [
        "",
        f"  Frechet distance (judge features) {r['frechet_distance']:.2f} vs floor "
        f"{r['real_floor']:.2f} ({r['fd_samples']} vs {r['fd_samples']}, "
        f"{r['fd_draws']} draw(s))",
        f"  border mean {r['border_mean']:.4f} vs real {r['real_border_mean']:.4f}; border "
        f"pixels above 0.1 {r['border_ink']:.4f} vs {r['real_border_ink']:.4f}; near-black "
        f"pixels {r['near_black']:.4f} vs {r['real_near_black']:.4f}",
        "",
        "  digit  count  accuracy  confident  background  real bg",
    ]
    for d, p in sorted(r["per_digit"].items()):
        lines.append(
            f"  {d:>5}  {p['count']:>5}  {p['accuracy']:>8.3f}  {p['confident']:>9.3f}  "
            f"{p['background']:>10.4f}  {p['real_background']:>7.4f}"
        )
    lines.append(
        f"  {'all':>5}  {n:>5}  {r['accuracy']:>8.3f}  {r['confident_accuracy']:>9.3f}  "
        f"{r['border_mean']:>10.4f}  {r['real_border_mean']:>7.4f}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def _samples_from_run(args: argparse.Namespace, tmp: str) -> Path:
    from xpdiff.digits.cli import main as xpdiff_main

    out = Path(tmp) / "samples.npz"
    argv = ["evaluate", args.samples, "--per-digit", str(args.per_digit), "--save-samples"]
    argv += [str(out), "--scheduler", args.scheduler, "--seed", str(args.seed)]
    if args.steps is not None:
        argv += ["--steps", str(args.steps)]
    if args.guidance is not None:
        argv += ["--guidance", str(args.guidance)]
    if xpdiff_main(argv) != 0:
        raise SystemExit(f"judge: xpdiff evaluate {args.samples} failed")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("samples", help="an .npz from `xpdiff evaluate --save-samples`, or a run dir")
    p.add_argument("--per-digit", type=int, default=50, help="(run dir) samples per digit")
    p.add_argument("--scheduler", default="ddim", help="(run dir) sampler")
    p.add_argument("--steps", type=int, help="(run dir) sampling steps")
    p.add_argument("--guidance", type=float, help="(run dir) guidance scale")
    p.add_argument("--seed", type=int, default=0, help="(run dir) seed of the noise")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--no-xpdiff", action="store_true", help="skip xpdiff's figures")
    p.add_argument("--json", help="also write the judge's figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from xpdiff.digits.classifier import heldout_digits

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.samples)
        if path.is_dir():
            path = _samples_from_run(args, tmp)
        with np.load(path) as z:
            images = z["images"].astype(np.float32)
            labels = z["labels"].astype(np.int64)
            settings = json.loads(str(z["settings"])) if "settings" in z else {}
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[2] not in (14, 28):
        raise SystemExit(f"judge: expected images (N, 1, 14|28, 14|28), got {images.shape}")
    size = images.shape[2]
    prep = heldout_digits(size, settings.get("data"))
    net, info = load_or_train(size, prep)
    report = judge(net, images, labels, prep.x_test, prep.y_test)
    xp_report = None
    if not args.no_xpdiff:
        from xpdiff.digits.classifier import load_or_train_classifier
        from xpdiff.digits.evaluation import evaluate_samples

        clf = load_or_train_classifier(size, data_path=settings.get("data"))
        xp_report = evaluate_samples(clf, images, labels, prep.x_test, prep.y_test)
    if settings:
        print("samples: " + ", ".join(f"{k} {v}" for k, v in sorted(settings.items())))
    print(format_report(report, len(labels), size, xp_report))
    if args.json:
        report["settings"] = settings
        report["judge"] = info
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
