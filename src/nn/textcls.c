/* textcls.c - the text classifier (GPT trunk, masked mean pool, linear
 * head, optional per-token tag head), the training graph around it (label
 * loss terms, a cached teacher's logits as an input, the rationale tagging
 * loss), and the teacher's gradient x input saliency with its top-k tags.
 *
 * The trunk is the block stack of src/nn/gpt.c with the same names and
 * initialisation (GPT-2's), but without the tied LM head, which a
 * classifier does not need (it would cost a (B,T,V) product per step):
 *   e = wte[ids] ("tok_emb"); x = e + wpe[0..T-1]
 *   per layer: x += c_proj(attn(c_attn(ln_1(x))));  x += mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
 *   h = ln_f(x); pool = masked_mean(h, mask); logits = head(pool); tags = tag_head(h)
 * Attention is causal (the existing op): token t sees tokens <= t, padding
 * comes after every real token, so it never reaches one.
 *
 * Saliency reads the gradient and the value of "tok_emb" after backward.
 * That is safe because tok_emb is the first non-leaf node of the graph (the
 * builder asserts it): its backward is the last one to run, so nothing
 * reuses its memory afterwards (graph.c plans by liveness).
 */
#include <math.h>
#include <string.h>

#include "kd_textcls.h"

static kd_node *normal_param(kd_graph *g, const char *name, int ndim, const int *shape, float std) {
    kd_node *p = kd_param(g, name, ndim, shape, KD_INIT_NORMAL, shape[ndim - 1]);
    p->init_scale = std;
    return p;
}

static kd_node *linear(kd_graph *g, const char *prefix, kd_node *x, int out, float std) {
    int in = x->val.shape[x->val.ndim - 1];
    char name[96];
    int ws[2] = {out, in}, bs[1] = {out};
    snprintf(name, sizeof name, "%s.weight", prefix);
    kd_node *w = normal_param(g, name, 2, ws, std);
    snprintf(name, sizeof name, "%s.bias", prefix);
    kd_node *b = kd_param(g, name, 1, bs, KD_INIT_ZERO, in);
    kd_node *y = kd_matmul(g, x, w, b);
    kd_node_set_name(y, "%s", prefix);
    return y;
}

static void tap(kd_model *m, kd_node *n, const char *name) {
    kd_node_set_name(n, "%s%s", m->prefix, name);
    KD_ASSERT(m->n_taps < KD_MAX_TAPS, "too many taps");
    m->taps[m->n_taps++] = n;
}

kd_status kd_textcls_build(kd_graph *g, const kd_gpt_cfg *cfg, const char *prefix, kd_node *ids, kd_node *mask,
                           int n_classes, int tag_head, kd_model *m) {
    const char *p = prefix ? prefix : "";
    memset(m, 0, sizeof *m);
    snprintf(m->prefix, sizeof m->prefix, "%s", p);
    kd_gpt_cfg_str(cfg, m->spec, sizeof m->spec);
    if (ids->val.ndim != 2 || mask->val.ndim != 2 || mask->val.shape[1] != ids->val.shape[1])
        return kd_errorf(KD_ESHAPE, "text classifier '%s': ids and mask must both be (B, T)", m->spec);
    int T = ids->val.shape[1], C = cfg->dim, L = cfg->layers;
    if (T > cfg->ctx)
        return kd_errorf(KD_ESHAPE, "text classifier '%s': sequence length %d exceeds its context %d", m->spec, T,
                         cfg->ctx);
    if (L > KD_MAX_TAPS - 6)
        return kd_errorf(KD_ECONFIG, "text classifier '%s': at most %d layers can be built", m->spec, KD_MAX_TAPS - 6);
    if (n_classes < 2) return kd_errorf(KD_ECONFIG, "text classifier '%s': needs at least 2 classes", m->spec);
    char name[96], pre[96];
    float std = 0.02f, pstd = 0.02f / sqrtf(2.0f * (float)L);
    int es[2] = {cfg->vocab, C}, ps[2] = {cfg->ctx, C};
    snprintf(name, sizeof name, "%swte.weight", p);
    kd_node *wte = normal_param(g, name, 2, es, std);
    snprintf(name, sizeof name, "%swpe.weight", p);
    kd_node *wpe = normal_param(g, name, 2, ps, std);
    m->input = ids;
    kd_node *e = kd_embedding(g, ids, wte);
    tap(m, e, "tok_emb");
    kd_node *x = kd_pos_add(g, e, wpe);
    for (int l = 0; l < L; l++) {
        snprintf(pre, sizeof pre, "%sh.%d.ln_1", p, l);
        kd_node *a = kd_ln(g, pre, x);
        snprintf(pre, sizeof pre, "%sh.%d.attn.c_attn", p, l);
        kd_node *y = kd_causal_attention(g, linear(g, pre, a, 3 * C, std), cfg->heads);
        snprintf(pre, sizeof pre, "%sh.%d.attn.c_proj", p, l);
        x = kd_add(g, x, linear(g, pre, y, C, pstd));
        snprintf(pre, sizeof pre, "%sh.%d.ln_2", p, l);
        kd_node *h = kd_ln(g, pre, x);
        snprintf(pre, sizeof pre, "%sh.%d.mlp.c_fc", p, l);
        h = kd_gelu(g, linear(g, pre, h, 4 * C, std));
        snprintf(pre, sizeof pre, "%sh.%d.mlp.c_proj", p, l);
        x = kd_add(g, x, linear(g, pre, h, C, pstd));
        snprintf(name, sizeof name, "h%d", l);
        tap(m, x, name);
    }
    snprintf(pre, sizeof pre, "%sln_f", p);
    kd_node *h = kd_ln(g, pre, x);
    tap(m, h, "ln_f");
    m->feat = kd_masked_mean(g, h, mask);
    tap(m, m->feat, "pool");
    snprintf(pre, sizeof pre, "%shead", p);
    m->logits = linear(g, pre, m->feat, n_classes, std);
    tap(m, m->logits, "logits");
    if (tag_head) {
        snprintf(pre, sizeof pre, "%stag_head", p);
        kd_node *z = linear(g, pre, h, 1, std);
        int s2[2] = {0, T};
        tap(m, kd_reshape(g, z, 2, s2), "tags");
    }
    return KD_OK;
}

/* ---------------------------------------------------------------- net */

kd_status kd_textcls_net_new(kd_textcls_net *n, const kd_textcls_setup *s, uint64_t seed) {
    memset(n, 0, sizeof *n);
    kd_gpt_cfg cfg;
    kd_status st = kd_gpt_cfg_parse(s->model, 256, &cfg);
    if (st != KD_OK) return st;
    if (cfg.vocab != 256)
        return kd_errorf(KD_ECONFIG, "model '%s': vocab=%d, but text classification reads bytes (256)", s->model,
                         cfg.vocab);
    if (s->seq < 1 || s->seq > cfg.ctx)
        return kd_errorf(KD_ECONFIG, "model '%s': sequence length %d not in [1, %d] (its context)", s->model, s->seq,
                         cfg.ctx);
    if (s->max_batch < 1) return kd_errorf(KD_ECONFIG, "batch size %d must be at least 1", s->max_batch);
    if (!(s->rationale_weight >= 0.0f) || !isfinite(s->rationale_weight))
        return kd_errorf(KD_ECONFIG, "rationale weight %g must be >= 0", (double)s->rationale_weight);
    kd_loss_spec spec;
    const char *loss = s->loss && *s->loss ? s->loss : "ce";
    st = kd_loss_spec_parse(loss, &spec);
    if (st != KD_OK) return kd_error_prefix(st, "loss '%s'", loss);
    int reads_teacher = 0;
    for (int i = 0; i < spec.n; i++) reads_teacher |= strcmp(spec.terms[i].name, "ce") != 0;
    n->g = kd_graph_new();
    n->seq = s->seq;
    n->classes = s->classes;
    n->rationale_weight = s->rationale_weight;
    int B = s->max_batch, T = s->seq;
    n->ids = kd_input(n->g, "ids", 2, (int[]){B, T});
    n->mask = kd_input(n->g, "mask", 2, (int[]){B, T});
    n->labels = kd_input(n->g, "labels", 1, (int[]){B});
    if (s->rationale_weight > 0.0f) n->tags = kd_input(n->g, "tags", 2, (int[]){B, T});
    if (reads_teacher) n->t_logits = kd_input(n->g, "t.logits", 2, (int[]){B, s->classes});
    st = kd_textcls_build(n->g, &cfg, "", n->ids, n->mask, s->classes, s->rationale_weight > 0.0f, &n->m);
    if (st == KD_OK) { /* saliency relies on it (file comment) */
        kd_node *e = kd_model_tap(&n->m, "tok_emb");
        for (int i = 0; i < e->id; i++) KD_ASSERT(kd_graph_node(n->g, i)->op == KD_OP_LEAF, "tok_emb is not first");
    }
    if (st == KD_OK) {
        kd_loss_inputs in = {.s_logits = n->m.logits, .t_logits = n->t_logits, .labels = n->labels};
        st = kd_loss_build(n->g, &spec, &in, &n->terms);
        if (st != KD_OK) st = kd_error_prefix(st, "loss '%s'", loss);
    }
    if (st == KD_OK) {
        n->loss = n->terms.total;
        if (n->tags) {
            n->tag_loss = kd_token_bce(n->g, kd_model_tap(&n->m, "tags"), n->tags, n->mask);
            kd_node_set_name(n->tag_loss, "rationale");
            n->loss = kd_add(n->g, n->loss, kd_scale(n->g, n->tag_loss, s->rationale_weight));
        }
        n->m.logits->flags |= KD_F_KEEP;
        n->loss->flags |= KD_F_KEEP;
        if (n->tag_loss) n->tag_loss->flags |= KD_F_KEEP;
        st = kd_graph_compile(n->g, B, seed);
    }
    if (st != KD_OK) {
        kd_graph_free(n->g);
        n->g = NULL;
    }
    return st;
}

void kd_textcls_net_free(kd_textcls_net *n) {
    kd_graph_free(n->g);
    memset(n, 0, sizeof *n);
}

/* ---------------------------------------------------------------- saliency */

void kd_textcls_saliency(kd_textcls_net *n, const kd_textcls_data *d, int split, const int *idx, int B, float *score,
                         float *logits) {
    KD_ASSERT(!n->tags && n->terms.n == 1 && !strcmp(n->terms.terms[0].name, "ce"), "saliency needs a plain-ce net");
    KD_ASSERT(B >= 1 && B <= kd_graph_max_batch(n->g), "batch %d", B);
    int T = n->seq, K = n->classes;
    kd_graph_set_batch(n->g, B);
    kd_textcls_fill(d, split, idx, B, n->ids->val.data, n->mask->val.data, NULL);
    /* the predicted classes as labels, then d(mean_b -log p_yb)/de */
    kd_graph_forward_to(n->g, 0, n->m.logits);
    for (int b = 0; b < B; b++) {
        const float *z = n->m.logits->val.data + (size_t)b * K;
        int best = 0;
        for (int k = 1; k < K; k++)
            if (z[k] > z[best]) best = k;
        n->labels->val.data[b] = (float)best;
        if (logits) memcpy(logits + (size_t)b * K, z, (size_t)K * sizeof *z);
    }
    kd_graph_forward(n->g, 0);
    kd_graph_backward(n->g, n->loss);
    const kd_node *e = kd_model_tap(&n->m, "tok_emb");
    int C = e->val.shape[2];
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            size_t o = ((size_t)b * T + t) * C;
            double s = 0.0;
            for (int c = 0; c < C; c++) s += (double)e->grad.data[o + c] * e->val.data[o + c];
            /* the loss is the batch mean: the factor B restores one document's gradient */
            score[(size_t)b * T + t] = n->mask->val.data[(size_t)b * T + t] != 0.0f ? (float)fabs(s * B) : 0.0f;
        }
}

void kd_textcls_topk_tags(float *tags, const float *score, int len, int T, int k) {
    KD_ASSERT(len >= 0 && len <= T, "len %d, T %d", len, T);
    if (k > len) k = len;
    memset(tags, 0, (size_t)T * sizeof *tags);
    for (int j = 0; j < k; j++) { /* k passes: fine for the k of a few tokens */
        int best = -1;
        for (int t = 0; t < len; t++)
            if (tags[t] == 0.0f && (best < 0 || score[t] > score[best])) best = t;
        tags[best] = 1.0f;
    }
}
