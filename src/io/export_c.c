/* export_c.c - writes a trained mlp, cnn or resnet as standalone C99
 * (model.h, model.c) with float32 or int8 weights.
 *
 * The model is rebuilt from the checkpoint's metadata at batch 1 and its
 * graph walked in topological order; each op becomes plain loops over
 * static const weights. Activations live in one static workspace cut into
 * slots of the largest activation's size: a value takes a free slot and
 * gives it back after its last reader, so a chain needs two slots and a
 * residual block three or four. Reshape and dropout are no-ops that share
 * their input's slot.
 *
 * float32: every op is evaluated as the engine evaluates it in eval mode
 * (batch norm with invstd = 1/sqrtf(var + eps) at run time; per output the
 * convolution sums bias, then c, kh, kw in order), so logits agree with the
 * engine up to GEMM's summation order. Weights are printed with %.9g,
 * which round-trips every float exactly. The loops are shaped for a plain
 * `cc -O2` to vectorise them without reordering any float sum: linear
 * weights are stored transposed, (IN, OUT), and the inner loop runs over
 * outputs; a convolution works on a zero-padded copy of its input (see
 * conv_geom) with constant trip counts.
 *
 * int8 (the rule in full: docs/export.md): batch norm is folded into the
 * convolution before it, in double; each output channel's weights are
 * quantised symmetrically, q = round(w / s) with s = max|w| / 127. At run
 * time the input of every convolution and linear layer is quantised per
 * sample and per tensor by the same rule, products are summed in int32 and
 * each sum is scaled back by s_x * s_w[o] plus a float bias. Pooling, ReLU,
 * residual additions and the logits stay float. Quantised activations are
 * held in shorts (values in [-127, 127]) so that gcc turns the int8 dot
 * products into pmaddwd; the weights are int8 in the file.
 *
 * Deliberately not here: ops other than convolution, batch norm, ReLU,
 * pooling, linear, dropout and addition (the error names the node),
 * threads, SIMD intrinsics, per-tensor calibration from data.
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kd_data.h"
#include "kd_export.h"
#include "kd_train.h"

typedef struct exporter {
    FILE *f;
    kd_graph *g;
    kd_node *x; /* the input image */
    int n;      /* nodes 0 .. the logits' id */
    int int8;
    int *root;      /* node whose slot holds this node's value: itself, or the source of a no-op / folded BN */
    int *last;      /* for a root: id of the last node reading its value (-1: none) */
    int *slot;      /* for a root: its workspace slot */
    int *fold;      /* int8, for a convolution or linear layer: id of the batch norm folded into it, or -1 */
    int *readers;   /* how many nodes read this node directly */
    int n_slots;
    int64_t max_act; /* floats per slot */
    int64_t max_q;   /* int8: the quantised input buffer (values in [-127, 127], stored as short) */
    int64_t max_pad;  /* convolution: the zero-padded input (float, or short for int8) */
    int64_t max_wide; /* convolution: one output plane on the padded grid (float, or int32 for int8) */
} exporter;

/* "conv1.weight" -> "p_conv1_weight" (prefix p, q, qs or qb) */
static void cname(char *out, size_t n, const char *prefix, const char *name) {
    snprintf(out, n, "%s_%s", prefix, name);
    for (char *p = out; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9'))) *p = '_';
}

static void emit_floats(FILE *f, const char *name, const float *v, int64_t k) {
    fprintf(f, "static const float %s[%lld] = {", name, (long long)k);
    for (int64_t i = 0; i < k; i++) fprintf(f, "%s%s%.9g", i ? "," : "", i % 8 ? "" : "\n    ", (double)v[i]);
    fprintf(f, "\n};\n");
}

static void emit_int8(FILE *f, const char *name, const int8_t *v, int64_t k) {
    fprintf(f, "static const signed char %s[%lld] = {", name, (long long)k);
    for (int64_t i = 0; i < k; i++) fprintf(f, "%s%s%d", i ? "," : "", i % 24 ? "" : "\n    ", v[i]);
    fprintf(f, "\n};\n");
}

/* A convolution runs on the zero-padded input, (C, Hp, Wp) plus slack, and
 * computes each output plane on the padded grid: wide[oh * Wp + ow], of
 * which columns ow < OW are kept. For every input channel c the update is
 * then one flat loop over i < L (L = OH * Wp rounded up to 16, a constant
 * trip count that gcc -O2 vectorises) adding every tap in the order kh, kw:
 * wide[i] = wide[i] + w[c,0,0] * pad[c, S * i] + w[c,0,1] * pad[c, S * i + 1]
 * + ... with pad[c, j] = xpad[c * Hp * Wp + j]. The padding contributes
 * exact zeros, so each output's float sum is the direct convolution's, in
 * the same order. The work is Wp / OW times the direct one, about S. */
typedef struct conv_geom {
    int C, H, W, OC, OH, OW, KH, KW, S, P, Hp, Wp;
    int64_t L, npad;
} conv_geom;

static conv_geom geom(const kd_node *n) {
    const kd_tensor *x = &n->in[0]->val, *y = &n->val;
    conv_geom g = {.C = x->shape[1], .H = x->shape[2], .W = x->shape[3], .OC = y->shape[1], .OH = y->shape[2],
                   .OW = y->shape[3], .KH = n->in[1]->val.shape[2], .KW = n->in[1]->val.shape[3], .S = n->ip[0],
                   .P = n->ip[1]};
    g.Hp = g.H + 2 * g.P, g.Wp = g.W + 2 * g.P;
    g.L = ((int64_t)g.OH * g.Wp + 15) / 16 * 16;
    /* the last read: (C-1)*Hp*Wp + (KH-1)*Wp + KW-1 + S*(L-1) */
    g.npad = (int64_t)g.C * g.Hp * g.Wp + (int64_t)g.KH * g.Wp + g.KW + g.S * g.L;
    return g;
}

static int is_data_input(const kd_node *n, int j) { return j == 0 || (n->op == KD_OP_ADD && j == 1); }

/* Checks every op node up to the logits, resolves no-ops and (int8) folded
 * batch norms to their source and finds each value's last reader. */
static kd_status plan(exporter *e, const char *checkpoint, const char *model) {
    for (int i = 0; i < e->n; i++) e->root[i] = i, e->last[i] = -1, e->slot[i] = -1, e->fold[i] = -1, e->readers[i] = 0;
    e->max_act = kd_numel(&e->x->val);
    for (int i = 0; i < e->n; i++) {
        kd_node *n = kd_graph_node(e->g, i);
        if (n->op == KD_OP_LEAF) continue;
        const char *why = NULL;
        switch (n->op) {
        case KD_OP_CONV2D: case KD_OP_BATCHNORM: case KD_OP_RELU: case KD_OP_MAXPOOL: case KD_OP_AVGPOOL:
        case KD_OP_GAP: case KD_OP_RESHAPE: case KD_OP_DROPOUT: case KD_OP_MATMUL: case KD_OP_ADD: break;
        default: why = "only convolution, batch norm, ReLU, pooling, linear, dropout and addition are supported";
        }
        for (int j = 0; j < n->n_in && !why; j++)
            if (is_data_input(n, j) && n->in[j] != e->x && (n->in[j]->op == KD_OP_LEAF || n->in[j]->id >= i))
                why = "its input is neither the image nor an earlier layer";
        kd_node *src = n->in[0];
        if (!why && e->int8 && n->op == KD_OP_BATCHNORM) {
            if (src == e->x || (src->op != KD_OP_CONV2D && src->op != KD_OP_MATMUL) || e->fold[src->id] >= 0)
                why = "with --int8, batch norm must follow a convolution or linear layer, into which it is folded";
        }
        if (!why && e->int8 && (n->op == KD_OP_CONV2D || n->op == KD_OP_MATMUL) &&
            kd_numel(&n->in[1]->val) / n->in[1]->val.shape[0] > INT32_MAX / (127 * 127))
            why = "too many inputs per output for int32 sums of int8 products";
        if (why)
            return kd_errorf(KD_EUSAGE, "%s: model '%s' cannot be exported to C%s (node '%s', op %s): %s", checkpoint,
                             model, e->int8 ? " with --int8" : "", n->name, kd_ops[n->op]->name, why);
        if (n->op == KD_OP_RESHAPE || n->op == KD_OP_DROPOUT) e->root[i] = e->root[src->id];
        if (e->int8 && n->op == KD_OP_BATCHNORM) {
            e->root[i] = e->root[src->id];
            e->fold[src->id] = i;
        }
        for (int j = 0; j < n->n_in; j++)
            if (is_data_input(n, j)) {
                e->last[e->root[n->in[j]->id]] = i;
                e->readers[n->in[j]->id]++;
            }
        if (kd_numel(&n->val) > e->max_act) e->max_act = kd_numel(&n->val);
        if (e->int8 && (n->op == KD_OP_CONV2D || n->op == KD_OP_MATMUL) && kd_numel(&src->val) > e->max_q)
            e->max_q = kd_numel(&src->val);
        if (n->op == KD_OP_CONV2D) {
            conv_geom gm = geom(n);
            if (gm.npad > e->max_pad) e->max_pad = gm.npad;
            if (gm.L > e->max_wide) e->max_wide = gm.L;
        }
    }
    for (int i = 0; i < e->n; i++)
        if (e->fold[i] >= 0 && e->readers[i] != 1) {
            kd_node *bn = kd_graph_node(e->g, e->fold[i]);
            return kd_errorf(KD_EUSAGE, "%s: model '%s' cannot be exported to C with --int8 (node '%s', op %s): the "
                             "layer before it has other readers, so the batch norm cannot be folded into it",
                             checkpoint, model, bn->name, kd_ops[bn->op]->name);
        }
    return KD_OK;
}

static int take_slot(exporter *e, int *used) {
    int s = 0;
    while (used[s]) s++;
    used[s] = 1;
    if (s + 1 > e->n_slots) e->n_slots = s + 1;
    return s;
}

/* a value takes the first free slot before its inputs give theirs back */
static void assign_slots(exporter *e, int logits) {
    int *used = kd_calloc((size_t)e->n + 1, sizeof(int));
    e->last[e->root[logits]] = e->n; /* read by the copy to `logits` at the end */
    e->slot[e->x->id] = take_slot(e, used);
    for (int i = 0; i < e->n; i++) {
        kd_node *n = kd_graph_node(e->g, i);
        if (n->op == KD_OP_LEAF) continue;
        if (e->root[i] == i) e->slot[i] = take_slot(e, used);
        for (int j = 0; j < n->n_in; j++) {
            int r = is_data_input(n, j) ? e->root[n->in[j]->id] : -1;
            if (r >= 0 && e->last[r] == i) used[e->slot[r]] = 0;
        }
        if (e->root[i] == i && e->last[i] < 0) used[e->slot[i]] = 0; /* read by nobody */
    }
    free(used);
}

/* int8: folds the batch norm bn (or NULL) into the rows of w (OC, K) and
 * the bias b (OC, or NULL), then quantises each row: q (OC, K), scale (OC),
 * bias (OC). All in double, as docs/export.md states the rule. */
static void quantize_rows(int8_t *q, float *scale, float *bias, const float *w, const float *b, const kd_node *bn,
                          int OC, int64_t K) {
    for (int o = 0; o < OC; o++) {
        double a = 1.0, shift = b ? (double)b[o] : 0.0;
        if (bn) {
            const float *gamma = bn->in[1]->val.data, *beta = bn->in[2]->val.data;
            const float *mean = bn->in[3]->val.data, *var = bn->in[4]->val.data;
            a = (double)gamma[o] / sqrt((double)var[o] + (double)bn->fp[1]);
            shift = (double)beta[o] + (shift - (double)mean[o]) * a;
        }
        double amax = 0.0;
        for (int64_t k = 0; k < K; k++) amax = fmax(amax, fabs((double)w[o * K + k] * a));
        double s = amax / 127.0;
        for (int64_t k = 0; k < K; k++) q[o * K + k] = (int8_t)(s > 0.0 ? round((double)w[o * K + k] * a / s) : 0.0);
        scale[o] = (float)s;
        bias[o] = (float)shift;
    }
}

/* the static const arrays one op reads */
static void emit_consts(exporter *e, const kd_node *n) {
    FILE *f = e->f;
    char nm[160];
    if (n->op == KD_OP_BATCHNORM && !e->int8) {
        for (int j = 1; j <= 4; j++) {
            cname(nm, sizeof nm, "p", n->in[j]->name);
            emit_floats(f, nm, n->in[j]->val.data, kd_numel(&n->in[j]->val));
        }
        return;
    }
    if (n->op != KD_OP_CONV2D && n->op != KD_OP_MATMUL) return;
    const kd_tensor *w = &n->in[1]->val;
    int OC = w->shape[0];
    int64_t K = kd_numel(w) / OC;
    int lin = n->op == KD_OP_MATMUL;
    if (!e->int8) {
        cname(nm, sizeof nm, "p", n->in[1]->name);
        if (lin) { /* transposed: (IN, OUT) */
            float *t = kd_malloc(sizeof(float) * (size_t)kd_numel(w));
            for (int o = 0; o < OC; o++)
                for (int64_t k = 0; k < K; k++) t[k * OC + o] = w->data[o * K + k];
            strcat(nm, "_t");
            emit_floats(f, nm, t, kd_numel(w));
            free(t);
        } else {
            emit_floats(f, nm, w->data, kd_numel(w));
        }
        if (n->n_in > 2) {
            cname(nm, sizeof nm, "p", n->in[2]->name);
            emit_floats(f, nm, n->in[2]->val.data, OC);
        }
        return;
    }
    int8_t *q = kd_malloc((size_t)kd_numel(w));
    float *scale = kd_malloc(sizeof(float) * (size_t)OC), *bias = kd_malloc(sizeof(float) * (size_t)OC);
    const kd_node *bn = e->fold[n->id] >= 0 ? kd_graph_node(e->g, e->fold[n->id]) : NULL;
    quantize_rows(q, scale, bias, w->data, n->n_in > 2 ? n->in[2]->val.data : NULL, bn, OC, K);
    cname(nm, sizeof nm, "q", n->in[1]->name);
    emit_int8(f, nm, q, kd_numel(w)); /* (OC, K) for both: the int8 linear sums over a row */
    cname(nm, sizeof nm, "qs", n->in[1]->name);
    emit_floats(f, nm, scale, OC);
    cname(nm, sizeof nm, "qb", n->in[1]->name);
    emit_floats(f, nm, bias, OC);
    free(q), free(scale), free(bias);
}

/* the int8 epilogue: float value v of output o -> dst, with the folded BN's ReLU */
static const char *relu_expr(const exporter *e, const kd_node *n) {
    int relu = e->int8 && e->fold[n->id] >= 0 && kd_graph_node(e->g, e->fold[n->id])->ip[0];
    return relu ? "v <= 0.0f ? 0.0f : v" : "v";
}

static void emit_conv(exporter *e, const kd_node *n, const char *src, const char *dst) {
    conv_geom g = geom(n);
    int q8 = e->int8;
    char w[160], init[168];
    cname(w, sizeof w, q8 ? "q" : "p", n->in[1]->name);
    snprintf(init, sizeof init, q8 ? "0" : "0.0f");
    if (!q8 && n->n_in > 2) {
        cname(init, sizeof init, "p", n->in[2]->name);
        strcat(init, "[o]");
    }
    fprintf(e->f, "    {\n");
    if (q8) fprintf(e->f, "        const float sx = quantize(xq, %s, %d);\n", src, g.C * g.H * g.W);
    fprintf(e->f,
            "        for (int i = 0; i < %lld; i++) xpad[i] = 0;\n"
            "        for (int c = 0; c < %d; c++)\n"
            "            for (int h = 0; h < %d; h++)\n"
            "                for (int w = 0; w < %d; w++) xpad[(c * %d + h + %d) * %d + w + %d] = %s[(c * %d + h) * %d + w];\n"
            "        for (int o = 0; o < %d; o++) {\n"
            "            %s *restrict y = wide;\n"
            "            for (int i = 0; i < %lld; i++) y[i] = %s;\n"
            "            for (int c = 0; c < %d; c++) {\n"
            "                const %s *restrict x = xpad + c * %d;\n"
            "                const %s *wc = %s + (o * %d + c) * %d;\n",
            (long long)g.npad, g.C, g.H, g.W, g.Hp, g.P, g.Wp, g.P, q8 ? "xq" : src, g.H, g.W, g.OC,
            q8 ? "int32_t" : "float", (long long)g.L, init, g.C, q8 ? "short" : "float", g.Hp * g.Wp,
            q8 ? "signed char" : "float", w, g.C, g.KH * g.KW);
    /* all taps of one input channel in one pass over the plane; the sum
     * runs in the order c, kh, kw as before (C evaluates left to right) */
    for (int k = 0; k < g.KH * g.KW; k++)
        fprintf(e->f, "                const %s w%d = wc[%d];\n", q8 ? "short" : "float", k, k);
    fprintf(e->f, "                for (int i = 0; i < %lld; i++)\n                    y[i] = y[i]", (long long)g.L);
    for (int k = 0; k < g.KH * g.KW; k++) {
        int off = (k / g.KW) * g.Wp + k % g.KW;
        char idx[32];
        if (g.S == 1) snprintf(idx, sizeof idx, "i + %d", off);
        else snprintf(idx, sizeof idx, "%d * i + %d", g.S, off);
        fprintf(e->f, "%s + w%d * x[%s]", k % 3 == 2 ? "\n                           " : "", k, idx);
    }
    fprintf(e->f, ";\n            }\n");
    if (q8) {
        char s[160], b[160];
        cname(s, sizeof s, "qs", n->in[1]->name);
        cname(b, sizeof b, "qb", n->in[1]->name);
        fprintf(e->f,
                "            {\n"
                "                const float m = sx * %s[o], bo = %s[o];\n"
                "                for (int oh = 0; oh < %d; oh++)\n"
                "                    for (int ow = 0; ow < %d; ow++) {\n"
                "                        float v = (float)y[oh * %d + ow] * m;\n"
                "                        v += bo;\n"
                "                        %s[(o * %d + oh) * %d + ow] = %s;\n"
                "                    }\n"
                "            }\n",
                s, b, g.OH, g.OW, g.Wp, dst, g.OH, g.OW, relu_expr(e, n));
    } else {
        fprintf(e->f,
                "            for (int oh = 0; oh < %d; oh++)\n"
                "                for (int ow = 0; ow < %d; ow++) %s[(o * %d + oh) * %d + ow] = y[oh * %d + ow];\n",
                g.OH, g.OW, dst, g.OH, g.OW, g.Wp);
    }
    fprintf(e->f, "        }\n    }\n");
}

static void emit_linear(exporter *e, const kd_node *n, const char *src, const char *dst) {
    int IN = n->in[1]->val.shape[1], OUT = n->in[1]->val.shape[0];
    char w[160], b[160], s[160];
    if (!e->int8) {
        cname(w, sizeof w, "p", n->in[1]->name);
        strcat(w, "_t");
        if (n->n_in > 2) cname(b, sizeof b, "p", n->in[2]->name), strcat(b, "[o]");
        else snprintf(b, sizeof b, "0.0f");
        fprintf(e->f,
                "    for (int o = 0; o < %d; o++) %s[o] = %s;\n"
                "    for (int i = 0; i < %d; i++) {\n"
                "        const float xi = %s[i], *restrict w = %s + i * %d;\n"
                "        float *restrict y = %s;\n"
                "        if (xi != 0.0f)\n"
                "            for (int o = 0; o < %d; o++) y[o] += w[o] * xi;\n"
                "    }\n",
                OUT, dst, b, IN, src, w, OUT, dst, OUT);
        return;
    }
    cname(w, sizeof w, "q", n->in[1]->name);
    cname(s, sizeof s, "qs", n->in[1]->name);
    cname(b, sizeof b, "qb", n->in[1]->name);
    fprintf(e->f,
            "    {\n"
            "        const float sx = quantize(xq, %s, %d);\n"
            "        for (int o = 0; o < %d; o++) {\n"
            "            const signed char *restrict w = %s + o * %d;\n"
            "            const short *restrict x = xq;\n"
            "            int32_t sum = 0;\n"
            "            float v;\n"
            "            for (int i = 0; i < %d; i++) sum += w[i] * x[i];\n"
            "            v = (float)sum * (sx * %s[o]);\n"
            "            v += %s[o];\n"
            "            %s[o] = %s;\n"
            "        }\n"
            "    }\n",
            src, IN, OUT, w, IN, IN, s, b, dst, relu_expr(e, n));
}

static void emit_op(exporter *e, const kd_node *n, const char *src, const char *dst) {
    FILE *f = e->f;
    const kd_tensor *x = &n->in[0]->val, *y = &n->val;
    switch (n->op) {
    case KD_OP_CONV2D: emit_conv(e, n, src, dst); break;
    case KD_OP_MATMUL: emit_linear(e, n, src, dst); break;
    case KD_OP_BATCHNORM: {
        if (e->int8) { /* folded into the layer before */
            fprintf(f, "    /* (folded into %s) */\n", n->in[0]->name);
            break;
        }
        int C = x->shape[1], S = x->ndim == 4 ? x->shape[2] * x->shape[3] : 1;
        char g1[160], b1[160], rm[160], rv[160];
        cname(g1, sizeof g1, "p", n->in[1]->name);
        cname(b1, sizeof b1, "p", n->in[2]->name);
        cname(rm, sizeof rm, "p", n->in[3]->name);
        cname(rv, sizeof rv, "p", n->in[4]->name);
        fprintf(f,
                "    for (int c = 0; c < %d; c++) {\n"
                "        float is = 1.0f / sqrtf(%s[c] + %.9gf), a = %s[c] * is, b = %s[c] - %s[c] * a;\n"
                "        for (int i = 0; i < %d; i++) {\n"
                "            float v = %s[c * %d + i] * a + b;\n"
                "            %s[c * %d + i] = %s;\n"
                "        }\n"
                "    }\n",
                C, rv, (double)n->fp[1], g1, b1, rm, S, src, S, dst, S, n->ip[0] ? "v <= 0.0f ? 0.0f : v" : "v");
        break;
    }
    case KD_OP_RELU:
        fprintf(f, "    for (int i = 0; i < %lld; i++) %s[i] = %s[i] <= 0.0f ? 0.0f : %s[i];\n", (long long)kd_numel(y),
                dst, src, src);
        break;
    case KD_OP_ADD: {
        char b[16];
        snprintf(b, sizeof b, "s%d", e->slot[e->root[n->in[1]->id]]);
        fprintf(f, "    for (int i = 0; i < %lld; i++) %s[i] = %s[i] + %s[i];\n", (long long)kd_numel(y), dst, src, b);
        break;
    }
    case KD_OP_MAXPOOL:
    case KD_OP_AVGPOOL: {
        int C = x->shape[1], H = x->shape[2], W = x->shape[3], OH = y->shape[2], OW = y->shape[3];
        int k = n->ip[0], s = n->ip[1];
        char body[256], out[64];
        if (n->op == KD_OP_MAXPOOL) {
            snprintf(body, sizeof body, "{ float v = p[i * %d + j]; if (v > m) m = v; }", W);
            snprintf(out, sizeof out, "m");
        } else {
            snprintf(body, sizeof body, "m += p[i * %d + j];", W);
            snprintf(out, sizeof out, "m / %d.0f", k * k);
        }
        fprintf(f,
                "    for (int c = 0; c < %d; c++)\n"
                "        for (int oh = 0; oh < %d; oh++)\n"
                "            for (int ow = 0; ow < %d; ow++) {\n"
                "                const float *p = %s + (c * %d + oh * %d) * %d + ow * %d;\n"
                "                float m = %s;\n"
                "                for (int i = 0; i < %d; i++)\n"
                "                    for (int j = 0; j < %d; j++) %s\n"
                "                %s[(c * %d + oh) * %d + ow] = %s;\n"
                "            }\n",
                C, OH, OW, src, H, s, W, s, n->op == KD_OP_MAXPOOL ? "p[0]" : "0.0f", k, k, body, dst, OH, OW, out);
        break;
    }
    case KD_OP_GAP: { /* summed in double, as the engine does */
        int C = x->shape[1], HW = x->shape[2] * x->shape[3];
        fprintf(f,
                "    for (int c = 0; c < %d; c++) {\n        double acc = 0.0;\n"
                "        for (int i = 0; i < %d; i++) acc += %s[c * %d + i];\n        %s[c] = (float)(acc / %d);\n    }\n",
                C, HW, src, HW, dst, HW);
        break;
    }
    default: fprintf(f, "    /* (no-op at inference) */\n"); break; /* reshape, dropout */
    }
}

static const char helpers_q8[] =
    "/* q = round(x / s), halves away from zero, with s = max|x| / 127 (0 when\n"
    " * max|x| < 1e-30: then q = 0). Returns s. Inputs must be finite. */\n"
    "static float quantize(short *q, const float *x, int n) {\n"
    "    float amax = 0.0f, inv;\n"
    "    for (int i = 0; i < n; i++) {\n"
    "        float a = fabsf(x[i]);\n"
    "        if (a > amax) amax = a;\n"
    "    }\n"
    "    if (!(amax >= 1e-30f)) {\n"
    "        for (int i = 0; i < n; i++) q[i] = 0;\n"
    "        return 0.0f;\n"
    "    }\n"
    "    inv = 127.0f / amax;\n"
    "    for (int i = 0; i < n; i++) {\n"
    "        float v = x[i] * inv, r;\n"
    "        int t = (int)v; /* toward zero; |v| <= 127 */\n"
    "        r = v - (float)t; /* exact */\n"
    "        q[i] = (short)(t + (r >= 0.5f) - (r <= -0.5f));\n"
    "    }\n"
    "    return amax / 127.0f;\n"
    "}\n\n";

static void write_header(exporter *e, FILE *h, const char *checkpoint, const kd_checkpoint_info *info, int64_t params) {
    int64_t ws = e->n_slots * e->max_act;
    int64_t bytes = 4 * ws + (e->int8 ? 2 * (e->max_q + e->max_pad) : 4 * e->max_pad) + 4 * e->max_wide;
    fprintf(h,
            "/* model.h - generated by distill %s from %s.\n"
            " * Model: %s, %s. Dependency-free C99; link with -lm. */\n"
            "#ifndef MODEL_H\n#define MODEL_H\n\n"
            "#define MODEL_INPUT_C %d\n#define MODEL_INPUT_H %d\n#define MODEL_INPUT_W %d\n"
            "#define MODEL_INPUT_SIZE %lld\n#define MODEL_CLASSES %d\n#define MODEL_PARAMS %lld\n"
            "#define MODEL_INT8 %d\n"
            "/* activations: %d slots of %lld floats */\n#define MODEL_WORKSPACE_FLOATS %lld\n"
            "/* all static scratch memory: the activations, %s */\n#define MODEL_WORKSPACE_BYTES %lld\n\n"
            "/* input: MODEL_INPUT_SIZE floats, the image as pixel/255 in [0, 1], (C, H, W) row-major;\n"
            " * logits: MODEL_CLASSES floats. Returns the predicted class. Uses a static\n"
            " * workspace of MODEL_WORKSPACE_BYTES bytes: not reentrant. */\n"
            "int model_predict(const float *input, float *logits);\n\n#endif\n",
            KD_VERSION, checkpoint, info->model,
            e->int8 ? "int8 weights per output channel, int8 activations per sample, int32 sums" : "float32",
            info->c, info->h, info->w, (long long)kd_numel(&e->x->val), info->classes, (long long)params, e->int8,
            e->n_slots, (long long)e->max_act, (long long)ws,
            e->int8 ? "the quantised input, a convolution's padded input and output plane"
                    : "a convolution's padded input and output plane",
            (long long)bytes);
}

static void write_source(exporter *e, FILE *f, const char *checkpoint, const kd_checkpoint_info *info, int logits) {
    fprintf(f, "/* model.c - generated by distill %s from %s (model %s%s). */\n#include <math.h>\n%s\n#include \"model.h\"\n\n",
            KD_VERSION, checkpoint, info->model, e->int8 ? ", int8" : "", e->int8 ? "#include <stdint.h>\n" : "");
    for (int i = 0; i < e->n; i++)
        if (kd_graph_node(e->g, i)->op != KD_OP_LEAF) emit_consts(e, kd_graph_node(e->g, i));
    fprintf(f, "\nstatic float ws[MODEL_WORKSPACE_FLOATS];\n");
    if (e->int8) fprintf(f, "static short xq[%lld]; /* int8 values; 16 bits for pmaddwd-style dot products */\n", (long long)e->max_q);
    if (e->max_pad)
        fprintf(f, "static %s xpad[%lld];\nstatic %s wide[%lld];\n", e->int8 ? "short" : "float", (long long)e->max_pad,
                e->int8 ? "int32_t" : "float", (long long)e->max_wide);
    fprintf(f, "\n%s", e->int8 ? helpers_q8 : "");
    fprintf(f, "int model_predict(const float *input, float *logits) {\n    float *const s0 = ws");
    for (int s = 1; s < e->n_slots; s++) fprintf(f, ", *const s%d = ws + %lld", s, (long long)(s * e->max_act));
    fprintf(f, ";\n    int best = 0;\n");
    fprintf(f, "    for (int i = 0; i < %lld; i++) s%d[i] = (input[i] - %.9gf) / %.9gf;\n",
            (long long)kd_numel(&e->x->val), e->slot[e->x->id], (double)info->mean, (double)info->std);
    for (int i = 0; i < e->n; i++) {
        kd_node *n = kd_graph_node(e->g, i);
        if (n->op == KD_OP_LEAF) continue;
        char src[16], dst[16];
        snprintf(src, sizeof src, "s%d", e->slot[e->root[n->in[0]->id]]);
        snprintf(dst, sizeof dst, "s%d", e->slot[e->root[i]]);
        fprintf(f, "    /* %s: %s */\n", n->name, kd_ops[n->op]->name);
        emit_op(e, n, src, dst);
    }
    int out = e->slot[e->root[logits]];
    fprintf(f, "    for (int k = 0; k < %d; k++) {\n        logits[k] = s%d[k];\n"
               "        if (s%d[k] > s%d[best]) best = k;\n    }\n    return best;\n}\n",
            info->classes, out, out, out);
}

kd_status kd_export_c_opts(const char *checkpoint, const char *dir, const kd_export_opts *opts) {
    kd_checkpoint_info info;
    kd_status st = kd_checkpoint_info_read(checkpoint, &info);
    if (st != KD_OK) return st;
    kd_dataset ds = {.n = 1, .c = info.c, .h = info.h, .w = info.w, .n_classes = info.classes, .mean = info.mean,
                     .std = info.std};
    kd_classifier c;
    st = kd_classifier_new(&c, info.model, "", &ds, 1, 0.0f, 0);
    if (st != KD_OK) return st;
    st = kd_checkpoint_load(c.g, &c.m, checkpoint);
    if (st != KD_OK) {
        kd_classifier_free(&c);
        return st;
    }
    exporter e = {.g = c.g, .x = c.x, .n = c.m.logits->id + 1, .int8 = opts && opts->int8};
    int *arrays = kd_malloc(sizeof(int) * 5 * (size_t)e.n);
    e.root = arrays, e.last = arrays + e.n, e.slot = arrays + 2 * e.n, e.fold = arrays + 3 * e.n;
    e.readers = arrays + 4 * e.n;
    st = plan(&e, checkpoint, info.model); /* the message names a node: write it before the graph is freed */
    if (st == KD_OK) assign_slots(&e, c.m.logits->id);
    if (st == KD_OK && mkdir(dir, 0755) != 0 && errno != EEXIST)
        st = kd_errorf(KD_EIO, "%s: cannot create: %s", dir, strerror(errno));
    char hpath[4200], cpath[4200];
    snprintf(hpath, sizeof hpath, "%s/model.h", dir);
    snprintf(cpath, sizeof cpath, "%s/model.c", dir);
    FILE *h = st == KD_OK ? fopen(hpath, "w") : NULL, *f = h ? fopen(cpath, "w") : NULL;
    if (st == KD_OK && (!h || !f)) st = kd_errorf(KD_EIO, "%s: cannot write: %s", !h ? hpath : cpath, strerror(errno));
    if (st == KD_OK) {
        e.f = f;
        write_header(&e, h, checkpoint, &info, kd_model_params(c.g, &c.m));
        write_source(&e, f, checkpoint, &info, c.m.logits->id);
        if (ferror(f) || ferror(h)) st = kd_errorf(KD_EIO, "%s: write failed", dir);
    }
    if (h && fclose(h) != 0 && st == KD_OK) st = kd_errorf(KD_EIO, "%s: write failed", hpath);
    if (f && fclose(f) != 0 && st == KD_OK) st = kd_errorf(KD_EIO, "%s: write failed", cpath);
    free(arrays);
    kd_classifier_free(&c);
    return st;
}

kd_status kd_export_c(const char *checkpoint, const char *dir) { return kd_export_c_opts(checkpoint, dir, NULL); }
