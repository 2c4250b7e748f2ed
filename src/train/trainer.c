/* trainer.c - the classifier trainer: loader -> forward -> backward ->
 * clip -> schedule -> optimiser, evaluation after each epoch, metrics lines
 * and a progress line.
 *
 * metrics.jsonl holds only values that are reproducible (losses, accuracy,
 * learning rate, step counters), never wall-clock times, so two runs with
 * the same seed and thread count write byte-identical files; times go to
 * summary.json and the log. Deliberately not here: distillation (kd_distill),
 * resume (a later issue).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kd_train.h"

double kd_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

kd_status kd_classifier_new(kd_classifier *c, const char *spec, const char *prefix, const kd_dataset *ds,
                            int max_batch, float smoothing, uint64_t seed) {
    memset(c, 0, sizeof *c);
    c->g = kd_graph_new();
    int xs[4] = {max_batch, ds->c, ds->h, ds->w}, ys[1] = {max_batch};
    c->x = kd_input(c->g, "x", 4, xs);
    c->y = kd_input(c->g, "y", 1, ys);
    kd_status st = kd_model_build(c->g, spec, prefix, c->x, ds->n_classes, &c->m);
    if (st == KD_OK) {
        c->loss = kd_cross_entropy(c->g, c->m.logits, c->y, smoothing);
        kd_node_set_name(c->loss, "%sloss", prefix);
        st = kd_graph_compile(c->g, max_batch, seed);
    }
    if (st != KD_OK) {
        kd_graph_free(c->g);
        c->g = NULL;
    }
    return st;
}

void kd_classifier_free(kd_classifier *c) {
    kd_graph_free(c->g);
    c->g = NULL;
}

static int argmax(const float *z, int K) {
    int best = 0;
    for (int k = 1; k < K; k++)
        if (z[k] > z[best]) best = k;
    return best;
}

kd_eval_result kd_evaluate(kd_classifier *c, const kd_dataset *ds, int batch) {
    if (batch > kd_graph_max_batch(c->g)) batch = kd_graph_max_batch(c->g);
    kd_loader_opts lo = {.batch = batch};
    kd_loader *ld = kd_loader_new(ds, &lo);
    kd_loader_start_epoch(ld, 0);
    kd_eval_result r = {0};
    double loss = 0.0;
    int B, correct = 0;
    int K = c->m.logits->val.shape[1];
    while ((B = kd_loader_next(ld, c->x->val.data, c->y->val.data, NULL)) > 0) {
        kd_graph_set_batch(c->g, B);
        kd_graph_forward_to(c->g, 0, c->m.logits);
        for (int i = 0; i < B; i++) {
            const float *z = c->m.logits->val.data + (size_t)i * K;
            int y = (int)c->y->val.data[i];
            if (y < 0) continue;
            double m = z[0], s = 0.0;
            for (int k = 1; k < K; k++) m = z[k] > m ? z[k] : m;
            for (int k = 0; k < K; k++) s += exp((double)z[k] - m);
            loss += m + log(s) - z[y];
            correct += argmax(z, K) == y;
            r.n++;
        }
    }
    kd_loader_free(ld);
    r.acc = r.n ? (double)correct / r.n : 0.0;
    r.loss = r.n ? loss / r.n : 0.0;
    return r;
}

static void fmt_time(char *buf, size_t n, double s) {
    if (s < 0 || !isfinite(s)) s = 0;
    int t = (int)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, n, "%dh%02dm", t / 3600, (t / 60) % 60);
    else
        snprintf(buf, n, "%dm%02ds", t / 60, t % 60);
}

void kd_progress(kd_log *log, const char *role, int epoch, int epochs, int step, int steps, double loss,
                 double sps, double eta) {
    if (log->quiet || !log->tty) return;
    char e[32];
    fmt_time(e, sizeof e, eta);
    fprintf(stderr, "\r\033[K%s epoch %d/%d step %d/%d loss %.4f %.0f samples/s ETA %s", role, epoch, epochs, step,
            steps, loss, sps, e);
    fflush(stderr);
}

kd_status kd_train_classifier(kd_classifier *c, const kd_dataset *train, const kd_dataset *test,
                              const kd_train_opts *o, kd_log *log, kd_train_result *res) {
    memset(res, 0, sizeof *res);
    KD_ASSERT(o->batch <= kd_graph_max_batch(c->g), "batch %d above the graph's %d", o->batch, kd_graph_max_batch(c->g));
    kd_loader_opts lo = {.batch = o->batch,
                         .seed = o->seed,
                         .shuffle = 1,
                         .crop_pad = o->crop,
                         .flip = o->flip,
                         .view_epochs = o->view_epochs};
    kd_loader *ld = kd_loader_new(train, &lo);
    /* an "idx" input (memory-bank losses such as CRD) receives each row's example index */
    kd_node *idx = kd_graph_find(c->g, "idx");
    if (idx && !(idx->flags & KD_F_INPUT)) idx = NULL;
    int *aug = (o->batch_hook || idx) ? kd_malloc((size_t)o->batch * 4 * sizeof(int)) : NULL;
    int spe = kd_loader_batches(ld);
    int64_t total = (int64_t)spe * o->epochs;
    kd_optim_cfg oc = o->opt;
    oc.warmup_steps = (int64_t)(o->warmup_epochs * spe + 0.5f);
    kd_optim *opt = kd_optim_new(&oc, kd_graph_param_count(c->g));
    float *p = kd_graph_param_data(c->g), *gr = kd_graph_param_grad(c->g);
    kd_status st = KD_OK;
    double t0 = kd_now();
    int64_t step = 0, samples = 0;
    for (int epoch = 1; epoch <= o->epochs && st == KD_OK; epoch++) {
        kd_loader_start_epoch(ld, epoch - 1);
        if (o->terms) kd_loss_set_epoch(o->terms, epoch);
        double eloss = 0.0, win = 0.0;
        int eseen = 0, wsteps = 0, B, bi = 0;
        while ((B = kd_loader_next(ld, c->x->val.data, c->y->val.data, aug)) > 0) {
            if (o->batch_hook && (st = o->batch_hook(o->hook_ctx, epoch - 1, aug, B)) != KD_OK) break;
            if (idx)
                for (int i = 0; i < B; i++) idx->val.data[i] = (float)aug[4 * i + 3];
            kd_graph_set_batch(c->g, B);
            kd_graph_set_step(c->g, (uint64_t)step);
            kd_graph_forward(c->g, 1);
            float loss = c->loss->val.data[0];
            if (!isfinite(loss)) {
                kd_node *badn = kd_graph_forward_check(c->g, 1, c->loss); /* re-run, checking each value */
                const char *bad = badn ? badn->name : NULL;
                st = kd_errorf(KD_ENUMERIC,
                               "%s: loss is %g at epoch %d step %lld; first non-finite tensor: '%s' (try a lower "
                               "[train] lr or set [train] clip)",
                               o->role, (double)loss, epoch, (long long)step, bad ? bad : "?");
                break;
            }
            kd_graph_backward(c->g, c->loss);
            if (oc.clip > 0.0f) kd_clip_grad_norm(gr, kd_graph_param_count(c->g), oc.clip);
            float lr = kd_schedule_lr(&oc, step, total, spe);
            kd_optim_step(opt, p, gr, lr);
            step++;
            bi++;
            samples += B;
            eloss += (double)loss * B;
            eseen += B;
            win += loss;
            wsteps++;
            if (log->metrics && o->log_every > 0 && step % o->log_every == 0) {
                fprintf(log->metrics, "{\"role\":\"%s\",\"epoch\":%d,\"step\":%lld,\"loss\":%.6g,\"lr\":%.6g", o->role,
                        epoch, (long long)step, win / wsteps, (double)lr);
                if (o->terms) /* this step's unweighted terms */
                    for (int i = 0; i < o->terms->n; i++)
                        fprintf(log->metrics, ",\"%d.%s\":%.6g", i + 1, o->terms->terms[i].name,
                                (double)o->terms->terms[i].value->val.data[0]);
                fputs("}\n", log->metrics);
                win = 0.0;
                wsteps = 0;
            }
            double el = kd_now() - t0;
            double sps = samples / (el > 1e-9 ? el : 1e-9);
            kd_progress(log, o->role, epoch, o->epochs, bi, spe, eloss / eseen, sps,
                        (double)(total - step) * o->batch / (sps > 0 ? sps : 1));
        }
        if (st != KD_OK) break;
        double train_time = kd_now() - t0;
        res->final_loss = eseen ? eloss / eseen : 0.0;
        if (o->eval_every > 1 && epoch % o->eval_every != 0 && epoch != o->epochs) {
            if (log->metrics) {
                fprintf(log->metrics, "{\"role\":\"%s\",\"epoch\":%d,\"step\":%lld,\"train_loss\":%.6g}\n", o->role,
                        epoch, (long long)step, res->final_loss);
                fflush(log->metrics);
            }
            if (!log->quiet) {
                if (log->tty) fprintf(stderr, "\r\033[K");
                fprintf(stderr, "%s epoch %d/%d: train loss %.4f (%.0f samples/s)\n", o->role, epoch, o->epochs,
                        res->final_loss, samples / (train_time > 1e-9 ? train_time : 1e-9));
            }
            continue;
        }
        kd_eval_result ev = kd_evaluate(c, test, o->batch);
        res->test = ev;
        if (log->metrics) {
            fprintf(log->metrics,
                    "{\"role\":\"%s\",\"epoch\":%d,\"step\":%lld,\"train_loss\":%.6g,\"test_loss\":%.6g,\"test_acc\":%.6g}\n",
                    o->role, epoch, (long long)step, res->final_loss, ev.loss, ev.acc);
            fflush(log->metrics);
        }
        if (!log->quiet) {
            if (log->tty) fprintf(stderr, "\r\033[K");
            fprintf(stderr, "%s epoch %d/%d: train loss %.4f, test loss %.4f, test acc %.2f%% (%.0f samples/s)\n",
                    o->role, epoch, o->epochs, res->final_loss, ev.loss, 100.0 * ev.acc,
                    samples / (train_time > 1e-9 ? train_time : 1e-9));
        }
    }
    res->train_seconds = kd_now() - t0;
    res->samples_per_s = samples / (res->train_seconds > 1e-9 ? res->train_seconds : 1e-9);
    kd_optim_free(opt);
    kd_loader_free(ld);
    free(aug);
    return st;
}
