#!/usr/bin/env python3
"""A teacher built and saved by PyTorch, for distill to load (docs/interop.md).

Builds the model a distill spec describes (mlp or cnn, docs/models.md) as an
ordinary PyTorch module with PyTorch's own names, deliberately not distill's:

    cnn  ->  features.{i}  (Conv2d, BatchNorm2d, ReLU, MaxPool2d, Dropout)
             classifier.{j} (Flatten, Linear, ReLU, Dropout, ..., the head)
    mlp  ->  {i}            (Flatten, Linear, ReLU, Dropout, ..., the head)

The layers, their order, padding, pooling, flatten order (NCHW) and the
head are those src/nn/model.c builds, so the same weights give the same
logits. Then either trains it briefly (--train-epochs, SGD as
examples/fashion_teacher.ini without augmentation) or keeps PyTorch's random
initialisation, draws random BN affine parameters and runs --bn-batches
training-mode forward passes (no gradient) so that every BN tensor is
non-trivial. Saves the state_dict with safetensors.torch.save_file three
times (F32, and F16 and BF16 copies of the floating tensors), the mapping of
its names to distill's (teacher.map, one `theirs = ours` per line) and, in
eval mode, the logits of the first --n test images normalised as distill's
loader does: (pixel/255 - 0.2860) / 0.3530 in float32.

Outputs in --out DIR:
    teacher.safetensors, teacher_f16.safetensors, teacher_bf16.safetensors
    teacher.map
    logits.safetensors: pixels U8 (n,1,28,28), labels I64 (n), logits (n,K),
        logits_f16 / logits_bf16 (n,K): the logits of the same network with
        its weights rounded to F16 / BF16 (computed in float32 after rounding),
        metadata model, mean, std.

--fixtures DIR writes the small fixtures tests/test_interop.c reads:
    torch_cnn*.safetensors  (cnn: c8 p c16 p f32), torch_cnn.map,
    torch_mlp.safetensors   (mlp: 16 16), torch_ref.safetensors (64 images,
    their labels and every model's logits, named logits_cnn, logits_cnn_f16,
    logits_cnn_bf16, logits_mlp).

Examples (from the repository root):
    python3 tools/torch_teacher.py --config examples/fashion_teacher.ini --out /tmp/tt
    python3 tools/torch_teacher.py --model "cnn: c16 p c32 p f128" --train-epochs 1 --limit 10000 --out /tmp/tt
    python3 tools/torch_teacher.py --fixtures tests/fixtures
"""
import argparse
import configparser
import gzip
import os
import struct
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
DATA_DIR = os.environ.get("KD_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- the model

def build(spec, in_ch=1, hw=28, classes=10):
    """Returns (module, mapping) where mapping is a list of (their module
    prefix, our module prefix) pairs covering every tensor."""
    kind, _, body = spec.partition(":")
    kind = kind.strip()
    toks = body.replace(",", " ").split()
    mapping = []
    if kind == "mlp":
        layers, d, nfc = [nn.Flatten()], in_ch * hw * hw, 0
        for t in toks:
            if t.startswith("d"):
                layers.append(nn.Dropout(float(t[1:])))
                continue
            nfc += 1
            mapping.append((str(len(layers)), "fc%d" % nfc))
            layers += [nn.Linear(d, int(t)), nn.ReLU()]
            d = int(t)
        mapping.append((str(len(layers)), "head"))
        layers.append(nn.Linear(d, classes))
        return nn.Sequential(*layers), mapping
    if kind != "cnn":
        sys.exit("torch_teacher.py: only mlp and cnn specs are supported, got '%s'" % spec)
    bn = "bn=0" not in toks
    feats, cls = [], []
    c, h, w, d = in_ch, hw, hw, None
    nconv = nfc = 0
    for t in toks:
        if t.startswith("bn="):
            continue
        if t[0] == "c":
            nconv += 1
            mapping.append(("features.%d" % len(feats), "conv%d" % nconv))
            feats.append(nn.Conv2d(c, int(t[1:]), 3, padding=1, bias=not bn))
            if bn:
                mapping.append(("features.%d" % len(feats), "bn%d" % nconv))
                feats.append(nn.BatchNorm2d(int(t[1:])))
            feats.append(nn.ReLU())
            c = int(t[1:])
        elif t == "p":
            feats.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        elif t[0] == "f":
            if d is None:
                cls.append(nn.Flatten())
                d = c * h * w
            nfc += 1
            mapping.append(("classifier.%d" % len(cls), "fc%d" % nfc))
            cls += [nn.Linear(d, int(t[1:])), nn.ReLU()]
            d = int(t[1:])
        elif t[0] == "d":
            (cls if d is not None else feats).append(nn.Dropout(float(t[1:])))
        else:
            sys.exit("torch_teacher.py: unknown token '%s' in '%s'" % (t, spec))
    if d is None:
        cls.append(nn.Flatten())
        d = c * h * w
    mapping.append(("classifier.%d" % len(cls), "head"))
    cls.append(nn.Linear(d, classes))
    return nn.Sequential(OrderedDict(features=nn.Sequential(*feats), classifier=nn.Sequential(*cls))), mapping


def spec_from_config(path):
    cp = configparser.ConfigParser(inline_comment_prefixes=(";",))
    cp.read(path)
    return cp.get("teacher", "model", fallback="cnn: c32 c32 p c64 c64 p f256 d0.3").strip().strip("\"'")


# ---------------------------------------------------------------- data

def load_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    nd = data[3]
    dims = struct.unpack(">" + "I" * nd, data[4:4 + 4 * nd])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * nd).reshape(dims)


def fashion(split):
    p = "train" if split == "train" else "t10k"
    def path(base):
        full = os.path.join(DATA_DIR, base)
        return full if os.path.exists(full) else full[:-3]
    x = load_idx(path("%s-images-idx3-ubyte.gz" % p))
    y = load_idx(path("%s-labels-idx1-ubyte.gz" % p))
    return x, y


def normalise(pixels):
    """(pixel/255 - mean)/std in float32, the order of operations of src/data/loader.c"""
    x = torch.from_numpy(np.array(pixels)).float().unsqueeze(1)
    return (x / 255.0 - torch.tensor(FASHION_MEAN, dtype=torch.float32)) / torch.tensor(FASHION_STD, dtype=torch.float32)


# ---------------------------------------------------------------- weights

def randomise_bn(model, bn_batches, seed):
    """PyTorch's initialisation, random BN affine parameters, then training-mode
    forward passes (no gradient) on training images to move the running stats."""
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
    if bn_batches:
        x, _ = fashion("train")
        model.train()
        with torch.no_grad():
            for b in range(bn_batches):
                model(normalise(x[b * 64:(b + 1) * 64]))


def train(model, epochs, limit, seed):
    x, y = fashion("train")
    if limit:
        x, y = x[:limit], y[:limit]
    xs, ys = normalise(x), torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(xs) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 2)
    model.train()
    for e in range(epochs):
        perm = torch.randperm(len(xs), generator=g)
        total = 0.0
        for i in range(0, len(xs), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print("torch_teacher.py: epoch %d loss %.4f" % (e + 1, total / len(xs)), file=sys.stderr)


def rounded(state, dtype):
    """state_dict with floating tensors rounded to dtype (integers untouched)"""
    return OrderedDict((k, v.to(dtype) if v.is_floating_point() else v.clone()) for k, v in state.items())


@torch.no_grad()
def logits_of(model, state, x):
    """eval-mode logits of model with weights `state` (upcast to float32)"""
    model.load_state_dict(OrderedDict((k, v.float() if v.is_floating_point() else v) for k, v in state.items()))
    model.eval()
    return model(x).contiguous()


def eval_forward(model, w, x):
    """The eval-mode forward pass of a module from build() with its tensors
    taken from the dict w (so batch norm's running statistics can be
    differentiated, which torch.batch_norm refuses)."""
    for name, m in model.named_modules():
        p = name + "."
        if isinstance(m, nn.Conv2d):
            x = F.conv2d(x, w[p + "weight"], w.get(p + "bias"), padding=1)
        elif isinstance(m, nn.BatchNorm2d):
            c = lambda t: t[None, :, None, None]
            x = (x - c(w[p + "running_mean"])) / torch.sqrt(c(w[p + "running_var"]) + m.eps) * c(w[p + "weight"]) + c(w[p + "bias"])
        elif isinstance(m, nn.Linear):
            x = F.linear(x, w[p + "weight"], w[p + "bias"])
        elif isinstance(m, nn.ReLU):
            x = F.relu(x)
        elif isinstance(m, nn.MaxPool2d):
            x = F.max_pool2d(x, 2)
        elif isinstance(m, nn.Flatten):
            x = x.flatten(1)
        elif isinstance(m, (nn.Dropout, nn.Sequential)):
            pass  # dropout is the identity in eval mode; containers hold the layers
        else:
            raise TypeError(name)
    return x


def rounding_bound(model, state, x, dt):
    """First-order bound on how far each logit can move when every floating
    tensor w of the state is rounded to nearest in dt:
        |dz| <= sum_w |dz/dw| * e(w),  e(w) = max(u |w|, s)
    with u the unit roundoff (F16 2^-11, BF16 2^-8) and s half the smallest
    subnormal step (F16 2^-25, BF16 2^-134), dz/dw per example by autograd
    at the F32 weights (eval mode). Returns (n, K) float32."""
    u, s = (2.0 ** -11, 2.0 ** -25) if dt == torch.float16 else (2.0 ** -8, 2.0 ** -134)
    model.load_state_dict(state)
    model.eval()
    names = [k for k, v in state.items() if v.is_floating_point()]
    ws = {k: state[k].double() for k in names}
    err = {k: torch.clamp(w.abs() * u, min=s) for k, w in ws.items()}
    m64 = model

    def f(w, xi):
        return eval_forward(m64, w, xi.unsqueeze(0))[0]

    with torch.no_grad():  # the hand-written forward pass is the module's
        gap = (eval_forward(model, ws, x.double()) - model(x).double()).abs().max().item()
    assert gap < 1e-4, "eval_forward differs from the module by %g" % gap
    jac = torch.func.vmap(torch.func.jacrev(f), in_dims=(None, 0))(ws, x.double())
    bound = sum((jac[k].abs() * err[k]).flatten(2).sum(2) for k in names)
    return bound.float().contiguous()


def make(spec, seed, bn_batches, train_epochs, limit):
    torch.manual_seed(seed)
    model, mapping = build(spec)
    randomise_bn(model, bn_batches if not train_epochs else 0, seed)
    if train_epochs:
        train(model, train_epochs, limit, seed)
    state = OrderedDict((k, v.detach().clone().contiguous()) for k, v in model.state_dict().items())
    return model, mapping, state


def map_text(mapping, spec):
    lines = ["# PyTorch module -> distill module for '%s' (written by tools/torch_teacher.py)" % spec]
    lines += ["%s = %s" % (a, b) for a, b in mapping]
    return "\n".join(lines) + "\n"


def write_teacher(out, spec, seed, bn_batches, train_epochs, limit, n):
    os.makedirs(out, exist_ok=True)
    model, mapping, state = make(spec, seed, bn_batches, train_epochs, limit)
    xt, yt = fashion("test")
    pixels, labels = xt[:n], yt[:n]
    x = normalise(pixels)
    ref = {"pixels": torch.from_numpy(np.array(pixels)).unsqueeze(1).contiguous(),
           "labels": torch.from_numpy(labels.astype(np.int64))}
    for suffix, dt in (("", None), ("_f16", torch.float16), ("_bf16", torch.bfloat16)):
        st = state if dt is None else rounded(state, dt)
        save_file(st, os.path.join(out, "teacher%s.safetensors" % suffix))
        ref["logits" + suffix] = logits_of(model, st, x)
    with open(os.path.join(out, "teacher.map"), "w") as f:
        f.write(map_text(mapping, spec))
    save_file(ref, os.path.join(out, "logits.safetensors"),
              metadata={"model": spec, "mean": repr(FASHION_MEAN), "std": repr(FASHION_STD)})
    acc = (ref["logits"].argmax(1) == ref["labels"]).float().mean().item()
    print("torch_teacher.py: %s -> %s (%d tensors, accuracy %.2f%% on the first %d test images)"
          % (spec, out, len(state), 100 * acc, n))


def write_fixtures(d):
    torch.set_num_threads(1)
    xt, yt = fashion("test")
    n = 64
    x = normalise(xt[:n])
    ref = {"pixels": torch.from_numpy(np.array(xt[:n])).unsqueeze(1).contiguous(),
           "labels": torch.from_numpy(yt[:n].astype(np.int64))}
    model, mapping, state = make("cnn: c8 p c16 p f32", 20240611, 0, 1, 6000)
    for suffix, dt in (("", None), ("_f16", torch.float16), ("_bf16", torch.bfloat16)):
        st = state if dt is None else rounded(state, dt)
        save_file(st, os.path.join(d, "torch_cnn%s.safetensors" % suffix))
        ref["logits_cnn" + suffix] = logits_of(model, st, x)
        if dt is not None:
            b = rounding_bound(model, state, x, dt)
            ref["bound_cnn" + suffix] = b
            err = (ref["logits_cnn" + suffix] - ref["logits_cnn"]).abs()
            print("torch_teacher.py: %s max |logit - F32 logit| = %.3g, max of that / bound = %.3g, max |logit| = %.3g"
                  % (suffix[1:], err.max().item(), (err / b).max().item(), ref["logits_cnn"].abs().max().item()))
    with open(os.path.join(d, "torch_cnn.map"), "w") as f:
        f.write(map_text(mapping, "cnn: c8 p c16 p f32"))
    model, _, state = make("mlp: 16 16", 20240612, 0, 1, 6000)
    save_file(state, os.path.join(d, "torch_mlp.safetensors"))
    ref["logits_mlp"] = logits_of(model, state, x)
    save_file(ref, os.path.join(d, "torch_ref.safetensors"),
              metadata={"mean": repr(FASHION_MEAN), "std": repr(FASHION_STD)})
    for f in sorted(os.listdir(d)):
        if f.startswith("torch_"):
            print("  %-30s %7d bytes" % (f, os.path.getsize(os.path.join(d, f))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="take the model spec from this config's [teacher] model")
    ap.add_argument("--model", help="model spec (default: examples/fashion_teacher.ini's)")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-epochs", type=int, default=0, help="train this many epochs (0: random init)")
    ap.add_argument("--limit", type=int, default=0, help="train on the first N training images (0: all)")
    ap.add_argument("--bn-batches", type=int, default=10, help="untrained: BN-updating forward passes")
    ap.add_argument("--n", type=int, default=64, help="test images whose logits are written")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fixtures", help="write the test fixtures into this directory instead")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.fixtures:
        write_fixtures(a.fixtures)
        return
    if not a.out:
        ap.error("--out or --fixtures is required")
    spec = a.model or spec_from_config(a.config or "examples/fashion_teacher.ini")
    write_teacher(a.out, spec, a.seed, a.bn_batches, a.train_epochs, a.limit, a.n)


if __name__ == "__main__":
    main()
