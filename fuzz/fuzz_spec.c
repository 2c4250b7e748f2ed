/* fuzz_spec.c - libFuzzer harness for the loss-spec language and the loss
 * builder.
 *
 * The input is a spec string ("ce(weight=0.1) + kd(T=4)"). kd_loss_spec_parse
 * must reject it with KD_ECONFIG or produce terms that print back to a spec
 * that parses to the same terms. An accepted spec is then built the way
 * `distill loss` builds one, between tiny tensors (no models: logits N x K,
 * features as matrices in one graph, as (N, C, H, W) maps in another), and
 * when the builder accepts it the graph is compiled and run forward and
 * backward. Specs that ask for large memory banks or sample counts (an
 * argument >= 1024, such as crd's n_data or dim, or nce_k >= 32768) are
 * built but not compiled: their size is what the user asked for.
 */
#include <math.h>

#include "fuzz.h"
#include "kd_losses.h"

#define N 3
#define K 5

static void spec_print(const kd_loss_spec *sp, char *buf, size_t n) {
    size_t k = 0;
    buf[0] = '\0';
    for (int i = 0; i < sp->n && k < n; i++) {
        const kd_loss_term *t = &sp->terms[i];
        k += (size_t)snprintf(buf + k, n - k, "%s%s", i ? " + " : "", t->name);
        if (k < n && t->n_args) k += (size_t)snprintf(buf + k, n - k, "(");
        for (int j = 0; j < t->n_args && k < n; j++)
            k += (size_t)snprintf(buf + k, n - k, "%s%s=%s", j ? ", " : "", t->args[j].key, t->args[j].value);
        if (k < n && t->n_args) k += (size_t)snprintf(buf + k, n - k, ")");
    }
    FZ_CHECK(k < n, "printed spec too long");
}

static void check_parse(const kd_loss_spec *sp) {
    FZ_CHECK(sp->n >= 1 && sp->n <= KD_MAX_TERMS, "%d terms", sp->n);
    for (int i = 0; i < sp->n; i++) {
        const kd_loss_term *t = &sp->terms[i];
        FZ_CHECK(t->name[0] && t->n_args >= 0 && t->n_args <= KD_MAX_ARGS, "term %d", i);
        for (int j = 0; j < t->n_args; j++) {
            FZ_CHECK(t->args[j].key[0] && t->args[j].value[0], "term %d arg %d empty", i, j);
            for (int m = 0; m < j; m++) FZ_CHECK(strcmp(t->args[m].key, t->args[j].key) != 0, "repeated key");
        }
    }
    char text[KD_MAX_TERMS * (32 + KD_MAX_ARGS * (32 + 64 + 3) + 8)];
    spec_print(sp, text, sizeof text);
    kd_loss_spec again;
    FZ_CHECK(kd_loss_spec_parse(text, &again) == KD_OK, "printed spec '%s' does not parse", text);
    FZ_CHECK(memcmp(sp, &again, sizeof again) == 0, "printed spec '%s' parses differently", text);
}

static int small_args(const kd_loss_spec *sp) {
    for (int i = 0; i < sp->n; i++)
        for (int j = 0; j < sp->terms[i].n_args; j++) {
            const kd_loss_arg *a = &sp->terms[i].args[j];
            double x = strtod(a->value, NULL), lim = strcmp(a->key, "nce_k") == 0 ? 1 << 15 : 1024;
            if (!(fabs(x) < lim)) return 0;
        }
    return 1;
}

static void fill(float *p, size_t n, uint64_t seed) {
    kd_rng r;
    kd_rng_seed(&r, seed);
    for (size_t i = 0; i < n; i++) p[i] = kd_rng_normal(&r);
}

static void build(const kd_loss_spec *sp, int maps, int compile) {
    kd_graph *g = kd_graph_new();
    int ls[2] = {N, K}, ys[1] = {N};
    int sf[4] = {N, 4, 3, 3}, tf[4] = {N, 6, 3, 3};
    if (!maps) sf[1] = 6, tf[1] = 8;
    kd_loss_inputs in = {0};
    in.s_logits = kd_param(g, "s_logits", 2, ls, KD_INIT_ZERO, 1);
    in.t_logits = kd_input(g, "t_logits", 2, ls);
    in.labels = kd_input(g, "labels", 1, ys);
    in.mask = maps ? kd_input(g, "mask", 1, ys) : NULL;
    in.s_feat = kd_param(g, "s_feat", maps ? 4 : 2, sf, KD_INIT_ZERO, 1);
    in.t_feat = kd_input(g, "t_feat", maps ? 4 : 2, tf);
    in.n_data = 8;
    kd_built_loss bl;
    kd_status s = kd_loss_build(g, sp, &in, &bl);
    FZ_CHECK(s == KD_OK || s == KD_ECONFIG || s == KD_ESHAPE, "build status %d", (int)s);
    if (s == KD_OK) {
        FZ_CHECK(bl.n == sp->n && bl.total, "%d terms built of %d", bl.n, sp->n);
        s = compile ? kd_graph_compile(g, N, 1) : KD_EFORMAT;
        FZ_CHECK(s == KD_OK || s == KD_ESHAPE || s == KD_ECONFIG || s == KD_EFORMAT, "compile status %d", (int)s);
    }
    if (compile && s == KD_OK) {
        /* inputs: logits and features random, labels valid classes, mask and
         * every other input (crd's idx) valid too */
        for (int i = 0; i < kd_graph_n_nodes(g); i++) {
            kd_node *n = kd_graph_node(g, i);
            if (!(n->flags & KD_F_INPUT) || !n->val.data) continue;
            size_t cnt = (size_t)kd_numel(&n->val);
            if (n == in.labels)
                for (size_t k = 0; k < cnt; k++) n->val.data[k] = (float)(k % K);
            else if (n == in.mask)
                for (size_t k = 0; k < cnt; k++) n->val.data[k] = (float)(k != 1);
            else if (n == in.t_logits || n == in.t_feat)
                fill(n->val.data, cnt, 7 + (uint64_t)i);
            else
                for (size_t k = 0; k < cnt; k++) n->val.data[k] = (float)(k % 8);
        }
        fill(in.s_logits->val.data, (size_t)kd_numel(&in.s_logits->val), 1);
        fill(in.s_feat->val.data, (size_t)kd_numel(&in.s_feat->val), 2);
        kd_loss_set_epoch(&bl, 1.5);
        kd_graph_forward(g, 1);
        kd_graph_backward(g, bl.total);
        kd_loss_set_epoch(&bl, 100);
        kd_graph_forward(g, 0);
    }
    kd_graph_free(g);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size > 4096) return 0;
    char *text = fz_cstr(data, size);
    kd_loss_spec sp;
    kd_status s = kd_loss_spec_parse(text, &sp);
    FZ_CHECK(s == KD_OK || s == KD_ECONFIG, "parse status %d", (int)s);
    if (s == KD_OK) {
        check_parse(&sp);
        int compile = small_args(&sp);
        build(&sp, 0, compile);
        build(&sp, 1, compile);
    }
    free(text);
    return 0;
}
