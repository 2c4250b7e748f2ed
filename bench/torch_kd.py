"""PyTorch side of the distillation table: the same student, recipe and
teacher logits (read from distill's cache file with the `safetensors`
package) trained with PyTorch, to check that distill's numbers match.

  python3 bench/torch_kd.py --cache runs/kd_table/teacher.cache --seeds 0 1 2 \
      --method ce --method "kd:1:0.5" --method "kd:4:0.9" --method "lab5k:1:0.9"

A method is `ce`, `kd:T:alpha` (loss (1-alpha) CE + alpha T^2 KL, as
`ce(weight=1-alpha) + kd(T, weight=alpha)`), or `lab5k:T:alpha` (only the
first 5000 images keep labels; CE on those, KD on all; its baseline is CE on
the 5000 for 30 epochs). Prints one JSON line per run.
"""
import argparse, json, math, os, sys, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.numpy import load_file

sys.path.insert(0, os.path.dirname(__file__))
from torch_fashion import build, load_idx  # noqa: E402


def train(X, Y, lab_mask, tlogits, Xte, Yte, spec, epochs, T, alpha, seed, threads):
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    model = build(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = math.ceil(len(X) / 128) * epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    g = torch.Generator().manual_seed(seed)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), 128):
            idx = perm[i:i + 128]
            z = model(X[idx])
            m = lab_mask[idx]
            loss = torch.zeros(())
            if alpha < 1 and m.any():
                loss = loss + (1 - alpha) * F.cross_entropy(z[m], Y[idx][m])
            if alpha > 0:
                loss = loss + alpha * T * T * F.kl_div(F.log_softmax(z / T, 1), F.log_softmax(tlogits[idx] / T, 1),
                                                       reduction="batchmean", log_target=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = sum((model(Xte[i:i + 1000]).argmax(1) == Yte[i:i + 1000]).sum().item() for i in range(0, len(Xte), 1000))
    return acc / len(Xte)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", required=True)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--student", default="mlp: 128")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--method", action="append", default=[])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    d = a.data
    mean, std = 0.2860, 0.3530
    norm = lambda v: ((torch.from_numpy(v.astype(np.float32) / 255.0) - mean) / std).unsqueeze(1)
    X = norm(load_idx(os.path.join(d, "train-images-idx3-ubyte.gz")))
    Y = torch.from_numpy(load_idx(os.path.join(d, "train-labels-idx1-ubyte.gz")).astype(np.int64))
    Xte = norm(load_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz")))
    Yte = torch.from_numpy(load_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz")).astype(np.int64))
    tl = torch.from_numpy(load_file(a.cache)["logits"][0].astype(np.float32))
    assert tl.shape == (len(X), 10), tl.shape
    allm = torch.ones(len(X), dtype=torch.bool)
    for meth in a.method:
        parts = meth.split(":")
        for s in a.seeds:
            t0 = time.time()
            if parts[0] == "ce":
                acc = train(X, Y, allm, tl, Xte, Yte, a.student, a.epochs, 1.0, 0.0, s, a.threads)
                out = {"method": meth, "seed": s, "test_acc": acc}
            elif parts[0] == "kd":
                T, al = float(parts[1]), float(parts[2])
                acc = train(X, Y, allm, tl, Xte, Yte, a.student, a.epochs, T, al, s, a.threads)
                out = {"method": meth, "seed": s, "test_acc": acc}
            else:  # lab5k
                T, al = float(parts[1]), float(parts[2])
                m5 = torch.zeros(len(X), dtype=torch.bool)
                m5[:5000] = True
                base = train(X[:5000], Y[:5000], allm[:5000], tl[:5000], Xte, Yte, a.student, 30, 1.0, 0.0, s, a.threads)
                acc = train(X, Y, m5, tl, Xte, Yte, a.student, a.epochs, T, al, s, a.threads)
                out = {"method": meth, "seed": s, "test_acc": acc, "baseline_acc": base}
            out["seconds"] = time.time() - t0
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
