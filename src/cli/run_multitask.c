/* run_multitask.c - `distill run` when [multitask] tasks is set: one
 * student trunk with a head per task, each task taught by its own teacher
 * (docs/losses/multitask.md). Stages:
 *   1. per task, the teacher: loaded from its [multitask] teachers entry, or
 *      trained there (with [teacher] model and the [teacher]/[train] recipe)
 *      on the task's labels when the file is missing; evaluated on the task;
 *   2. the multi-task student with [distill] loss on every task (an
 *      `anneal` term's weight moves from teacher to gold labels per step);
 *   3. every task's test accuracy; DIR/student_TASK.safetensors per task
 *      (an ordinary checkpoint of the trunk and that task's head).
 * Writes metrics.jsonl lines (roles teacher_TASK and student; after the
 * last epoch one line per task, role student_TASK) and summary.json.
 * Not here: --resume (refused by run.c for these runs), caches,
 * ensembles, assistants, mutual learning, an unlabelled transfer set
 * ([data] labeled).
 */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "cli/run_progress.h"
#include "kd_config.h"
#include "kd_multitask.h"
#include "kd_report.h"

/* A dataset view with its own label array, relabelled by task t's map. */
static kd_status task_view(const kd_dataset *ds, const kd_mt_task *t, kd_dataset *out) {
    *out = *ds;
    out->labels = kd_malloc((size_t)ds->n);
    memcpy(out->labels, ds->labels, (size_t)ds->n);
    kd_status st = kd_dataset_relabel(out, t->map, t->n_map);
    if (st != KD_OK) {
        free(out->labels);
        out->labels = NULL;
        return kd_error_prefix(st, "task '%s'", t->name);
    }
    return KD_OK;
}

typedef struct teacher_out {
    char model[256];
    kd_eval_result test;
    int loaded;
    int64_t params;
    double seconds;
} teacher_out;

/* Task t's teacher at path: loaded and evaluated, or trained and saved. */
static kd_status task_teacher(const kd_config *cfg, const kd_train_opts *base, const kd_dataset *train,
                              const kd_dataset *test, const kd_mt_task *t, const char *path, kd_log *log,
                              teacher_out *out) {
    kd_dataset tr, te;
    kd_status st = task_view(train, t, &tr);
    if (st != KD_OK) return st;
    st = task_view(test, t, &te);
    if (st != KD_OK) {
        free(tr.labels);
        return st;
    }
    if (te.n_classes > tr.n_classes) te.n_classes = tr.n_classes;
    int load = run_file_exists(path);
    if (load) {
        kd_checkpoint_info info;
        st = kd_checkpoint_info_read(path, &info);
        if (st == KD_OK && info.classes != t->classes)
            st = kd_errorf(KD_ECONFIG, "%s: a teacher of %d classes; task '%s' has %d", path, info.classes, t->name,
                           t->classes);
        if (st == KD_OK) snprintf(out->model, sizeof out->model, "%s", info.model);
    } else {
        snprintf(out->model, sizeof out->model, "%s", kd_config_str(cfg, "teacher", "model"));
    }
    kd_classifier c = {0};
    if (st == KD_OK) {
        st = kd_classifier_new(&c, out->model, "", &tr, base->batch, (float)kd_config_float(cfg, "train", "smoothing"),
                               base->seed);
        if (st != KD_OK) st = kd_error_prefix(st, "teacher of task '%s'", t->name);
    }
    if (st == KD_OK) out->params = kd_model_params(c.g, &c.m);
    if (st == KD_OK && load) {
        st = kd_checkpoint_load(c.g, &c.m, path);
        if (st == KD_OK) {
            out->loaded = 1;
            out->test = kd_evaluate(&c, &te, base->batch);
            kd_log_info(log, "teacher of task '%s' loaded from %s: test acc %.2f%%", t->name, path,
                        100.0 * out->test.acc);
        }
    } else if (st == KD_OK) {
        char role[64];
        snprintf(role, sizeof role, "teacher_%.31s", t->name);
        kd_train_opts o = *base;
        o.role = role;
        o.terms = NULL;
        if (kd_config_int(cfg, "teacher", "epochs") > 0) o.epochs = kd_config_int(cfg, "teacher", "epochs");
        if (kd_config_float(cfg, "teacher", "lr") > 0) o.opt.lr = (float)kd_config_float(cfg, "teacher", "lr");
        if (kd_config_int(cfg, "teacher", "crop") >= 0) o.crop = kd_config_int(cfg, "teacher", "crop");
        if (kd_config_int(cfg, "teacher", "flip") >= 0) o.flip = kd_config_int(cfg, "teacher", "flip") != 0;
        kd_log_info(log, "teacher of task '%s' (%d classes): training %s into %s", t->name, t->classes, out->model,
                    path);
        kd_train_result r;
        st = kd_train_classifier(&c, &tr, &te, &o, log, &r);
        out->test = r.test;
        out->seconds = r.train_seconds;
        if (st == KD_OK) st = kd_checkpoint_save(c.g, &c.m, &tr, path);
    }
    if (c.g) kd_classifier_free(&c);
    free(tr.labels);
    free(te.labels);
    return st;
}

/* [multitask] teachers: n paths, space-separated */
static kd_status parse_paths(const kd_config *cfg, char paths[][1024], int n) {
    const char *p = kd_config_str(cfg, "multitask", "teachers");
    int k = 0;
    while (*p) {
        while (*p == ' ' || *p == '\t') p++;
        if (!*p) break;
        size_t L = strcspn(p, " \t");
        if (k == n) return kd_config_error(cfg, "multitask", "teachers", "more paths than the %d tasks", n);
        if (L >= 1024) return kd_config_error(cfg, "multitask", "teachers", "path too long");
        memcpy(paths[k], p, L);
        paths[k][L] = '\0';
        k++;
        p += L;
    }
    if (k != n) return kd_config_error(cfg, "multitask", "teachers", "%d paths for %d tasks (one per task)", k, n);
    return KD_OK;
}

static kd_status write_summary(const char *dir, const kd_multitask *mt, const teacher_out *tout, int have_t,
                               const kd_eval_result *res, const kd_train_result *tr, int64_t params, const char *spec,
                               const char *loss, int threads) {
    cJSON *root = cJSON_CreateObject();
    if (have_t) {
        cJSON *ts = cJSON_AddObjectToObject(root, "teachers");
        for (int k = 0; k < mt->n_tasks; k++) {
            cJSON *t = cJSON_AddObjectToObject(ts, mt->tasks[k].name);
            cJSON_AddStringToObject(t, "model", tout[k].model);
            cJSON_AddNumberToObject(t, "test_acc", tout[k].test.acc);
            cJSON_AddNumberToObject(t, "test_loss", tout[k].test.loss);
            cJSON_AddNumberToObject(t, "params", (double)tout[k].params);
            cJSON_AddBoolToObject(t, "loaded", tout[k].loaded);
            cJSON_AddNumberToObject(t, "train_seconds", tout[k].seconds);
        }
    }
    cJSON *s = cJSON_AddObjectToObject(root, "student");
    cJSON_AddStringToObject(s, "model", spec);
    cJSON_AddNumberToObject(s, "params", (double)params);
    cJSON_AddNumberToObject(s, "train_seconds", tr->train_seconds);
    cJSON_AddNumberToObject(s, "samples_per_second", tr->samples_per_s);
    double mean = 0.0;
    cJSON *tk = cJSON_AddObjectToObject(s, "tasks");
    for (int k = 0; k < mt->n_tasks; k++) {
        cJSON *t = cJSON_AddObjectToObject(tk, mt->tasks[k].name);
        cJSON_AddNumberToObject(t, "classes", mt->tasks[k].classes);
        cJSON_AddNumberToObject(t, "weight", mt->tasks[k].weight);
        cJSON_AddNumberToObject(t, "test_acc", res[k].acc);
        cJSON_AddNumberToObject(t, "test_loss", res[k].loss);
        mean += res[k].acc / mt->n_tasks;
    }
    cJSON_AddNumberToObject(s, "test_acc", mean); /* the mean over tasks */
    cJSON_AddStringToObject(root, "loss", loss);
    cJSON_AddNumberToObject(root, "threads", threads);
    kd_report_add_machine(root);
    char path[4200];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    kd_status st = run_write_json(path, root);
    cJSON_Delete(root);
    return st;
}

kd_status cli_run_multitask(const kd_config *cfg, const kd_train_opts *base, const kd_dataset *train,
                            const kd_dataset *test, const char *dir, int threads, kd_log *log) {
    if (*kd_config_str(cfg, "data", "label_map"))
        return kd_config_error(cfg, "data", "label_map", "a multi-task run maps labels per task ([multitask] maps)");
    if (*kd_config_str(cfg, "teacher", "cache") || *kd_config_str(cfg, "teacher", "ensemble") ||
        kd_config_int(cfg, "distill", "mutual") || *kd_config_str(cfg, "assistant", "model") ||
        kd_config_int(cfg, "data", "labeled") > 0)
        return kd_config_error(cfg, "multitask", "tasks",
                               "multi-task runs take one teacher per task ([multitask] teachers); [teacher] cache, "
                               "ensemble, [assistant], mutual learning and [data] labeled are not available with them");
    const char *spec = kd_config_str(cfg, "student", "model"), *loss = kd_config_str(cfg, "distill", "loss");
    if (!*spec) return kd_config_error(cfg, "student", "model", "a multi-task run needs the student's model");
    kd_mt_task tasks[KD_MAX_TASKS];
    int n = 0;
    kd_status st = kd_multitask_parse(kd_config_str(cfg, "multitask", "tasks"), kd_config_str(cfg, "multitask", "maps"),
                                      kd_config_str(cfg, "multitask", "weights"), train->n_classes, tasks, &n);
    if (st != KD_OK) return kd_error_prefix(st, "[multitask]");
    kd_loss_spec ls;
    st = kd_loss_spec_parse(loss, &ls);
    if (st != KD_OK) return kd_error_prefix(st, "[distill] loss");
    int need_t = kd_multitask_loss_uses_teacher(loss);
    static char paths[KD_MAX_TASKS][1024];
    teacher_out tout[KD_MAX_TASKS];
    memset(tout, 0, sizeof tout);
    int have_t = need_t || *kd_config_str(cfg, "multitask", "teachers");
    if (have_t) st = parse_paths(cfg, paths, n);
    for (int k = 0; k < n && st == KD_OK && have_t; k++) {
        st = task_teacher(cfg, base, train, test, &tasks[k], paths[k], log, &tout[k]);
        snprintf(tasks[k].teacher, sizeof tasks[k].teacher, "%.255s", tout[k].model);
    }
    if (st != KD_OK) return st;
    /* the student: task 0's labels in the loader, the others by the hook */
    kd_dataset tr, te;
    st = task_view(train, &tasks[0], &tr);
    if (st != KD_OK) return st;
    st = task_view(test, &tasks[0], &te);
    if (st != KD_OK) {
        free(tr.labels);
        return st;
    }
    if (te.n_classes > tr.n_classes) te.n_classes = tr.n_classes;
    kd_multitask mt;
    st = kd_multitask_build(&mt, spec, loss, tasks, n, &tr, base->batch, base->seed);
    if (st != KD_OK) st = kd_error_prefix(st, "multi-task student");
    for (int k = 0; k < n && st == KD_OK && mt.has_teachers; k++) st = kd_checkpoint_load(mt.c.g, &mt.teachers[k], paths[k]);
    kd_train_result r;
    memset(&r, 0, sizeof r);
    kd_eval_result res[KD_MAX_TASKS];
    int64_t params = 0;
    if (st == KD_OK) {
        params = kd_multitask_params(&mt);
        kd_log_info(log, "multi-task student %s (%lld params, %d heads), loss %s on each of %d tasks", spec,
                    (long long)params, n, loss, n);
        kd_train_opts o = *base;
        o.role = "student";
        o.terms = &mt.loss;
        o.batch_hook = kd_multitask_batch;
        o.hook_ctx = &mt;
        o.state_path = NULL;
        o.resume = 0;
        mt.orig_labels = train->labels;
        mt.epochs = o.epochs;
        mt.steps_per_epoch = (tr.n + o.batch - 1) / o.batch;
        st = kd_train_classifier(&mt.c, &tr, &te, &o, log, &r);
    }
    if (st == KD_OK) {
        kd_multitask_evaluate(&mt, test, base->batch, res);
        for (int k = 0; k < n; k++) {
            kd_log_info(log, "task '%s' (%d classes): test acc %.2f%%, test loss %.4f", tasks[k].name, tasks[k].classes,
                        100.0 * res[k].acc, res[k].loss);
            if (log->metrics)
                fprintf(log->metrics,
                        "{\"role\":\"student_%s\",\"epoch\":%d,\"step\":%lld,\"test_loss\":%.6g,\"test_acc\":%.6g}\n",
                        tasks[k].name, mt.epochs, (long long)mt.epochs * mt.steps_per_epoch, res[k].loss, res[k].acc);
        }
        if (log->metrics) fflush(log->metrics);
        char path[4200];
        for (int k = 0; k < n && st == KD_OK; k++) {
            snprintf(path, sizeof path, "%.4000s/student_%.31s.safetensors", dir, tasks[k].name);
            st = kd_multitask_save(&mt, k, &tr, path);
        }
    }
    if (st == KD_OK) st = write_summary(dir, &mt, tout, have_t, res, &r, params, spec, loss, threads);
    if (st == KD_OK) {
        printf("%-16s %-34s %8s %9s\n", "model", "spec", "classes", "test acc");
        for (int k = 0; k < n && have_t; k++) {
            char role[48];
            snprintf(role, sizeof role, "teacher_%.31s", tasks[k].name);
            printf("%-16s %-34.34s %8d %8.2f%%\n", role, tout[k].model, tasks[k].classes, 100.0 * tout[k].test.acc);
        }
        for (int k = 0; k < n; k++) {
            char role[48];
            snprintf(role, sizeof role, "student_%.31s", tasks[k].name);
            printf("%-16s %-34.34s %8d %8.2f%%\n", role, spec, tasks[k].classes, 100.0 * res[k].acc);
        }
        kd_log_info(log, "wrote %s", dir);
    }
    if (mt.c.g) kd_multitask_free(&mt);
    free(tr.labels);
    free(te.labels);
    return st;
}
