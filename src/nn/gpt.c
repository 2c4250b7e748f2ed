/* gpt.c - the GPT graph builder (docs/models.md, "gpt"): a pre-LayerNorm
 * GPT-2 block stack with learned positions and a weight-tied LM head.
 *
 *   x = wte[ids] + wpe[0..T-1]
 *   per layer: x += c_proj(attn(c_attn(ln_1(x))));  x += mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
 *   logits = ln_f(x) wte^T
 *
 * Names are GPT-2's ("wte.weight", "h.0.attn.c_attn.weight", ...) with
 * torch.nn.Linear's [out, in] layout (GPT-2's own checkpoints store the
 * transposed Conv1D layout; docs/formats.md says how to convert). The
 * incremental inference path (src/nn/gpt_infer.c) computes the same
 * function from the same names; a test checks they agree.
 *
 * Initialisation follows GPT-2: weights N(0, 0.02), the two projections that
 * write into the residual stream N(0, 0.02/sqrt(2*layers)), biases zero,
 * LayerNorm weight one and bias zero.
 */
#include <math.h>
#include <string.h>

#include "kd_gpt.h"
#include "kd_lora.h"
#include "kd_nn.h"

static kd_node *normal_param(kd_graph *g, const char *name, int ndim, const int *shape, float std) {
    kd_node *p = kd_param(g, name, ndim, shape, KD_INIT_NORMAL, shape[ndim - 1]);
    p->init_scale = std;
    return p;
}

/* a Linear layer named prefix with N(0, std) weights and zero bias, and a
 * LoRA adapter when lora (may be NULL) targets it */
static kd_node *linear(kd_graph *g, const kd_lora_cfg *lora, const char *prefix, kd_node *x, int out, float std) {
    int in = x->val.shape[x->val.ndim - 1];
    char name[96];
    int ws[2] = {out, in}, bs[1] = {out};
    snprintf(name, sizeof name, "%s.weight", prefix);
    kd_node *w = normal_param(g, name, 2, ws, std);
    snprintf(name, sizeof name, "%s.bias", prefix);
    kd_node *b = kd_param(g, name, 1, bs, KD_INIT_ZERO, in);
    if (lora && lora->r > 0) return kd_lora_linear(g, lora, prefix, x, w, b);
    kd_node *y = kd_matmul(g, x, w, b);
    kd_node_set_name(y, "%s", prefix);
    return y;
}

static void tap(kd_model *m, kd_node *n, const char *name) {
    kd_node_set_name(n, "%s%s", m->prefix, name);
    KD_ASSERT(m->n_taps < KD_MAX_TAPS, "too many taps");
    m->taps[m->n_taps++] = n;
}

kd_status kd_gpt_build(kd_graph *g, const kd_gpt_cfg *cfg, const char *prefix, kd_node *ids, kd_model *m) {
    return kd_gpt_build_lora(g, cfg, prefix, ids, NULL, m);
}

kd_status kd_gpt_build_lora(kd_graph *g, const kd_gpt_cfg *cfg, const char *prefix, kd_node *ids,
                            const kd_lora_cfg *lora, kd_model *m) {
    int first = kd_graph_n_nodes(g);
    if (ids->val.ndim != 2)
        return kd_errorf(KD_ESHAPE, "gpt model '%s': input '%s' must be token ids (B, T)", m->spec, ids->name);
    int T = ids->val.shape[1], C = cfg->dim, V = cfg->vocab, L = cfg->layers;
    if (T > cfg->ctx)
        return kd_errorf(KD_ESHAPE, "gpt model '%s': sequence length %d exceeds its context %d", m->spec, T, cfg->ctx);
    if (L > KD_MAX_TAPS - 3)
        return kd_errorf(KD_ECONFIG, "gpt model '%s': at most %d layers can be built", m->spec, KD_MAX_TAPS - 3);
    const char *p = prefix ? prefix : "";
    char name[96], pre[96];
    float std = 0.02f, pstd = 0.02f / sqrtf(2.0f * (float)L);
    int es[2] = {V, C}, ps[2] = {cfg->ctx, C};
    snprintf(name, sizeof name, "%swte.weight", p);
    kd_node *wte = normal_param(g, name, 2, es, std);
    snprintf(name, sizeof name, "%swpe.weight", p);
    kd_node *wpe = normal_param(g, name, 2, ps, std);
    m->input = ids;
    kd_node *x = kd_pos_add(g, kd_embedding(g, ids, wte), wpe);
    tap(m, x, "emb");
    for (int l = 0; l < L; l++) {
        snprintf(pre, sizeof pre, "%sh.%d.ln_1", p, l);
        kd_node *a = kd_ln(g, pre, x);
        snprintf(pre, sizeof pre, "%sh.%d.attn.c_attn", p, l);
        kd_node *qkv = linear(g, lora, pre, a, 3 * C, std);
        kd_node *y = kd_causal_attention(g, qkv, cfg->heads);
        snprintf(pre, sizeof pre, "%sh.%d.attn.c_proj", p, l);
        x = kd_add(g, x, linear(g, lora, pre, y, C, pstd));
        snprintf(pre, sizeof pre, "%sh.%d.ln_2", p, l);
        kd_node *h = kd_ln(g, pre, x);
        snprintf(pre, sizeof pre, "%sh.%d.mlp.c_fc", p, l);
        h = kd_gelu(g, linear(g, lora, pre, h, 4 * C, std));
        snprintf(pre, sizeof pre, "%sh.%d.mlp.c_proj", p, l);
        x = kd_add(g, x, linear(g, lora, pre, h, C, pstd));
        snprintf(name, sizeof name, "h%d", l);
        tap(m, x, name);
    }
    snprintf(pre, sizeof pre, "%sln_f", p);
    x = kd_ln(g, pre, x);
    tap(m, x, "ln_f");
    m->feat = x;
    m->logits = kd_matmul(g, x, wte, NULL); /* the tied head */
    tap(m, m->logits, "logits");
    if (lora && lora->r > 0) /* adapters on: the base weights are frozen */
        for (int i = first; i < kd_graph_n_nodes(g); i++) {
            kd_node *n = kd_graph_node(g, i);
            if ((n->flags & KD_F_PARAM) && strncmp(n->name, "lora.", 5) != 0) n->flags |= KD_F_FROZEN;
        }
    return KD_OK;
}
