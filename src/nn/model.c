/* model.c - model builders from a one-line spec: mlp, cnn, resnet.
 *
 * Parameter names follow PyTorch's state_dict conventions for the layers they
 * stand for (conv weight (OC,C,KH,KW), linear weight (OUT,IN), BN weight,
 * bias, running_mean, running_var, num_batches_tracked), so a checkpoint
 * reads in PyTorch with an equivalent module tree; docs/models.md lists the
 * names. Builders only emit graph nodes; they allocate nothing else.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "kd_gpt.h"
#include "kd_nn.h"

static void tap(kd_model *m, kd_node *n, const char *name) {
    kd_node_set_name(n, "%s%s", m->prefix, name);
    KD_ASSERT(m->n_taps < KD_MAX_TAPS, "too many taps");
    m->taps[m->n_taps++] = n;
}

kd_node *kd_model_tap(const kd_model *m, const char *name) {
    size_t pl = strlen(m->prefix);
    for (int i = 0; i < m->n_taps; i++)
        if (strcmp(m->taps[i]->name + pl, name) == 0) return m->taps[i];
    return NULL;
}

int64_t kd_model_params(const kd_graph *g, const kd_model *m) {
    int64_t total = 0;
    size_t pl = strlen(m->prefix);
    for (int i = 0; i < kd_graph_n_state(g); i++) {
        kd_node *n = kd_graph_state(g, i);
        if ((n->flags & KD_F_PARAM) && strncmp(n->name, m->prefix, pl) == 0) total += kd_numel(&n->val);
    }
    return total;
}

static kd_status spec_error(const char *spec, const char *tok, const char *why) {
    return kd_errorf(KD_ECONFIG, "model spec '%s': %s '%s'", spec, why, tok);
}

/* parses a positive integer that fills the whole token */
static int parse_int(const char *s, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v <= 0 || v > 1 << 20) return 0;
    *out = (int)v;
    return 1;
}

static int parse_float(const char *s, float *out) {
    char *end;
    float v = strtof(s, &end);
    if (end == s || *end) return 0;
    *out = v;
    return 1;
}

#define MAX_TOK 64
typedef struct toks {
    int n;
    char t[MAX_TOK][32];
} toks;

static kd_status tokenize(const char *spec, const char *body, toks *tk) {
    tk->n = 0;
    const char *p = body;
    while (*p) {
        while (*p && (isspace((unsigned char)*p) || *p == ',')) p++;
        if (!*p) break;
        const char *s = p;
        while (*p && !isspace((unsigned char)*p) && *p != ',') p++;
        size_t len = (size_t)(p - s);
        if (len >= sizeof tk->t[0] || tk->n == MAX_TOK) return kd_errorf(KD_ECONFIG, "model spec '%s' is too long", spec);
        memcpy(tk->t[tk->n], s, len);
        tk->t[tk->n++][len] = '\0';
    }
    return KD_OK;
}

static kd_node *conv_bn_relu(kd_graph *g, kd_model *m, int idx, kd_node *x, int out, int bn) {
    char name[96];
    snprintf(name, sizeof name, "%sconv%d", m->prefix, idx);
    kd_node *y = kd_conv(g, name, x, out, 3, 1, 1, !bn);
    if (bn) {
        snprintf(name, sizeof name, "%sbn%d", m->prefix, idx);
        y = kd_bn_relu(g, name, y); /* BN and ReLU fused: one pass, one buffer */
    } else {
        y = kd_relu(g, y);
    }
    kd_node_set_name(y, "%srelu%d", m->prefix, idx);
    return y;
}

static kd_node *head(kd_graph *g, kd_model *m, kd_node *x, int n_classes) {
    char name[96];
    m->feat = x;
    snprintf(name, sizeof name, "%shead", m->prefix);
    kd_node *y = kd_dense(g, name, x, n_classes);
    tap(m, y, "logits");
    m->logits = y;
    y->flags |= KD_F_KEEP; /* read by callers after backward (accuracy, distillation) */
    return y;
}

static kd_status build_mlp(kd_graph *g, const char *spec, const toks *tk, kd_model *m, kd_node *x, int K) {
    kd_node *h = x->val.ndim > 2 ? kd_flatten(g, x) : x;
    int layer = 0;
    for (int i = 0; i < tk->n; i++) {
        int w;
        float p;
        if (tk->t[i][0] == 'd' && parse_float(tk->t[i] + 1, &p)) {
            if (p < 0.0f || p >= 1.0f) return spec_error(spec, tk->t[i], "dropout must be in [0, 1):");
            h = kd_dropout(g, h, p);
            continue;
        }
        if (!parse_int(tk->t[i], &w)) return spec_error(spec, tk->t[i], "expected a hidden size or dX, got");
        char name[96];
        snprintf(name, sizeof name, "%sfc%d", m->prefix, ++layer);
        h = kd_relu(g, kd_dense(g, name, h, w));
        char tn[32];
        snprintf(tn, sizeof tn, "block%d", layer);
        tap(m, h, tn);
    }
    head(g, m, h, K);
    return KD_OK;
}

static kd_status build_cnn(kd_graph *g, const char *spec, const toks *tk, kd_model *m, kd_node *x, int K) {
    int bn = 1;
    for (int i = 0; i < tk->n; i++)
        if (strncmp(tk->t[i], "bn=", 3) == 0) {
            if (strcmp(tk->t[i] + 3, "0") != 0 && strcmp(tk->t[i] + 3, "1") != 0)
                return spec_error(spec, tk->t[i], "bn must be 0 or 1:");
            bn = tk->t[i][3] == '1';
        }
    if (x->val.ndim != 4) return kd_errorf(KD_ECONFIG, "model spec '%s': cnn needs image input", spec);
    kd_node *h = x;
    int nconv = 0, nfc = 0, nblock = 0;
    for (int i = 0; i < tk->n; i++) {
        const char *t = tk->t[i];
        int v;
        float p;
        if (strncmp(t, "bn=", 3) == 0) continue;
        if (t[0] == 'c' && parse_int(t + 1, &v)) {
            if (h->val.ndim != 4) return spec_error(spec, t, "convolution after a linear layer:");
            h = conv_bn_relu(g, m, ++nconv, h, v, bn);
        } else if (strcmp(t, "p") == 0) {
            if (h->val.ndim != 4) return spec_error(spec, t, "pooling after a linear layer:");
            if (h->val.shape[2] < 2 || h->val.shape[3] < 2) return spec_error(spec, t, "too many poolings at");
            h = kd_maxpool2d(g, h, 2, 2);
            char tn[32];
            snprintf(tn, sizeof tn, "block%d", ++nblock);
            tap(m, h, tn);
        } else if (t[0] == 'f' && parse_int(t + 1, &v)) {
            if (h->val.ndim != 2) h = kd_flatten(g, h);
            char name[96];
            snprintf(name, sizeof name, "%sfc%d", m->prefix, ++nfc);
            h = kd_relu(g, kd_dense(g, name, h, v));
            char tn[32];
            snprintf(tn, sizeof tn, "fc%d_out", nfc);
            tap(m, h, tn);
        } else if (t[0] == 'd' && parse_float(t + 1, &p)) {
            if (p < 0.0f || p >= 1.0f) return spec_error(spec, t, "dropout must be in [0, 1):");
            h = kd_dropout(g, h, p);
        } else {
            return spec_error(spec, t, "unknown layer (expected cN, p, fN, dX or bn=0|1)");
        }
    }
    if (h->val.ndim != 2) h = kd_flatten(g, h);
    head(g, m, h, K);
    return KD_OK;
}

static kd_node *resnet_block(kd_graph *g, kd_model *m, const char *name, kd_node *x, int out, int stride) {
    char p[96];
    int C = x->val.shape[1];
    snprintf(p, sizeof p, "%s%s.conv1", m->prefix, name);
    kd_node *h = kd_conv(g, p, x, out, 3, stride, 1, 0);
    snprintf(p, sizeof p, "%s%s.bn1", m->prefix, name);
    h = kd_bn_relu(g, p, h);
    snprintf(p, sizeof p, "%s%s.conv2", m->prefix, name);
    h = kd_conv(g, p, h, out, 3, 1, 1, 0);
    snprintf(p, sizeof p, "%s%s.bn2", m->prefix, name);
    h = kd_bn(g, p, h);
    kd_node *sc = x;
    if (stride != 1 || C != out) {
        snprintf(p, sizeof p, "%s%s.shortcut.0", m->prefix, name);
        sc = kd_conv(g, p, x, out, 1, stride, 0, 0);
        snprintf(p, sizeof p, "%s%s.shortcut.1", m->prefix, name);
        sc = kd_bn(g, p, sc);
    }
    kd_node *y = kd_relu(g, kd_add(g, h, sc));
    kd_node_set_name(y, "%s%s", m->prefix, name);
    return y;
}

static kd_status build_resnet(kd_graph *g, const char *spec, const toks *tk, kd_model *m, kd_node *x, int K) {
    int depth = 20, width = 16;
    for (int i = 0; i < tk->n; i++) {
        const char *t = tk->t[i];
        if (strncmp(t, "depth=", 6) == 0 && parse_int(t + 6, &depth)) continue;
        if (strncmp(t, "width=", 6) == 0 && parse_int(t + 6, &width)) continue;
        return spec_error(spec, t, "expected depth=N or width=N, got");
    }
    if (depth < 8 || (depth - 2) % 6 != 0) {
        char d[16];
        snprintf(d, sizeof d, "%d", depth);
        return spec_error(spec, d, "resnet depth must be 6n+2 (8, 14, 20, 32, ...), got");
    }
    if (x->val.ndim != 4) return kd_errorf(KD_ECONFIG, "model spec '%s': resnet needs image input", spec);
    int nb = (depth - 2) / 6;
    char p[96];
    snprintf(p, sizeof p, "%sconv1", m->prefix);
    kd_node *h = kd_conv(g, p, x, width, 3, 1, 1, 0);
    snprintf(p, sizeof p, "%sbn1", m->prefix);
    h = kd_bn_relu(g, p, h);
    tap(m, h, "stem");
    for (int s = 0; s < 3; s++) {
        for (int b = 0; b < nb; b++) {
            char name[32];
            snprintf(name, sizeof name, "layer%d.%d", s + 1, b);
            h = resnet_block(g, m, name, h, width << s, (s > 0 && b == 0) ? 2 : 1);
        }
        char tn[32];
        snprintf(tn, sizeof tn, "layer%d", s + 1);
        tap(m, h, tn);
    }
    h = kd_global_avgpool(g, h);
    tap(m, h, "pool");
    head(g, m, h, K);
    return KD_OK;
}

kd_status kd_model_build(kd_graph *g, const char *spec, const char *prefix, kd_node *x, int n_classes, kd_model *m) {
    memset(m, 0, sizeof *m);
    snprintf(m->prefix, sizeof m->prefix, "%s", prefix ? prefix : "");
    snprintf(m->spec, sizeof m->spec, "%s", spec);
    m->input = x;
    const char *colon = strchr(spec, ':');
    if (!colon) return kd_errorf(KD_ECONFIG, "model spec '%s': expected 'mlp: ...', 'cnn: ...' or 'resnet: ...'", spec);
    char kind[16];
    size_t kl = (size_t)(colon - spec);
    while (kl > 0 && isspace((unsigned char)spec[kl - 1])) kl--;
    size_t k0 = 0;
    while (k0 < kl && isspace((unsigned char)spec[k0])) k0++;
    if (kl - k0 >= sizeof kind) return kd_errorf(KD_ECONFIG, "model spec '%s': unknown model kind", spec);
    memcpy(kind, spec + k0, kl - k0);
    kind[kl - k0] = '\0';
    if (strcmp(kind, "gpt") == 0) {
        kd_gpt_cfg cfg;
        kd_status gs = kd_gpt_cfg_parse(spec, n_classes, &cfg);
        return gs != KD_OK ? gs : kd_gpt_build(g, &cfg, prefix, x, m);
    }
    toks tk;
    kd_status st = tokenize(spec, colon + 1, &tk);
    if (st != KD_OK) return st;
    if (n_classes < 2) return kd_errorf(KD_ECONFIG, "model needs at least 2 classes, got %d", n_classes);
    if (strcmp(kind, "mlp") == 0) return build_mlp(g, spec, &tk, m, x, n_classes);
    if (strcmp(kind, "cnn") == 0) return build_cnn(g, spec, &tk, m, x, n_classes);
    if (strcmp(kind, "resnet") == 0) return build_resnet(g, spec, &tk, m, x, n_classes);
    return kd_errorf(KD_ECONFIG, "model spec '%s': unknown model kind '%s' (expected mlp, cnn, resnet or gpt)", spec, kind);
}
