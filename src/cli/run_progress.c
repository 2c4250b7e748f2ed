/* run_progress.c - RUN/progress.json for `distill run --resume`: which
 * stages of a run have finished, with what results, and where their lines
 * of metrics.jsonl end; and the clean-up a fresh start does.
 *
 *   {"format": "distill-progress/1", "config_hash": "...", "config": "...",
 *    "stages": [{"role": "teacher", "model": "mlp: 32", "params": 25450,
 *                "loaded": false, "weights": "teacher.safetensors",
 *                "metrics_end": 4711, "test_acc": 0.785, "test_loss": ...,
 *                "test_n": 200, "final_loss": ..., "train_seconds": ...,
 *                "samples_per_s": ...}, ...]}
 *
 * cJSON prints a number with 17 significant digits where 15 do not read
 * back exactly, so the results of a skipped stage are bit-identical to
 * those it had. A stage is recorded after its weights are written, so a
 * recorded stage always has them. Also the message of an interrupted run.
 * Deliberately not here: the state of a stage in progress
 * (src/train/state.c).
 */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/run_progress.h"

#define PROGRESS_FORMAT "distill-progress/1"

int run_file_exists(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

kd_status run_copy_file(const char *from, const char *to) {
    if (strcmp(from, to) == 0) return KD_OK;
    FILE *a = fopen(from, "rb");
    if (!a) return kd_errorf(KD_EIO, "%s: cannot read: %s", from, strerror(errno));
    char tmp[4400];
    snprintf(tmp, sizeof tmp, "%.4200s.tmp.%d", to, (int)getpid());
    FILE *b = fopen(tmp, "wb");
    if (!b) {
        fclose(a);
        return kd_errorf(KD_EIO, "%s: cannot write: %s", tmp, strerror(errno));
    }
    char buf[1 << 16];
    size_t n;
    int bad = 0;
    while ((n = fread(buf, 1, sizeof buf, a)) > 0) bad |= fwrite(buf, 1, n, b) != n;
    bad |= ferror(a);
    fclose(a);
    bad |= fflush(b) != 0 || fsync(fileno(b)) != 0;
    bad |= fclose(b) != 0;
    if (bad || rename(tmp, to) != 0) {
        remove(tmp);
        return kd_errorf(KD_EIO, "%s: copy to %s failed", from, to);
    }
    return KD_OK;
}

kd_status run_write_json(const char *path, const cJSON *root) {
    char *txt = cJSON_Print(root);
    KD_ASSERT(txt, "cJSON_Print failed");
    size_t L = strlen(txt);
    char *withnl = kd_malloc(L + 1);
    memcpy(withnl, txt, L);
    withnl[L] = '\n';
    cJSON_free(txt);
    kd_status st = kd_write_atomic(path, withnl, L + 1);
    free(withnl);
    return st;
}

static kd_status save(const run_progress *p) {
    char path[4200];
    snprintf(path, sizeof path, "%s/progress.json", p->dir);
    return run_write_json(path, p->root);
}

static int ends_with(const char *s, const char *suffix) {
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Removes dir's training states (all: fresh start) and the temporary files
 * of state writes that never finished (always). */
static kd_status clean(const char *dir, int states) {
    DIR *d = opendir(dir);
    if (!d) return kd_errorf(KD_EIO, "%s: cannot list: %s", dir, strerror(errno));
    struct dirent *e;
    kd_status st = KD_OK;
    while ((e = readdir(d)) && st == KD_OK) {
        int tmp = strstr(e->d_name, ".state.safetensors.tmp.") != NULL;
        if (!tmp && !(states && ends_with(e->d_name, ".state.safetensors"))) continue;
        char path[4400];
        snprintf(path, sizeof path, "%.4000s/%s", dir, e->d_name);
        if (remove(path) != 0 && errno != ENOENT)
            st = kd_errorf(KD_EIO, "%s: cannot remove: %s", path, strerror(errno));
    }
    closedir(d);
    return st;
}

static char *slurp(const char *path, int *missing) {
    FILE *f = fopen(path, "rb");
    *missing = !f && errno == ENOENT;
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0, got;
    char *b = kd_malloc(cap);
    while ((got = fread(b + n, 1, cap - n - 1, f)) > 0) {
        n += got;
        if (n + 1 == cap) {
            if (cap > (64u << 20)) break;
            b = kd_realloc(b, cap *= 2);
        }
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b);
        return NULL;
    }
    b[n] = '\0';
    return b;
}

kd_status progress_open(run_progress *p, const char *dir, const char *config, int want_resume, int *resuming) {
    memset(p, 0, sizeof *p);
    snprintf(p->dir, sizeof p->dir, "%s", dir);
    *resuming = 0;
    char path[4200], hash[17];
    snprintf(path, sizeof path, "%s/progress.json", dir);
    kd_state_config_hash(config, hash);
    if (want_resume) {
        int missing;
        char *txt = slurp(path, &missing);
        if (!txt && !missing) return kd_errorf(KD_EIO, "%s: cannot read: %s", path, strerror(errno));
        if (txt) {
            cJSON *r = cJSON_Parse(txt);
            free(txt);
            const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(r, "format");
            const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(r, "config");
            const cJSON *stages = cJSON_GetObjectItemCaseSensitive(r, "stages");
            if (!cJSON_IsObject(r) || !cJSON_IsString(fmt) || strcmp(fmt->valuestring, PROGRESS_FORMAT) != 0 ||
                !cJSON_IsString(cfg) || !cJSON_IsArray(stages)) {
                cJSON_Delete(r);
                return kd_errorf(KD_EFORMAT,
                                 "%s: not a progress record of this distill (%s expected); run without --resume to "
                                 "start over",
                                 path, PROGRESS_FORMAT);
            }
            char diff[1000];
            if (kd_state_config_diff(cfg->valuestring, config, diff, sizeof diff) > 0) {
                cJSON_Delete(r);
                return kd_errorf(KD_ECONFIG,
                                 "%s: the run was started with another configuration (%s); resume with the same config "
                                 "and overrides, or run without --resume to start over",
                                 path, diff);
            }
            p->root = r;
            *resuming = 1;
            return clean(dir, 0);
        }
    }
    kd_status st = clean(dir, 1);
    if (st != KD_OK) return st;
    p->root = cJSON_CreateObject();
    cJSON_AddStringToObject(p->root, "format", PROGRESS_FORMAT);
    cJSON_AddStringToObject(p->root, "config_hash", hash);
    cJSON_AddStringToObject(p->root, "config", config);
    cJSON_AddArrayToObject(p->root, "stages");
    return save(p);
}

void progress_close(run_progress *p) {
    cJSON_Delete(p->root);
    p->root = NULL;
}

static double num(const cJSON *o, const char *key, int *bad) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v)) {
        *bad = 1;
        return 0;
    }
    return v->valuedouble;
}

kd_status progress_skip(run_progress *p, const char *role, stage *out, int *skip) {
    *skip = 0;
    const cJSON *stages = cJSON_GetObjectItemCaseSensitive(p->root, "stages"), *s;
    cJSON_ArrayForEach(s, stages) {
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(s, "role");
        if (!cJSON_IsString(r) || strcmp(r->valuestring, role) != 0) continue;
        const cJSON *model = cJSON_GetObjectItemCaseSensitive(s, "model");
        const cJSON *weights = cJSON_GetObjectItemCaseSensitive(s, "weights");
        int bad = !cJSON_IsString(model) || !cJSON_IsString(weights);
        memset(out, 0, sizeof *out);
        snprintf(out->role, sizeof out->role, "%s", role);
        snprintf(out->spec, sizeof out->spec, "%s", bad ? "" : model->valuestring);
        out->params = (int64_t)num(s, "params", &bad);
        out->loaded = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(s, "loaded"));
        out->tr.test.acc = num(s, "test_acc", &bad);
        out->tr.test.loss = num(s, "test_loss", &bad);
        out->tr.test.n = (int)num(s, "test_n", &bad);
        out->tr.final_loss = num(s, "final_loss", &bad);
        out->tr.train_seconds = num(s, "train_seconds", &bad);
        out->tr.samples_per_s = num(s, "samples_per_s", &bad);
        double end = num(s, "metrics_end", &bad);
        if (bad || end < 0)
            return kd_errorf(KD_EFORMAT,
                             "%s/progress.json: the record of stage '%s' is incomplete; run without --resume "
                             "to start over",
                             p->dir, role);
        if (*weights->valuestring) {
            char path[4400];
            struct stat sb;
            snprintf(path, sizeof path, "%s/%.300s", p->dir, weights->valuestring);
            if (stat(path, &sb) != 0)
                return kd_errorf(KD_EIO,
                                 "%s/progress.json records stage '%s' as finished, but its weights %s are missing; run "
                                 "without --resume to start over",
                                 p->dir, role, path);
        }
        out->ran = 1;
        p->metrics_end = (int64_t)end;
        *skip = 1;
        return KD_OK;
    }
    return KD_OK;
}

kd_status progress_done(run_progress *p, const stage *s, const char *const *weights, int n, FILE *metrics) {
    if (metrics) {
        fflush(metrics);
        long off = ftell(metrics);
        if (off < 0) return kd_errorf(KD_EIO, "%s/metrics.jsonl: cannot tell its length", p->dir);
        p->metrics_end = off;
    }
    cJSON *stages = cJSON_GetObjectItemCaseSensitive(p->root, "stages");
    for (int i = 0; i < n; i++) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "role", s[i].role);
        cJSON_AddStringToObject(o, "model", s[i].spec);
        cJSON_AddNumberToObject(o, "params", (double)s[i].params);
        cJSON_AddBoolToObject(o, "loaded", s[i].loaded);
        cJSON_AddStringToObject(o, "weights", weights[i]);
        cJSON_AddNumberToObject(o, "metrics_end", (double)p->metrics_end);
        cJSON_AddNumberToObject(o, "test_acc", s[i].tr.test.acc);
        cJSON_AddNumberToObject(o, "test_loss", s[i].tr.test.loss);
        cJSON_AddNumberToObject(o, "test_n", s[i].tr.test.n);
        cJSON_AddNumberToObject(o, "final_loss", s[i].tr.final_loss);
        cJSON_AddNumberToObject(o, "train_seconds", s[i].tr.train_seconds);
        cJSON_AddNumberToObject(o, "samples_per_s", s[i].tr.samples_per_s);
        cJSON_AddItemToArray(stages, o);
    }
    return save(p);
}

kd_status progress_cut(run_progress *p, FILE *metrics) {
    if (!metrics) return KD_OK;
    struct stat sb;
    int fd = fileno(metrics);
    fflush(metrics);
    if (fstat(fd, &sb) != 0 || sb.st_size < p->metrics_end)
        return kd_errorf(KD_EFORMAT, "%s/metrics.jsonl is shorter than the %lld bytes progress.json records for it",
                         p->dir, (long long)p->metrics_end);
    if (ftruncate(fd, (off_t)p->metrics_end) != 0 || fseek(metrics, (long)p->metrics_end, SEEK_SET) != 0)
        return kd_errorf(KD_EIO, "%s/metrics.jsonl: cannot cut back to %lld bytes: %s", p->dir,
                         (long long)p->metrics_end, strerror(errno));
    return KD_OK;
}

/* After KD_EINTR: what stopped, where the state is, the command that
 * resumes; exit 128 + the signal (130 SIGINT, 143 SIGTERM). */
int run_interrupted(const kd_log *log, int sig, int argc, char **argv) {
    const char *name = sig == SIGTERM ? "SIGTERM" : "SIGINT";
    char cmd[4096];
    size_t k = (size_t)snprintf(cmd, sizeof cmd, "distill run");
    for (int i = 0; i < argc && k < sizeof cmd; i++) {
        if (strcmp(argv[i], "--resume") == 0) continue;
        int plain =
            argv[i][strspn(argv[i], "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,/=:+@")] == '\0';
        k += (size_t)snprintf(cmd + k, sizeof cmd - k, plain ? " %s" : " '%s'", argv[i]);
    }
    if (k < sizeof cmd) snprintf(cmd + k, sizeof cmd - k, " --resume");
    if (log->json) {
        cJSON *o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "event", "interrupted");
        cJSON_AddStringToObject(o, "signal", name);
        cJSON_AddNumberToObject(o, "exit_code", 128 + sig);
        cJSON_AddStringToObject(o, "message", kd_error_message());
        cJSON_AddStringToObject(o, "resume", cmd);
        char *t = cJSON_PrintUnformatted(o);
        fprintf(stderr, "%s\n", t);
        cJSON_free(t);
        cJSON_Delete(o);
    } else {
        if (log->tty) fprintf(stderr, "\r\033[K");
        fprintf(stderr, "distill: interrupted by %s: %s\ndistill: resume with: %s\n", name, kd_error_message(), cmd);
    }
    return 128 + sig;
}
