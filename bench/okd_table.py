"""Summarises bench/okd_table.sh: per method, the student's final validation
loss (nats/token) and perplexity as mean +- std over seeds, the change
against the offline fkl row, agreement with the (frozen) teacher, steps,
wall-clock training seconds and CPU seconds of the whole run where
recorded. OKD rows also give the adapted teacher's validation loss.
Prints a markdown table.
"""
import glob, json, os, re, statistics, sys

out = sys.argv[1] if len(sys.argv) > 1 else "runs/okd_table"
lm_table = sys.argv[2] if len(sys.argv) > 2 else "runs/lm_table"


def ms(xs):
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def load(method):
    """[(seed, student summary, steps, cpu seconds or None, source)]"""
    rows = []
    for seed in range(10):
        cands = [(os.path.join(out, f"{method}_s{seed}"), "here"),
                 (os.path.join(lm_table, f"online_{method}_s{seed}"), "lm_table")]
        for d, src in cands:
            f = os.path.join(d, "summary.json")
            if not os.path.exists(f):
                continue
            st = json.load(open(f)).get("student")
            steps = None
            cfg = os.path.join(d, "config.ini")
            if os.path.exists(cfg):
                m = re.search(r"^steps = (\d+)", open(cfg).read(), re.M)
                steps = int(m.group(1)) if m else None
            cpu = None
            tf = d + ".time"
            if os.path.exists(tf):
                u, s = open(tf).read().split()[-2:]
                cpu = float(u) + float(s)
            rows.append((seed, st, steps, cpu, src))
            break
    return rows


names = {"fkl": "offline fkl: ce(0.5) + fkl(0.5)", "rkl": "offline rkl: ce(0.5) + rkl(0.5)",
         "gkd": "on-policy GKD: jsd(0.5), λ=0.5", "okd": "OKD: ce(0.5) + fkl(0.5), teacher LoRA r=8 on ce + fkl"}
print("| method | seeds | steps | val loss (nats/token) | val ppl | vs offline fkl | agreement | train s (wall) | CPU s (run) | adapted teacher val loss |")
print("|---|---|---|---|---|---|---|---|---|---|")
ref = ms([st["val_loss"] for _, st, *_ in load("fkl")])[0]
for meth in ("fkl", "rkl", "gkd", "okd"):
    r = load(meth)
    if not r:
        continue
    lm_, ls_ = ms([st["val_loss"] for _, st, *_ in r])
    pm, ps = ms([st["val_ppl"] for _, st, *_ in r])
    agr = [st["agreement"] for _, st, *_ in r if "agreement" in st]
    tr = ms([st["train_seconds"] for _, st, *_ in r])[0]
    cpus = [c for *_, c, _ in r if c is not None]
    steps = sorted({s for _, _, s, _, _ in r})
    tv = [st["teacher_val_loss"] for _, st, *_ in r if "teacher_val_loss" in st]
    src = sorted({s for *_, s in r})
    rel = "" if meth == "fkl" else f"{100.0 * (lm_ - ref) / ref:+.2f}%"
    print(f"| {names[meth]}{' (runs of bench/lm_table.sh)' if src == ['lm_table'] else ''} | {len(r)} | "
          f"{'/'.join(map(str, steps))} | {lm_:.4f} ± {ls_:.4f} | {pm:.3f} ± {ps:.3f} | {rel} | "
          f"{100*statistics.mean(agr):.1f}% | {tr:.0f} | {f'{statistics.mean(cpus):.0f}' if cpus else '-'} | "
          f"{f'{statistics.mean(tv):.4f}' if tv else '-'} |")

# LoRA: adapters on the CE-only student (its base), 200 steps of ce + fkl
lr = load("lora")
if lr:
    base = ms([st["val_loss"] for _, st, *_ in load("ce")])[0]
    lm_, ls_ = ms([st["val_loss"] for _, st, *_ in lr])
    ad = lr[0][1].get("adapter_params", 0)
    cpus = [c for *_, c, _ in lr if c is not None]
    print()
    print("| LoRA row | seeds | steps | trainable | val loss (nats/token) | vs its base (CE student) | CPU s (run) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| base: CE-only student, 800 steps (bench/lm_table.sh) | {len(load('ce'))} | 800 | {lr[0][1]['params']} | {base:.4f} | | |")
    print(f"| + LoRA r=8 α=16 (all linears), ce(0.5) + fkl(0.5) | {len(lr)} | "
          f"{'/'.join(map(str, sorted({s for _, _, s, _, _ in lr})))} | {int(ad)} | {lm_:.4f} ± {ls_:.4f} | "
          f"{100.0 * (lm_ - base) / base:+.2f}% | {f'{statistics.mean(cpus):.0f}' if cpus else '-'} |")
