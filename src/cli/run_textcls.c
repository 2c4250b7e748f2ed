/* run_textcls.c - `distill run` for text classification (a [data] train of
 * "textcls:..."): train or load the teacher classifier, run it once over
 * the training documents for its logits and its gradient x input saliency
 * (the top-k tokens per document become the rationale tags), train the
 * baseline student (CE alone) and the student (the [distill] loss on the
 * label logits, plus [textcls] rationale times the tagging loss), and
 * report test accuracy. Writes config.ini, metrics.jsonl, *.safetensors and
 * summary.json. docs/losses/rationale.md is the guide.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/run_progress.h"
#include "kd_config.h"
#include "kd_report.h"
#include "kd_textcls.h"

typedef struct tc_stage {
    char role[32], spec[256], loss[256];
    int64_t params;
    int ran, loaded;
    float rationale;
    kd_textcls_result r;
} tc_stage;

/* [train] and [textcls] keys into training options */
static kd_status tc_opts(const kd_config *c, kd_textcls_opts *o) {
    memset(o, 0, sizeof *o);
    o->steps = kd_config_int(c, "textcls", "steps");
    if (o->steps < 1) return kd_config_error(c, "textcls", "steps", "must be at least 1");
    o->batch = kd_config_int(c, "train", "batch");
    if (o->batch < 1 || o->batch > 4096) return kd_config_error(c, "train", "batch", "must be in [1, 4096]");
    o->seed = (uint64_t)kd_config_int(c, "run", "seed");
    kd_optim_cfg *oc = &o->opt;
    const char *opt = kd_config_str(c, "train", "optimizer");
    if (strcmp(opt, "adamw") != 0 && strcmp(opt, "sgd") != 0)
        return kd_config_error(c, "train", "optimizer", "expected sgd or adamw");
    oc->kind = strcmp(opt, "adamw") == 0 ? KD_OPTIM_ADAMW : KD_OPTIM_SGD;
    oc->lr = (float)kd_config_float(c, "train", "lr");
    if (!(oc->lr > 0.0f)) return kd_config_error(c, "train", "lr", "must be positive");
    oc->momentum = (float)kd_config_float(c, "train", "momentum");
    oc->nesterov = kd_config_int(c, "train", "nesterov") && oc->momentum > 0.0f;
    oc->weight_decay = (float)kd_config_float(c, "train", "weight_decay");
    oc->beta1 = (float)kd_config_float(c, "train", "beta1");
    oc->beta2 = (float)kd_config_float(c, "train", "beta2");
    oc->eps = (float)kd_config_float(c, "train", "eps");
    const char *s = kd_config_str(c, "train", "schedule");
    if (strcmp(s, "cosine") != 0 && strcmp(s, "constant") != 0)
        return kd_config_error(c, "train", "schedule", "text classification uses constant or cosine");
    oc->sched = strcmp(s, "cosine") == 0 ? KD_SCHED_COSINE : KD_SCHED_CONSTANT;
    oc->min_lr = (float)kd_config_float(c, "train", "min_lr");
    oc->step_epochs = 1;
    oc->gamma = 1.0f;
    oc->clip = (float)kd_config_float(c, "train", "clip");
    if (oc->clip < 0.0f) return kd_config_error(c, "train", "clip", "must be >= 0");
    oc->warmup_steps = kd_config_int(c, "textcls", "warmup");
    if (oc->warmup_steps < 0) return kd_config_error(c, "textcls", "warmup", "must be >= 0");
    o->log_every = kd_config_int(c, "train", "log_every");
    return KD_OK;
}

static kd_status train_stage(const kd_textcls_setup *s, const kd_textcls_data *d, const kd_textcls_opts *o,
                             const kd_textcls_teacher_out *t, kd_log *log, const char *out, tc_stage *stage) {
    kd_textcls_net net;
    kd_status st = kd_textcls_net_new(&net, s, o->seed + (uint64_t)stage->role[0]);
    if (st != KD_OK) return st;
    snprintf(stage->spec, sizeof stage->spec, "%s", s->model);
    snprintf(stage->loss, sizeof stage->loss, "%s", s->loss && *s->loss ? s->loss : "ce");
    stage->rationale = s->rationale_weight;
    stage->params = kd_model_params(net.g, &net.m);
    kd_log_info(log, "%s %s (%lld parameters), %lld steps of %d documents, loss %s%s", stage->role, s->model,
                (long long)stage->params, (long long)o->steps, o->batch, stage->loss,
                s->rationale_weight > 0 ? " + rationale" : "");
    st = kd_textcls_train(&net, d, o, t, log, &stage->r);
    if (st == KD_OK) {
        stage->ran = 1;
        st = kd_textcls_save(&net, out);
    }
    kd_textcls_net_free(&net);
    return st;
}

/* the teacher's logits and top-k saliency tags over the training split */
static void teacher_outputs(kd_textcls_net *tn, const kd_textcls_data *d, int k, float *logits, uint8_t *tags,
                            double *tag_frac) {
    int Bmax = kd_graph_max_batch(tn->g), T = d->T, N = d->n[0];
    int *idx = kd_malloc((size_t)Bmax * sizeof *idx);
    float *score = kd_malloc((size_t)Bmax * T * sizeof *score), *row = kd_malloc((size_t)T * sizeof *row);
    int64_t on = 0, real = 0;
    for (int i0 = 0; i0 < N; i0 += Bmax) {
        int B = N - i0 < Bmax ? N - i0 : Bmax;
        for (int b = 0; b < B; b++) idx[b] = i0 + b;
        kd_textcls_saliency(tn, d, 0, idx, B, score, logits + (size_t)i0 * tn->classes);
        for (int b = 0; b < B; b++) {
            int len = d->len[0][i0 + b];
            kd_textcls_topk_tags(row, score + (size_t)b * T, len, T, k);
            for (int t = 0; t < T; t++) {
                tags[(size_t)(i0 + b) * T + t] = row[t] != 0.0f;
                on += row[t] != 0.0f;
            }
            real += len;
        }
    }
    kd_graph_set_batch(tn->g, Bmax);
    *tag_frac = real ? (double)on / real : 0.0;
    free(idx);
    free(score);
    free(row);
}

/* the first n training documents with their tagged bytes in [brackets],
 * for a reader to see what the teacher found */
static kd_status write_examples(const char *dir, const kd_textcls_data *d, const uint8_t *tags, int n) {
    char path[4200];
    snprintf(path, sizeof path, "%s/rationale_examples.txt", dir);
    size_t cap = (size_t)n * (3 * (size_t)d->T + 96) + 1, len = 0;
    char *buf = kd_malloc(cap);
    for (int i = 0; i < n && i < d->n[0]; i++) {
        len += (size_t)snprintf(buf + len, cap - len, "[class %s]\n", d->names[d->label[0][i]]);
        const uint8_t *tok = d->tok[0] + (size_t)i * d->T, *tg = tags + (size_t)i * d->T;
        for (int t = 0; t < d->len[0][i]; t++) {
            if (tg[t]) buf[len++] = '[';
            buf[len++] = (char)tok[t];
            if (tg[t]) buf[len++] = ']';
        }
        len += (size_t)snprintf(buf + len, cap - len, "\n%%\n");
    }
    kd_status st = kd_write_atomic(path, buf, len);
    free(buf);
    return st;
}

static void stage_json(cJSON *root, const tc_stage *s) {
    if (!s->ran) return;
    cJSON *t = cJSON_AddObjectToObject(root, s->role);
    cJSON_AddStringToObject(t, "model", s->spec);
    cJSON_AddNumberToObject(t, "params", (double)s->params);
    cJSON_AddNumberToObject(t, "test_acc", s->r.test_acc);
    cJSON_AddNumberToObject(t, "train_acc", s->r.train_acc);
    if (!s->loaded) {
        cJSON_AddStringToObject(t, "loss", s->loss);
        cJSON_AddNumberToObject(t, "rationale", s->rationale);
        cJSON_AddNumberToObject(t, "train_seconds", s->r.train_seconds);
        cJSON_AddNumberToObject(t, "final_loss", s->r.final_loss);
        if (s->rationale > 0) cJSON_AddNumberToObject(t, "final_rationale_loss", s->r.final_tag_loss);
    }
    if (!strcmp(s->role, "teacher")) cJSON_AddBoolToObject(t, "loaded", s->loaded);
}

static kd_status write_summary(const char *dir, const tc_stage *st, int n, const kd_textcls_data *d, int k,
                               double tag_frac, double teacher_seconds, int threads) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "task", "textcls");
    cJSON_AddStringToObject(root, "data", d->name);
    cJSON_AddNumberToObject(root, "classes", d->n_classes);
    cJSON_AddNumberToObject(root, "train_docs", d->n[0]);
    cJSON_AddNumberToObject(root, "test_docs", d->n[1]);
    cJSON_AddNumberToObject(root, "seq", d->T);
    for (int i = 0; i < n; i++) stage_json(root, &st[i]);
    if (tag_frac > 0) {
        cJSON_AddNumberToObject(root, "rationale_k", k);
        cJSON_AddNumberToObject(root, "rationale_token_fraction", tag_frac);
    }
    cJSON_AddNumberToObject(root, "teacher_pass_seconds", teacher_seconds);
    cJSON_AddNumberToObject(root, "threads", threads);
    kd_report_add_machine(root);
    char path[4200];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    kd_status s = run_write_json(path, root);
    cJSON_Delete(root);
    return s;
}

int cli_run_textcls(const kd_config *cfg, const char *dir, int threads, kd_log *log) {
    kd_textcls_data d;
    memset(&d, 0, sizeof d);
    kd_textcls_opts base;
    kd_status st = tc_opts(cfg, &base);
    int T = kd_config_int(cfg, "textcls", "seq"), k = kd_config_int(cfg, "textcls", "rationale_k");
    float tf = (float)kd_config_float(cfg, "textcls", "test_frac");
    float rw = (float)kd_config_float(cfg, "textcls", "rationale");
    if (st == KD_OK && (T < 2 || T > 4096)) st = kd_config_error(cfg, "textcls", "seq", "must be in [2, 4096]");
    if (st == KD_OK && !(tf > 0.0f && tf <= 0.5f)) st = kd_config_error(cfg, "textcls", "test_frac", "must be in (0, 0.5]");
    if (st == KD_OK && !(rw >= 0.0f)) st = kd_config_error(cfg, "textcls", "rationale", "must be >= 0 (0: off)");
    if (st == KD_OK && rw > 0.0f && (k < 1 || k > T))
        st = kd_config_error(cfg, "textcls", "rationale_k", "must be in [1, %d] ([textcls] seq)", T);
    if (st == KD_OK && kd_config_int(cfg, "textcls", "teacher_steps") < 0)
        st = kd_config_error(cfg, "textcls", "teacher_steps", "must be >= 0");
    if (st == KD_OK) st = kd_textcls_load(&d, kd_config_str(cfg, "data", "train"), T, tf);
    if (st == KD_OK && d.n[1] == 0) st = kd_errorf(KD_EFORMAT, "%s: no test document ([textcls] test_frac)", d.name);
    if (st == KD_OK && base.batch > d.n[0])
        st = kd_config_error(cfg, "train", "batch", "exceeds the %d training documents", d.n[0]);
    const char *tspec = kd_config_str(cfg, "teacher", "model"), *sspec = kd_config_str(cfg, "student", "model");
    const char *loss = kd_config_str(cfg, "distill", "loss"), *tck = kd_config_str(cfg, "teacher", "checkpoint");
    /* catch bad specs before any training */
    kd_textcls_net probe;
    kd_textcls_setup ts = {.model = tspec, .loss = "ce", .classes = d.n_classes, .seq = T, .max_batch = base.batch};
    if (st == KD_OK) {
        st = kd_textcls_net_new(&probe, &ts, 0);
        if (st == KD_OK) kd_textcls_net_free(&probe);
        else st = kd_config_error(cfg, "teacher", "model", "%s", kd_error_message());
    }
    kd_textcls_setup ss = {.model = sspec, .loss = loss, .classes = d.n_classes, .seq = T, .max_batch = base.batch,
                           .rationale_weight = rw};
    if (st == KD_OK && *sspec) {
        st = kd_textcls_net_new(&probe, &ss, 0);
        if (st == KD_OK) kd_textcls_net_free(&probe);
        else st = kd_config_error(cfg, "student", "model", "%s", kd_error_message());
    }
    if (st != KD_OK) goto done;
    kd_log_info(log, "%s", d.info);

    tc_stage stages[3];
    memset(stages, 0, sizeof stages);
    int ns = 0;
    char tpath[4200], path[4200];
    snprintf(tpath, sizeof tpath, "%s/teacher.safetensors", dir);
    tc_stage *tst = &stages[ns++];
    snprintf(tst->role, sizeof tst->role, "teacher");
    kd_textcls_net tn;
    memset(&tn, 0, sizeof tn);
    st = kd_textcls_net_new(&tn, &ts, base.seed + 't');
    if (st == KD_OK && *tck && run_file_exists(tck)) {
        st = kd_textcls_load_weights(&tn, tck);
        if (st == KD_OK) {
            tst->ran = tst->loaded = 1;
            snprintf(tst->spec, sizeof tst->spec, "%s", tspec);
            tst->params = kd_model_params(tn.g, &tn.m);
            tst->r.test_acc = kd_textcls_accuracy(&tn, &d, 1, NULL);
            tst->r.train_acc = kd_textcls_accuracy(&tn, &d, 0, NULL);
            kd_log_info(log, "teacher loaded from %s: test acc %.2f%%", tck, 100 * tst->r.test_acc);
            if (log->metrics)
                fprintf(log->metrics, "{\"role\":\"teacher\",\"step\":0,\"test_acc\":%.6g,\"train_acc\":%.6g}\n",
                        tst->r.test_acc, tst->r.train_acc);
            st = kd_textcls_save(&tn, tpath);
        }
    } else if (st == KD_OK) {
        kd_textcls_net_free(&tn);
        kd_textcls_opts o = base;
        int tsteps = kd_config_int(cfg, "textcls", "teacher_steps");
        if (tsteps > 0) o.steps = tsteps;
        if (kd_config_float(cfg, "teacher", "lr") > 0) o.opt.lr = (float)kd_config_float(cfg, "teacher", "lr");
        o.role = "teacher";
        st = train_stage(&ts, &d, &o, NULL, log, tpath, tst);
        if (st == KD_OK && *tck) {
            char tdir[4200];
            snprintf(tdir, sizeof tdir, "%s", tck);
            char *slash = strrchr(tdir, '/');
            if (slash) {
                *slash = '\0';
                st = cli_mkdirs(tdir);
            }
            if (st == KD_OK) st = run_copy_file(tpath, tck);
        }
        if (st == KD_OK) st = kd_textcls_net_new(&tn, &ts, 0);
        if (st == KD_OK) st = kd_textcls_load_weights(&tn, tpath);
    }
    double tag_frac = 0.0, tsec = 0.0;
    float *tlogits = NULL;
    uint8_t *tags = NULL;
    if (st == KD_OK && *sspec) {
        if (kd_config_int(cfg, "distill", "baseline")) {
            tc_stage *bs = &stages[ns++];
            snprintf(bs->role, sizeof bs->role, "baseline");
            kd_textcls_setup s = ss;
            s.loss = "ce";
            s.rationale_weight = 0.0f;
            kd_textcls_opts o = base;
            o.role = "baseline";
            snprintf(path, sizeof path, "%s/baseline.safetensors", dir);
            st = train_stage(&s, &d, &o, NULL, log, path, bs);
        }
        /* the teacher pass only when the student reads it */
        kd_loss_spec ls;
        int reads = rw > 0.0f;
        if (kd_loss_spec_parse(loss, &ls) == KD_OK)
            for (int i = 0; i < ls.n; i++) reads |= strcmp(ls.terms[i].name, "ce") != 0;
        if (st == KD_OK && reads) {
            double t0 = kd_now();
            tlogits = kd_malloc((size_t)d.n[0] * d.n_classes * sizeof *tlogits);
            tags = kd_malloc((size_t)d.n[0] * T);
            teacher_outputs(&tn, &d, k, tlogits, tags, &tag_frac);
            tsec = kd_now() - t0;
            kd_log_info(log, "teacher pass over %d training documents: logits and top-%d saliency tags (%.1f%% of tokens) in %.1f s",
                        d.n[0], k, 100 * tag_frac, tsec);
            st = write_examples(dir, &d, tags, 20);
        }
        if (st == KD_OK) {
            tc_stage *ss2 = &stages[ns++];
            snprintf(ss2->role, sizeof ss2->role, "student");
            kd_textcls_opts o = base;
            o.role = "student";
            kd_textcls_teacher_out to = {.logits = tlogits, .tags = tags};
            snprintf(path, sizeof path, "%s/student.safetensors", dir);
            st = train_stage(&ss, &d, &o, &to, log, path, ss2);
        }
    }
    free(tlogits);
    free(tags);
    if (tn.g) kd_textcls_net_free(&tn);
    if (st == KD_OK) st = write_summary(dir, stages, ns, &d, k, rw > 0 ? tag_frac : 0.0, tsec, threads);
    if (st == KD_OK) {
        printf("%-9s %-40s %10s %9s %9s %9s\n", "model", "spec", "params", "test acc", "train acc", "train s");
        for (int i = 0; i < ns; i++) {
            const tc_stage *s = &stages[i];
            if (!s->ran) continue;
            printf("%-9s %-40.40s %10lld %8.2f%% %8.2f%% %9.1f\n", s->role, s->spec, (long long)s->params,
                   100 * s->r.test_acc, 100 * s->r.train_acc, s->loaded ? 0.0 : s->r.train_seconds);
        }
        kd_log_info(log, "wrote %s", dir);
    }
done:
    kd_textcls_free(&d);
    if (st != KD_OK) {
        kd_log_error(log, kd_error_message());
        return st == KD_EUSAGE ? 2 : 1;
    }
    return 0;
}
