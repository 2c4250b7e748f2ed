/* checkpoint.c - a model's parameters and buffers to and from safetensors.
 *
 * Names are the model's own, without the graph prefix ("t." for a teacher),
 * so a teacher checkpoint loads as a student and the reverse. BN's
 * num_batches_tracked is stored as I64 like PyTorch. Metadata carries what
 * `distill eval` needs to rebuild the model: spec, classes, input geometry,
 * normalisation. Loading is strict: a missing, misshapen or unexpected tensor
 * is an error naming it.
 */
#include <stdlib.h>
#include <string.h>

#include "kd_io.h"
#include "kd_train.h"

static int in_model(const kd_node *n, const kd_model *m) {
    return strncmp(n->name, m->prefix, strlen(m->prefix)) == 0;
}

kd_status kd_checkpoint_save(const kd_graph *g, const kd_model *m, const kd_dataset *ds, const char *path) {
    kd_st_writer *w = kd_st_writer_new();
    size_t pl = strlen(m->prefix);
    for (int i = 0; i < kd_graph_n_state(g); i++) {
        kd_node *n = kd_graph_state(g, i);
        if (!in_model(n, m)) continue;
        if (n->flags & KD_F_I64) {
            int64_t v = (int64_t)n->val.data[0], shape[1] = {0};
            kd_st_add(w, n->name + pl, KD_I64, 0, shape, &v);
        } else {
            kd_st_add_f32(w, n->name + pl, n->val.ndim, n->val.shape, n->val.data);
        }
    }
    char buf[64];
    kd_st_set_meta(w, "format", "distill/1");
    kd_st_set_meta(w, "model", m->spec);
    snprintf(buf, sizeof buf, "%d", m->logits->val.shape[1]);
    kd_st_set_meta(w, "classes", buf);
    snprintf(buf, sizeof buf, "%d,%d,%d", ds->c, ds->h, ds->w);
    kd_st_set_meta(w, "input", buf);
    snprintf(buf, sizeof buf, "%.9g,%.9g", ds->mean, ds->std);
    kd_st_set_meta(w, "normalize", buf);
    kd_status st = kd_st_write(w, path);
    kd_st_writer_free(w);
    return st;
}

kd_status kd_checkpoint_load(kd_graph *g, const kd_model *m, const char *path) {
    kd_safetensors st;
    kd_status s = kd_st_read(path, &st);
    if (s != KD_OK) return s;
    size_t pl = strlen(m->prefix);
    int used = 0;
    for (int i = 0; i < kd_graph_n_state(g) && s == KD_OK; i++) {
        kd_node *n = kd_graph_state(g, i);
        if (!in_model(n, m)) continue;
        const char *name = n->name + pl;
        if (n->flags & KD_F_I64) {
            const kd_st_tensor *t = kd_st_find(&st, name);
            if (!t) {
                s = kd_errorf(KD_EFORMAT, "%s: tensor '%s' not found (model %s)", path, name, m->spec);
                break;
            }
            if (t->ndim != 0 || t->nbytes != kd_dtype_size(t->dtype) || (t->dtype != KD_I64 && t->dtype != KD_F32)) {
                s = kd_errorf(KD_EFORMAT, "%s: tensor '%s' must be a scalar I64", path, name);
                break;
            }
            int64_t v = 0;
            if (t->dtype == KD_I64)
                memcpy(&v, t->data, 8);
            else {
                float f;
                memcpy(&f, t->data, 4);
                v = (int64_t)f;
            }
            n->val.data[0] = (float)v;
        } else {
            if (!kd_st_find(&st, name)) {
                s = kd_errorf(KD_EFORMAT, "%s: tensor '%s' not found (model %s)", path, name, m->spec);
                break;
            }
            s = kd_st_get_f32(&st, name, n->val.data, n->val.ndim, n->val.shape);
        }
        used++;
    }
    if (s == KD_OK && used != st.n) {
        for (int i = 0; i < st.n; i++) {
            char full[256];
            snprintf(full, sizeof full, "%s%s", m->prefix, st.tensors[i].name);
            kd_node *n = kd_graph_find(g, full);
            if (!n || !(n->flags & (KD_F_PARAM | KD_F_BUFFER))) {
                s = kd_errorf(KD_EFORMAT, "%s: unexpected tensor '%s' for model '%s'", path, st.tensors[i].name,
                              m->spec);
                break;
            }
        }
    }
    kd_st_free(&st);
    return s;
}

kd_status kd_checkpoint_info_read(const char *path, kd_checkpoint_info *info) {
    kd_safetensors st;
    kd_status s = kd_st_read(path, &st);
    if (s != KD_OK) return s;
    memset(info, 0, sizeof *info);
    const char *model = kd_st_meta(&st, "model"), *classes = kd_st_meta(&st, "classes");
    const char *input = kd_st_meta(&st, "input"), *norm = kd_st_meta(&st, "normalize");
    if (!model || !classes || !input || !norm) {
        kd_st_free(&st);
        return kd_errorf(KD_EFORMAT,
                         "%s: metadata lacks 'model', 'classes', 'input' or 'normalize' (not written by distill? "
                         "name the model in a config instead)",
                         path);
    }
    snprintf(info->model, sizeof info->model, "%s", model);
    int ok = sscanf(classes, "%d", &info->classes) == 1 && sscanf(input, "%d,%d,%d", &info->c, &info->h, &info->w) == 3 &&
             sscanf(norm, "%f,%f", &info->mean, &info->std) == 2 && info->classes >= 2 && info->c > 0 && info->h > 0 &&
             info->w > 0 && info->std > 0.0f;
    kd_st_free(&st);
    if (!ok) return kd_errorf(KD_EFORMAT, "%s: malformed metadata (classes/input/normalize)", path);
    return KD_OK;
}
