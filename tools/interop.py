#!/usr/bin/env python3
"""`make interop`: distill and PyTorch read each other's checkpoints.

(a) distill -> PyTorch. `distill run` trains a small CNN teacher and an MLP
    student (data.limit images, one epoch); for each checkpoint, the official
    reader (safetensors.torch.load_file, the Rust implementation) loads it,
    the names are turned into the PyTorch module's by the same map
    tools/torch_teacher.py writes, `load_state_dict(strict=True)` takes it, and
    PyTorch's eval-mode logits on the whole Fashion-MNIST test set (normalised
    with the checkpoint's own metadata) must equal `distill eval --logits`'s.
(b) PyTorch -> distill. tools/torch_teacher.py trains a CNN in PyTorch
    (its own names: features.N, classifier.N) and saves it with
    safetensors.torch.save_file in F32, F16 and BF16; `distill eval --model
    --names auto` and `--names @teacher.map` must reproduce PyTorch's logits
    on the test set, and `distill run --teacher.checkpoint ... --teacher.names=auto`
    must report PyTorch's test accuracy for the teacher and distil a student
    from it.

Logits are compared per row: |ours - torch| <= 1e-5 * max_k |torch logit|.
Prints one line per check and exits 1 if any fails; the output is also
written to --log. docs/interop.md records the last output.

Usage (from the repository root; make interop does this in a venv):
    python3 tools/interop.py --distill build/distill --work build/interop --log build/interop.log
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_teacher as tt  # noqa: E402

LINES = []
FAILED = []


def say(msg):
    print(msg, flush=True)
    LINES.append(msg)


def check(name, ok, detail=""):
    say("%-4s %s%s" % ("ok" if ok else "FAIL", name, (": " + detail) if detail else ""))
    if not ok:
        FAILED.append(name)


def run(cmd, **kw):
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        say("command failed (%d): %s\n%s%s" % (p.returncode, " ".join(cmd), p.stdout, p.stderr))
    return p, time.time() - t0


def row_rel(ours, ref):
    """max over logits of |ours - ref| / max_k |ref| of the row"""
    scale = ref.abs().amax(1, keepdim=True).clamp_min(1e-30)
    return ((ours - ref).abs() / scale).max().item()


def compare_logits(name, path, ref):
    z = load_file(path)["logits"]
    if z.shape != ref.shape:
        check(name, False, "shapes %s vs %s" % (tuple(z.shape), tuple(ref.shape)))
        return
    r = row_rel(z, ref)
    check(name, r <= 1e-5, "max row-relative difference %.2e over %d logits" % (r, ref.numel()))


def ours_to_theirs(state, mapping):
    """renames distill's tensors to the PyTorch module's (module prefixes)"""
    inv = {ours: theirs for theirs, ours in mapping}
    out = {}
    for k, v in state.items():
        mod, _, leaf = k.rpartition(".")
        out[inv[mod] + "." + leaf] = v
    return out


def distill_to_torch(a, xt, yt):
    say("== (a) distill -> PyTorch")
    work = os.path.join(a.work, "a")
    os.makedirs(work, exist_ok=True)
    ini = os.path.join(work, "a.ini")
    with open(ini, "w") as f:
        f.write("[run]\nname = a\nout = %s\nseed = 0\nthreads = %d\n"
                "[data]\nlimit = %d\n"
                "[teacher]\nmodel = cnn: c8 p c16 p f32\nepochs = 1\n"
                "[student]\nmodel = mlp: 64\n"
                "[distill]\nloss = ce(weight=0.1) + kd(T=4, weight=0.9)\n"
                "[train]\nepochs = 1\nbatch = 128\n" % (work, a.threads, a.limit))
    p, secs = run([a.distill, "run", ini, "--quiet"])
    check("distill run trains a teacher, baseline and student", p.returncode == 0, "%.1f s" % secs)
    if p.returncode:
        return
    for role in ("teacher", "baseline", "student"):
        ck = os.path.join(work, "a", role + ".safetensors")
        zp = os.path.join(work, role + "_logits.safetensors")
        p, _ = run([a.distill, "eval", ck, "--logits", zp, "--threads", str(a.threads)])
        if p.returncode:
            check("%s: distill eval --logits" % role, False)
            continue
        with safe_open(ck, framework="pt") as f:
            meta = f.metadata()
        state = load_file(ck)
        spec = meta["model"]
        mean, std = (float(v) for v in meta["normalize"].split(","))
        model, mapping = tt.build(spec, classes=int(meta["classes"]))
        missing = model.load_state_dict(ours_to_theirs(state, mapping), strict=True)
        check("%s (%s): safetensors.torch.load_file + load_state_dict(strict=True)" % (role, spec),
              not missing.missing_keys and not missing.unexpected_keys, "%d tensors" % len(state))
        x = torch.from_numpy(np.array(xt)).float().unsqueeze(1)
        x = (x / 255.0 - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)
        model.eval()
        with torch.no_grad():
            ref = torch.cat([model(x[i:i + 1000]) for i in range(0, len(x), 1000)])
        compare_logits("%s: PyTorch's logits = distill eval's" % role, zp, ref)
        acc = 100 * (ref.argmax(1).numpy() == yt).mean()
        m = re.search(r"accuracy ([0-9.]+)%", p.stdout)
        check("%s: the same test accuracy" % role, m is not None and abs(float(m.group(1)) - acc) < 0.006,
              "PyTorch %.2f%%, distill eval %s%%" % (acc, m.group(1) if m else "?"))


def torch_to_distill(a, yt):
    say("== (b) PyTorch -> distill")
    work = os.path.join(a.work, "b")
    spec = "cnn: c16 p c32 p f64"
    p, secs = run([sys.executable, os.path.join(os.path.dirname(__file__), "torch_teacher.py"), "--model", spec,
                   "--train-epochs", "1", "--limit", str(a.limit), "--n", "10000", "--threads", str(a.threads),
                   "--out", work])
    check("torch_teacher.py trains '%s' in PyTorch and saves F32/F16/BF16" % spec, p.returncode == 0, "%.1f s" % secs)
    if p.returncode:
        return
    ref = load_file(os.path.join(work, "logits.safetensors"))
    for suffix, names in (("", "auto"), ("", "@" + os.path.join(work, "teacher.map")), ("_f16", "auto"),
                          ("_bf16", "auto")):
        ck = os.path.join(work, "teacher%s.safetensors" % suffix)
        zp = os.path.join(work, "ours%s_%s.safetensors" % (suffix, "auto" if names == "auto" else "map"))
        p, _ = run([a.distill, "eval", ck, "--model", spec, "--names", names, "--logits", zp, "--threads",
                    str(a.threads)])
        label = "teacher%s.safetensors with --names %s" % (suffix, "auto" if names == "auto" else "@teacher.map")
        if p.returncode:
            check(label, False)
            continue
        compare_logits(label + ": distill's logits = PyTorch's", zp, ref["logits" + suffix])
    acc = (ref["logits"].argmax(1) == ref["labels"]).double().mean().item()
    ini = os.path.join(work, "b.ini")
    with open(ini, "w") as f:
        f.write("[run]\nname = b\nout = %s\nseed = 0\nthreads = %d\n"
                "[data]\nlimit = %d\n"
                "[teacher]\nmodel = %s\n"
                "[student]\nmodel = mlp: 64\n"
                "[distill]\nbaseline = 0\nloss = ce(weight=0.1) + kd(T=4, weight=0.9)\n"
                "[train]\nepochs = 1\nbatch = 128\n" % (work, a.threads, a.limit, spec))
    p, secs = run([a.distill, "run", ini, "--teacher.checkpoint=" + os.path.join(work, "teacher.safetensors"),
                   "--teacher.names=auto", "--quiet"])
    check("distill run --teacher.checkpoint teacher.safetensors --teacher.names=auto", p.returncode == 0,
          "%.1f s" % secs)
    if p.returncode:
        return
    with open(os.path.join(work, "b", "summary.json")) as f:
        s = json.load(f)
    t = s["teacher"]
    check("the run loaded the PyTorch teacher and measures PyTorch's test accuracy",
          t["loaded"] and abs(t["test_acc"] - acc) < 1e-9,
          "distill %.2f%%, PyTorch %.2f%%" % (100 * t["test_acc"], 100 * acc))
    say("     student distilled from it: %.2f%% test accuracy" % (100 * s["student"]["test_acc"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--distill", default="build/distill")
    ap.add_argument("--work", default="build/interop")
    ap.add_argument("--log", default="build/interop.log")
    ap.add_argument("--limit", type=int, default=5000, help="training images for the small runs")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.work, exist_ok=True)
    p = subprocess.run([a.distill, "--version"], capture_output=True, text=True)
    say("interop: %s, torch %s, safetensors %s, numpy %s, Python %s" % (
        p.stdout.strip(), torch.__version__, safetensors.__version__, np.__version__, platform.python_version()))
    xt, yt = tt.fashion("test")
    distill_to_torch(a, xt, yt)
    torch_to_distill(a, yt)
    say("interop: %s" % ("all checks passed" if not FAILED else "%d FAILED: %s" % (len(FAILED), "; ".join(FAILED))))
    with open(a.log, "w") as f:
        f.write("\n".join(LINES) + "\n")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
