"""PyTorch side of the benchmarks and of the accuracy comparison.

Builds the same models as distill's model specs (cnn: c32 c32 p c64 c64 p f256
d0.3 and friends) and either times a training step / eval forward at a batch
size (--bench) or trains the reference recipe on Fashion-MNIST (--train) and
prints the test accuracy per epoch. Run with OPENBLAS_NUM_THREADS=1 and
--threads 2 for PyTorch's best setting on a 2-core machine.
"""
import argparse, gzip, json, math, os, struct, sys, time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def build(spec, in_ch=1, hw=28, classes=10):
    kind, _, body = spec.partition(":")
    toks = body.replace(",", " ").split()
    layers, c, h, flat = [], in_ch, hw, None
    if kind.strip() == "mlp":
        layers.append(nn.Flatten())
        d = in_ch * hw * hw
        for t in toks:
            if t.startswith("d"):
                layers.append(nn.Dropout(float(t[1:])))
                continue
            layers += [nn.Linear(d, int(t)), nn.ReLU()]
            d = int(t)
        layers.append(nn.Linear(d, classes))
        return nn.Sequential(*layers)
    bn = "bn=0" not in toks
    d = None
    for t in toks:
        if t.startswith("bn="):
            continue
        if t[0] == "c":
            layers += [nn.Conv2d(c, int(t[1:]), 3, padding=1, bias=not bn)]
            if bn:
                layers.append(nn.BatchNorm2d(int(t[1:])))
            layers.append(nn.ReLU())
            c = int(t[1:])
        elif t == "p":
            layers.append(nn.MaxPool2d(2))
            h //= 2
        elif t[0] == "f":
            if d is None:
                layers.append(nn.Flatten())
                d = c * h * h
            layers += [nn.Linear(d, int(t[1:])), nn.ReLU()]
            d = int(t[1:])
        elif t[0] == "d":
            layers.append(nn.Dropout(float(t[1:])))
    if d is None:
        layers.append(nn.Flatten())
        d = c * h * h
    layers.append(nn.Linear(d, classes))
    return nn.Sequential(*layers)


def load_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack(">I", data[:4])[0]
    nd = magic & 0xFF
    dims = struct.unpack(">" + "I" * nd, data[4:4 + 4 * nd])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


def bench(args):
    torch.manual_seed(0)
    model = build(args.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    def fwd():
        with torch.inference_mode():
            model(x)
    out = {}
    for name, fn in (("train_step", step), ("eval_forward", fwd)):
        model.train(name == "train_step")
        for _ in range(args.warmup):
            fn()
        t0 = time.perf_counter()
        n = 0
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t0
            if el > args.seconds and n >= 5:
                break
        out[name] = args.batch * n / el
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
                      "model": args.model, "train_samples_per_s": out["train_step"],
                      "eval_samples_per_s": out["eval_forward"]}))


def bench_kd(args):
    """online KD step (teacher eval forward under no_grad + student step) and the plain student step"""
    torch.manual_seed(0)
    teacher, student = build(args.model).eval(), build(args.student)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    T = 4.0
    def kd_step():
        with torch.no_grad():
            t = teacher(x)
        s = student(x)
        loss = 0.1 * F.cross_entropy(s, y) + 0.9 * T * T * F.kl_div(
            F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    def plain_step():
        loss = F.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    out = {}
    for name, fn in (("kd_online", kd_step), ("student", plain_step)):
        for _ in range(args.warmup):
            fn()
        t0, n = time.perf_counter(), 0
        while True:
            fn()
            n += 1
            el = time.perf_counter() - t0
            if el > args.seconds and n >= 5:
                break
        out[name] = args.batch * n / el
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch,
                      "teacher": args.model, "student": args.student,
                      "kd_online_samples_per_s": out["kd_online"], "student_samples_per_s": out["student"]}))


def train(args):
    torch.manual_seed(args.seed)
    d = args.data
    xtr = load_idx(os.path.join(d, "train-images-idx3-ubyte.gz"))
    ytr = load_idx(os.path.join(d, "train-labels-idx1-ubyte.gz"))
    xte = load_idx(os.path.join(d, "t10k-images-idx3-ubyte.gz"))
    yte = load_idx(os.path.join(d, "t10k-labels-idx1-ubyte.gz"))
    if args.limit:
        xtr, ytr = xtr[:args.limit], ytr[:args.limit]
    mean, std = 0.2860, 0.3530
    norm = lambda a: (torch.from_numpy(a.astype(np.float32) / 255.0) - mean) / std
    Xtr, Ytr = norm(xtr).unsqueeze(1), torch.from_numpy(ytr.astype(np.int64))
    Xte, Yte = norm(xte).unsqueeze(1), torch.from_numpy(yte.astype(np.int64))
    model = build(args.model)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = math.ceil(len(Xtr) / args.batch) * args.epochs
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    pad_val = (0.0 - mean) / std
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for ep in range(args.epochs):
        model.train()
        perm = torch.randperm(len(Xtr), generator=g)
        for i in range(0, len(Xtr), args.batch):
            idx = perm[i:i + args.batch]
            xb = Xtr[idx]
            if args.crop:
                p = args.crop
                xp = F.pad(xb, (p, p, p, p), value=pad_val)
                dx = torch.randint(0, 2 * p + 1, (len(idx),), generator=g)
                dy = torch.randint(0, 2 * p + 1, (len(idx),), generator=g)
                xb = torch.stack([xp[j, :, dy[j]:dy[j] + 28, dx[j]:dx[j] + 28] for j in range(len(idx))])
            if args.flip:
                fl = torch.rand(len(idx), generator=g) < 0.5
                xb = torch.where(fl.view(-1, 1, 1, 1), xb.flip(3), xb)
            loss = F.cross_entropy(model(xb), Ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            correct = sum((model(Xte[i:i + 1000]).argmax(1) == Yte[i:i + 1000]).sum().item()
                          for i in range(0, len(Xte), 1000))
        print(json.dumps({"epoch": ep + 1, "test_acc": correct / len(Xte), "seconds": time.time() - t0}), flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn: c32 c32 p c64 c64 p f256 d0.3")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--student", default=None, help="with --bench: time the KD step into this student")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=2)
    ap.add_argument("--flip", type=int, default=1)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.bench and args.student:
        bench_kd(args)
    elif args.bench:
        bench(args)
    if args.train:
        train(args)
