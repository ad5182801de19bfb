"""``--gpu``: the training/inference comparison on CUDA, xpdiff on CuPy against torch CUDA
eager, and the device memory of one warm step.  ``--_gpu-dryrun`` runs the same code on NumPy
and torch CPU (``HostDryRun``) to test the harness on a machine without a device."""

from __future__ import annotations

import argparse
import contextlib
import gc

from .harness import (
    THROUGHPUT_HEAD,
    XpdiffRunner,
    alternate,
    build_pair,
    fmt,
    forward_agreement,
    host_inputs,
    print_table,
    ratio,
    throughput_rows,
    unet_config,
)


class CupyDevice:
    """xpdiff on CuPy, the torch reference on "cuda"; device-memory probes."""

    torch_device = "cuda"

    def __init__(self) -> None:
        import cupy  # only ever imported here, inside the benchmarks

        from xpdiff import backend

        self.cupy = cupy
        self.xp = backend.namespace_for("cupy")
        dev = cupy.cuda.Device()
        self.sync = dev.synchronize
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        self.info = f"cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}"
        self.pool = cupy.get_default_memory_pool()
        self._used0 = 0
        self._alloc0 = 0

    def xp_mem_start(self) -> None:
        self.pool.free_all_blocks()
        self._used0 = self.pool.used_bytes()

    def xp_mem_end(self) -> float:
        """MiB the CuPy pool grew to above what was in use before (the pool keeps freed
        blocks, so its size after the step is the step's high-water mark)."""
        return (self.pool.total_bytes() - self._used0) / 2**20

    def torch_mem_start(self) -> None:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._alloc0 = torch.cuda.memory_allocated()

    def torch_mem_end(self) -> float:
        import torch

        return (torch.cuda.max_memory_allocated() - self._alloc0) / 2**20

    def cleanup(self) -> None:
        gc.collect()
        self.pool.free_all_blocks()
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()


class HostDryRun(CupyDevice):
    """``--_gpu-dryrun``: the --gpu code path on NumPy and torch CPU (tests the harness on
    a machine without a device; the numbers mean nothing)."""

    torch_device = "cpu"

    def __init__(self) -> None:  # no CuPy here
        from xpdiff import backend

        self.xp = backend.namespace_for("numpy")
        self.sync = lambda: None
        self.name, self.info = "host (dry run)", "numpy, torch cpu"

    def xp_mem_start(self) -> None:
        pass

    def xp_mem_end(self) -> None:
        return None

    def torch_mem_start(self) -> None:
        pass

    def torch_mem_end(self) -> None:
        return None

    def cleanup(self) -> None:
        gc.collect()


def torch_reference_status(device: str) -> str | None:
    """None when diffusers on torch ``device`` can run, else why not."""
    try:
        import diffusers  # noqa: F401
        import torch
    except Exception as err:
        return f"diffusers/torch not importable ({type(err).__name__}: {err})"
    if device == "cuda" and not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def section_gpu(names: list[str], args: argparse.Namespace, results: dict) -> None:
    from xpdiff import backend

    if args._gpu_dryrun:
        dev: CupyDevice = HostDryRun()
    else:
        ok, why = backend.cupy_status()
        if not ok:
            print(f"\n## GPU\nSKIPPED: no usable CUDA device for xpdiff ({why})")
            results["gpu"] = {"skipped": why}
            return
        dev = CupyDevice()
    no_ref = torch_reference_status(dev.torch_device)
    print(f"\nGPU: {dev.name} ({dev.info})")
    if no_ref:
        print(f"torch reference SKIPPED: {no_ref}; xpdiff alone is timed (random weights)")
    batch = args.gpu_batch
    res_gpu: dict = {
        "device": dev.name,
        "info": dev.info,
        "batch": batch,
        "torch_reference": no_ref or "diffusers UNet2DModel, torch eager",
        "configs": {},
    }
    results["gpu"] = res_gpu
    train_rows, infer_rows, mem_rows = [], [], []
    for name in names:
        cfg = unet_config(name)
        print(f"[gpu {name}] building models (batch {batch}) ...", flush=True)
        res = res_gpu["configs"].setdefault(name, {"unet_kwargs": cfg})
        if no_ref:
            xr = XpdiffRunner(cfg, dev.xp, host_inputs(cfg, batch), sync=dev.sync)
            tr, agree = None, None
        else:
            xr, tr = build_pair(cfg, batch, dev.xp, device=dev.torch_device, sync=dev.sync)
            agree = forward_agreement(xr, tr)
        fwd = {"xpdiff": xr.forward} | ({"torch": tr.forward} if tr else {})
        step = {"xpdiff": xr.train_step} | ({"torch": tr.train_step} if tr else {})
        print(
            f"[gpu {name}] inference and training: {args.warmup} warm-up + {args.repeats} "
            "alternated repeats each ...",
            flush=True,
        )
        row, res["infer"] = throughput_rows(
            name, batch, alternate(fwd, args.warmup, args.repeats), agree, True
        )
        infer_rows.append(row)
        row, res["train"] = throughput_rows(name, batch, alternate(step, args.warmup, args.repeats))
        train_rows.append(row)
        # device memory of one (warm) training step above what is held before it
        dev.xp_mem_start()
        xr.train_step()
        x_inc = dev.xp_mem_end()
        t_inc = None
        if tr is not None:
            dev.torch_mem_start()
            tr.train_step()
            t_inc = dev.torch_mem_end()
        res["memory_mib"] = {"xpdiff_pool_growth": x_inc, "torch_peak_increase": t_inc}
        mem_rows.append([name, batch, fmt(x_inc), fmt(t_inc), ratio(x_inc, t_inc)])
        del xr, tr
        dev.cleanup()
    print_table(
        f"GPU inference ({dev.name}), xpdiff on CuPy vs torch eager, median of {args.repeats}",
        THROUGHPUT_HEAD + ["fwd max|diff|"],
        infer_rows,
    )
    print_table(
        f"GPU training step (fwd + MSE + bwd + AdamW) ({dev.name}), median of {args.repeats}",
        THROUGHPUT_HEAD,
        train_rows,
    )
    print_table(
        "GPU memory of one warm training step (MiB above what is held before it: "
        "CuPy pool growth vs torch max_memory_allocated)",
        ["config", "batch", "xpdiff", "torch", "xpdiff/torch"],
        mem_rows,
    )
