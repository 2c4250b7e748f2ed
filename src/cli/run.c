/* run.c - `distill run CONFIG`: resolve the config, load data, train (or
 * load) the teacher, evaluate, and write the run directory:
 *   config.ini (resolved), metrics.jsonl, teacher.safetensors, summary.json.
 * Later stages (students, distillation) plug in after the teacher.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <libgen.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "kd_config.h"
#include "kd_train.h"

static cli_opt run_opts[] = {
    {"--threads", "N", "threads (overrides [run] threads; 0 = all cores)", NULL},
    {"--quiet", NULL, "no progress or log lines, only the final table", NULL},
};

static cli_cmd run_cmd = {
    .name = "run",
    .synopsis = "CONFIG [--section.key=value ...] [options]",
    .about = "Runs what CONFIG describes: trains the teacher (or loads [teacher] checkpoint),\n"
             "evaluates it every epoch, and writes runs/NAME/ with config.ini, metrics.jsonl,\n"
             "teacher.safetensors and summary.json. Any config key can be overridden.",
    .examples = "  distill run examples/fashion_teacher.ini\n"
                "  distill run examples/fashion_teacher.ini --train.epochs=3 --data.limit=5000\n",
    .opts = run_opts,
    .n_opts = 2,
};

static kd_status mkdirs(const char *path) {
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

static kd_status write_atomic(const char *path, const char *text) {
    char tmp[4400];
    snprintf(tmp, sizeof tmp, "%.4200s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return kd_errorf(KD_EIO, "%s: cannot write: %s", tmp, strerror(errno));
    int bad = fputs(text, f) < 0;
    bad |= fflush(f) != 0;
    bad |= fsync(fileno(f)) != 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        remove(tmp);
        return kd_errorf(KD_EIO, "%s: write failed: %s", path, strerror(errno));
    }
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

static int file_exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static int fail(kd_status st) {
    fprintf(stderr, "distill: error: %s\n", kd_error_message());
    return st == KD_EUSAGE ? 2 : 1;
}

int cmd_run(int argc, char **argv) {
    const char *pos[1], *extra[64];
    int npos, nextra, help;
    kd_status st = cli_parse(&run_cmd, argc, argv, pos, 1, &npos, extra, 64, &nextra, &help);
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
    kd_classifier teacher = {0};
    FILE *metrics = NULL;
    st = kd_config_load(cfg, pos[0]);
    for (int i = 0; i < nextra && st == KD_OK; i++) st = kd_config_override(cfg, extra[i]);
    int threads = 0;
    if (st == KD_OK) {
        threads = kd_config_int(cfg, "run", "threads");
        if (cli_get(&run_cmd, "--threads")) st = cli_parse_int("--threads", cli_get(&run_cmd, "--threads"), 0, 1024, &threads);
        else if (threads < 0) st = kd_config_error(cfg, "run", "threads", "must be >= 0");
    }
    kd_train_opts to;
    if (st == KD_OK) st = train_opts_from(cfg, &to);
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
    if (st == KD_OK) st = mkdirs(dir);
    if (st == KD_OK) {
        snprintf(path, sizeof path, "%s/config.ini", dir);
        st = kd_config_write(cfg, path);
    }
    if (st == KD_OK) st = load_data(cfg, &train, &test);
    if (st != KD_OK) {
        kd_config_free(cfg);
        return fail(st);
    }
    threads = cli_set_threads(threads);
    int quiet = cli_get(&run_cmd, "--quiet") != NULL;
    snprintf(path, sizeof path, "%s/metrics.jsonl", dir);
    metrics = fopen(path, "w");
    if (!metrics) st = kd_errorf(KD_EIO, "%s: cannot write: %s", path, strerror(errno));
    kd_log log = {.metrics = metrics, .quiet = quiet, .tty = isatty(2)};
    float smoothing = (float)kd_config_float(cfg, "train", "smoothing");
    if (st == KD_OK && (smoothing < 0.0f || smoothing >= 1.0f))
        st = kd_config_error(cfg, "train", "smoothing", "must be in [0, 1)");
    const char *spec = kd_config_str(cfg, "teacher", "model");
    if (st == KD_OK) {
        st = kd_classifier_new(&teacher, spec, "", &train, to.batch, smoothing, to.seed);
        if (st != KD_OK) st = kd_error_prefix(st, "[teacher] model");
    }
    if (!quiet && st == KD_OK)
        fprintf(stderr, "distill: run '%s' -> %s (%d threads); train %d, test %d examples; teacher %s, %lld params\n",
                name, dir, threads, train.n, test.n, spec, (long long)kd_model_params(teacher.g, &teacher.m));
    kd_train_result tr = {0};
    const char *ckpt = kd_config_str(cfg, "teacher", "checkpoint");
    int loaded = 0;
    if (st == KD_OK && *ckpt && file_exists(ckpt)) {
        st = kd_checkpoint_load(teacher.g, &teacher.m, ckpt);
        if (st == KD_OK) {
            loaded = 1;
            tr.test = kd_evaluate(&teacher, &test, to.batch);
            if (!quiet) fprintf(stderr, "distill: teacher loaded from %s\n", ckpt);
        }
    } else if (st == KD_OK) {
        to.role = "teacher";
        st = kd_train_classifier(&teacher, &train, &test, &to, &log, &tr);
    }
    if (st == KD_OK) {
        snprintf(path, sizeof path, "%s/teacher.safetensors", dir);
        st = kd_checkpoint_save(teacher.g, &teacher.m, &train, path);
        if (st == KD_OK && *ckpt && !loaded) st = kd_checkpoint_save(teacher.g, &teacher.m, &train, ckpt);
    }
    if (st == KD_OK) {
        cJSON *root = cJSON_CreateObject(), *t = cJSON_AddObjectToObject(root, "teacher");
        cJSON_AddStringToObject(t, "model", spec);
        cJSON_AddNumberToObject(t, "test_acc", tr.test.acc);
        cJSON_AddNumberToObject(t, "test_loss", tr.test.loss);
        cJSON_AddNumberToObject(t, "params", (double)kd_model_params(teacher.g, &teacher.m));
        cJSON_AddNumberToObject(t, "train_seconds", tr.train_seconds);
        cJSON_AddNumberToObject(t, "samples_per_second", tr.samples_per_s);
        cJSON_AddBoolToObject(t, "loaded", loaded);
        cJSON_AddNumberToObject(root, "threads", threads);
        char *txt = cJSON_Print(root);
        snprintf(path, sizeof path, "%s/summary.json", dir);
        size_t L = strlen(txt);
        char *withnl = kd_malloc(L + 2);
        memcpy(withnl, txt, L);
        withnl[L] = '\n';
        withnl[L + 1] = '\0';
        st = write_atomic(path, withnl);
        free(withnl);
        cJSON_free(txt);
        cJSON_Delete(root);
    }
    if (st == KD_OK) {
        printf("%-10s %-40s %10s %9s %10s\n", "model", "spec", "params", "test acc", "train s");
        printf("%-10s %-40s %10lld %8.2f%% %10.1f\n", "teacher", spec,
               (long long)kd_model_params(teacher.g, &teacher.m), 100.0 * tr.test.acc, tr.train_seconds);
        if (!quiet) fprintf(stderr, "distill: wrote %s\n", dir);
    }
    if (metrics) fclose(metrics);
    kd_classifier_free(&teacher);
    kd_dataset_free(&train);
    kd_dataset_free(&test);
    kd_config_free(cfg);
    return st == KD_OK ? 0 : fail(st);
}
