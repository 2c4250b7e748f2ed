/* loss.c - `distill loss "SPEC" --in X.safetensors --out Y.safetensors`:
 * evaluates a loss spec on tensors from elsewhere (PyTorch, a user's own
 * code) and writes the loss and its gradient with respect to every student
 * input, for parity checks. Inputs (by name): s_logits, t_logits (N, K),
 * labels (N; I64, I32 or F32), mask (N), s_feat, t_feat. Outputs: loss (a
 * scalar), grad.s_logits, grad.s_feat. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "kd_io.h"
#include "kd_losses.h"

static cli_opt loss_opts[] = {
    {"--in", "X.safetensors", "input tensors: s_logits, t_logits, labels, mask, s_feat, t_feat", NULL},
    {"--out", "Y.safetensors", "where to write loss and grad.<input>", NULL},
    {"--epoch", "E", "epoch for scheduled terms (DKD warm-up); default: after any warm-up", NULL},
};

static cli_cmd loss_cmd = {
    .name = "loss",
    .synopsis = "\"SPEC\" --in X.safetensors --out Y.safetensors",
    .about = "Evaluates a loss spec on given tensors and writes the loss and its gradients\n"
             "with respect to the student inputs (s_logits, s_feat). The teacher side is\n"
             "treated as detached. Use it to check parity with your own implementation.",
    .examples = "  distill loss \"ce(weight=0.1) + kd(T=4, weight=0.9)\" --in batch.safetensors --out grads.safetensors\n"
                "  distill loss \"dkd(alpha=1, beta=8, T=4)\" --in x.safetensors --out y.safetensors\n",
    .opts = loss_opts,
    .n_opts = (int)(sizeof loss_opts / sizeof loss_opts[0]),
};

/* Creates a node for tensor `name` if the file has it: student tensors as
 * trainable leaves (they get gradients), the rest as inputs. */
static kd_status leaf_from(kd_graph *g, const kd_safetensors *st, const char *name, int trainable, int want_ndim,
                           kd_node **out) {
    *out = NULL;
    const kd_st_tensor *t = kd_st_find(st, name);
    if (!t) return KD_OK;
    if (t->ndim < 1 || t->ndim > KD_MAX_DIM || (want_ndim && t->ndim != want_ndim))
        return kd_errorf(KD_ESHAPE, "%s: tensor '%s' has %d dimensions, expected %s", st->path, name, t->ndim,
                         want_ndim == 1 ? "1 (N)" : want_ndim == 2 ? "2 (N, K)" : "1 to 4");
    int shape[KD_MAX_DIM];
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] < 1 || t->shape[i] > (1 << 24))
            return kd_errorf(KD_ESHAPE, "%s: tensor '%s' has an empty or huge dimension", st->path, name);
        shape[i] = (int)t->shape[i];
    }
    *out = trainable ? kd_param(g, name, t->ndim, shape, KD_INIT_ZERO, 1) : kd_input(g, name, t->ndim, shape);
    return KD_OK;
}

static kd_status fill(const kd_safetensors *st, kd_node *n) {
    return n ? kd_st_get_f32(st, n->name, n->val.data, n->val.ndim, n->val.shape) : KD_OK;
}

int cmd_loss(int argc, char **argv) {
    const char *pos[1];
    int npos, help;
    kd_status s = cli_parse(&loss_cmd, argc, argv, pos, 1, &npos, NULL, 0, NULL, &help);
    if (s == KD_OK && help) {
        cli_usage(&loss_cmd, stdout);
        printf("\nlosses (argument=default):\n");
        kd_loss_print_help(stdout);
        return 0;
    }
    if (s == KD_OK && (npos != 1 || !cli_get(&loss_cmd, "--in") || !cli_get(&loss_cmd, "--out")))
        s = kd_errorf(KD_EUSAGE, "distill loss needs \"SPEC\", --in and --out (see distill loss --help)");
    double epoch = 1e9;
    if (s == KD_OK && cli_get(&loss_cmd, "--epoch")) {
        char *end;
        epoch = strtod(cli_get(&loss_cmd, "--epoch"), &end);
        if (*end || !(epoch >= 0)) s = kd_errorf(KD_EUSAGE, "--epoch: '%s' is not a number >= 0", cli_get(&loss_cmd, "--epoch"));
    }
    if (s != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 2;
    }
    cli_set_threads(0);
    kd_loss_spec spec;
    kd_safetensors st = {0};
    kd_graph *g = kd_graph_new();
    kd_loss_inputs in = {0};
    kd_built_loss built;
    s = kd_loss_spec_parse(pos[0], &spec);
    if (s == KD_OK) s = kd_st_read(cli_get(&loss_cmd, "--in"), &st);
    if (s == KD_OK) s = leaf_from(g, &st, "s_logits", 1, 2, &in.s_logits);
    if (s == KD_OK) s = leaf_from(g, &st, "t_logits", 0, 2, &in.t_logits);
    if (s == KD_OK) s = leaf_from(g, &st, "labels", 0, 1, &in.labels);
    if (s == KD_OK) s = leaf_from(g, &st, "mask", 0, 1, &in.mask);
    if (s == KD_OK) s = leaf_from(g, &st, "s_feat", 1, 0, &in.s_feat);
    if (s == KD_OK) s = leaf_from(g, &st, "t_feat", 0, 0, &in.t_feat);
    if (s == KD_OK && !in.s_logits && !in.s_feat)
        s = kd_errorf(KD_EFORMAT, "%s: needs a tensor 's_logits' or 's_feat'", st.path);
    if (s == KD_OK && in.s_logits && in.t_logits &&
        (in.s_logits->val.shape[0] != in.t_logits->val.shape[0] || in.s_logits->val.shape[1] != in.t_logits->val.shape[1]))
        s = kd_errorf(KD_ESHAPE, "%s: s_logits and t_logits differ in shape", st.path);
    int N = in.s_logits ? in.s_logits->val.shape[0] : in.s_feat->val.shape[0];
    if (s == KD_OK && ((in.labels && in.labels->val.shape[0] != N) || (in.mask && in.mask->val.shape[0] != N)))
        s = kd_errorf(KD_ESHAPE, "%s: labels and mask must have N = %d entries", st.path, N);
    if (s == KD_OK) s = kd_loss_build(g, &spec, &in, &built);
    if (s == KD_OK) s = kd_graph_compile(g, N, 0);
    if (s == KD_OK) s = fill(&st, in.s_logits);
    if (s == KD_OK) s = fill(&st, in.t_logits);
    if (s == KD_OK) s = fill(&st, in.labels);
    if (s == KD_OK) s = fill(&st, in.mask);
    if (s == KD_OK) s = fill(&st, in.s_feat);
    if (s == KD_OK) s = fill(&st, in.t_feat);
    if (s == KD_OK && in.labels && in.s_logits) {
        int K = in.s_logits->val.shape[1];
        for (int i = 0; i < N && s == KD_OK; i++) {
            float y = in.labels->val.data[i];
            if (y != floorf(y) || y >= K)
                s = kd_errorf(KD_EFORMAT, "%s: labels[%d] = %g is not a class index below %d (negative = ignored)",
                              st.path, i, (double)y, K);
        }
    }
    if (s == KD_OK) {
        kd_loss_set_epoch(&built, epoch);
        kd_graph_forward(g, 1);
        if (!isfinite(built.total->val.data[0]))
            s = kd_errorf(KD_ENUMERIC, "loss is %g on these inputs", (double)built.total->val.data[0]);
    }
    if (s == KD_OK) {
        float loss = built.total->val.data[0];
        kd_graph_backward(g, built.total);
        kd_st_writer *w = kd_st_writer_new();
        int64_t none[1] = {0};
        kd_st_add(w, "loss", KD_F32, 0, none, &loss);
        kd_node *grads[2] = {in.s_logits, in.s_feat};
        for (int i = 0; i < 2; i++) {
            if (!grads[i]) continue;
            char nm[128];
            snprintf(nm, sizeof nm, "grad.%s", grads[i]->name);
            kd_st_add_f32(w, nm, grads[i]->val.ndim, grads[i]->val.shape, grads[i]->grad.data);
        }
        for (int i = 0; i < built.n; i++) {
            char nm[64];
            snprintf(nm, sizeof nm, "term.%d.%s", i + 1, built.terms[i].name);
            kd_st_add(w, nm, KD_F32, 0, none, built.terms[i].value->val.data);
        }
        kd_st_set_meta(w, "spec", pos[0]);
        s = kd_st_write(w, cli_get(&loss_cmd, "--out"));
        kd_st_writer_free(w);
        if (s == KD_OK) printf("loss %.9g\n", (double)loss);
    }
    kd_st_free(&st);
    kd_graph_free(g);
    if (s != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 1;
    }
    return 0;
}
