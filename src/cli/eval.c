/* eval.c - `distill eval CHECKPOINT --data SPEC`: rebuild the model named
 * in the checkpoint's metadata (or by --model, for a PyTorch state_dict
 * without it), load it strictly (or through --names), report accuracy, and
 * optionally write every logit (--logits) for comparisons with other tools. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "kd_io.h"
#include "kd_lm.h"
#include "kd_train.h"

static cli_opt eval_opts[] = {
    {"--data", "SPEC", "dataset: fashion-mnist:test (default), fashion-mnist:train, idx:IMAGES,LABELS", NULL},
    {"--batch", "N", "batch size (default 256)", NULL},
    {"--threads", "N", "threads (default: all cores)", NULL},
    {"--model", "SPEC", "model spec, for a checkpoint without distill's metadata (PyTorch)", NULL},
    {"--names", "MAP", "the checkpoint's names: auto, THEIRS=OURS,... or @FILE (docs/interop.md)", NULL},
    {"--limit", "N", "only the first N examples (default: all)", NULL},
    {"--label-map", "MAP", "new label of each class, as [data] label_map (\"0 0 0 0 0 1 1 1 1 1\")", NULL},
    {"--logits", "FILE", "also write the logits (N,K) and labels (N) as safetensors", NULL},
    {"--val", "F", "language models: the validation fraction of the run (default 0.05)", NULL},
    {"--seq", "T", "language models: window length (default: the model's context)", NULL},
};

static cli_cmd eval_cmd = {
    .name = "eval",
    .synopsis = "CHECKPOINT [--data SPEC] [options]",
    .about = "Evaluates a checkpoint and prints accuracy and mean cross-entropy. A checkpoint\n"
             "written by distill names its model in its metadata; a PyTorch state_dict saved\n"
             "with safetensors needs --model (classes and image size then come from the data,\n"
             "normalisation from the dataset) and, unless its names are ours, --names.",
    .examples = "  distill eval runs/fashion_teacher/teacher.safetensors --data fashion-mnist:test\n"
                "  distill eval torch.safetensors --model \"cnn: c8 p c16 p f32\" --names auto --logits z.safetensors\n"
                "  distill eval runs/lm_kd/student.safetensors --data text    # a GPT: validation loss and perplexity\n",
    .opts = eval_opts,
    .n_opts = (int)(sizeof eval_opts / sizeof eval_opts[0]),
};

/* Runs the model over ds in order and writes logits (N,K) F32 and labels
 * (N) I64 to path. */
static kd_status write_logits(kd_classifier *c, const kd_dataset *ds, int batch, const char *ckpt, const char *path) {
    int K = c->m.logits->val.shape[1];
    float *z = kd_malloc((size_t)ds->n * K * sizeof(float));
    int64_t *y = kd_malloc((size_t)ds->n * sizeof(int64_t));
    kd_loader_opts lo = {.batch = batch};
    kd_loader *ld = kd_loader_new(ds, &lo);
    int B, at = 0;
    while ((B = kd_loader_next(ld, c->x->val.data, c->y->val.data, NULL)) > 0) {
        kd_graph_set_batch(c->g, B);
        kd_graph_forward_to(c->g, 0, c->m.logits);
        memcpy(z + (size_t)at * K, c->m.logits->val.data, (size_t)B * K * sizeof(float));
        for (int b = 0; b < B; b++) y[at + b] = (int64_t)c->y->val.data[b];
        at += B;
    }
    kd_loader_free(ld);
    kd_st_writer *w = kd_st_writer_new();
    int zs[2] = {ds->n, K};
    int64_t ys[1] = {ds->n};
    kd_st_add_f32(w, "logits", 2, zs, z);
    kd_st_add(w, "labels", KD_I64, 1, ys, y);
    kd_st_set_meta(w, "checkpoint", ckpt);
    kd_st_set_meta(w, "model", c->m.spec);
    kd_st_set_meta(w, "dataset", ds->name);
    kd_status st = kd_st_write(w, path);
    kd_st_writer_free(w);
    free(z);
    free(y);
    return st;
}

/* A head of K*S subclass logits (LELP, metadata "groups" = S): a class's
 * log-probability is the log-sum-exp of its S subclasses' log-probabilities;
 * accuracy and mean cross-entropy over those K classes. */
static double lse(const float *z, int n) {
    float m = z[0];
    for (int i = 1; i < n; i++) m = z[i] > m ? z[i] : m;
    double s = 0.0;
    for (int i = 0; i < n; i++) s += exp((double)z[i] - m);
    return m + log(s);
}

static kd_eval_result eval_groups(kd_classifier *c, const kd_dataset *ds, int batch, int S) {
    int KS = c->m.logits->val.shape[1], K = KS / S;
    kd_eval_result r = {0};
    double loss = 0.0;
    int correct = 0;
    kd_loader_opts lo = {.batch = batch};
    kd_loader *ld = kd_loader_new(ds, &lo);
    int B;
    while ((B = kd_loader_next(ld, c->x->val.data, c->y->val.data, NULL)) > 0) {
        kd_graph_set_batch(c->g, B);
        kd_graph_forward_to(c->g, 0, c->m.logits);
        for (int b = 0; b < B; b++) {
            const float *z = c->m.logits->val.data + (size_t)b * KS;
            double all = lse(z, KS), best = -INFINITY, at_y = 0.0;
            int arg = 0, y = (int)c->y->val.data[b];
            for (int k = 0; k < K; k++) {
                double lk = lse(z + (size_t)k * S, S);
                if (lk > best) best = lk, arg = k;
                if (k == y) at_y = lk;
            }
            correct += arg == y;
            loss += all - at_y;
        }
        r.n += B;
    }
    kd_loader_free(ld);
    r.acc = r.n ? (double)correct / r.n : 0.0;
    r.loss = r.n ? loss / r.n : 0.0;
    return r;
}

/* a GPT checkpoint on a text dataset: validation loss and perplexity of the
 * deterministic window sweep (the split of `distill run` with the same
 * [lm] val_frac) */
static int eval_lm(const char *ckpt, const char *spec, int batch) {
    kd_safetensors st0;
    kd_status st = kd_st_read(ckpt, &st0);
    char model[256] = "", *tj = NULL;
    int vocab = 0;
    if (st == KD_OK) {
        const char *m = kd_st_meta(&st0, "model"), *v = kd_st_meta(&st0, "vocab"), *t = kd_st_meta(&st0, "tokenizer");
        if (!m || !v) st = kd_errorf(KD_EFORMAT, "%s: not a language-model checkpoint (no 'model'/'vocab' metadata)", ckpt);
        if (m) snprintf(model, sizeof model, "%s", m);
        vocab = v ? atoi(v) : 0;
        tj = t ? kd_strdup(t) : NULL;
        kd_st_free(&st0);
    }
    const char *vs = cli_get(&eval_cmd, "--val");
    float vf = vs ? strtof(vs, NULL) : 0.05f;
    if (st == KD_OK && !(vf > 0.0f && vf <= 0.5f)) st = kd_errorf(KD_EUSAGE, "--val must be in (0, 0.5]");
    kd_gpt_cfg g;
    int seq = 0;
    if (st == KD_OK) st = kd_gpt_cfg_parse(model, vocab, &g);
    if (st == KD_OK && cli_get(&eval_cmd, "--seq")) st = cli_parse_int("--seq", cli_get(&eval_cmd, "--seq"), 2, g.ctx, &seq);
    if (st == KD_OK && seq == 0) seq = g.ctx;
    kd_tokenizer tok;
    int bpe = 0;
    if (st == KD_OK && tj) {
        st = kd_tokenizer_from_json(&tok, tj, ckpt);
        bpe = st == KD_OK;
    }
    kd_text_data d;
    memset(&d, 0, sizeof d);
    if (st == KD_OK) st = kd_text_load(&d, spec, bpe ? &tok : NULL, vf);
    if (st == KD_OK && d.vocab != vocab)
        st = kd_errorf(KD_ECONFIG, "%s: vocabulary %d, the data's %d", ckpt, vocab, d.vocab);
    if (st == KD_OK && d.n_val < (size_t)seq + 1)
        st = kd_errorf(KD_ECONFIG, "%s: %zu validation tokens, fewer than a window of %d", spec, d.n_val, seq + 1);
    if (batch > 64) batch = 64;
    kd_lm lm;
    memset(&lm, 0, sizeof lm);
    kd_lm_setup s = {.student = model, .vocab = vocab, .seq = seq, .max_batch = batch};
    if (st == KD_OK) st = kd_lm_new(&lm, &s, 0);
    if (st == KD_OK) st = kd_lm_load(lm.g, &lm.m, ckpt);
    if (st == KD_OK) {
        kd_lm_eval_result r = kd_lm_evaluate(&lm, &d, 1, batch, 0, 0);
        printf("%s on %s (validation, %lld tokens): loss %.4f nats/token, perplexity %.3f\n", ckpt, d.name,
               (long long)r.tokens, r.loss, r.ppl);
    }
    if (lm.g) kd_lm_free(&lm);
    kd_text_free(&d);
    if (bpe) kd_tokenizer_free(&tok);
    free(tj);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return st == KD_EUSAGE ? 2 : 1;
    }
    return 0;
}

int cmd_eval(int argc, char **argv) {
    const char *pos[1];
    int npos, help;
    kd_status st = cli_parse(&eval_cmd, argc, argv, pos, 1, &npos, NULL, 0, NULL, &help);
    if (st == KD_OK && help) {
        cli_usage(&eval_cmd, stdout);
        return 0;
    }
    if (st == KD_OK && npos != 1) {
        cli_usage(&eval_cmd, stderr);
        return 2;
    }
    int batch = 256, threads = 0;
    if (st == KD_OK && cli_get(&eval_cmd, "--batch")) st = cli_parse_int("--batch", cli_get(&eval_cmd, "--batch"), 1, 65536, &batch);
    if (st == KD_OK && cli_get(&eval_cmd, "--threads"))
        st = cli_parse_int("--threads", cli_get(&eval_cmd, "--threads"), 0, 1024, &threads);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 2;
    }
    cli_set_threads(threads);
    const char *spec = cli_get(&eval_cmd, "--data") ? cli_get(&eval_cmd, "--data") : "fashion-mnist:test";
    if (strncmp(spec, "text", 4) == 0) return eval_lm(pos[0], spec, batch);
    const char *model = cli_get(&eval_cmd, "--model"), *names = cli_get(&eval_cmd, "--names");
    const char *logits = cli_get(&eval_cmd, "--logits");
    kd_checkpoint_info info;
    kd_dataset ds = {0};
    kd_classifier c = {0};
    int found = 1;
    if (model)
        st = kd_checkpoint_info_peek(pos[0], &info, &found);
    else
        st = kd_checkpoint_info_read(pos[0], &info);
    if (st == KD_OK) st = kd_dataset_load(spec, &ds);
    if (st == KD_OK && cli_get(&eval_cmd, "--limit")) {
        int limit = 0;
        st = cli_parse_int("--limit", cli_get(&eval_cmd, "--limit"), 1, 1 << 30, &limit);
        if (st == KD_OK) kd_dataset_limit(&ds, limit);
    }
    if (st == KD_OK && cli_get(&eval_cmd, "--label-map")) {
        int map[256], n = 0;
        st = kd_label_map_parse(cli_get(&eval_cmd, "--label-map"), map, 256, &n);
        if (st == KD_OK) st = kd_dataset_relabel(&ds, map, n);
        if (st != KD_OK) st = kd_error_prefix(st, "--label-map");
    }
    if (st == KD_OK && !found) { /* no metadata: the data says what the model sees */
        info.classes = ds.n_classes;
        info.c = ds.c, info.h = ds.h, info.w = ds.w;
        info.mean = ds.mean, info.std = ds.std;
    }
    if (st == KD_OK && model) snprintf(info.model, sizeof info.model, "%s", model);
    if (st == KD_OK && (ds.c != info.c || ds.h != info.h || ds.w != info.w))
        st = kd_errorf(KD_ESHAPE, "%s: images are %dx%dx%d, the checkpoint %s expects %dx%dx%d", spec, ds.c, ds.h, ds.w,
                       pos[0], info.c, info.h, info.w);
    if (st == KD_OK) {
        ds.mean = info.mean;
        ds.std = info.std;
        int classes = info.classes / (info.groups > 1 ? info.groups : 1);
        if (ds.n_classes > classes)
            st = kd_errorf(KD_ESHAPE, "%s has labels up to %d, the checkpoint %s has %d classes", spec, ds.n_classes - 1,
                           pos[0], classes);
        ds.n_classes = info.classes;
    }
    if (st == KD_OK) {
        st = kd_classifier_new(&c, info.model, "", &ds, batch, 0.0f, 0);
        if (st != KD_OK && model) st = kd_error_prefix(st, "--model");
    }
    if (st == KD_OK) st = kd_checkpoint_load_names(c.g, &c.m, pos[0], names, NULL);
    if (st == KD_OK) {
        kd_eval_result r = info.groups > 1 ? eval_groups(&c, &ds, batch, info.groups) : kd_evaluate(&c, &ds, batch);
        printf("%s on %s: accuracy %.2f%% (%d examples), loss %.4f\n", pos[0], spec, 100.0 * r.acc, r.n, r.loss);
    }
    if (st == KD_OK && logits) st = write_logits(&c, &ds, batch, pos[0], logits);
    kd_classifier_free(&c);
    kd_dataset_free(&ds);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 1;
    }
    return 0;
}
