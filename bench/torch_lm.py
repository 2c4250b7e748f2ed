"""PyTorch side of the language-model benchmark (bench/lm.sh).

Builds the GPT distill builds (pre-LayerNorm GPT-2 blocks, exact GELU,
LayerNorm eps 1e-5, learned positions, LM head tied to the token
embedding, no dropout; docs/models.md) and times, at batch B x T tokens:
  --mode train    a teacher training step (forward, backward, AdamW)
  --mode distill  a distillation step: frozen teacher forward (no grad) +
                  student forward/backward with 0.5 CE + 0.5 KL(t||s) + AdamW
Prints one JSON line with tokens/s. Run with OPENBLAS_NUM_THREADS=1 and
--threads N (torch.set_num_threads), PyTorch's best setting here.
"""
import argparse, json, math, time

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse(spec):
    kv = dict(t.split("=") for t in spec.split(":", 1)[1].split())
    return int(kv["layers"]), int(kv["dim"]), int(kv["heads"]), int(kv["ctx"])


class Block(nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.ln_1 = nn.LayerNorm(C)
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        sh = lambda z: z.view(B, T, self.H, C // self.H).transpose(1, 2)
        y = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, spec, vocab):
        super().__init__()
        L, C, H, ctx = parse(spec)
        self.wte = nn.Embedding(vocab, C)
        self.wpe = nn.Embedding(ctx, C)
        self.h = nn.ModuleList(Block(C, H) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.wte(ids) + self.wpe(torch.arange(T))
        for b in self.h:
            x = b(x)
        return self.ln_f(x) @ self.wte.weight.t()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["train", "distill"], default="train")
    ap.add_argument("--teacher", default="gpt: layers=4 dim=256 heads=8 ctx=128")
    ap.add_argument("--student", default="gpt: layers=2 dim=128 heads=4 ctx=128")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    B, T, V = a.batch, a.seq, a.vocab
    teacher = GPT(a.teacher, V)
    if a.mode == "train":
        model = teacher
    else:
        model = GPT(a.student, V)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randint(0, V, (B, T))
    y = torch.randint(0, V, (B, T))

    def step():
        z = model(x)
        ce = F.cross_entropy(z.view(-1, V), y.view(-1))
        if a.mode == "train":
            loss = ce
        else:
            with torch.no_grad():
                zt = teacher(x)
            kl = F.kl_div(F.log_softmax(z.view(-1, V), -1), F.log_softmax(zt.view(-1, V), -1), log_target=True,
                          reduction="batchmean")
            loss = 0.5 * ce + 0.5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < a.seconds:
        step()
        n += 1
    dt = time.perf_counter() - t0
    print(json.dumps({"mode": a.mode, "tokens_per_s": n * B * T / dt, "steps": n, "torch": torch.__version__,
                      "threads": a.threads}))


if __name__ == "__main__":
    main()
