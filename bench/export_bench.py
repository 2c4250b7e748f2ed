"""Measuring side of bench/export_bench.sh: the exported C models against
ONNX Runtime running the same students exported from PyTorch.

For each model (--model NAME CHECKPOINT FP32_DIR INT8_DIR, where each DIR
holds the export, its compiled harness `bench` and `model.o`; the spec and
the normalisation come from the checkpoint's metadata):
  * runs the harness of the float32 and the int8 export over the test set:
    accuracy, logits, microseconds per sample;
  * reads the size of model.o (text, data, bss: `size`);
  * builds the same network in PyTorch (tools/torch_teacher.py build()),
    loads the SAME weights from the distill checkpoint (our names renamed
    to the module's), exports it with torch.onnx.export and runs it with
    ONNX Runtime (1 intra-op and 1 inter-op thread, batch 1 per sample,
    the same images), checks its logits equal our float32 export's to 1e-4,
    and times it the same way (a Python loop of session.run calls);
  * optionally (--ort-int8) the ONNX model quantised by ONNX Runtime's own
    dynamic int8 quantisation, for reference.
Every figure is the median of --reps timed passes over the test set, the
runtimes taking turns pass by pass. Also times ONNX Runtime on an Identity graph of the same input: the cost of
one session.run call from Python, included in every ONNX Runtime figure.
Prints a Markdown table and writes --json.
"""
import argparse, json, os, platform, subprocess, sys, time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))


def median(xs):
    return sorted(xs)[len(xs) // 2]


def size_of(obj):
    out = subprocess.run(["size", obj], check=True, capture_output=True, text=True).stdout.split("\n")[1].split()
    return {"text": int(out[0]), "data": int(out[1]), "bss": int(out[2])}


def run_harness(d, images, labels, n):
    """one run of the harness: a checking pass, then one timed pass"""
    out = os.path.join(d, "logits.f32")
    r = subprocess.run([os.path.join(d, "bench"), images, labels, str(n), out, "1"], check=True,
                       capture_output=True, text=True)
    res = json.loads(r.stdout)
    res["logits"] = np.fromfile(out, dtype=np.float32).reshape(n, -1)
    return res


def ort_pass(sess, x):
    """one timed pass, batch 1 per sample: (logits, microseconds per sample)"""
    name = sess.get_inputs()[0].name
    out = [None] * len(x)
    t0 = time.perf_counter()
    for i in range(len(x)):
        out[i] = sess.run(None, {name: x[i:i + 1]})[0]
    us = (time.perf_counter() - t0) * 1e6 / len(x)
    return np.concatenate(out).reshape(len(x), -1), us


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def torch_model(spec, ckpt):
    """the PyTorch module of spec with the checkpoint's weights (renamed to its own names)"""
    import torch
    from safetensors.torch import load_file
    from torch_teacher import build
    model, mapping = build(spec)
    ours = load_file(ckpt)
    theirs = {}
    for k, v in ours.items():
        for t, o in mapping:
            if k.startswith(o + "."):
                k = t + k[len(o):]
                break
        theirs[k] = v
    model.load_state_dict(theirs, strict=True)
    return model.eval()


def export_onnx(model, path):
    import torch
    import warnings
    x = torch.zeros(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the TorchScript exporter: the default (dynamo) one needs onnxscript
        torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], dynamo=False,
                          do_constant_folding=True)


def identity_onnx(path):
    import onnx
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 28, 28])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 28, 28])
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8  # what every ONNX Runtime reads
    onnx.save(m, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--model", nargs=4, action="append", metavar=("NAME", "CKPT", "FP32_DIR", "INT8_DIR"),
                    required=True)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--ort-int8", action="store_true")
    ap.add_argument("--cflags", default="")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    import onnxruntime, torch
    from torch_teacher import fashion
    os.makedirs(a.work, exist_ok=True)
    xte, yte = fashion("test")
    xte, yte = xte[:a.n], yte[:a.n]
    px = (xte.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    images, labels = os.path.join(a.work, "images.f32"), os.path.join(a.work, "labels.u8")
    px.tofile(images)
    yte.astype(np.uint8).tofile(labels)
    n = len(yte)
    # PyTorch's normalisation is the first op of distill's export; the ONNX
    # model gets the same (pixel/255 in, normalised inside) by a wrapper
    class Norm(torch.nn.Module):
        def __init__(self, m, mean, std):
            super().__init__()
            self.m, self.mean, self.std = m, mean, std

        def forward(self, x):
            return self.m((x - self.mean) / self.std)

    ident = os.path.join(a.work, "identity.onnx")
    identity_onnx(ident)
    sid = session(ident)
    ort_pass(sid, px[:1000])
    call_us = [ort_pass(sid, px)[1] for _ in range(a.reps)]
    rows, res = [], {"machine": platform.processor() or platform.machine(), "load": os.getloadavg(),
                     "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "cflags": a.cflags,
                     "n": n, "reps": a.reps, "ort_call_us": median(call_us), "models": []}
    ok = True
    from safetensors import safe_open
    for name, ckpt, d32, d8 in a.model:
        with safe_open(ckpt, "np") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "distill/1":
            sys.exit("%s: not a distill checkpoint (no metadata)" % ckpt)
        spec = meta["model"]
        mean, std = (float(v) for v in meta["normalize"].split(","))
        net = Norm(torch_model(spec, ckpt), mean, std).eval()
        onx = os.path.join(a.work, name + ".onnx")
        export_onnx(net, onx)
        sess, sq, onq = session(onx), None, None
        if a.ort_int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic
            onq = os.path.join(a.work, name + "_int8.onnx")
            quantize_dynamic(onx, onq, weight_type=QuantType.QInt8)
            sq = session(onq)
        ort_pass(sess, px[:1000])  # warm-up
        # the repetitions interleave the runtimes, so that a change in the
        # machine's load touches all of them alike
        r32, r8, us, usq = None, None, [], []
        for _ in range(a.reps):
            t = run_harness(d32, images, labels, n)
            r32 = r32 or dict(t, us=[])
            r32["us"].append(t["median_us"])
            t = run_harness(d8, images, labels, n)
            r8 = r8 or dict(t, us=[])
            r8["us"].append(t["median_us"])
            z, u = ort_pass(sess, px)
            us.append(u)
            if sq is not None:
                zq, u = ort_pass(sq, px)
                usq.append(u)
        r32["median_us"], r8["median_us"] = median(r32["us"]), median(r8["us"])
        s32, s8 = size_of(os.path.join(d32, "model.o")), size_of(os.path.join(d8, "model.o"))
        with torch.no_grad():
            zt = net(torch.from_numpy(px[:256])).numpy()
        diff = np.abs(z - r32["logits"]) / (1.0 + np.abs(r32["logits"]))
        difft = np.abs(zt - r32["logits"][:256]) / (1.0 + np.abs(r32["logits"][:256]))
        same = bool(diff.max() <= 1e-4)
        ok &= same
        acc_ort = float((z.argmax(1) == yte).mean())
        m = {"name": name, "spec": spec, "checkpoint": ckpt,
             "c_fp32": {"acc": r32["acc"], "us": r32["us"], "median_us": r32["median_us"], "size": s32},
             "c_int8": {"acc": r8["acc"], "us": r8["us"], "median_us": r8["median_us"], "size": s8},
             "int8_drop_pt": 100.0 * (r32["acc"] - r8["acc"]),
             "int8_top1_agreement": float((r8["logits"].argmax(1) == r32["logits"].argmax(1)).mean()),
             "ort_fp32": {"acc": acc_ort, "us": us, "median_us": median(us), "onnx_bytes": os.path.getsize(onx)},
             "ort_vs_c_max_rel_diff": float(diff.max()), "torch_vs_c_max_rel_diff": float(difft.max()),
             "ort_logits_equal_1e-4": same}
        if sq is not None:
            m["ort_int8"] = {"acc": float((zq.argmax(1) == yte).mean()), "us": usq, "median_us": median(usq),
                             "onnx_bytes": os.path.getsize(onq)}
        res["models"].append(m)
    kb = lambda b: "%.1f KB" % (b / 1024.0)
    print("| model | runtime | test acc | vs fp32 (pt) | us/sample | size |")
    print("|---|---|---|---|---|---|")
    for m in res["models"]:
        c32, c8, o = m["c_fp32"], m["c_int8"], m["ort_fp32"]
        print("| %s | distill C float32 | %.2f%% | | %.2f | model.o text %s, data %s, bss %s |" % (
            m["spec"], 100 * c32["acc"], c32["median_us"], kb(c32["size"]["text"]), kb(c32["size"]["data"]),
            kb(c32["size"]["bss"])))
        print("| %s | distill C int8 | %.2f%% | %+.2f | %.2f | model.o text %s, data %s, bss %s |" % (
            m["spec"], 100 * c8["acc"], -m["int8_drop_pt"], c8["median_us"], kb(c8["size"]["text"]),
            kb(c8["size"]["data"]), kb(c8["size"]["bss"])))
        print("| %s | ONNX Runtime float32 | %.2f%% | | %.2f | .onnx %s |" % (
            m["spec"], 100 * o["acc"], o["median_us"], kb(o["onnx_bytes"])))
        if "ort_int8" in m:
            q = m["ort_int8"]
            print("| %s | ONNX Runtime int8 (quantize_dynamic) | %.2f%% | %+.2f | %.2f | .onnx %s |" % (
                m["spec"], 100 * q["acc"], 100 * (q["acc"] - o["acc"]), q["median_us"], kb(q["onnx_bytes"])))
    print()
    print("ONNX Runtime %s, torch %s; one session.run of an Identity graph from Python: %.2f us (included above)" % (
        res["onnxruntime"], res["torch"], res["ort_call_us"]))
    for m in res["models"]:
        print("%s: ONNX Runtime logits vs the float32 export: max |diff|/(1+|ours|) = %.2e (%s); PyTorch vs export %.2e;"
              " int8 top-1 agrees with float32 on %.2f%%" % (
                  m["spec"], m["ort_vs_c_max_rel_diff"], "ok" if m["ort_logits_equal_1e-4"] else "FAILED 1e-4",
                  m["torch_vs_c_max_rel_diff"], 100 * m["int8_top1_agreement"]))
    print("load average at the end: %.2f %.2f %.2f" % os.getloadavg())
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
