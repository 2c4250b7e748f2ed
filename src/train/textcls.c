/* textcls.c - training and evaluating a text classifier (kd_textcls.h):
 * minibatches of whole documents (a fresh permutation every pass), the
 * label loss plus the optional rationale tagging loss, AdamW or SGD with
 * warm-up and a cosine schedule by step, test accuracy, checkpoints.
 *
 * A cached teacher's logits and tags are per training document, so a batch
 * reads the rows of the documents it holds. Evaluation runs the student up
 * to its logits only. Nothing is allocated per step: the permutation and
 * the index buffer are allocated once per call.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_io.h"
#include "kd_textcls.h"

static void shuffle(int *p, int n, kd_rng *r) {
    for (int i = n - 1; i > 0; i--) {
        int j = (int)kd_rng_below(r, (uint32_t)(i + 1)), t = p[i];
        p[i] = p[j];
        p[j] = t;
    }
}

double kd_textcls_accuracy(kd_textcls_net *n, const kd_textcls_data *d, int split, double *loss) {
    int Bmax = kd_graph_max_batch(n->g), K = n->classes, N = d->n[split];
    int *idx = kd_malloc((size_t)Bmax * sizeof *idx);
    int64_t right = 0;
    double ce = 0.0;
    for (int i0 = 0; i0 < N; i0 += Bmax) {
        int B = N - i0 < Bmax ? N - i0 : Bmax;
        for (int b = 0; b < B; b++) idx[b] = i0 + b;
        kd_graph_set_batch(n->g, B);
        kd_textcls_fill(d, split, idx, B, n->ids->val.data, n->mask->val.data, NULL);
        kd_graph_forward_to(n->g, 0, n->m.logits);
        for (int b = 0; b < B; b++) {
            const float *z = n->m.logits->val.data + (size_t)b * K;
            int y = d->label[split][i0 + b], best = 0;
            double mx = z[0], s = 0.0;
            for (int k = 1; k < K; k++) {
                if (z[k] > z[best]) best = k;
                if (z[k] > mx) mx = z[k];
            }
            for (int k = 0; k < K; k++) s += exp((double)z[k] - mx);
            ce += mx + log(s) - z[y];
            right += best == y;
        }
    }
    free(idx);
    kd_graph_set_batch(n->g, Bmax);
    if (loss) *loss = N ? ce / N : 0.0;
    return N ? (double)right / N : 0.0;
}

kd_status kd_textcls_train(kd_textcls_net *n, const kd_textcls_data *d, const kd_textcls_opts *o,
                           const kd_textcls_teacher_out *t, kd_log *log, kd_textcls_result *res) {
    memset(res, 0, sizeof *res);
    int B = o->batch, T = n->seq, K = n->classes, N = d->n[0];
    if (B < 1 || B > kd_graph_max_batch(n->g))
        return kd_errorf(KD_ECONFIG, "batch %d not in [1, %d]", B, kd_graph_max_batch(n->g));
    if (B > N) return kd_errorf(KD_ECONFIG, "%s: batch %d exceeds the %d training documents", d->name, B, N);
    if (d->T != T) return kd_errorf(KD_ECONFIG, "%s: documents of %d tokens, the net takes %d", d->name, d->T, T);
    if ((n->t_logits && !(t && t->logits)) || (n->tags && !(t && t->tags)))
        return kd_errorf(KD_ECONFIG, "%s: the loss needs the teacher's %s", o->role, n->tags ? "tags" : "logits");
    kd_optim *opt = kd_optim_new(&o->opt, kd_graph_param_count(n->g));
    float *p = kd_graph_param_data(n->g), *gr = kd_graph_param_grad(n->g);
    int *perm = kd_malloc((size_t)N * sizeof *perm);
    for (int i = 0; i < N; i++) perm[i] = i;
    kd_rng rng;
    kd_rng_seed(&rng, o->seed ^ 0x7e47c15ull);
    shuffle(perm, N, &rng);
    int pos = 0;
    double t0 = kd_now(), run_loss = 0.0, run_tag = 0.0, win = 0.0, wtag = 0.0;
    int wsteps = 0;
    kd_status st = KD_OK;
    kd_graph_set_batch(n->g, B);
    for (int64_t step = 0; step < o->steps; step++) {
        if (pos + B > N) {
            shuffle(perm, N, &rng);
            pos = 0;
        }
        const int *idx = perm + pos;
        pos += B;
        kd_textcls_fill(d, 0, idx, B, n->ids->val.data, n->mask->val.data, n->labels->val.data);
        for (int b = 0; b < B; b++) {
            if (n->t_logits)
                memcpy(n->t_logits->val.data + (size_t)b * K, t->logits + (size_t)idx[b] * K, (size_t)K * sizeof(float));
            if (n->tags)
                for (int j = 0; j < T; j++) n->tags->val.data[(size_t)b * T + j] = t->tags[(size_t)idx[b] * T + j];
        }
        kd_graph_set_step(n->g, (uint64_t)step);
        kd_graph_forward(n->g, 1);
        float loss = n->loss->val.data[0];
        if (!isfinite(loss)) {
            kd_node *bad = kd_graph_forward_check(n->g, 1, n->loss);
            st = kd_errorf(KD_ENUMERIC, "%s: loss is %g at step %lld; first non-finite tensor: '%s' (try a lower [train] lr or set [train] clip)",
                           o->role, (double)loss, (long long)step + 1, bad ? bad->name : "?");
            break;
        }
        double tag = n->tag_loss ? n->tag_loss->val.data[0] : 0.0;
        kd_graph_backward(n->g, n->loss);
        if (o->opt.clip > 0.0f) kd_clip_grad_norm(gr, kd_graph_param_count(n->g), o->opt.clip);
        float lr = kd_schedule_lr(&o->opt, step, o->steps, o->steps);
        kd_optim_step(opt, p, gr, lr);
        run_loss = step == 0 ? loss : 0.98 * run_loss + 0.02 * loss;
        run_tag = step == 0 ? tag : 0.98 * run_tag + 0.02 * tag;
        win += loss;
        wtag += tag;
        wsteps++;
        int64_t done = step + 1;
        if (log && log->metrics && o->log_every > 0 && (done % o->log_every == 0 || done == o->steps)) {
            fprintf(log->metrics, "{\"role\":\"%s\",\"step\":%lld,\"loss\":%.6g,\"lr\":%.6g", o->role, (long long)done,
                    win / wsteps, (double)lr);
            for (int i = 0; i < n->terms.n; i++)
                fprintf(log->metrics, ",\"%d.%s\":%.6g", i + 1, n->terms.terms[i].name,
                        (double)n->terms.terms[i].value->val.data[0]);
            if (n->tag_loss) fprintf(log->metrics, ",\"rationale\":%.6g", wtag / wsteps);
            fputs("}\n", log->metrics);
            win = wtag = 0.0;
            wsteps = 0;
        }
        if (log && log->tty && !log->quiet && (done % 5 == 0 || done == o->steps)) {
            double el = kd_now() - t0, sps = (double)done * B / (el > 1e-9 ? el : 1e-9);
            kd_progress(log, o->role, 1, 1, (int)done, (int)o->steps, run_loss, sps,
                        (double)(o->steps - done) * B / (sps > 0 ? sps : 1));
        }
    }
    res->train_seconds = kd_now() - t0;
    res->final_loss = run_loss;
    res->final_tag_loss = run_tag;
    free(perm);
    kd_optim_free(opt);
    if (st != KD_OK) return st;
    double test_loss;
    res->test_acc = kd_textcls_accuracy(n, d, 1, &test_loss);
    res->train_acc = kd_textcls_accuracy(n, d, 0, NULL);
    if (log && log->metrics) {
        fprintf(log->metrics, "{\"role\":\"%s\",\"step\":%lld,\"train_acc\":%.6g,\"test_acc\":%.6g,\"test_loss\":%.6g}\n",
                o->role, (long long)o->steps, res->train_acc, res->test_acc, test_loss);
        fflush(log->metrics);
    }
    if (log && !log->quiet) {
        if (log->tty) fprintf(stderr, "\r\033[K");
        fprintf(stderr, "%s: %lld steps in %.1f s: train acc %.2f%%, test acc %.2f%% (test loss %.4f)\n", o->role,
                (long long)o->steps, res->train_seconds, 100 * res->train_acc, 100 * res->test_acc, test_loss);
    }
    return KD_OK;
}

kd_status kd_textcls_save(const kd_textcls_net *n, const char *path) {
    kd_st_writer *w = kd_st_writer_new();
    const kd_model *m = &n->m;
    size_t pl = strlen(m->prefix);
    for (int i = 0; i < kd_graph_n_state(n->g); i++) {
        kd_node *v = kd_graph_state(n->g, i);
        if (strncmp(v->name, m->prefix, pl) != 0) continue;
        kd_st_add_f32(w, v->name + pl, v->val.ndim, v->val.shape, v->val.data);
    }
    char buf[32];
    kd_st_set_meta(w, "format", "distill/1");
    kd_st_set_meta(w, "task", "textcls");
    kd_st_set_meta(w, "model", m->spec);
    snprintf(buf, sizeof buf, "%d", n->classes);
    kd_st_set_meta(w, "classes", buf);
    snprintf(buf, sizeof buf, "%d", n->seq);
    kd_st_set_meta(w, "seq", buf);
    kd_status st = kd_st_write(w, path);
    kd_st_writer_free(w);
    return st;
}

kd_status kd_textcls_load_weights(kd_textcls_net *n, const char *path) { return kd_checkpoint_load(n->g, &n->m, path); }
