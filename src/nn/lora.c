/* lora.c - LoRA adapters (Hu et al. 2021) on a GPT's linear layers: the
 * config string, the graph builder, the adapter file and the merge into a
 * base checkpoint.
 *
 *   y = x W^T + b + s (x A^T) B^T,   s = alpha / r,   A (r,in), B (out,r)
 *
 * The adapter path is three existing ops (two matmuls and a scale on the
 * narrow (..., r) tensor, then an add), so its gradients are those ops'
 * (tests/test_lora.c checks them by finite differences anyway). The scale
 * sits on x A^T rather than on the (..., out) product: the same function,
 * r instead of out multiplies per row.
 *
 * Merging is exact algebra, W' = W + s B A (one sgemm per adapted weight);
 * a merged checkpoint is a plain GPT checkpoint again. Not done here:
 * adapters on the embedding or the tied head, dropout on the adapter input,
 * and on-policy sampling from an adapted student (the KV-cache runner reads
 * base weights only; src/cli/run_lm.c refuses that combination).
 */
#include <cblas.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "kd_gpt.h"
#include "kd_io.h"
#include "kd_lora.h"

static const struct {
    const char *name; /* suffix of the layer name */
    int bit;
} linears[4] = {
    {"attn.c_attn", KD_LORA_C_ATTN},
    {"attn.c_proj", KD_LORA_ATTN_PROJ},
    {"mlp.c_fc", KD_LORA_C_FC},
    {"mlp.c_proj", KD_LORA_MLP_PROJ},
};

/* ---------------------------------------------------------------- config */

static kd_status bad(const char *spec, const char *tok, const char *why) {
    return kd_errorf(KD_ECONFIG, "lora spec '%s': %s '%s'", spec, why, tok);
}

static kd_status parse_targets(const char *spec, const char *list, int *bits) {
    *bits = 0;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", list);
    char *save = NULL;
    for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int b = 0;
        if (strcmp(t, "attn") == 0)
            b = KD_LORA_C_ATTN | KD_LORA_ATTN_PROJ;
        else if (strcmp(t, "mlp") == 0)
            b = KD_LORA_C_FC | KD_LORA_MLP_PROJ;
        else if (strcmp(t, "all") == 0)
            b = KD_LORA_ALL;
        else if (strcmp(t, "c_attn") == 0 || strcmp(t, "attn.c_attn") == 0)
            b = KD_LORA_C_ATTN;
        else if (strcmp(t, "attn.c_proj") == 0)
            b = KD_LORA_ATTN_PROJ;
        else if (strcmp(t, "c_fc") == 0 || strcmp(t, "mlp.c_fc") == 0)
            b = KD_LORA_C_FC;
        else if (strcmp(t, "mlp.c_proj") == 0)
            b = KD_LORA_MLP_PROJ;
        else
            return bad(spec, t,
                       "unknown target (expected c_attn, attn.c_proj, c_fc, mlp.c_proj, attn, mlp or all):");
        *bits |= b;
    }
    if (!*bits) return bad(spec, list, "no targets in");
    return KD_OK;
}

kd_status kd_lora_cfg_parse(const char *spec, kd_lora_cfg *cfg) {
    memset(cfg, 0, sizeof *cfg);
    const char *p = spec ? spec : "";
    int have_alpha = 0, have_targets = 0;
    cfg->targets = KD_LORA_ALL;
    while (*p) {
        while (*p && isspace((unsigned char)*p)) p++;
        if (!*p) break;
        const char *s = p;
        while (*p && !isspace((unsigned char)*p)) p++;
        char tok[256];
        size_t len = (size_t)(p - s);
        if (len >= sizeof tok) return kd_errorf(KD_ECONFIG, "lora spec '%s': a token is too long", spec);
        memcpy(tok, s, len);
        tok[len] = '\0';
        char *eq = strchr(tok, '=');
        if (!eq || eq == tok || !eq[1]) return bad(spec, tok, "expected key=value, got");
        *eq = '\0';
        const char *key = tok, *val = eq + 1;
        char *end;
        if (strcmp(key, "r") == 0) {
            if (cfg->r) return bad(spec, key, "repeated key");
            long v = strtol(val, &end, 10);
            if (end == val || *end || v < 1 || v > KD_LORA_MAX_RANK)
                return bad(spec, val, "r must be an integer in [1, 4096], got");
            cfg->r = (int)v;
        } else if (strcmp(key, "alpha") == 0) {
            if (have_alpha) return bad(spec, key, "repeated key");
            float v = strtof(val, &end);
            if (end == val || *end || !(v > 0.0f) || v > 1e6f) return bad(spec, val, "alpha must be a positive number, got");
            cfg->alpha = v;
            have_alpha = 1;
        } else if (strcmp(key, "targets") == 0) {
            if (have_targets) return bad(spec, key, "repeated key");
            kd_status st = parse_targets(spec, val, &cfg->targets);
            if (st != KD_OK) return st;
            have_targets = 1;
        } else {
            return bad(spec, key, "unknown key (expected r, alpha, targets):");
        }
    }
    if (!cfg->r) {
        if (have_alpha || have_targets) return kd_errorf(KD_ECONFIG, "lora spec '%s': r=N is required", spec);
        memset(cfg, 0, sizeof *cfg);
        return KD_OK;
    }
    if (!have_alpha) cfg->alpha = (float)cfg->r;
    return KD_OK;
}

const char *kd_lora_cfg_str(const kd_lora_cfg *cfg, char *buf, size_t n) {
    int o = snprintf(buf, n, "r=%d alpha=%g targets=", cfg->r, (double)cfg->alpha);
    int first = 1;
    for (int i = 0; i < 4 && o > 0 && (size_t)o < n; i++)
        if (cfg->targets & linears[i].bit) {
            o += snprintf(buf + o, n - (size_t)o, "%s%s", first ? "" : ",", linears[i].name);
            first = 0;
        }
    return buf;
}

int kd_lora_targets(const kd_lora_cfg *cfg, const char *linear) {
    if (!cfg || cfg->r <= 0) return 0;
    for (int i = 0; i < 4; i++)
        if (strcmp(linear, linears[i].name) == 0) return (cfg->targets & linears[i].bit) != 0;
    return 0;
}

/* ---------------------------------------------------------------- graph */

kd_node *kd_lora_linear(kd_graph *g, const kd_lora_cfg *cfg, const char *name, kd_node *x, kd_node *w, kd_node *b) {
    kd_node *y = kd_matmul(g, x, w, b);
    const char *dot = strstr(name, ".h.") ? strstr(name, ".h.") + 1 : name;
    /* the suffix after "h.<layer>." */
    const char *suffix = NULL;
    if (strncmp(dot, "h.", 2) == 0) {
        const char *q = dot + 2;
        while (isdigit((unsigned char)*q)) q++;
        if (*q == '.') suffix = q + 1;
    }
    if (suffix && kd_lora_targets(cfg, suffix)) {
        int out = w->val.shape[0], in = w->val.shape[1], r = cfg->r;
        int as[2] = {r, in}, bs[2] = {out, r};
        char pn[128];
        snprintf(pn, sizeof pn, "lora.%s.lora_A", name);
        kd_node *A = kd_param(g, pn, 2, as, KD_INIT_UNIFORM_FANIN, in);
        snprintf(pn, sizeof pn, "lora.%s.lora_B", name);
        kd_node *B = kd_param(g, pn, 2, bs, KD_INIT_ZERO, r);
        A->flags &= ~KD_F_FROZEN; /* trainable also inside a frozen teacher (OKD) */
        B->flags &= ~KD_F_FROZEN;
        kd_node *h = kd_scale(g, kd_matmul(g, x, A, NULL), cfg->alpha / (float)r);
        y = kd_add(g, y, kd_matmul(g, h, B, NULL));
    }
    kd_node_set_name(y, "%s", name);
    return y;
}

kd_status kd_lora_model_build(kd_graph *g, const char *spec, const char *prefix, kd_node *ids, int vocab,
                              const kd_lora_cfg *lora, kd_model *m) {
    if (!lora || lora->r <= 0) return kd_model_build(g, spec, prefix, ids, vocab, m);
    memset(m, 0, sizeof *m);
    snprintf(m->prefix, sizeof m->prefix, "%s", prefix ? prefix : "");
    snprintf(m->spec, sizeof m->spec, "%s", spec);
    m->input = ids;
    const char *p = spec + strspn(spec, " \t");
    if (strncmp(p, "gpt", 3) != 0)
        return kd_errorf(KD_ECONFIG, "model '%s': LoRA adapters need a 'gpt: ...' model", spec);
    kd_gpt_cfg cfg;
    kd_status st = kd_gpt_cfg_parse(spec, vocab, &cfg);
    return st != KD_OK ? st : kd_gpt_build_lora(g, &cfg, prefix, ids, lora, m);
}

/* "lora.<model prefix>" */
static size_t adapter_prefix(const kd_model *m, char *buf, size_t n) {
    snprintf(buf, n, "lora.%s", m->prefix);
    return strlen(buf);
}

int64_t kd_lora_params(const kd_graph *g, const kd_model *m) {
    char pre[40];
    size_t pl = adapter_prefix(m, pre, sizeof pre);
    int64_t total = 0;
    for (int i = 0; i < kd_graph_n_state(g); i++) {
        kd_node *n = kd_graph_state(g, i);
        if (strncmp(n->name, pre, pl) == 0) total += kd_numel(&n->val);
    }
    return total;
}

/* ---------------------------------------------------------------- files */

kd_status kd_lora_save(const kd_graph *g, const kd_model *m, const kd_lora_cfg *cfg, int vocab, const char *path) {
    char pre[40], buf[320];
    size_t pl = adapter_prefix(m, pre, sizeof pre);
    kd_st_writer *w = kd_st_writer_new();
    int n = 0;
    for (int i = 0; i < kd_graph_n_state(g); i++) {
        kd_node *t = kd_graph_state(g, i);
        if (strncmp(t->name, pre, pl) != 0) continue;
        kd_st_add_f32(w, t->name + pl, t->val.ndim, t->val.shape, t->val.data);
        n++;
    }
    KD_ASSERT(n > 0, "model '%s' has no adapters to save", m->spec);
    kd_st_set_meta(w, "format", "distill-lora/1");
    kd_st_set_meta(w, "model", m->spec);
    snprintf(buf, sizeof buf, "%d", vocab);
    kd_st_set_meta(w, "vocab", buf);
    snprintf(buf, sizeof buf, "%d", cfg->r);
    kd_st_set_meta(w, "r", buf);
    snprintf(buf, sizeof buf, "%.9g", (double)cfg->alpha);
    kd_st_set_meta(w, "alpha", buf);
    kd_lora_cfg_str(cfg, buf, sizeof buf);
    kd_st_set_meta(w, "targets", strstr(buf, "targets=") + 8);
    kd_status st = kd_st_write(w, path);
    kd_st_writer_free(w);
    return st;
}

/* An adapter file's metadata: the base model and the adapter config. */
static kd_status read_meta(const kd_safetensors *st, kd_gpt_cfg *gc, kd_lora_cfg *lc, char *spec, size_t n) {
    const char *fmt = kd_st_meta(st, "format"), *model = kd_st_meta(st, "model"), *vocab = kd_st_meta(st, "vocab");
    const char *r = kd_st_meta(st, "r"), *alpha = kd_st_meta(st, "alpha"), *targets = kd_st_meta(st, "targets");
    if (!fmt || strcmp(fmt, "distill-lora/1") != 0)
        return kd_errorf(KD_EFORMAT, "%s: not a LoRA adapter file (metadata format is '%s', expected 'distill-lora/1')",
                         st->path, fmt ? fmt : "(none)");
    if (!model || !vocab || !r || !alpha || !targets)
        return kd_errorf(KD_EFORMAT, "%s: adapter metadata lacks one of model, vocab, r, alpha, targets", st->path);
    char *end;
    long v = strtol(vocab, &end, 10);
    if (end == vocab || *end || v < 1 || v > KD_GPT_MAX_VOCAB)
        return kd_errorf(KD_EFORMAT, "%s: metadata vocab '%s' is not a vocabulary size", st->path, vocab);
    kd_status s = kd_gpt_cfg_parse(model, (int)v, gc);
    if (s != KD_OK) return kd_error_prefix(KD_EFORMAT, "%s: metadata model", st->path);
    char text[512];
    snprintf(text, sizeof text, "r=%.16s alpha=%.32s targets=%.400s", r, alpha, targets);
    s = kd_lora_cfg_parse(text, lc);
    if (s != KD_OK || lc->r < 1) return kd_errorf(KD_EFORMAT, "%s: bad adapter metadata r/alpha/targets: '%s'", st->path, text);
    snprintf(spec, n, "%s", model);
    return KD_OK;
}

static int same_model(const kd_gpt_cfg *a, const kd_gpt_cfg *b) {
    return a->layers == b->layers && a->dim == b->dim && a->heads == b->heads && a->ctx == b->ctx && a->vocab == b->vocab;
}

static int same_lora(const kd_lora_cfg *a, const kd_lora_cfg *b) {
    float d = a->alpha - b->alpha;
    return a->r == b->r && a->targets == b->targets && d < 1e-6f * b->alpha && -d < 1e-6f * b->alpha;
}

kd_status kd_lora_load(kd_graph *g, const kd_model *m, const kd_lora_cfg *cfg, int vocab, const char *path) {
    kd_safetensors st;
    kd_status s = kd_st_read(path, &st);
    if (s != KD_OK) return s;
    kd_gpt_cfg fg, mg;
    kd_lora_cfg fl;
    char fspec[256], want[320], have[320];
    s = read_meta(&st, &fg, &fl, fspec, sizeof fspec);
    if (s == KD_OK && kd_gpt_cfg_parse(m->spec, vocab, &mg) != KD_OK)
        s = kd_errorf(KD_ECONFIG, "%s: the model '%s' cannot take LoRA adapters (a gpt spec can)", path, m->spec);
    if (s == KD_OK && !same_model(&fg, &mg))
        s = kd_errorf(KD_EFORMAT, "%s: adapters for model '%s' (vocab %d), but this model is '%s' (vocab %d)", path,
                      fspec, fg.vocab, m->spec, mg.vocab);
    if (s == KD_OK && !same_lora(&fl, cfg))
        s = kd_errorf(KD_EFORMAT, "%s: adapters are '%s', but this model's are '%s'", path,
                      kd_lora_cfg_str(&fl, have, sizeof have), kd_lora_cfg_str(cfg, want, sizeof want));
    char pre[40];
    size_t pl = adapter_prefix(m, pre, sizeof pre);
    int used = 0;
    for (int i = 0; i < kd_graph_n_state(g) && s == KD_OK; i++) {
        kd_node *n = kd_graph_state(g, i);
        if (strncmp(n->name, pre, pl) != 0) continue;
        s = kd_st_get_f32(&st, n->name + pl, n->val.data, n->val.ndim, n->val.shape);
        used++;
    }
    if (s == KD_OK && used != st.n)
        for (int j = 0; j < st.n; j++) {
            char full[160];
            snprintf(full, sizeof full, "%s%s", pre, st.tensors[j].name);
            if (!kd_graph_find(g, full)) {
                s = kd_errorf(KD_EFORMAT, "%s: unexpected tensor '%s' (not an adapter of this model)", path,
                              st.tensors[j].name);
                break;
            }
        }
    kd_st_free(&st);
    return s;
}

kd_status kd_lora_merge(const char *base_path, const char *adapter_path, const char *out_path) {
    kd_safetensors base, ad;
    kd_status s = kd_st_read(base_path, &base);
    if (s != KD_OK) return s;
    s = kd_st_read(adapter_path, &ad);
    if (s != KD_OK) {
        kd_st_free(&base);
        return s;
    }
    kd_gpt_cfg ag, bg;
    kd_lora_cfg lc;
    char aspec[256];
    s = read_meta(&ad, &ag, &lc, aspec, sizeof aspec);
    const char *bmodel = kd_st_meta(&base, "model"), *bvocab = kd_st_meta(&base, "vocab");
    if (s == KD_OK && (!bmodel || !bvocab))
        s = kd_errorf(KD_EFORMAT, "%s: metadata lacks 'model' or 'vocab' (not a distill GPT checkpoint)", base_path);
    if (s == KD_OK) {
        int v = atoi(bvocab);
        if (kd_gpt_cfg_parse(bmodel, v, &bg) != KD_OK)
            s = kd_error_prefix(KD_EFORMAT, "%s: metadata model", base_path);
        else if (!same_model(&ag, &bg))
            s = kd_errorf(KD_EFORMAT, "%s: adapters for model '%s' (vocab %d), but %s is '%s' (vocab %d)", adapter_path,
                          aspec, ag.vocab, base_path, bmodel, bg.vocab);
    }
    /* every adapter tensor must belong to an adapted weight */
    int expect = 0;
    for (int l = 0; l < ag.layers && s == KD_OK; l++)
        for (int k = 0; k < 4; k++) expect += (lc.targets & linears[k].bit) ? 2 : 0;
    if (s == KD_OK && ad.n != expect)
        s = kd_errorf(KD_EFORMAT, "%s: %d tensors, but r/targets metadata say %d (lora_A and lora_B per target)",
                      adapter_path, ad.n, expect);
    kd_st_writer *w = kd_st_writer_new();
    float *W = NULL, *A = NULL, *B = NULL;
    for (int i = 0; i < base.n && s == KD_OK; i++) {
        const kd_st_tensor *t = &base.tensors[i];
        int k = -1, layer = -1, off = 0;
        if (sscanf(t->name, "h.%d.%n", &layer, &off) == 1 && off > 0)
            for (int j = 0; j < 4; j++) {
                size_t nl = strlen(linears[j].name);
                if (strncmp(t->name + off, linears[j].name, nl) == 0 && strcmp(t->name + off + nl, ".weight") == 0 &&
                    (lc.targets & linears[j].bit))
                    k = j;
            }
        if (k < 0) { /* copied as it is */
            kd_st_add(w, t->name, t->dtype, t->ndim, t->shape, t->data);
            continue;
        }
        if (t->ndim != 2) {
            s = kd_errorf(KD_EFORMAT, "%s: tensor '%s' is not a matrix", base_path, t->name);
            break;
        }
        int out = (int)t->shape[0], in = (int)t->shape[1], r = lc.r;
        int ws[2] = {out, in}, as[2] = {r, in}, bs[2] = {out, r};
        W = kd_realloc(W, (size_t)out * in * sizeof *W);
        A = kd_realloc(A, (size_t)r * in * sizeof *A);
        B = kd_realloc(B, (size_t)out * r * sizeof *B);
        char an[160], bn[160];
        snprintf(an, sizeof an, "h.%d.%s.lora_A", layer, linears[k].name);
        snprintf(bn, sizeof bn, "h.%d.%s.lora_B", layer, linears[k].name);
        s = kd_st_get_f32(&base, t->name, W, 2, ws);
        if (s == KD_OK) s = kd_st_get_f32(&ad, an, A, 2, as);
        if (s == KD_OK) s = kd_st_get_f32(&ad, bn, B, 2, bs);
        if (s != KD_OK) break;
        /* W (out,in) += s * B (out,r) A (r,in) */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, out, in, r, lc.alpha / (float)r, B, r, A, in, 1.0f, W,
                    in);
        kd_st_add_f32(w, t->name, 2, ws, W);
    }
    if (s == KD_OK) {
        for (int i = 0; i < base.n_meta; i++) kd_st_set_meta(w, base.meta_keys[i], base.meta_vals[i]);
        s = kd_st_write(w, out_path);
    }
    free(W);
    free(A);
    free(B);
    kd_st_writer_free(w);
    kd_st_free(&ad);
    kd_st_free(&base);
    return s;
}
