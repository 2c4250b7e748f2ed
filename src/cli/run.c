/* run.c - `distill run CONFIG`: resolve the config, load data, train (or
 * load) the teacher, evaluate, and write the run directory:
 *   config.ini (resolved), metrics.jsonl, teacher.safetensors, summary.json,
 *   report.html (also after a failed run: the curves up to the failure),
 *   progress.json and STAGE.state.safetensors (what --resume continues).
 * Later stages (students, distillation) plug in after the teacher. SIGINT
 * and SIGTERM stop a run cleanly: the trainer finishes its step and writes
 * its state, and the run exits 130 or 143 saying how to resume
 * (docs/resume.md).
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <libgen.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/run_progress.h"
#include "kd_cache.h"
#include "kd_config.h"
#include "kd_lelp.h"
#include "kd_report.h"
#include "kd_train.h"

static cli_opt run_opts[] = {
    {"--threads", "N", "threads (overrides [run] threads; 0 = all cores)", NULL},
    {"--quiet", NULL, "no progress or log lines, only the final table", NULL},
    {"--resume", NULL, "continue an interrupted run where its training states left it", NULL},
    {"--log-json", NULL, "log lines on stderr as JSON objects, one per line", NULL},
};

static cli_cmd run_cmd = {
    .name = "run",
    .synopsis = "CONFIG [--section.key=value ...] [options]",
    .about = "Runs what CONFIG describes: trains the teacher (or loads [teacher] checkpoint),\n"
             "evaluates it every epoch, and writes runs/NAME/ with config.ini, metrics.jsonl,\n"
             "teacher.safetensors and summary.json. Any config key can be overridden.\n"
             "Training states are written every [train] checkpoint_every steps and at each epoch\n"
             "end; Ctrl-C (SIGINT) or SIGTERM saves one and exits (130, 143), and --resume with the\n"
             "same config continues from it, giving the same metrics as an uninterrupted run.",
    .examples = "  distill run examples/fashion_teacher.ini\n"
                "  distill run examples/fashion_teacher.ini --train.epochs=3 --data.limit=5000\n"
                "  distill run examples/fashion_teacher.ini --train.epochs=3 --resume\n",
    .opts = run_opts,
    .n_opts = (int)(sizeof run_opts / sizeof run_opts[0]),
};

/* The first SIGINT or SIGTERM (0 before): the trainer finishes its step,
 * writes its state and returns KD_EINTR. SA_RESETHAND: a second one of the
 * same kind ends the process at once (the atomic writes keep every file
 * whole). */
static volatile sig_atomic_t g_stop;
static int g_json; /* --log-json, for errors before the log exists */

static void on_signal(int sig) {
    if (!g_stop) g_stop = sig;
}

static void catch_signals(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART | SA_RESETHAND;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

kd_status cli_mkdirs(const char *path) {
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST) return kd_errorf(KD_EIO, "%s: cannot create: %s", buf, strerror(errno));
        *p = '/';
    }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST) return kd_errorf(KD_EIO, "%s: cannot create: %s", buf, strerror(errno));
    return KD_OK;
}

/* Reads the [train] keys into options, checking ranges. */
static kd_status train_opts_from(const kd_config *c, kd_train_opts *o) {
    memset(o, 0, sizeof *o);
    o->epochs = kd_config_int(c, "train", "epochs");
    if (o->epochs < 1) return kd_config_error(c, "train", "epochs", "must be at least 1");
    o->batch = kd_config_int(c, "train", "batch");
    if (o->batch < 1 || o->batch > 65536) return kd_config_error(c, "train", "batch", "must be in [1, 65536]");
    o->seed = (uint64_t)kd_config_int(c, "run", "seed");
    o->crop = kd_config_int(c, "data", "crop");
    if (o->crop < 0 || o->crop > 16) return kd_config_error(c, "data", "crop", "must be in [0, 16]");
    o->flip = kd_config_int(c, "data", "flip");
    o->log_every = kd_config_int(c, "train", "log_every");
    if (o->log_every < 0) return kd_config_error(c, "train", "log_every", "must be >= 0");
    o->eval_every = kd_config_int(c, "train", "eval_every");
    if (o->eval_every < 1) return kd_config_error(c, "train", "eval_every", "must be at least 1");
    kd_optim_cfg *oc = &o->opt;
    const char *opt = kd_config_str(c, "train", "optimizer");
    if (strcmp(opt, "sgd") == 0)
        oc->kind = KD_OPTIM_SGD;
    else if (strcmp(opt, "adamw") == 0)
        oc->kind = KD_OPTIM_ADAMW;
    else
        return kd_config_error(c, "train", "optimizer", "expected sgd or adamw");
    oc->lr = (float)kd_config_float(c, "train", "lr");
    if (!(oc->lr > 0.0f)) return kd_config_error(c, "train", "lr", "must be positive");
    oc->momentum = (float)kd_config_float(c, "train", "momentum");
    if (oc->momentum < 0.0f || oc->momentum >= 1.0f) return kd_config_error(c, "train", "momentum", "must be in [0, 1)");
    oc->nesterov = kd_config_int(c, "train", "nesterov");
    if (oc->nesterov && oc->momentum == 0.0f && oc->kind == KD_OPTIM_SGD)
        return kd_config_error(c, "train", "nesterov", "Nesterov needs momentum > 0");
    oc->weight_decay = (float)kd_config_float(c, "train", "weight_decay");
    if (oc->weight_decay < 0.0f) return kd_config_error(c, "train", "weight_decay", "must be >= 0");
    oc->beta1 = (float)kd_config_float(c, "train", "beta1");
    oc->beta2 = (float)kd_config_float(c, "train", "beta2");
    oc->eps = (float)kd_config_float(c, "train", "eps");
    if (oc->beta1 < 0.0f || oc->beta1 >= 1.0f) return kd_config_error(c, "train", "beta1", "must be in [0, 1)");
    if (oc->beta2 < 0.0f || oc->beta2 >= 1.0f) return kd_config_error(c, "train", "beta2", "must be in [0, 1)");
    if (!(oc->eps > 0.0f)) return kd_config_error(c, "train", "eps", "must be positive");
    const char *s = kd_config_str(c, "train", "schedule");
    if (strcmp(s, "constant") == 0)
        oc->sched = KD_SCHED_CONSTANT;
    else if (strcmp(s, "cosine") == 0)
        oc->sched = KD_SCHED_COSINE;
    else if (strcmp(s, "step") == 0)
        oc->sched = KD_SCHED_STEP;
    else
        return kd_config_error(c, "train", "schedule", "expected constant, cosine or step");
    oc->min_lr = (float)kd_config_float(c, "train", "min_lr");
    oc->step_epochs = kd_config_int(c, "train", "step_epochs");
    if (oc->step_epochs < 1) return kd_config_error(c, "train", "step_epochs", "must be at least 1");
    oc->gamma = (float)kd_config_float(c, "train", "gamma");
    oc->clip = (float)kd_config_float(c, "train", "clip");
    if (oc->clip < 0.0f) return kd_config_error(c, "train", "clip", "must be >= 0");
    o->warmup_epochs = (float)kd_config_float(c, "train", "warmup_epochs");
    if (o->warmup_epochs < 0.0f) return kd_config_error(c, "train", "warmup_epochs", "must be >= 0");
    return KD_OK;
}

static kd_status load_data(const kd_config *c, kd_dataset *train, kd_dataset *test) {
    int limit = kd_config_int(c, "data", "limit"), tlimit = kd_config_int(c, "data", "test_limit");
    if (limit < 0) return kd_config_error(c, "data", "limit", "must be >= 0");
    if (tlimit < 0) return kd_config_error(c, "data", "test_limit", "must be >= 0");
    kd_status st = kd_dataset_load(kd_config_str(c, "data", "train"), train);
    if (st != KD_OK) return st;
    st = kd_dataset_load(kd_config_str(c, "data", "test"), test);
    if (st != KD_OK) {
        kd_dataset_free(train);
        return st;
    }
    kd_dataset_limit(train, limit);
    kd_dataset_limit(test, tlimit);
    const char *lm = kd_config_str(c, "data", "label_map");
    if (*lm) {
        int map[256], n = 0;
        st = kd_label_map_parse(lm, map, 256, &n);
        if (st == KD_OK) st = kd_dataset_relabel(train, map, n);
        if (st == KD_OK) st = kd_dataset_relabel(test, map, n);
        if (st != KD_OK) {
            char why[512];
            snprintf(why, sizeof why, "%s", kd_error_message());
            kd_dataset_free(train);
            kd_dataset_free(test);
            return kd_config_error(c, "data", "label_map", "%s", why);
        }
    }
    if (test->h != train->h || test->w != train->w || test->c != train->c) {
        kd_dataset_free(train);
        kd_dataset_free(test);
        return kd_config_error(c, "data", "test", "images differ in size from the training set");
    }
    /* the test set is normalised like the training set */
    test->mean = train->mean;
    test->std = train->std;
    if (test->n_classes > train->n_classes) test->n_classes = train->n_classes;
    return KD_OK;
}

static int fail(kd_status st) {
    kd_log l = {.json = g_json};
    kd_log_error(&l, kd_error_message());
    return st == KD_EUSAGE ? 2 : 1;
}

/* What the stages share: the run directory, the log, the progress record
 * and the state path of the stage about to train. */
typedef struct run_ctx {
    const char *dir;
    kd_log *log;
    run_progress prog;
    int resuming;               /* --resume found a run to continue */
    char state_path[4200];      /* of the stage being run */
    int state_resume;           /* continue it from its state */
} run_ctx;

/* Before a stage: *skip when --resume finds it finished (out filled from
 * progress.json); else, unless the stage continues from its training state
 * (state_name: the stage's file name, NULL for one that does not train),
 * metrics.jsonl is cut back to the end of the last finished stage. */
static kd_status stage_begin(run_ctx *rc, const char *role, const char *state_name, stage *out, int *skip) {
    *skip = 0;
    if (g_stop)
        return kd_errorf(KD_EINTR, "stopped before stage '%s'; the finished stages are recorded in %s/progress.json",
                         role, rc->dir);
    kd_status st = progress_skip(&rc->prog, role, out, skip);
    if (st != KD_OK || *skip) {
        if (*skip) kd_log_info(rc->log, "%s: finished before, skipped (--resume)", role);
        return st;
    }
    snprintf(out->role, sizeof out->role, "%s", role);
    rc->state_path[0] = '\0';
    rc->state_resume = 0;
    if (state_name) {
        snprintf(rc->state_path, sizeof rc->state_path, "%s/%s.state.safetensors", rc->dir, state_name);
        rc->state_resume = rc->resuming && run_file_exists(rc->state_path);
    }
    return rc->state_resume ? KD_OK : progress_cut(&rc->prog, rc->log->metrics);
}

/* The stage's trainer options: checkpoints to rc->state_path, resumed
 * from it when stage_begin said so. */
static void stage_opts(const run_ctx *rc, kd_train_opts *o) {
    o->state_path = rc->state_path[0] ? rc->state_path : NULL;
    o->resume = rc->state_resume;
    o->stop = &g_stop;
}

static void stage_json(cJSON *root, const stage *s) {
    if (!s->ran) return;
    cJSON *t = cJSON_AddObjectToObject(root, s->role);
    cJSON_AddStringToObject(t, "model", s->spec);
    cJSON_AddNumberToObject(t, "test_acc", s->tr.test.acc);
    cJSON_AddNumberToObject(t, "test_loss", s->tr.test.loss);
    cJSON_AddNumberToObject(t, "params", (double)s->params);
    cJSON_AddNumberToObject(t, "train_seconds", s->tr.train_seconds);
    cJSON_AddNumberToObject(t, "samples_per_second", s->tr.samples_per_s);
    if (!strcmp(s->role, "teacher")) cJSON_AddBoolToObject(t, "loaded", s->loaded);
}

static kd_status write_summary(const char *dir, const stage *st, int n, int threads, const char *loss) {
    cJSON *root = cJSON_CreateObject();
    for (int i = 0; i < n; i++) stage_json(root, &st[i]);
    if (loss) cJSON_AddStringToObject(root, "loss", loss);
    cJSON_AddNumberToObject(root, "threads", threads);
    kd_report_add_machine(root);
    char path[4200];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    kd_status s = run_write_json(path, root);
    cJSON_Delete(root);
    return s;
}

/* DIR/report.html from what the run wrote, finished or not. A report that
 * cannot be written is a warning: it never changes the run's exit status
 * or its error message. */
static void write_report(const char *dir) {
    char saved[2048], path[4200];
    snprintf(saved, sizeof saved, "%s", kd_error_message());
    snprintf(path, sizeof path, "%s/report.html", dir);
    const char *dirs[1] = {dir};
    if (kd_report_write(dirs, 1, path) != KD_OK) fprintf(stderr, "distill: warning: %s\n", kd_error_message());
    kd_errorf(KD_OK, "%s", saved);
}

/* The teacher: load [teacher] checkpoint if it exists, else train it with the
 * [train] recipe ([teacher] epochs/lr override) and save it there too. */
enum { GEN_PATHS = 2 };

static kd_status run_teacher(const kd_config *cfg, const kd_train_opts *base, const kd_dataset *train,
                             const kd_dataset *test, run_ctx *rc, stage *out) {
    kd_log *log = rc->log;
    const char *spec = kd_config_str(cfg, "teacher", "model"), *ckpt = kd_config_str(cfg, "teacher", "checkpoint");
    float smoothing = (float)kd_config_float(cfg, "train", "smoothing");
    kd_classifier t;
    kd_status st = kd_classifier_new(&t, spec, "", train, base->batch, smoothing, base->seed);
    if (st != KD_OK) return kd_error_prefix(st, "[teacher] model");
    snprintf(out->spec, sizeof out->spec, "%s", spec);
    out->params = kd_model_params(t.g, &t.m);
    out->ran = 1;
    kd_log_info(log, "teacher %s, %lld params", spec, (long long)out->params);
    /* a teacher resumed from its state was being trained here, even if it was saved to ckpt since */
    if (*ckpt && run_file_exists(ckpt) && !rc->state_resume) {
        /* a relative names = @FILE is found next to the config that set it */
        const char *names = kd_config_str(cfg, "teacher", "names"), *origin = kd_config_origin(cfg, "teacher", "names");
        char dir_of[4096] = "";
        if (strcmp(origin, "default") != 0 && strcmp(origin, "command line") != 0) {
            char tmp[4096];
            snprintf(tmp, sizeof tmp, "%s", origin);
            snprintf(dir_of, sizeof dir_of, "%s", dirname(tmp));
        }
        st = kd_checkpoint_load_names(t.g, &t.m, ckpt, names, *dir_of ? dir_of : NULL);
        if (st == KD_OK) {
            out->loaded = 1;
            out->tr.test = kd_evaluate(&t, test, base->batch);
            kd_log_info(log, "teacher loaded from %s: test acc %.2f%%", ckpt, 100.0 * out->tr.test.acc);
        }
    } else {
        kd_train_opts o = *base;
        o.role = "teacher";
        if (kd_config_int(cfg, "teacher", "epochs") > 0) o.epochs = kd_config_int(cfg, "teacher", "epochs");
        if (kd_config_float(cfg, "teacher", "lr") > 0) o.opt.lr = (float)kd_config_float(cfg, "teacher", "lr");
        if (kd_config_int(cfg, "teacher", "crop") >= 0) o.crop = kd_config_int(cfg, "teacher", "crop");
        if (kd_config_int(cfg, "teacher", "flip") >= 0) o.flip = kd_config_int(cfg, "teacher", "flip") != 0;
        stage_opts(rc, &o);
        st = kd_train_classifier(&t, train, test, &o, log, &out->tr);
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/teacher.safetensors", rc->dir);
    if (st == KD_OK) st = kd_checkpoint_save(t.g, &t.m, train, path);
    if (st == KD_OK && *ckpt && !out->loaded) st = kd_checkpoint_save(t.g, &t.m, train, ckpt);
    if (st == KD_OK) st = progress_done(&rc->prog, out, (const char *[]){"teacher.safetensors"}, 1, log->metrics);
    kd_classifier_free(&t);
    return st;
}

/* The student with cross-entropy alone, on the labelled examples only. */
static kd_status run_baseline(const kd_config *cfg, const kd_train_opts *base, const kd_dataset *train,
                              const kd_dataset *test, run_ctx *rc, stage *out) {
    const char *spec = kd_config_str(cfg, "student", "model");
    kd_dataset labeled = *train; /* a view: shares the buffers, never freed */
    if (train->labeled > 0 && train->labeled < train->n) labeled.n = train->labeled;
    labeled.labeled = 0;
    kd_classifier c;
    kd_status st = kd_classifier_new(&c, spec, "", &labeled, base->batch, (float)kd_config_float(cfg, "train", "smoothing"),
                                     base->seed);
    if (st != KD_OK) return kd_error_prefix(st, "[student] model");
    snprintf(out->spec, sizeof out->spec, "%s", spec);
    out->params = kd_model_params(c.g, &c.m);
    out->ran = 1;
    kd_train_opts o = *base;
    o.role = "baseline";
    if (kd_config_int(cfg, "distill", "baseline_epochs") > 0) o.epochs = kd_config_int(cfg, "distill", "baseline_epochs");
    stage_opts(rc, &o);
    st = kd_train_classifier(&c, &labeled, test, &o, rc->log, &out->tr);
    char path[4200];
    snprintf(path, sizeof path, "%s/baseline.safetensors", rc->dir);
    if (st == KD_OK) st = kd_checkpoint_save(c.g, &c.m, train, path);
    if (st == KD_OK) st = progress_done(&rc->prog, out, (const char *[]){"baseline.safetensors"}, 1, rc->log->metrics);
    kd_classifier_free(&c);
    return st;
}

static kd_status fill_from_cache(void *ctx, int epoch, const int *aug, int B) {
    kd_distiller *d = ctx;
    return kd_cache_fill(d->hook_cache, epoch, aug, B, d->t_logits->val.data);
}

/* One distillation stage: setup says what teaches (frozen teachers loaded
 * from ckpts, a cache, or a trainable peer); the student (setup->student)
 * is saved as DIR/OUT.safetensors, the peer (mutual learning) as
 * DIR/peer.safetensors into peer_out. */
static kd_status run_distill(const kd_distill_setup *setup, const char *const *ckpts, const kd_cache *cache,
                             const kd_train_opts *base, const kd_dataset *train, const kd_dataset *test, run_ctx *rc,
                             const char *role, const char *out_name, stage *out, stage *peer_out) {
    kd_log *log = rc->log;
    kd_distiller d;
    kd_status st = kd_distiller_build(&d, setup, train, base->batch, base->seed);
    if (st != KD_OK) return st;
    for (int i = 0; i < d.n_teachers && st == KD_OK; i++) st = kd_checkpoint_load(d.c.g, &d.teachers[i], ckpts[i]);
    snprintf(out->role, sizeof out->role, "%s", role);
    snprintf(out->spec, sizeof out->spec, "%s", setup->student);
    out->params = kd_model_params(d.c.g, &d.c.m);
    out->ran = 1;
    if (st == KD_OK) {
        kd_log_info(log, "%s %s, loss %s, taught by %s", role, setup->student, setup->loss,
                    cache ? cache->st.path : setup->peer ? "a peer (mutual learning)" : ckpts[0]);
        kd_train_opts o = *base;
        o.role = out->role;
        o.terms = &d.loss;
        if (cache) {
            d.hook_cache = cache;
            o.batch_hook = fill_from_cache;
            o.hook_ctx = &d;
            o.view_epochs = cache->views;
        }
        stage_opts(rc, &o);
        st = kd_train_classifier(&d.c, train, test, &o, log, &out->tr);
    }
    char path[4200], wname[300];
    snprintf(wname, sizeof wname, "%.200s.safetensors", out_name);
    snprintf(path, sizeof path, "%s/%s", rc->dir, wname);
    if (st == KD_OK) st = kd_checkpoint_save(d.c.g, &d.c.m, train, path);
    if (st == KD_OK && d.has_peer && peer_out) {
        /* evaluate and save the peer too: it is a second trained student */
        kd_classifier pc = d.c;
        pc.m = d.peer;
        snprintf(peer_out->role, sizeof peer_out->role, "peer");
        snprintf(peer_out->spec, sizeof peer_out->spec, "%s", setup->peer);
        peer_out->params = kd_model_params(d.c.g, &d.peer);
        peer_out->tr = out->tr;
        peer_out->tr.test = kd_evaluate(&pc, test, base->batch);
        peer_out->ran = 1;
        snprintf(path, sizeof path, "%s/peer.safetensors", rc->dir);
        st = kd_checkpoint_save(d.c.g, &d.peer, train, path);
    }
    /* the student and its peer are recorded together: a resume skips both or neither */
    stage done[2] = {*out};
    const char *wn[2] = {wname, "peer.safetensors"};
    if (d.has_peer && peer_out) done[1] = *peer_out;
    if (st == KD_OK) st = progress_done(&rc->prog, done, wn, d.has_peer && peer_out ? 2 : 1, log->metrics);
    kd_distiller_free(&d);
    return st;
}

/* LELP (docs/losses/lelp.md): the teacher's pseudo-subclass targets of
 * every training example, computed once, then the student with an S*K-way
 * head trained on them (the batch hook copies each row's targets). */
typedef struct lelp_hook {
    kd_distiller *d;
    const float *logq;
    int KS;
} lelp_hook;

static kd_status fill_lelp(void *ctx, int epoch, const int *aug, int B) {
    (void)epoch;
    lelp_hook *h = ctx;
    kd_lelp_fill(h->d->t_logits->val.data, h->logq, h->KS, aug, B);
    return KD_OK;
}

static kd_status run_lelp(const kd_config *cfg, const char *tspec, const char *tckpt, const kd_train_opts *base,
                          const kd_dataset *train, const kd_dataset *test, run_ctx *rc, stage *out) {
    kd_log *log = rc->log;
    const char *sspec = kd_config_str(cfg, "student", "model"), *loss = kd_config_str(cfg, "distill", "loss");
    kd_lelp_opts lo = {.S = kd_config_int(cfg, "distill", "lelp"),
                       .T = (float)kd_config_float(cfg, "distill", "lelp_T"),
                       .null_proj = kd_config_int(cfg, "distill", "lelp_null"),
                       .rotate = kd_config_int(cfg, "distill", "lelp_rotate"),
                       .seed = kd_hash64(base->seed ^ 0x4c454c50u)};
    int KS = train->n_classes * lo.S;
    float *logq = kd_malloc((size_t)train->n * KS * sizeof(float));
    kd_lelp fit;
    kd_status st = kd_lelp_teacher_targets(logq, tspec, tckpt, train, base->batch, &lo, &fit);
    if (st == KD_OK) {
        for (int k = 0; k < fit.K; k++)
            kd_log_info(log, "LELP class %d: %d examples, %d directions hold %.1f%% of the%s variance", k, fit.count[k],
                        lo.S, 100.0 * fit.explained[k], lo.null_proj ? " null-space" : "");
        kd_lelp_free(&fit);
    }
    kd_distiller d;
    if (st == KD_OK) st = kd_lelp_distiller_build(&d, sspec, loss, train, lo.S, base->batch, base->seed);
    if (st != KD_OK) {
        free(logq);
        return st;
    }
    snprintf(out->role, sizeof out->role, "student");
    snprintf(out->spec, sizeof out->spec, "%s", sspec);
    out->params = kd_model_params(d.c.g, &d.c.m);
    out->ran = 1;
    kd_log_info(log, "student %s, LELP S=%d T=%g null=%d rotate=%d, loss %s, taught by %s", sspec, lo.S, (double)lo.T,
                lo.null_proj, lo.rotate, loss, tckpt);
    lelp_hook hk = {.d = &d, .logq = logq, .KS = KS};
    kd_train_opts o = *base;
    o.role = out->role;
    o.terms = &d.loss;
    o.batch_hook = fill_lelp;
    o.hook_ctx = &hk;
    stage_opts(rc, &o);
    st = kd_train_classifier(&d.c, train, test, &o, log, &out->tr);
    char path[4200];
    snprintf(path, sizeof path, "%s/student.safetensors", rc->dir);
    kd_model sm = d.c.m; /* saved with its S*K-way head: classes = K*S, groups = S in the metadata */
    sm.logits = kd_lelp_sub_logits(&d);
    if (st == KD_OK) st = kd_checkpoint_save_groups(d.c.g, &sm, train, lo.S, path);
    if (st == KD_OK) st = progress_done(&rc->prog, out, (const char *[]){"student.safetensors"}, 1, log->metrics);
    kd_distiller_free(&d);
    free(logq);
    return st;
}

/* Accuracy of an ensemble: the weighted mean of the teachers' logits. */
static kd_status eval_ensemble(const kd_distill_setup *s, const char *const *ckpts, const kd_dataset *train,
                               const kd_dataset *test, int batch, stage *out) {
    kd_classifier c[KD_MAX_TEACHERS];
    kd_status st = KD_OK;
    int n = 0;
    for (; n < s->n_teachers && st == KD_OK; n++) {
        st = kd_classifier_new(&c[n], s->teachers[n], "", train, batch, 0.0f, 0);
        if (st == KD_OK) {
            st = kd_checkpoint_load(c[n].g, &c[n].m, ckpts[n]);
            if (st != KD_OK) kd_classifier_free(&c[n]);
        }
        out->params += st == KD_OK ? kd_model_params(c[n].g, &c[n].m) : 0;
    }
    if (st != KD_OK) n--;
    if (st == KD_OK) {
        int K = test->n_classes, correct = 0, total = 0, B;
        double wsum = 0, loss = 0;
        for (int i = 0; i < n; i++) wsum += s->weights[i] > 0 ? s->weights[i] : 1.0;
        float *mix = kd_malloc((size_t)batch * K * sizeof(float));
        kd_loader_opts lo = {.batch = batch};
        kd_loader *ld = kd_loader_new(test, &lo);
        while ((B = kd_loader_next(ld, c[0].x->val.data, c[0].y->val.data, NULL)) > 0) {
            memset(mix, 0, (size_t)B * K * sizeof(float));
            for (int i = 0; i < n; i++) {
                if (i) memcpy(c[i].x->val.data, c[0].x->val.data, (size_t)B * test->c * test->h * test->w * sizeof(float));
                kd_graph_set_batch(c[i].g, B);
                kd_graph_forward_to(c[i].g, 0, c[i].m.logits);
                float w = (float)((s->weights[i] > 0 ? s->weights[i] : 1.0) / wsum);
                for (int j = 0; j < B * K; j++) mix[j] += w * c[i].m.logits->val.data[j];
            }
            for (int b = 0; b < B; b++) {
                const float *z = mix + (size_t)b * K;
                int y = (int)c[0].y->val.data[b], best = 0;
                double m = z[0], se = 0;
                for (int k = 1; k < K; k++) {
                    if (z[k] > z[best]) best = k;
                    if (z[k] > m) m = z[k];
                }
                for (int k = 0; k < K; k++) se += exp((double)z[k] - m);
                loss += m + log(se) - z[y];
                correct += best == y;
                total++;
            }
        }
        kd_loader_free(ld);
        free(mix);
        out->tr.test.acc = total ? (double)correct / total : 0;
        out->tr.test.loss = total ? loss / total : 0;
        out->tr.test.n = total;
    }
    for (int i = 0; i < n; i++) kd_classifier_free(&c[i]);
    snprintf(out->role, sizeof out->role, "teacher");
    snprintf(out->spec, sizeof out->spec, "ensemble of %d", s->n_teachers);
    out->loaded = 1;
    out->ran = 1;
    return st;
}

/* [teacher] ensemble: checkpoints and weights from space-separated lists;
 * each checkpoint's metadata names its model. */
static kd_status parse_ensemble(const kd_config *cfg, kd_distill_setup *s, char paths[][1024], char models[][256]) {
    const char *list = kd_config_str(cfg, "teacher", "ensemble"), *wl = kd_config_str(cfg, "teacher", "ensemble_weights");
    int n = 0;
    for (const char *p = list; *p;) {
        while (*p == ' ' || *p == '\t') p++;
        if (!*p) break;
        size_t L = strcspn(p, " \t");
        if (n == KD_MAX_TEACHERS)
            return kd_config_error(cfg, "teacher", "ensemble", "more than %d teachers", KD_MAX_TEACHERS);
        if (L >= 1024) return kd_config_error(cfg, "teacher", "ensemble", "path too long");
        memcpy(paths[n], p, L);
        paths[n][L] = '\0';
        kd_checkpoint_info info;
        kd_status st = kd_checkpoint_info_read(paths[n], &info);
        if (st != KD_OK) return kd_error_prefix(st, "[teacher] ensemble");
        snprintf(models[n], 256, "%s", info.model);
        s->teachers[n] = models[n];
        n++;
        p += L;
    }
    s->n_teachers = n;
    int k = 0;
    for (const char *p = wl; *p && k <= n;) {
        char *end;
        double w = strtod(p, &end);
        if (end == p) {
            if (*p == ' ' || *p == '\t') {
                p++;
                continue;
            }
            return kd_config_error(cfg, "teacher", "ensemble_weights", "not a list of numbers");
        }
        if (!(w > 0) || k == n) return kd_config_error(cfg, "teacher", "ensemble_weights", "needs %d positive numbers", n);
        s->weights[k++] = (float)w;
        p = end;
    }
    if (k && k != n) return kd_config_error(cfg, "teacher", "ensemble_weights", "needs %d numbers, one per teacher", n);
    return KD_OK;
}

/* Checks that a cache fits the run: same examples and classes, and the
 * augmentation it was built with. */
static kd_status check_cache(const kd_config *cfg, const kd_cache *c, const kd_dataset *train, const kd_train_opts *o) {
    if (c->n < train->n)
        return kd_config_error(cfg, "teacher", "cache", "holds %d examples, the training set has %d", c->n, train->n);
    if (c->K != train->n_classes)
        return kd_config_error(cfg, "teacher", "cache", "holds %d classes, the data has %d", c->K, train->n_classes);
    if (c->views == 0 && (o->crop || o->flip))
        return kd_config_error(cfg, "teacher", "cache",
                               "has no augmented views but [data] crop/flip are on: set crop = 0 and flip = 0, or build "
                               "the cache with --views E --crop P --flip 1");
    if (c->views > 0 && (c->crop != o->crop || c->flip != o->flip || c->seed != o->seed))
        return kd_config_error(cfg, "teacher", "cache",
                               "views were drawn with seed %llu, crop %d, flip %d; the run has seed %llu, crop %d, flip %d",
                               (unsigned long long)c->seed, c->crop, c->flip, (unsigned long long)o->seed, o->crop, o->flip);
    return KD_OK;
}

int cmd_run(int argc, char **argv) {
    const char *pos[1], *extra[64];
    int npos, nextra, help;
    kd_status st = cli_parse(&run_cmd, argc, argv, pos, 1, &npos, extra, 64, &nextra, &help);
    g_json = cli_get(&run_cmd, "--log-json") != NULL;
    if (st != KD_OK) return fail(st);
    if (help) {
        cli_usage(&run_cmd, stdout);
        printf("\nconfig keys (INI sections and keys; override with --section.key=value):\n");
        kd_config_print_schema(stdout);
        return 0;
    }
    if (npos != 1) {
        cli_usage(&run_cmd, stderr);
        return 2;
    }
    kd_config *cfg = kd_config_new();
    kd_dataset train = {0}, test = {0};
    FILE *metrics = NULL;
    st = kd_config_load(cfg, pos[0]);
    for (int i = 0; i < nextra && st == KD_OK; i++) st = kd_config_override(cfg, extra[i]);
    int threads = 0;
    if (st == KD_OK) {
        threads = kd_config_int(cfg, "run", "threads");
        if (cli_get(&run_cmd, "--threads"))
            st = cli_parse_int("--threads", cli_get(&run_cmd, "--threads"), 0, 1024, &threads);
        else if (threads < 0)
            st = kd_config_error(cfg, "run", "threads", "must be >= 0");
    }
    kd_train_opts to;
    if (st == KD_OK) st = train_opts_from(cfg, &to);
    float smoothing = 0.0f;
    if (st == KD_OK) {
        smoothing = (float)kd_config_float(cfg, "train", "smoothing");
        if (smoothing < 0.0f || smoothing >= 1.0f) st = kd_config_error(cfg, "train", "smoothing", "must be in [0, 1)");
    }
    int labeled = 0;
    if (st == KD_OK) {
        labeled = kd_config_int(cfg, "data", "labeled");
        if (labeled < 0) st = kd_config_error(cfg, "data", "labeled", "must be >= 0");
    }
    if (st == KD_OK && kd_config_int(cfg, "teacher", "epochs") < 0)
        st = kd_config_error(cfg, "teacher", "epochs", "must be >= 0");
    if (st == KD_OK && kd_config_float(cfg, "teacher", "lr") < 0) st = kd_config_error(cfg, "teacher", "lr", "must be >= 0");
    if (st == KD_OK && (kd_config_int(cfg, "teacher", "crop") < -1 || kd_config_int(cfg, "teacher", "crop") > 16))
        st = kd_config_error(cfg, "teacher", "crop", "must be -1 (as [data]) or in [0, 16]");
    if (st == KD_OK && (kd_config_int(cfg, "teacher", "flip") < -1 || kd_config_int(cfg, "teacher", "flip") > 1))
        st = kd_config_error(cfg, "teacher", "flip", "must be -1 (as [data]), 0 or 1");
    if (st == KD_OK && *kd_config_str(cfg, "teacher", "names") && !*kd_config_str(cfg, "teacher", "checkpoint"))
        st = kd_config_error(cfg, "teacher", "names", "needs [teacher] checkpoint (the file whose names it maps)");
    if (st == KD_OK && kd_config_int(cfg, "distill", "baseline_epochs") < 0)
        st = kd_config_error(cfg, "distill", "baseline_epochs", "must be >= 0");
    const char *sspec = st == KD_OK ? kd_config_str(cfg, "student", "model") : "";
    int lelp = st == KD_OK ? kd_config_int(cfg, "distill", "lelp") : 0;
    if (st == KD_OK && (lelp < 0 || lelp > 64)) st = kd_config_error(cfg, "distill", "lelp", "must be in [0, 64]");
    if (st == KD_OK && lelp && !(kd_config_float(cfg, "distill", "lelp_T") > 0))
        st = kd_config_error(cfg, "distill", "lelp_T", "must be positive");
    if (st == KD_OK && lelp && (kd_config_int(cfg, "data", "crop") || kd_config_int(cfg, "data", "flip")))
        st = kd_config_error(cfg, "distill", "lelp",
                             "LELP targets are computed once per stored image: set [data] crop = 0 and flip = 0");
    if (st == KD_OK && lelp &&
        (kd_config_int(cfg, "distill", "mutual") || *kd_config_str(cfg, "teacher", "cache") ||
         *kd_config_str(cfg, "teacher", "ensemble") || *kd_config_str(cfg, "assistant", "model") ||
         kd_config_int(cfg, "distill", "generations") != 1))
        st = kd_config_error(cfg, "distill", "lelp",
                             "LELP needs one teacher model and one student: no mutual, cache, ensemble, assistant or "
                             "generations");
    if (st == KD_OK && *sspec) { /* catch a bad loss spec before any training */
        kd_loss_spec ls;
        st = kd_loss_spec_parse(kd_config_str(cfg, "distill", "loss"), &ls);
        if (st != KD_OK) st = kd_error_prefix(st, "[distill] loss");
    }
    char name[256], dir[4096], path[4200];
    if (st == KD_OK) {
        const char *n = kd_config_str(cfg, "run", "name");
        if (*n) {
            snprintf(name, sizeof name, "%s", n);
        } else {
            char tmp[4096];
            snprintf(tmp, sizeof tmp, "%s", pos[0]);
            snprintf(name, sizeof name, "%s", basename(tmp));
            char *dot = strrchr(name, '.');
            if (dot && dot != name) *dot = '\0';
        }
        if (strchr(name, '/') || strcmp(name, "..") == 0 || strcmp(name, ".") == 0)
            st = kd_config_error(cfg, "run", "name", "must be a plain name, not a path");
        snprintf(dir, sizeof dir, "%s/%s", kd_config_str(cfg, "run", "out"), name);
    }
    if (st == KD_OK) st = cli_mkdirs(dir);
    int lm = st == KD_OK && strncmp(kd_config_str(cfg, "data", "train"), "text", 4) == 0;
    int want_resume = cli_get(&run_cmd, "--resume") != NULL, quiet = cli_get(&run_cmd, "--quiet") != NULL;
    if (lm && want_resume)
        st = kd_errorf(KD_EUSAGE, "distill run: --resume is not available for language-model runs yet (docs/resume.md)");
    int multitask = st == KD_OK && *kd_config_str(cfg, "multitask", "tasks");
    if (multitask && want_resume)
        st = kd_errorf(KD_EUSAGE, "distill run: --resume is not available for multi-task runs yet (docs/losses/multitask.md)");
    /* --resume: the run must have been started with this config (checked
     * before config.ini is rewritten) */
    char *cfg_text = st == KD_OK ? kd_config_text(cfg) : NULL;
    kd_log log = {.quiet = quiet, .tty = isatty(2), .json = g_json};
    run_ctx rc = {.dir = dir, .log = &log};
    if (st == KD_OK && !lm) {
        st = progress_open(&rc.prog, dir, cfg_text, want_resume, &rc.resuming);
        if (st == KD_OK && want_resume && !rc.resuming)
            kd_log_info(&log, "nothing to resume in %s (no progress.json): starting from the beginning", dir);
    }
    if (st == KD_OK) {
        snprintf(path, sizeof path, "%s/config.ini", dir);
        st = kd_config_write(cfg, path);
    }
    if (st == KD_OK && lm) {
        /* a language model: its own pipeline */
        threads = cli_set_threads(threads);
        snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
        metrics = fopen(path, "w");
        int code;
        if (!metrics) {
            kd_errorf(KD_EIO, "%s: cannot write: %s", path, strerror(errno));
            code = fail(KD_EIO);
        } else {
            log.metrics = metrics;
            kd_log_info(&log, "run '%s' -> %s (%d threads)", name, dir, threads);
            /* "textcls:..." also starts with "text": text classification */
            code = strncmp(kd_config_str(cfg, "data", "train"), "textcls:", 8) == 0
                       ? cli_run_textcls(cfg, dir, threads, &log)
                       : cli_run_lm(cfg, dir, threads, &log);
            fclose(metrics);
            write_report(dir);
        }
        free(cfg_text);
        kd_config_free(cfg);
        return code;
    }
    if (st == KD_OK) st = load_data(cfg, &train, &test);
    if (st != KD_OK) {
        progress_close(&rc.prog);
        free(cfg_text);
        kd_config_free(cfg);
        return fail(st);
    }
    threads = cli_set_threads(threads);
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    /* a resumed run keeps what it wrote: stages cut it back to where they start */
    metrics = rc.resuming ? fopen(path, "r+") : NULL;
    if (!metrics) metrics = fopen(path, "w");
    if (!metrics) st = kd_errorf(KD_EIO, "%s: cannot write: %s", path, strerror(errno));
    log.metrics = metrics;
    to.checkpoint_every = kd_config_int(cfg, "train", "checkpoint_every");
    if (st == KD_OK && to.checkpoint_every < 0)
        st = kd_config_error(cfg, "train", "checkpoint_every", "must be >= 0");
    to.config = cfg_text;
    to.threads = threads;
    catch_signals();
    if (st == KD_OK)
        kd_log_info(&log, "run '%s' -> %s (%d threads); train %d, test %d examples%s", name, dir, threads, train.n,
                    test.n, rc.resuming ? "; resuming" : "");
    enum { MAX_STAGES = 16 };
    stage stages[MAX_STAGES];
    memset(stages, 0, sizeof stages);
    int ns = 0;
    kd_cache cache = {0};
    if (st == KD_OK && multitask) { /* its own stages (src/cli/run_multitask.c) */
        st = cli_run_multitask(cfg, &to, &train, &test, dir, threads, &log);
        goto finish;
    }
    const char *cache_path = kd_config_str(cfg, "teacher", "cache");
    int mutual = kd_config_int(cfg, "distill", "mutual"), gens = kd_config_int(cfg, "distill", "generations");
    int ensemble = *kd_config_str(cfg, "teacher", "ensemble") != '\0';
    const char *aspec = kd_config_str(cfg, "assistant", "model");
    int cached = *sspec && *cache_path && !mutual;
    if (st == KD_OK && (gens < 1 || gens > 10)) st = kd_config_error(cfg, "distill", "generations", "must be in [1, 10]");
    if (st == KD_OK && cached && *aspec)
        st = kd_config_error(cfg, "assistant", "model", "an assistant needs the teacher itself, not [teacher] cache");
    if (st == KD_OK && cached) {
        st = kd_cache_open(cache_path, &cache);
        if (st == KD_OK) st = check_cache(cfg, &cache, &train, &to);
    }
    /* who teaches the student: the teacher(s), read from these checkpoints */
    kd_distill_setup tset = {.loss = kd_config_str(cfg, "distill", "loss")};
    static char ens_paths[KD_MAX_TEACHERS][1024], ens_models[KD_MAX_TEACHERS][256];
    const char *tckpts[KD_MAX_TEACHERS];
    char tpath[4200];
    snprintf(tpath, sizeof tpath, "%s/teacher.safetensors", dir);
    if (st == KD_OK && ensemble && *sspec && !mutual) {
        st = parse_ensemble(cfg, &tset, ens_paths, ens_models);
        for (int i = 0; i < tset.n_teachers; i++) tckpts[i] = ens_paths[i];
        int skip = 0;
        if (st == KD_OK) st = stage_begin(&rc, "teacher", NULL, &stages[ns], &skip);
        if (st == KD_OK && !skip) {
            st = eval_ensemble(&tset, tckpts, &train, &test, to.batch, &stages[ns]);
            if (st == KD_OK) st = progress_done(&rc.prog, &stages[ns], (const char *[]){""}, 1, metrics);
        }
        ns++;
    } else if (st == KD_OK && !mutual) {
        /* with a cache the teacher is only evaluated, from its checkpoint if there is one */
        const char *tck = kd_config_str(cfg, "teacher", "checkpoint");
        if (!cached || (*tck && run_file_exists(tck))) {
            int skip;
            st = stage_begin(&rc, "teacher", "teacher", &stages[ns], &skip);
            if (st == KD_OK && !skip) st = run_teacher(cfg, &to, &train, &test, &rc, &stages[ns]);
            ns++;
        }
        tset.n_teachers = 1;
        tset.teachers[0] = kd_config_str(cfg, "teacher", "model");
        tckpts[0] = tpath;
    }
    if (st == KD_OK && *sspec) {
        if (labeled > 0 && labeled < train.n) {
            train.labeled = labeled;
            kd_log_info(&log, "%d labelled examples; the other %d are an unlabelled transfer set", labeled,
                        train.n - labeled);
        }
        static char apath[4200], gpath[GEN_PATHS][4200];
        if (st == KD_OK && *aspec && !mutual) { /* teacher -> assistant, then the assistant teaches */
            kd_distill_setup as = tset;
            as.student = aspec;
            int skip;
            st = stage_begin(&rc, "assistant", "assistant", &stages[ns], &skip);
            if (st == KD_OK && !skip)
                st = run_distill(&as, tckpts, NULL, &to, &train, &test, &rc, "assistant", "assistant", &stages[ns], NULL);
            ns++;
            snprintf(apath, sizeof apath, "%s/assistant.safetensors", dir);
            tset.n_teachers = 1;
            tset.teachers[0] = aspec;
            tckpts[0] = apath;
        }
        if (st == KD_OK && kd_config_int(cfg, "distill", "baseline")) {
            int skip;
            st = stage_begin(&rc, "baseline", "baseline", &stages[ns], &skip);
            if (st == KD_OK && !skip) st = run_baseline(cfg, &to, &train, &test, &rc, &stages[ns]);
            ns++;
        }
        if (st == KD_OK) {
            kd_distill_setup ss = tset;
            ss.student = sspec;
            const char *peer = kd_config_str(cfg, "distill", "peer");
            if (mutual) {
                memset(&ss, 0, sizeof ss);
                ss.student = sspec;
                ss.loss = tset.loss;
                ss.peer = *peer ? peer : sspec;
            }
            if (cached) {
                ss.n_teachers = 0;
                ss.cached = 1;
            }
            int at = ns++, skip;
            st = stage_begin(&rc, "student", "student", &stages[at], &skip);
            if (st == KD_OK && skip && mutual) { /* recorded together with its student */
                st = progress_skip(&rc.prog, "peer", &stages[ns], &skip);
                if (st == KD_OK && !skip)
                    st = kd_errorf(KD_EFORMAT, "%s/progress.json: the student is recorded without its peer", dir);
                skip = 1;
            }
            if (st == KD_OK && !skip && lelp)
                st = run_lelp(cfg, tset.teachers[0], tckpts[0], &to, &train, &test, &rc, &stages[at]);
            else if (st == KD_OK && !skip)
                st = run_distill(&ss, tckpts, cached ? &cache : NULL, &to, &train, &test, &rc, "student", "student",
                                 &stages[at], mutual ? &stages[ns] : NULL);
            if (mutual) ns++;
        }
        /* born-again generations: each student teaches the next, same model */
        for (int gen = 2; gen <= gens && st == KD_OK; gen++) {
            kd_distill_setup gs = {.loss = tset.loss, .student = sspec, .n_teachers = 1, .teachers = {sspec}};
            char role[32], name[32];
            const char *prev[1] = {gpath[(gen - 2) % GEN_PATHS]};
            if (gen == 2)
                snprintf(gpath[0], sizeof gpath[0], "%s/student.safetensors", dir);
            snprintf(role, sizeof role, "student_g%d", gen);
            snprintf(name, sizeof name, "student_g%d", gen);
            int skip;
            st = stage_begin(&rc, role, name, &stages[ns], &skip);
            if (st == KD_OK && !skip) st = run_distill(&gs, prev, NULL, &to, &train, &test, &rc, role, name, &stages[ns], NULL);
            ns++;
            snprintf(gpath[(gen - 1) % GEN_PATHS], sizeof gpath[0], "%s/%s.safetensors", dir, name);
        }
    }
    if (st == KD_OK) st = progress_cut(&rc.prog, metrics); /* all skipped: as the last stage left it */
    if (st == KD_OK)
        st = write_summary(dir, stages, ns, threads, *sspec ? kd_config_str(cfg, "distill", "loss") : NULL);
    if (st == KD_OK) {
        printf("%-11s %-34s %10s %9s %9s\n", "model", "spec", "params", "test acc", "train s");
        for (int i = 0; i < ns; i++)
            if (stages[i].ran)
                printf("%-11s %-34.34s %10lld %8.2f%% %9.1f\n", stages[i].role, stages[i].spec,
                       (long long)stages[i].params, 100.0 * stages[i].tr.test.acc, stages[i].tr.train_seconds);
        kd_log_info(&log, "wrote %s", dir);
    }
finish:
    if (metrics) {
        fclose(metrics);
        write_report(dir);
    }
    kd_cache_close(&cache);
    kd_dataset_free(&train);
    kd_dataset_free(&test);
    kd_config_free(cfg);
    progress_close(&rc.prog);
    free(cfg_text);
    if (st == KD_EINTR) return run_interrupted(&log, g_stop ? g_stop : SIGINT, argc, argv);
    return st == KD_OK ? 0 : fail(st);
}
