/* multitask.c - the multi-task student: a shared trunk with one linear head
 * per task, each task's loss against its own frozen teacher, all in one
 * graph (include/kd_multitask.h has the picture). Also parsing of the task
 * list, the trainer's batch hook (per-task labels, annealing progress),
 * per-task evaluation and per-task checkpoints.
 *
 * Deliberately not here: the training loop (kd_train_classifier runs it,
 * with this file's batch hook), training the teachers and the run
 * directory (src/cli/run_multitask.c), the annealed loss (anneal.c).
 */
#include <ctype.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "distill/build.h"
#include "kd_data.h"
#include "kd_io.h"
#include "kd_multitask.h"

/* ---------------------------------------------------------------- parsing */

kd_status kd_multitask_parse(const char *names, const char *maps, const char *weights, int n_classes,
                             kd_mt_task *tasks, int *n_tasks) {
    int n = 0;
    for (const char *p = names; *p;) {
        while (*p == ' ' || *p == '\t' || *p == ',') p++;
        if (!*p) break;
        size_t L = strcspn(p, " \t,");
        if (n == KD_MAX_TASKS) return kd_errorf(KD_ECONFIG, "tasks: more than %d tasks", KD_MAX_TASKS);
        if (L >= sizeof tasks[0].name) return kd_errorf(KD_ECONFIG, "tasks: name '%.*s' too long", (int)L, p);
        kd_mt_task *t = &tasks[n];
        memset(t, 0, sizeof *t);
        memcpy(t->name, p, L);
        for (size_t i = 0; i < L; i++)
            if (!isalnum((unsigned char)p[i]) && p[i] != '_')
                return kd_errorf(KD_ECONFIG, "tasks: name '%s' may hold only letters, digits and '_'", t->name);
        for (int j = 0; j < n; j++)
            if (strcmp(tasks[j].name, t->name) == 0) return kd_errorf(KD_ECONFIG, "tasks: '%s' twice", t->name);
        t->weight = 1.0f;
        n++;
        p += L;
    }
    if (n == 0) return kd_errorf(KD_ECONFIG, "tasks: no task named");
    /* maps: one per task, '|' between them */
    const char *p = maps;
    for (int k = 0; k < n; k++) {
        size_t L = strcspn(p, "|");
        char buf[1024];
        if (L >= sizeof buf) return kd_errorf(KD_ECONFIG, "maps: the map of task '%s' is too long", tasks[k].name);
        memcpy(buf, p, L);
        buf[L] = '\0';
        kd_status st = kd_label_map_parse(buf, tasks[k].map, 256, &tasks[k].n_map);
        if (st != KD_OK) return kd_error_prefix(KD_ECONFIG, "maps: task '%s'", tasks[k].name);
        if (tasks[k].n_map != n_classes)
            return kd_errorf(KD_ECONFIG, "maps: task '%s' maps %d classes, the data has %d", tasks[k].name,
                             tasks[k].n_map, n_classes);
        int used[256] = {0}, mx = -1;
        for (int i = 0; i < tasks[k].n_map; i++) {
            int v = tasks[k].map[i];
            if (v < 0 || v > 255) return kd_errorf(KD_ECONFIG, "maps: task '%s': label %d outside [0, 255]", tasks[k].name, v);
            used[v] = 1;
            mx = v > mx ? v : mx;
        }
        for (int v = 0; v <= mx; v++)
            if (!used[v]) return kd_errorf(KD_ECONFIG, "maps: task '%s' never produces label %d", tasks[k].name, v);
        if (mx < 1) return kd_errorf(KD_ECONFIG, "maps: task '%s' has one class only", tasks[k].name);
        tasks[k].classes = mx + 1;
        p += L;
        if (k + 1 < n) {
            if (*p != '|') return kd_errorf(KD_ECONFIG, "maps: %d tasks but %d maps ('|' between maps)", n, k + 1);
            p++;
        }
    }
    if (*p) return kd_errorf(KD_ECONFIG, "maps: more maps than the %d tasks", n);
    /* weights */
    int k = 0;
    for (const char *q = weights; *q;) {
        while (*q == ' ' || *q == '\t' || *q == ',') q++;
        if (!*q) break;
        char *end;
        double w = strtod(q, &end);
        if (end == q || !isfinite(w) || w < 0) return kd_errorf(KD_ECONFIG, "weights: not a list of numbers >= 0");
        if (k == n) return kd_errorf(KD_ECONFIG, "weights: more than the %d tasks", n);
        tasks[k++].weight = (float)w;
        q = end;
    }
    if (k && k != n) return kd_errorf(KD_ECONFIG, "weights: %d numbers for %d tasks", k, n);
    *n_tasks = n;
    return KD_OK;
}

int kd_multitask_loss_uses_teacher(const char *loss) {
    kd_loss_spec sp;
    if (kd_loss_spec_parse(loss, &sp) != KD_OK) return 0;
    for (int i = 0; i < sp.n; i++) {
        const kd_loss_def *d = kd_loss_def_find(sp.terms[i].name);
        if (d && d->teacher) return 1;
    }
    return 0;
}

/* ---------------------------------------------------------------- graph */

kd_status kd_multitask_build(kd_multitask *mt, const char *student, const char *loss, const kd_mt_task *tasks,
                             int n_tasks, const kd_dataset *ds, int max_batch, uint64_t seed) {
    memset(mt, 0, sizeof *mt);
    KD_ASSERT(n_tasks >= 1 && n_tasks <= KD_MAX_TASKS, "%d tasks", n_tasks);
    mt->n_tasks = n_tasks;
    memcpy(mt->tasks, tasks, (size_t)n_tasks * sizeof *tasks);
    mt->cur_epoch = -1;
    kd_loss_spec spec;
    kd_status st = kd_loss_spec_parse(loss, &spec);
    if (st != KD_OK) return st;
    mt->has_teachers = kd_multitask_loss_uses_teacher(loss);
    for (int k = 0; k < n_tasks && mt->has_teachers; k++)
        if (!tasks[k].teacher[0]) return kd_errorf(KD_ECONFIG, "task '%s' has no teacher and the loss reads one", tasks[k].name);
    kd_classifier *c = &mt->c;
    c->g = kd_graph_new();
    int xs[4] = {max_batch, ds->c, ds->h, ds->w}, ys[1] = {max_batch};
    c->x = kd_input(c->g, "x", 4, xs);
    c->y = kd_input(c->g, "y", 1, ys);
    st = kd_model_build(c->g, student, "s.", c->x, tasks[0].classes, &c->m);
    if (st != KD_OK) goto fail;
    mt->logits[0] = c->m.logits;
    mt->labels[0] = c->y;
    kd_node *feat = c->m.feat->val.ndim == 2 ? c->m.feat : kd_flatten(c->g, c->m.feat);
    for (int k = 1; k < n_tasks; k++) {
        char pre[48];
        snprintf(pre, sizeof pre, "mt%d.head", k);
        mt->logits[k] = kd_dense(c->g, pre, feat, tasks[k].classes);
        char nm[64];
        snprintf(nm, sizeof nm, "%s.weight", pre);
        mt->heads_w[k] = kd_graph_find(c->g, nm);
        snprintf(nm, sizeof nm, "%s.bias", pre);
        mt->heads_b[k] = kd_graph_find(c->g, nm);
        KD_ASSERT(mt->heads_w[k] && mt->heads_b[k], "head parameters of task %d not found", k);
        snprintf(nm, sizeof nm, "y_%s", tasks[k].name);
        mt->labels[k] = kd_input(c->g, nm, 1, ys);
    }
    if (mt->has_teachers) {
        kd_graph_set_frozen(c->g, 1);
        for (int k = 0; k < n_tasks && st == KD_OK; k++) {
            char pre[16];
            snprintf(pre, sizeof pre, "t%d.", k);
            st = kd_model_build(c->g, tasks[k].teacher, pre, c->x, tasks[k].classes, &mt->teachers[k]);
            if (st != KD_OK) st = kd_error_prefix(st, "teacher of task '%s'", tasks[k].name);
        }
        kd_graph_set_frozen(c->g, 0);
        if (st != KD_OK) goto fail;
    }
    kd_node *total = NULL;
    for (int k = 0; k < n_tasks; k++) {
        char pp[16];
        snprintf(pp, sizeof pp, "mt%d.", k);
        kd_loss_inputs in = {.student = &c->m,
                             .teacher = mt->has_teachers ? &mt->teachers[k] : NULL,
                             .s_logits = mt->logits[k],
                             .t_logits = mt->has_teachers ? mt->teachers[k].logits : NULL,
                             .labels = mt->labels[k],
                             .proj_prefix = pp,
                             .n_data = ds->n};
        kd_built_loss bl;
        st = kd_loss_build(c->g, &spec, &in, &bl);
        if (st != KD_OK) {
            st = kd_error_prefix(st, "task '%s'", tasks[k].name);
            goto fail;
        }
        if (mt->loss.n + bl.n > KD_MAX_TERMS) {
            st = kd_errorf(KD_ECONFIG, "%d tasks x %d terms: more than %d terms in all", n_tasks, bl.n, KD_MAX_TERMS);
            goto fail;
        }
        for (int i = 0; i < bl.n; i++) {
            kd_built_term *t = &mt->loss.terms[mt->loss.n++];
            *t = bl.terms[i];
            snprintf(t->name, sizeof t->name, "%.15s.%.15s", tasks[k].name, bl.terms[i].name);
            kd_node_set_name(t->value, "loss.%s.%d.%s", tasks[k].name, i + 1, bl.terms[i].name);
        }
        kd_node_set_name(bl.total, "loss.%s", tasks[k].name);
        kd_node *w = kd_scale(c->g, bl.total, tasks[k].weight);
        total = total ? kd_add(c->g, total, w) : w;
        mt->loss.uses_teacher |= bl.uses_teacher;
    }
    kd_node_set_name(total, "loss");
    mt->loss.total = total;
    c->loss = total;
    st = kd_graph_compile(c->g, max_batch, seed);
    if (st != KD_OK) goto fail;
    kd_loss_set_epoch(&mt->loss, 1e9);
    kd_anneal_set_progress(&mt->loss, 0.0);
    return KD_OK;
fail:
    kd_graph_free(c->g);
    c->g = NULL;
    return st;
}

void kd_multitask_free(kd_multitask *mt) {
    if (mt->c.g) kd_graph_free(mt->c.g);
    mt->c.g = NULL;
}

int64_t kd_multitask_params(const kd_multitask *mt) {
    int64_t n = kd_model_params(mt->c.g, &mt->c.m);
    for (int k = 1; k < mt->n_tasks; k++) n += kd_numel(&mt->heads_w[k]->val) + kd_numel(&mt->heads_b[k]->val);
    return n;
}

/* ---------------------------------------------------------------- training */

kd_status kd_multitask_batch(void *ctx, int epoch, const int *aug, int B) {
    kd_multitask *mt = ctx;
    KD_ASSERT(mt->orig_labels, "kd_multitask_batch without orig_labels");
    const float *y0 = mt->c.y->val.data;
    for (int k = 1; k < mt->n_tasks; k++) {
        float *y = mt->labels[k]->val.data;
        const int *map = mt->tasks[k].map;
        for (int i = 0; i < B; i++) y[i] = y0[i] < 0.0f ? -1.0f : (float)map[mt->orig_labels[aug[4 * i + 3]]];
    }
    if (epoch != mt->cur_epoch) {
        mt->cur_epoch = epoch;
        mt->cur_batch = 0;
    }
    double total = (double)mt->epochs * mt->steps_per_epoch;
    double done = (double)epoch * mt->steps_per_epoch + mt->cur_batch;
    kd_anneal_set_progress(&mt->loss, total > 0 ? done / total : 0.0);
    mt->cur_batch++;
    return KD_OK;
}

/* ---------------------------------------------------------------- evaluation */

void kd_multitask_evaluate(kd_multitask *mt, const kd_dataset *ds, int batch, kd_eval_result *res) {
    kd_classifier *c = &mt->c;
    int n = mt->n_tasks, B;
    double loss[KD_MAX_TASKS] = {0};
    int correct[KD_MAX_TASKS] = {0}, total = 0;
    float *orig = kd_malloc((size_t)batch * sizeof(float));
    kd_loader_opts lo = {.batch = batch};
    kd_loader *ld = kd_loader_new(ds, &lo);
    kd_node *last = mt->logits[0];
    for (int k = 1; k < n; k++)
        if (mt->logits[k]->id > last->id) last = mt->logits[k];
    while ((B = kd_loader_next(ld, c->x->val.data, orig, NULL)) > 0) {
        kd_graph_set_batch(c->g, B);
        kd_graph_forward_to(c->g, 0, last);
        for (int b = 0; b < B; b++) {
            int o = (int)orig[b];
            KD_ASSERT(o >= 0 && o < mt->tasks[0].n_map, "label %d outside the task maps", o);
            for (int k = 0; k < n; k++) {
                int K = mt->tasks[k].classes, y = mt->tasks[k].map[o], best = 0;
                const float *z = mt->logits[k]->val.data + (size_t)b * K;
                double m = z[0], se = 0.0;
                for (int j = 1; j < K; j++) {
                    if (z[j] > z[best]) best = j;
                    if (z[j] > m) m = z[j];
                }
                for (int j = 0; j < K; j++) se += exp((double)z[j] - m);
                loss[k] += m + log(se) - z[y];
                correct[k] += best == y;
            }
        }
        total += B;
    }
    kd_loader_free(ld);
    free(orig);
    for (int k = 0; k < n; k++) {
        res[k].acc = total ? (double)correct[k] / total : 0.0;
        res[k].loss = total ? loss[k] / total : 0.0;
        res[k].n = total;
    }
}

/* ---------------------------------------------------------------- checkpoints */

kd_status kd_multitask_save(const kd_multitask *mt, int k, const kd_dataset *ds, const char *path) {
    KD_ASSERT(k >= 0 && k < mt->n_tasks, "task %d of %d", k, mt->n_tasks);
    const kd_model *m = &mt->c.m;
    if (k == 0) return kd_checkpoint_save(mt->c.g, m, ds, path);
    kd_st_writer *w = kd_st_writer_new();
    size_t pl = strlen(m->prefix);
    for (int i = 0; i < kd_graph_n_state(mt->c.g); i++) {
        kd_node *n = kd_graph_state(mt->c.g, i);
        if (strncmp(n->name, m->prefix, pl) != 0 || strncmp(n->name + pl, "head.", 5) == 0) continue;
        if (n->flags & KD_F_I64) {
            int64_t v = (int64_t)n->val.data[0], shape[1] = {0};
            kd_st_add(w, n->name + pl, KD_I64, 0, shape, &v);
        } else {
            kd_st_add_f32(w, n->name + pl, n->val.ndim, n->val.shape, n->val.data);
        }
    }
    const kd_node *hw = mt->heads_w[k], *hb = mt->heads_b[k];
    kd_st_add_f32(w, "head.weight", hw->val.ndim, hw->val.shape, hw->val.data);
    kd_st_add_f32(w, "head.bias", hb->val.ndim, hb->val.shape, hb->val.data);
    char buf[64];
    kd_st_set_meta(w, "format", "distill/1");
    kd_st_set_meta(w, "model", m->spec);
    snprintf(buf, sizeof buf, "%d", mt->tasks[k].classes);
    kd_st_set_meta(w, "classes", buf);
    snprintf(buf, sizeof buf, "%d,%d,%d", ds->c, ds->h, ds->w);
    kd_st_set_meta(w, "input", buf);
    snprintf(buf, sizeof buf, "%.9g,%.9g", ds->mean, ds->std);
    kd_st_set_meta(w, "normalize", buf);
    kd_st_set_meta(w, "task", mt->tasks[k].name);
    kd_status st = kd_st_write(w, path);
    kd_st_writer_free(w);
    return st;
}
