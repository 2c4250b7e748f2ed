/* trainer.c - the classifier trainer: loader -> forward -> backward ->
 * clip -> schedule -> optimiser, evaluation after each epoch, metrics lines,
 * log lines (plain or JSON) and a progress bar; training states every N
 * steps and at each epoch end, resume from one, and a clean stop on a
 * signal (docs/resume.md).
 *
 * metrics.jsonl holds only values that are reproducible (losses, accuracy,
 * learning rate, step counters), never wall-clock times, so two runs with
 * the same seed and thread count write byte-identical files; times go to
 * summary.json and the log. A resumed run continues every counter and
 * accumulator from the state (the epoch's loss sum, the log window), so it
 * writes the same bytes an uninterrupted run would. Deliberately not here:
 * distillation (kd_distill), the file format of the state (state.c).
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kd_train.h"

double kd_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

kd_status kd_classifier_new(kd_classifier *c, const char *spec, const char *prefix, const kd_dataset *ds, int max_batch,
                            float smoothing, uint64_t seed) {
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

/* ---------------------------------------------------------------- log lines */

/* Prints o as one line of JSON on stderr and frees it. */
static void json_line(cJSON *o) {
    char *txt = cJSON_PrintUnformatted(o);
    if (txt) {
        fprintf(stderr, "%s\n", txt);
        cJSON_free(txt);
    }
    cJSON_Delete(o);
    fflush(stderr);
}

static cJSON *json_event(const char *event, const char *role) {
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", event);
    if (role) cJSON_AddStringToObject(o, "role", role);
    return o;
}

void kd_log_info(const kd_log *log, const char *fmt, ...) {
    if (log->quiet) return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (log->json) {
        cJSON *o = json_event("info", NULL);
        cJSON_AddStringToObject(o, "message", msg);
        json_line(o);
    } else {
        if (log->tty) fprintf(stderr, "\r\033[K");
        fprintf(stderr, "distill: %s\n", msg);
    }
}

void kd_log_error(const kd_log *log, const char *msg) {
    if (log && log->json) {
        cJSON *o = json_event("error", NULL);
        cJSON_AddStringToObject(o, "message", msg);
        json_line(o);
    } else {
        if (log && log->tty) fprintf(stderr, "\r\033[K");
        fprintf(stderr, "distill: error: %s\n", msg);
    }
}

/* The progress line of a terminal: a bar over the whole stage and its ETA. */
void kd_progress(kd_log *log, const char *role, int epoch, int epochs, int step, int steps, double loss, double sps,
                 double eta) {
    if (log->quiet || !log->tty || log->json) return;
    enum { W = 20 };
    double total = (double)epochs * steps, done = (double)(epoch - 1) * steps + step;
    double f = total > 0 ? done / total : 0.0;
    if (f < 0) f = 0;
    if (f > 1) f = 1;
    char bar[W + 1], e[32];
    int fill = (int)(f * W + 0.5);
    for (int i = 0; i < W; i++) bar[i] = i < fill ? '#' : '.';
    bar[W] = '\0';
    fmt_time(e, sizeof e, eta);
    fprintf(stderr, "\r\033[K%s [%s] %3.0f%% epoch %d/%d step %d/%d loss %.4f %.0f samples/s ETA %s", role, bar,
            100.0 * f, epoch, epochs, step, steps, loss, sps, e);
    fflush(stderr);
}

/* One line per epoch: text, or an "epoch" event. ev: NULL when the epoch
 * was not evaluated. */
static void log_epoch(const kd_log *log, const char *role, int epoch, int epochs, int64_t step, double train_loss,
                      const kd_eval_result *ev, double sps) {
    if (log->quiet) return;
    if (log->json) {
        cJSON *o = json_event("epoch", role);
        cJSON_AddNumberToObject(o, "epoch", epoch);
        cJSON_AddNumberToObject(o, "epochs", epochs);
        cJSON_AddNumberToObject(o, "step", (double)step);
        cJSON_AddNumberToObject(o, "train_loss", train_loss);
        if (ev) {
            cJSON_AddNumberToObject(o, "test_loss", ev->loss);
            cJSON_AddNumberToObject(o, "test_acc", ev->acc);
        }
        cJSON_AddNumberToObject(o, "samples_per_s", sps);
        json_line(o);
        return;
    }
    if (log->tty) fprintf(stderr, "\r\033[K");
    if (ev)
        fprintf(stderr, "%s epoch %d/%d: train loss %.4f, test loss %.4f, test acc %.2f%% (%.0f samples/s)\n", role,
                epoch, epochs, train_loss, ev->loss, 100.0 * ev->acc, sps);
    else
        fprintf(stderr, "%s epoch %d/%d: train loss %.4f (%.0f samples/s)\n", role, epoch, epochs, train_loss, sps);
}

static void log_step(const kd_log *log, const char *role, int epoch, int64_t step, double loss, double lr) {
    if (log->quiet || !log->json) return;
    cJSON *o = json_event("step", role);
    cJSON_AddNumberToObject(o, "epoch", epoch);
    cJSON_AddNumberToObject(o, "step", (double)step);
    cJSON_AddNumberToObject(o, "loss", loss);
    cJSON_AddNumberToObject(o, "lr", lr);
    json_line(o);
}

/* ---------------------------------------------------------------- states */

/* "; the last good training state is P (after step S)" or why there is none. */
static void last_good(char *buf, size_t n, const kd_train_opts *o, int64_t saved_step) {
    if (!o->state_path)
        snprintf(buf, n, "%s", "");
    else if (saved_step < 0)
        snprintf(buf, n, "; no training state was written before it ([train] checkpoint_every sets how often)");
    else
        snprintf(buf, n, "; the last good training state is %.1500s (after step %lld), left as it was", o->state_path,
                 (long long)saved_step);
}

/* Writes the state ts (counters filled by the caller) unless something in it
 * went non-finite, which is reported naming the step and the tensor. */
static kd_status save_state(kd_classifier *c, const kd_optim *opt, const kd_train_opts *o, const kd_log *log,
                            kd_train_state *ts, int64_t *saved_step) {
    const char *bad = kd_state_nonfinite(c->g, opt);
    if (bad) {
        char lg[1700];
        last_good(lg, sizeof lg, o, *saved_step);
        return kd_errorf(KD_ENUMERIC,
                         "%s: parameters went non-finite at epoch %d step %lld; first non-finite tensor: "
                         "'%s' (try a lower [train] lr or set [train] clip)%s",
                         o->role, ts->epoch + (ts->batch > 0), (long long)ts->step, bad, lg);
    }
    if (log->metrics) {
        fflush(log->metrics);
        long off = ftell(log->metrics);
        if (off < 0) return kd_errorf(KD_EIO, "metrics.jsonl: cannot tell its length for the training state");
        ts->metrics_offset = off;
    }
    kd_status st = kd_state_save(o->state_path, c->g, opt, ts, o->config);
    if (st != KD_OK) return st;
    *saved_step = ts->step;
    if (log->json && !log->quiet) {
        cJSON *j = json_event("checkpoint", o->role);
        cJSON_AddNumberToObject(j, "epoch", ts->epoch);
        cJSON_AddNumberToObject(j, "batch", ts->batch);
        cJSON_AddNumberToObject(j, "step", (double)ts->step);
        cJSON_AddStringToObject(j, "path", o->state_path);
        json_line(j);
    }
    return KD_OK;
}

/* Loads the state to resume from, checks it fits this stage, and cuts
 * metrics.jsonl back to what it held then. */
static kd_status resume_state(kd_classifier *c, kd_optim *opt, const kd_train_opts *o, kd_log *log, int spe,
                              kd_train_state *ts) {
    kd_status st = kd_state_load(o->state_path, c->g, opt, ts, o->role, o->config);
    if (st != KD_OK && st != KD_ECONFIG) {
        char msg[1800];
        snprintf(msg, sizeof msg, "%s", kd_error_message());
        return kd_errorf(st, "%s (remove the file to train stage '%s' from its start)", msg, o->role);
    }
    if (st != KD_OK) return st;
    if (ts->epochs != o->epochs || ts->steps_per_epoch != spe || ts->seed != o->seed)
        return kd_errorf(KD_ECONFIG,
                         "%s: a training state of %d epochs of %d steps with seed %llu; this stage has %d epochs of %d "
                         "steps with seed %llu",
                         o->state_path, ts->epochs, ts->steps_per_epoch, (unsigned long long)ts->seed, o->epochs, spe,
                         (unsigned long long)o->seed);
    if (log->metrics) {
        struct stat sb;
        int fd = fileno(log->metrics);
        fflush(log->metrics);
        if (fstat(fd, &sb) != 0 || sb.st_size < ts->metrics_offset)
            return kd_errorf(KD_EFORMAT, "metrics.jsonl is shorter than the %lld bytes it had when %s was written",
                             (long long)ts->metrics_offset, o->state_path);
        if (ftruncate(fd, (off_t)ts->metrics_offset) != 0 ||
            fseek(log->metrics, (long)ts->metrics_offset, SEEK_SET) != 0)
            return kd_errorf(KD_EIO, "metrics.jsonl: cannot cut back to %lld bytes", (long long)ts->metrics_offset);
    }
    if (o->threads > 0 && ts->threads > 0 && ts->threads != o->threads)
        kd_log_info(log,
                    "warning: %s was written with %d threads, this run has %d: the rest of the run will not be "
                    "bit-identical to an uninterrupted one",
                    o->state_path, ts->threads, o->threads);
    kd_log_info(log, "%s: resuming from %s: %d of %d epochs and %d of %d batches done (step %lld)", o->role,
                o->state_path, ts->epoch, o->epochs, ts->batch, spe, (long long)ts->step);
    return KD_OK;
}

static kd_status stopped(const kd_train_opts *o, int epoch, int64_t step, int64_t saved_step) {
    if (o->state_path && saved_step == step)
        return kd_errorf(KD_EINTR, "%s stopped at epoch %d, step %lld; training state saved to %s", o->role, epoch,
                         (long long)step, o->state_path);
    return kd_errorf(KD_EINTR, "%s stopped at epoch %d, step %lld; no training state saved", o->role, epoch,
                     (long long)step);
}

/* ---------------------------------------------------------------- trainer */

kd_status kd_train_classifier(kd_classifier *c, const kd_dataset *train, const kd_dataset *test, const kd_train_opts *o,
                              kd_log *log, kd_train_result *res) {
    memset(res, 0, sizeof *res);
    KD_ASSERT(o->batch <= kd_graph_max_batch(c->g), "batch %d above the graph's %d", o->batch,
              kd_graph_max_batch(c->g));
    KD_ASSERT(!o->resume || o->state_path, "resume needs a state path");
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
    kd_train_state ts;
    memset(&ts, 0, sizeof ts);
    snprintf(ts.stage, sizeof ts.stage, "%s", o->role);
    ts.epochs = o->epochs;
    ts.steps_per_epoch = spe;
    ts.seed = o->seed;
    ts.threads = o->threads;
    int64_t saved_step = -1; /* the step of the last good state on disk */
    kd_status st = KD_OK;
    if (o->resume) {
        st = resume_state(c, opt, o, log, spe, &ts);
        ts.threads = o->threads;
        saved_step = ts.step;
    }
    int64_t step = ts.step, samples = ts.samples;
    double t0 = kd_now() - ts.seconds;
    res->final_loss = ts.final_loss;
    res->test = ts.test;
    int first = ts.epoch + 1;
    for (int epoch = first; epoch <= o->epochs && st == KD_OK; epoch++) {
        kd_loader_start_epoch(ld, epoch - 1);
        if (o->terms) kd_loss_set_epoch(o->terms, epoch);
        double eloss = 0.0, win = 0.0;
        int64_t eseen = 0;
        int wsteps = 0, B, bi = 0;
        if (epoch == first && ts.batch > 0) { /* resume within the epoch */
            kd_loader_seek(ld, ts.batch);
            bi = ts.batch;
            eloss = ts.eloss;
            eseen = ts.eseen;
            win = ts.win;
            wsteps = ts.wsteps;
        }
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
                char lg[1700];
                last_good(lg, sizeof lg, o, saved_step);
                st = kd_errorf(KD_ENUMERIC,
                               "%s: loss is %g at epoch %d step %lld; first non-finite tensor: '%s' (try a lower "
                               "[train] lr or set [train] clip)%s",
                               o->role, (double)loss, epoch, (long long)step, bad ? bad : "?", lg);
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
            if (o->log_every > 0 && step % o->log_every == 0) {
                if (log->metrics) {
                    fprintf(log->metrics, "{\"role\":\"%s\",\"epoch\":%d,\"step\":%lld,\"loss\":%.6g,\"lr\":%.6g",
                            o->role, epoch, (long long)step, win / wsteps, (double)lr);
                    if (o->terms) /* this step's unweighted terms */
                        for (int i = 0; i < o->terms->n; i++)
                            fprintf(log->metrics, ",\"%d.%s\":%.6g", i + 1, o->terms->terms[i].name,
                                    (double)o->terms->terms[i].value->val.data[0]);
                    fputs("}\n", log->metrics);
                }
                log_step(log, o->role, epoch, step, win / wsteps, lr);
                win = 0.0;
                wsteps = 0;
            }
            double el = kd_now() - t0;
            double sps = samples / (el > 1e-9 ? el : 1e-9);
            kd_progress(log, o->role, epoch, o->epochs, bi, spe, eloss / eseen, sps,
                        (double)(total - step) * o->batch / (sps > 0 ? sps : 1));
            int stop = o->stop && *o->stop;
            /* a state due at the epoch's last batch is written at the epoch end, just below */
            if (o->state_path && (stop || (o->checkpoint_every > 0 && step % o->checkpoint_every == 0 && bi < spe))) {
                ts.step = step;
                ts.epoch = epoch - 1;
                ts.batch = bi;
                ts.eloss = eloss;
                ts.eseen = eseen;
                ts.win = win;
                ts.wsteps = wsteps;
                ts.samples = samples;
                ts.seconds = kd_now() - t0;
                ts.final_loss = res->final_loss;
                ts.test = res->test;
                if ((st = save_state(c, opt, o, log, &ts, &saved_step)) != KD_OK) break;
            }
            if (stop) {
                st = stopped(o, epoch, step, saved_step);
                break;
            }
        }
        if (st != KD_OK) break;
        double train_time = kd_now() - t0;
        double sps = samples / (train_time > 1e-9 ? train_time : 1e-9);
        res->final_loss = eseen ? eloss / (double)eseen : 0.0;
        if (o->eval_every > 1 && epoch % o->eval_every != 0 && epoch != o->epochs) {
            if (log->metrics)
                fprintf(log->metrics, "{\"role\":\"%s\",\"epoch\":%d,\"step\":%lld,\"train_loss\":%.6g}\n", o->role,
                        epoch, (long long)step, res->final_loss);
            log_epoch(log, o->role, epoch, o->epochs, step, res->final_loss, NULL, sps);
        } else {
            kd_eval_result ev = kd_evaluate(c, test, o->batch);
            res->test = ev;
            if (log->metrics)
                fprintf(log->metrics,
                        "{\"role\":\"%s\",\"epoch\":%d,\"step\":%lld,\"train_loss\":%.6g,\"test_loss\":%.6g,"
                        "\"test_acc\":%.6g}\n",
                        o->role, epoch, (long long)step, res->final_loss, ev.loss, ev.acc);
            log_epoch(log, o->role, epoch, o->epochs, step, res->final_loss, &ev, sps);
        }
        if (log->metrics) fflush(log->metrics);
        if (o->state_path) {
            ts.step = step;
            ts.epoch = epoch;
            ts.batch = 0;
            ts.eloss = 0.0;
            ts.eseen = 0;
            ts.win = 0.0;
            ts.wsteps = 0;
            ts.samples = samples;
            ts.seconds = kd_now() - t0;
            ts.final_loss = res->final_loss;
            ts.test = res->test;
            ts.threads = o->threads;
            st = save_state(c, opt, o, log, &ts, &saved_step);
        }
        if (st == KD_OK && o->stop && *o->stop) st = stopped(o, epoch, step, saved_step);
    }
    res->train_seconds = kd_now() - t0;
    res->samples_per_s = samples / (res->train_seconds > 1e-9 ? res->train_seconds : 1e-9);
    kd_optim_free(opt);
    kd_loader_free(ld);
    free(aug);
    return st;
}
