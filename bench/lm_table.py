"""Summarises bench/lm_table.sh: per regime and method, the student's final
validation loss (nats/token) and perplexity as mean +- std over seeds, the
change against the CE-only student of the same regime, and the top-1
agreement with the teacher where it was measured. Prints a markdown table.
"""
import glob, json, math, os, re, statistics, sys

out = sys.argv[1] if len(sys.argv) > 1 else "runs/lm_table"
rows = {}
for f in sorted(glob.glob(os.path.join(out, "*", "summary.json"))):
    name = os.path.basename(os.path.dirname(f))
    m = re.match(r"(cached|online)_(.+)_s(\d+)$", name)
    if not m:
        continue
    s = json.load(open(f))
    st = s.get("student")
    if not st:
        continue
    rows.setdefault((m.group(1), m.group(2)), []).append((int(m.group(3)), st))

teacher = None
tf = glob.glob("runs/lm_teacher/summary.json")
if tf:
    teacher = json.load(open(tf[0])).get("teacher")
te = os.path.join(out, "teacher_eval.txt")  # the whole validation sweep, as the students'
if teacher and os.path.exists(te):
    m = re.search(r"loss ([0-9.]+) nats/token, perplexity ([0-9.]+)", open(te).read())
    if m:
        teacher["val_loss"], teacher["val_ppl"] = float(m.group(1)), float(m.group(2))


def ms(xs):
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


print("| regime | method | seeds | val loss (nats/token) | val ppl | vs CE loss | agreement |")
print("|---|---|---|---|---|---|---|")
if teacher:
    print(f"| - | teacher {teacher['model']} | 1 | {teacher['val_loss']:.4f} | {teacher['val_ppl']:.3f} | | |")
order = ["ce", "fkl", "rkl", "jsd", "tvd", "skl", "srkl", "fkl_rlkd", "seqkd", "gkd"]
best = {}
for regime in ("cached", "online"):
    base = [st["val_loss"] for _, st in rows.get((regime, "ce"), [])]
    bmean = statistics.mean(base) if base else float("nan")
    for meth in order:
        r = rows.get((regime, meth))
        if not r:
            continue
        losses = [st["val_loss"] for _, st in r]
        ppls = [st["val_ppl"] for _, st in r]
        agr = [st["agreement"] for _, st in r if "agreement" in st]
        lm, ls = ms(losses)
        pm, ps = ms(ppls)
        rel = 100.0 * (lm - bmean) / bmean if meth != "ce" else 0.0
        a = f"{100*statistics.mean(agr):.1f}%" if agr else "-"
        print(f"| {regime} | {meth} | {len(r)} | {lm:.4f} ± {ls:.4f} | {pm:.3f} ± {ps:.3f} | "
              f"{'' if meth == 'ce' else f'{rel:+.2f}%'} | {a} |")
        if meth != "ce" and (regime not in best or lm < best[regime][1]):
            best[regime] = (meth, lm, rel)
for regime, (meth, lm, rel) in best.items():
    print(f"\nbest {regime}: {meth}, validation loss {rel:+.2f}% against CE alone at equal steps")
