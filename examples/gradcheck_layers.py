"""Build layers, run forward and backward, and check the gradients by finite differences.

python examples/gradcheck_layers.py [numpy|torch|array_api_strict|cupy]
"""

import sys

from xpdiff import backend
from xpdiff.nn.blocks import Attention, ResnetBlock2D
from xpdiff.nn.layers import Conv2d, GroupNorm
from xpdiff.testing import check_backward


def main() -> None:
    xp = backend.namespace_for(sys.argv[1] if len(sys.argv) > 1 else "numpy")
    rng = backend.Generator(0, xp)
    x = rng.normal((2, 8, 6, 6), dtype=xp.float64)
    temb = rng.normal((2, 16), dtype=xp.float64)
    kw = {"dtype": "float64", "xp": xp}
    cases = [
        ("Conv2d 3x3 stride 2", Conv2d(8, 4, 3, stride=2, padding=1, **kw), [x]),
        ("GroupNorm", GroupNorm(4, 8, **kw), [x]),
        ("Attention", Attention(8, heads=2, dim_head=4, norm_num_groups=4, **kw), [x]),
        (
            "ResnetBlock2D",
            ResnetBlock2D(in_channels=8, out_channels=12, temb_channels=16, groups=4, **kw),
            [x, temb],
        ),
    ]
    for name, layer, inputs in cases:
        results = check_backward(layer, inputs)  # raises AssertionError on a mismatch
        worst = max(abs(a - n) for a, n in results.values())
        print(
            f"{name:22s} {len(results):3d} tensors agree; largest |analytic - numeric| {worst:.1e}"
        )


if __name__ == "__main__":
    main()
