"""The CUDA execution provider against float64 and the CPU provider, in two steps for a GPU machine that has neither
TensorFlow nor a network:

    python -m benchmarks.gpu_check prepare DIR    # here: export the suite's four workloads (auto mode) into DIR with
                                                  # the first 2,000 of the suite's 100,000 points (the CNN: 50 of 2,000)
                                                  # and their float64 Jacobians (workloads.py's reference)
    python -m benchmarks.gpu_check run DIR [OUT]  # there (nnpartials, numpy and onnxruntime-gpu only): per workload,
                                                  # the Jacobian through the CPU provider, the CUDA provider with
                                                  # onnxruntime's own defaults, and with use_tf32 = 0 (what
                                                  # Partials now asks for): scaled errors against float64 and against
                                                  # the CPU, and the median of 5 calls at batch 1, 1,000 and 100,000
                                                  # (CNN: 1 and 1,000); OUT/gpu_check.json

Scaled error: max |J - reference| / max(1, max |reference|). The larger batches repeat the reference points. Not a
test: a one-off check for the machines that have a GPU (the result of one is in benchmarks/gpu_check.json).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

#: (workload, reference points, the suite's batch they are the first points of)
WORKLOADS = (("seed", 2000, 100000), ("physics", 2000, 100000), ("wide", 2000, 100000), ("cnn", 50, 2000))
CUDA = "CUDAExecutionProvider"


def prepare(d):
    import nnpartials
    from benchmarks import workloads

    os.makedirs(d, exist_ok=True)
    for name, n, batch in WORKLOADS:
        w = workloads.build(name)
        nnpartials.export(w.keras_model, os.path.join(d, name), mode="auto", overwrite=True,
                          **w.export_options("auto"))
        pts = np.asarray(w.inputs(batch))[:n]
        _, J64 = workloads.reference(w, pts.astype(np.float64))
        np.save(os.path.join(d, f"{name}_xref.npy"), np.asarray(w.shaped(pts), np.float32))
        np.save(os.path.join(d, f"{name}_J64.npy"), np.asarray(J64))
        print(name, "ready", flush=True)


def _scaled(J, R):
    from nnpartials import tolerances

    return tolerances.scaled_error(J, R)[1]


def _timed(p, x, reps=5):
    p.jacobian(x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        p.jacobian(x)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def run(d, out):
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # the CUDA libraries of the nvidia-* wheels, where they are installed
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - the system's libraries may still do
            print("preload_dlls:", e)
    import nnpartials

    if CUDA not in ort.get_available_providers():
        raise SystemExit(f"the CUDA provider is not available here: {ort.get_available_providers()} (install "
                         "onnxruntime-gpu and run this on a machine with an NVIDIA GPU)")
    res = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "cases": {}}
    print("onnxruntime", res["onnxruntime"], res["providers"], flush=True)
    for name, _, _ in WORKLOADS:
        xr = np.load(os.path.join(d, f"{name}_xref.npy"))
        R = np.load(os.path.join(d, f"{name}_J64.npy"))
        b = os.path.join(d, name)
        cpu = nnpartials.Partials(b)
        # onnxruntime's own CUDA defaults (TF32 on where the GPU has it), then what Partials asks for by default
        gpu = nnpartials.Partials(b, providers=[(CUDA, {"use_tf32": "1"}), "CPUExecutionProvider"])
        g32 = nnpartials.Partials(b, providers=[CUDA, "CPUExecutionProvider"])
        c = {"active": gpu.active_providers, "active_no_tf32": g32.active_providers}
        Jc, Jg, J3 = cpu.jacobian(xr)[1], gpu.jacobian(xr)[1], g32.jacobian(xr)[1]
        c["err_cpu"], c["err_gpu_default"], c["err_gpu_no_tf32"] = _scaled(Jc, R), _scaled(Jg, R), _scaled(J3, R)
        c["gpu_vs_cpu"], c["gpu_no_tf32_vs_cpu"] = _scaled(Jg, Jc), _scaled(J3, Jc)
        for batch in ([1, 1000, 100000] if name != "cnn" else [1, 1000]):
            x = np.resize(xr, (batch,) + xr.shape[1:]).astype(np.float32)
            c[f"t_cpu_{batch}"], c[f"t_gpu_{batch}"], c[f"t_gpu_no_tf32_{batch}"] = (
                _timed(cpu, x), _timed(gpu, x), _timed(g32, x))
        res["cases"][name] = c
        print(name, json.dumps(c), flush=True)
    with open(os.path.join(out, "gpu_check.json"), "w") as f:
        json.dump(res, f, indent=1)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "prepare":
        prepare(argv[1])
        return 0
    if len(argv) >= 2 and argv[0] == "run":
        run(argv[1], argv[2] if len(argv) > 2 else ".")
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
