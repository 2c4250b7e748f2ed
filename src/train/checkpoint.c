/* checkpoint.c - a model's parameters and buffers to and from safetensors.
 *
 * Names are the model's own, without the graph prefix ("t." for a teacher),
 * so a teacher checkpoint loads as a student and the reverse. BN's
 * num_batches_tracked is stored as I64 like PyTorch. Metadata carries what
 * `distill eval` needs to rebuild the model: spec, classes, input geometry,
 * normalisation. Loading is strict: a missing, misshapen or unexpected tensor
 * is an error naming it.
 *
 * A checkpoint saved by PyTorch under other names loads through a name map
 * (docs/interop.md): explicit `theirs = ours` pairs (a pair may name a module
 * prefix and cover all its tensors), or "auto", which pairs tensors by leaf
 * name and shape and, where several share both, by the numbers in their
 * names (nn.Sequential indices count up in the order the layers run); it
 * refuses whenever the names do not decide. Floating tensors may be F32,
 * F16, BF16 or F64 (converted exactly, F64 rounded); a missing
 * num_batches_tracked reads as 0 under a name map.
 */
#include <ctype.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "kd_io.h"
#include "kd_train.h"
static int in_model(const kd_node *n, const kd_model *m) {
    return strncmp(n->name, m->prefix, strlen(m->prefix)) == 0;
}

kd_status kd_checkpoint_save(const kd_graph *g, const kd_model *m, const kd_dataset *ds, const char *path) {
    return kd_checkpoint_save_groups(g, m, ds, 1, path);
}

kd_status kd_checkpoint_save_groups(const kd_graph *g, const kd_model *m, const kd_dataset *ds, int groups,
                                    const char *path) {
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
    if (groups > 1) {
        snprintf(buf, sizeof buf, "%d", groups);
        kd_st_set_meta(w, "groups", buf);
    }
    kd_status st = kd_st_write(w, path);
    kd_st_writer_free(w);
    return st;
}

/* ---------------------------------------------------------------- loading */

/* One tensor of the model and where in the file it comes from. */
typedef struct want {
    const char *name; /* the model's name, without the prefix */
    kd_node *n;
    int ndim; /* as stored: num_batches_tracked is a 0-d scalar */
    int64_t shape[KD_ST_MAX_DIM];
    int i64;
    int src; /* index into the file's tensors, -1: none yet */
} want;

typedef struct loadctx {
    const kd_safetensors *st;
    const kd_model *m;
    want *w;
    int nw;
    int *used; /* per file tensor: the want it feeds, or -1 */
} loadctx;

static int find_want(const loadctx *c, const char *name) {
    for (int i = 0; i < c->nw; i++)
        if (strcmp(c->w[i].name, name) == 0) return i;
    return -1;
}

static int find_file(const loadctx *c, const char *name) {
    for (int j = 0; j < c->st->n; j++)
        if (strcmp(c->st->tensors[j].name, name) == 0) return j;
    return -1;
}

static const char *shape_str(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t k = (size_t)snprintf(buf, n, "(");
    for (int i = 0; i < ndim && k < n; i++) k += (size_t)snprintf(buf + k, n - k, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (k < n) snprintf(buf + k, n - k, ")");
    return buf;
}

/* "'theirs'" or "'theirs' (the model's 'ours')" */
static const char *desc(const loadctx *c, int i, char *buf, size_t n) {
    const char *theirs = c->st->tensors[c->w[i].src].name;
    if (strcmp(theirs, c->w[i].name) == 0)
        snprintf(buf, n, "'%s'", theirs);
    else
        snprintf(buf, n, "'%.200s' (the model's '%.200s')", theirs, c->w[i].name);
    return buf;
}

static void pair(loadctx *c, int i, int j) {
    c->w[i].src = j;
    c->used[j] = i;
}

/* The file's own names (strict). */
static kd_status match_exact(loadctx *c) {
    for (int i = 0; i < c->nw; i++) {
        int j = find_file(c, c->w[i].name);
        if (j < 0) return kd_errorf(KD_EFORMAT, "%s: tensor '%s' not found (model %s)", c->st->path, c->w[i].name, c->m->spec);
        pair(c, i, j);
    }
    return KD_OK;
}

/* After the copy, so a misshapen tensor is reported before the extras. */
static kd_status check_unused(const loadctx *c) {
    for (int j = 0; j < c->st->n; j++)
        if (c->used[j] < 0)
            return kd_errorf(KD_EFORMAT, "%s: unexpected tensor '%s' for model '%s'", c->st->path, c->st->tensors[j].name,
                             c->m->spec);
    return KD_OK;
}

/* ---- explicit map: "theirs = ours" entries separated by commas or newlines */

typedef struct entry {
    char theirs[256], ours[256];
    int line;
} entry;

static void trim(char *s) {
    size_t n = strlen(s), a = 0;
    while (a < n && isspace((unsigned char)s[a])) a++;
    while (n > a && isspace((unsigned char)s[n - 1])) n--;
    memmove(s, s + a, n - a);
    s[n - a] = '\0';
}

/* where an entry came from: "map.txt:3" or "inline" */
static const char *entry_at(const entry *e, const char *origin, char *buf, size_t n) {
    if (origin)
        snprintf(buf, n, "%.300s:%d", origin, e->line);
    else
        snprintf(buf, n, "inline");
    return buf;
}

/* Splits text into entries ('#' starts a comment up to the end of the line;
 * empty entries are skipped). origin: the map file, NULL for inline text. */
static kd_status parse_map(const char *path, const char *text, const char *origin, entry **out, int *n_out) {
    int cap = 16, n = 0, line = 1;
    entry *e = kd_malloc((size_t)cap * sizeof(entry));
    const char *p = text;
    while (*p) {
        size_t len = strcspn(p, ",\n#");
        char item[600];
        if (len >= sizeof item) {
            free(e);
            return kd_errorf(KD_ECONFIG, "%s: names: entry too long (%s%s%d)", path, origin ? origin : "inline",
                             origin ? ":" : "", line);
        }
        memcpy(item, p, len);
        item[len] = '\0';
        trim(item);
        if (*item) {
            char orig[600], where[400];
            memcpy(orig, item, strlen(item) + 1);
            char *eq = strchr(item, '=');
            entry tmp = {.line = line};
            entry_at(&tmp, origin, where, sizeof where);
            if (eq) {
                *eq = '\0';
                trim(item);
                char *rhs = eq + 1;
                trim(rhs);
                size_t lt = strlen(item), lo = strlen(rhs);
                if (lt >= sizeof tmp.theirs || lo >= sizeof tmp.ours) {
                    free(e);
                    return kd_errorf(KD_ECONFIG, "%s: names entry (%s): a name longer than %zu characters", path, where,
                                     sizeof tmp.theirs - 1);
                }
                memcpy(tmp.theirs, item, lt + 1);
                memcpy(tmp.ours, rhs, lo + 1);
            }
            if (!eq || !*tmp.theirs || !*tmp.ours || strchr(tmp.ours, '=')) {
                free(e);
                return kd_errorf(KD_ECONFIG, "%s: names entry '%s' (%s) is not THEIRS = OURS", path, orig, where);
            }
            if (n == cap) e = kd_realloc(e, (size_t)(cap *= 2) * sizeof(entry));
            e[n++] = tmp;
        }
        p += len;
        if (*p == '#') p += strcspn(p, "\n");
        if (*p == '\n') line++;
        if (*p) p++;
    }
    *out = e;
    *n_out = n;
    return KD_OK;
}

/* Applies one entry: a tensor of the file, else every tensor under the
 * module prefix "theirs.", renamed to the same leaf under "ours.". */
static kd_status apply_entry(loadctx *c, const entry *e, const char *origin) {
    const char *path = c->st->path;
    char where[400];
    entry_at(e, origin, where, sizeof where);
    size_t tl = strlen(e->theirs);
    int hits = 0;
    for (int j = 0; j < c->st->n; j++) {
        const char *name = c->st->tensors[j].name;
        char ours[600];
        if (strcmp(name, e->theirs) == 0)
            snprintf(ours, sizeof ours, "%s", e->ours);
        else if (strncmp(name, e->theirs, tl) == 0 && name[tl] == '.')
            snprintf(ours, sizeof ours, "%s%s", e->ours, name + tl);
        else
            continue;
        hits++;
        if (c->used[j] >= 0)
            return kd_errorf(KD_ECONFIG, "%s: names entry '%s = %s' (%s): the file's tensor '%s' is already mapped to '%s'",
                             path, e->theirs, e->ours, where, name, c->w[c->used[j]].name);
        int i = find_want(c, ours);
        if (i < 0)
            return kd_errorf(KD_ECONFIG,
                             "%s: names entry '%s = %s' (%s): the model has no tensor '%s' for the file's '%s' (model %s; "
                             "docs/models.md lists its names)",
                             path, e->theirs, e->ours, where, ours, name, c->m->spec);
        if (c->w[i].src >= 0)
            return kd_errorf(KD_ECONFIG, "%s: names entry '%s = %s' (%s): the model's tensor '%s' already receives '%s'",
                             path, e->theirs, e->ours, where, ours, c->st->tensors[c->w[i].src].name);
        pair(c, i, j);
    }
    if (!hits)
        return kd_errorf(KD_ECONFIG, "%s: names entry '%s = %s' (%s): the file has no tensor '%s' and none under '%s.'",
                         path, e->theirs, e->ours, where, e->theirs, e->theirs);
    return KD_OK;
}

static kd_status match_map(loadctx *c, const char *text, const char *origin) {
    entry *e = NULL; /* parse_map leaves it alone on an error */
    int n = 0;
    kd_status s = parse_map(c->st->path, text, origin, &e, &n);
    for (int k = 0; k < n && s == KD_OK; k++) s = apply_entry(c, &e[k], origin);
    free(e);
    if (s != KD_OK) return s;
    /* what no entry mentions keeps its name */
    for (int i = 0; i < c->nw; i++) {
        if (c->w[i].src >= 0) continue;
        int j = find_file(c, c->w[i].name);
        if (j >= 0 && c->used[j] < 0) {
            pair(c, i, j);
            continue;
        }
        if (!c->w[i].i64) /* a missing num_batches_tracked reads as 0 */
            return kd_errorf(KD_EFORMAT,
                             "%s: the model's tensor '%s' (model %s) has no source: no names entry maps to it and the file "
                             "has no free tensor of that name",
                             c->st->path, c->w[i].name, c->m->spec);
    }
    for (int j = 0; j < c->st->n; j++)
        if (c->used[j] < 0)
            return kd_errorf(KD_EFORMAT, "%s: the file's tensor '%s' is not used: no names entry maps it to the model (%s)",
                             c->st->path, c->st->tensors[j].name, c->m->spec);
    return KD_OK;
}

/* ---- automatic match */

static const char *leaf(const char *name) {
    const char *d = strrchr(name, '.');
    return d ? d + 1 : name;
}

/* length of the module part of a name ("features.1" of "features.1.weight") */
static size_t module_len(const char *name) {
    const char *d = strrchr(name, '.');
    return d ? (size_t)(d - name) : 0;
}

/* Names equal once every run of digits is replaced by one placeholder. */
static int same_skeleton(const char *a, const char *b) {
    while (*a && *b) {
        int da = isdigit((unsigned char)*a), db = isdigit((unsigned char)*b);
        if (da != db) return 0;
        if (da) {
            while (isdigit((unsigned char)*a)) a++;
            while (isdigit((unsigned char)*b)) b++;
        } else if (*a++ != *b++) {
            return 0;
        }
    }
    return *a == *b;
}

/* Orders names of one skeleton by their numbers, left to right. */
static int numeric_cmp(const char *a, const char *b) {
    const char *a0 = a, *b0 = b;
    while (*a && *b) {
        if (isdigit((unsigned char)*a) && isdigit((unsigned char)*b)) {
            while (*a == '0' && isdigit((unsigned char)a[1])) a++;
            while (*b == '0' && isdigit((unsigned char)b[1])) b++;
            size_t la = 0, lb = 0;
            while (isdigit((unsigned char)a[la])) la++;
            while (isdigit((unsigned char)b[lb])) lb++;
            if (la != lb) return la < lb ? -1 : 1;
            int r = strncmp(a, b, la);
            if (r) return r;
            a += la;
            b += lb;
        } else {
            if (*a != *b) return (unsigned char)*a < (unsigned char)*b ? -1 : 1;
            a++;
            b++;
        }
    }
    if (*a || *b) return *a ? 1 : -1;
    return strcmp(a0, b0);
}

static int file_shape_is(const kd_st_tensor *t, const want *w) {
    if (t->ndim != w->ndim) return 0;
    for (int d = 0; d < w->ndim; d++)
        if (t->shape[d] != w->shape[d]) return 0;
    return 1;
}

/* Appends "a, b, c" (up to 6 names, then "and N more") to buf. */
static void list_names(char *buf, size_t n, const char *const *names, int k) {
    size_t at = strlen(buf);
    for (int i = 0; i < k && at < n; i++) {
        if (i == 6) {
            snprintf(buf + at, n - at, ", and %d more", k - 6);
            return;
        }
        at += (size_t)snprintf(buf + at, n - at, "%s%s", i ? ", " : "", names[i]);
    }
}

#define AUTO_HINT "give the names explicitly (names = THEIRS = OURS, ...; docs/interop.md)"

static kd_status match_auto(loadctx *c) {
    const char *path = c->st->path;
    int nw = c->nw, nf = c->st->n;
    int *cls = kd_malloc((size_t)(nw + nf + 2) * sizeof(int)); /* our members, then theirs */
    const char **names = kd_malloc((size_t)(nw + nf + 2) * sizeof(char *));
    char *done = kd_calloc((size_t)nw + 1, 1);
    kd_status s = KD_OK;
    for (int i0 = 0; i0 < nw && s == KD_OK; i0++) {
        if (done[i0]) continue;
        const want *w0 = &c->w[i0];
        const char *lf = leaf(w0->name);
        int no = 0, nt = 0;
        for (int i = i0; i < nw; i++) {
            const want *w = &c->w[i];
            if (done[i] || strcmp(leaf(w->name), lf) != 0 || w->ndim != w0->ndim) continue;
            int same = 1;
            for (int d = 0; d < w->ndim; d++) same &= w->shape[d] == w0->shape[d];
            if (!same) continue;
            done[i] = 1;
            cls[no++] = i;
        }
        int *th = cls + no;
        for (int j = 0; j < nf; j++)
            if (strcmp(leaf(c->st->tensors[j].name), lf) == 0 && file_shape_is(&c->st->tensors[j], w0)) th[nt++] = j;
        if (nt == 0 && w0->i64) continue; /* num_batches_tracked may be absent: reads as 0 */
        char sh[128], msg[2048];
        shape_str(w0->ndim, w0->shape, sh, sizeof sh);
        if (no != nt) {
            for (int k = 0; k < no; k++) names[k] = c->w[cls[k]].name;
            snprintf(msg, sizeof msg, "the model has %d tensor%s '%s' of shape %s (", no, no == 1 ? "" : "s", lf, sh);
            list_names(msg, sizeof msg, names, no);
            size_t at = strlen(msg);
            snprintf(msg + at, sizeof msg - at, "), the file has %d%s", nt, nt ? " (" : "");
            for (int k = 0; k < nt; k++) names[k] = c->st->tensors[th[k]].name;
            list_names(msg, sizeof msg, names, nt);
            at = strlen(msg);
            if (nt) snprintf(msg + at, sizeof msg - at, ")");
            s = kd_errorf(KD_EFORMAT, "%s: names = auto: shapes do not line up: %s; %s", path, msg, AUTO_HINT);
            break;
        }
        /* several of one leaf and shape: only numbers may tell them apart */
        for (int k = 1; k < nt; k++)
            if (!same_skeleton(c->st->tensors[th[0]].name, c->st->tensors[th[k]].name)) {
                for (int q = 0; q < nt; q++) names[q] = c->st->tensors[th[q]].name;
                msg[0] = '\0';
                list_names(msg, sizeof msg, names, nt);
                size_t at = strlen(msg);
                snprintf(msg + at, sizeof msg - at, " could be the model's ");
                for (int q = 0; q < no; q++) names[q] = c->w[cls[q]].name;
                list_names(msg, sizeof msg, names, no);
                s = kd_errorf(KD_EFORMAT,
                              "%s: names = auto is ambiguous: %d tensors '%s' of shape %s: the file's %s in any order "
                              "(their names differ by more than numbers, so they do not give the order); %s",
                              path, nt, lf, sh, msg, AUTO_HINT);
                break;
            }
        if (s != KD_OK) break;
        for (int a = 1; a < nt; a++) /* insertion sort by the numbers in the names */
            for (int b = a; b > 0 && numeric_cmp(c->st->tensors[th[b - 1]].name, c->st->tensors[th[b]].name) > 0; b--) {
                int t = th[b];
                th[b] = th[b - 1];
                th[b - 1] = t;
            }
        for (int k = 0; k < no; k++) pair(c, cls[k], th[k]);
    }
    for (int j = 0; j < nf && s == KD_OK; j++)
        if (c->used[j] < 0) {
            const kd_st_tensor *t = &c->st->tensors[j];
            char sh[128];
            s = kd_errorf(KD_EFORMAT, "%s: names = auto: the file's tensor '%s' %s %s matches no tensor of the model (%s)",
                          path, t->name, kd_dtype_name(t->dtype), shape_str(t->ndim, t->shape, sh, sizeof sh), c->m->spec);
        }
    /* a module of the file must land in one module of the model, and the reverse */
    for (int i = 0; i < nw && s == KD_OK; i++) {
        if (c->w[i].src < 0) continue;
        const char *ti = c->st->tensors[c->w[i].src].name, *oi = c->w[i].name;
        size_t tli = module_len(ti), oli = module_len(oi);
        for (int k = i + 1; k < nw && s == KD_OK; k++) {
            if (c->w[k].src < 0) continue;
            const char *tk = c->st->tensors[c->w[k].src].name, *ok = c->w[k].name;
            int same_t = module_len(tk) == tli && strncmp(ti, tk, tli) == 0;
            int same_o = module_len(ok) == oli && strncmp(oi, ok, oli) == 0;
            if (same_t != same_o)
                s = kd_errorf(KD_EFORMAT,
                              "%s: names = auto is ambiguous: '%s' -> '%s' and '%s' -> '%s' would %s; %s", path, ti, oi,
                              tk, ok, same_t ? "split one module of the file" : "merge two modules of the file",
                              AUTO_HINT);
        }
    }
    free(cls);
    free(names);
    free(done);
    return s;
}

/* ---- copying */

static kd_status copy_in(const loadctx *c) {
    const char *path = c->st->path;
    for (int i = 0; i < c->nw; i++) {
        const want *w = &c->w[i];
        kd_node *n = w->n;
        if (w->src < 0) { /* num_batches_tracked absent under a name map */
            n->val.data[0] = 0.0f;
            continue;
        }
        const kd_st_tensor *t = &c->st->tensors[w->src];
        char d[512], have[128], need[128];
        if (w->i64) {
            if (t->ndim != 0 || t->nbytes != kd_dtype_size(t->dtype) ||
                (t->dtype != KD_I64 && t->dtype != KD_I32 && t->dtype != KD_F32))
                return kd_errorf(KD_EFORMAT, "%s: tensor %s must be a scalar I64, found %s %s", path, desc(c, i, d, sizeof d),
                                 kd_dtype_name(t->dtype), shape_str(t->ndim, t->shape, have, sizeof have));
            int64_t v;
            if (t->dtype == KD_I64) {
                memcpy(&v, t->data, 8);
            } else if (t->dtype == KD_I32) {
                int32_t v32;
                memcpy(&v32, t->data, 4);
                v = v32;
            } else {
                float f;
                memcpy(&f, t->data, 4);
                v = (int64_t)f;
            }
            n->val.data[0] = (float)v;
            continue;
        }
        if (t->dtype != KD_F32 && t->dtype != KD_F16 && t->dtype != KD_BF16 && t->dtype != KD_F64)
            return kd_errorf(KD_EFORMAT, "%s: tensor %s has dtype %s; parameters and buffers must be F32, F16, BF16 or F64",
                             path, desc(c, i, d, sizeof d), kd_dtype_name(t->dtype));
        if (!file_shape_is(t, w))
            return kd_errorf(KD_ESHAPE, "%s: tensor %s has shape %s, the model expects %s", path, desc(c, i, d, sizeof d),
                             shape_str(t->ndim, t->shape, have, sizeof have), shape_str(w->ndim, w->shape, need, sizeof need));
        kd_status s = kd_st_get_f32(c->st, t->name, n->val.data, n->val.ndim, n->val.shape);
        KD_ASSERT(s == KD_OK, "shape checked above: %s", kd_error_message());
    }
    return KD_OK;
}

/* The text of "@FILE" (relative to base_dir unless absolute), at most 1 MB. */
static kd_status read_map_file(const char *ref, const char *base_dir, char *full, size_t nfull, char **text) {
    if (ref[0] == '/' || !base_dir || !*base_dir)
        snprintf(full, nfull, "%s", ref);
    else
        snprintf(full, nfull, "%s/%s", base_dir, ref);
    FILE *f = fopen(full, "rb");
    if (!f) return kd_errorf(KD_EIO, "names = @%s: cannot open %s: %s", ref, full, strerror(errno));
    size_t cap = 1 << 20;
    char *b = kd_malloc(cap + 1);
    size_t got = fread(b, 1, cap + 1, f);
    int bad = ferror(f);
    fclose(f);
    if (bad || got > cap) {
        free(b);
        return kd_errorf(KD_EIO, "%s: %s", full, bad ? "read error" : "name map larger than 1 MB");
    }
    b[got] = '\0';
    if (strlen(b) != got) {
        free(b);
        return kd_errorf(KD_ECONFIG, "%s: name map contains a NUL byte (not a text file?)", full);
    }
    *text = b;
    return KD_OK;
}

kd_status kd_checkpoint_load_names(kd_graph *g, const kd_model *m, const char *path, const char *names,
                                   const char *base_dir) {
    kd_safetensors st;
    kd_status s = kd_st_read(path, &st);
    if (s != KD_OK) return s;
    size_t pl = strlen(m->prefix);
    loadctx c = {.st = &st, .m = m};
    c.w = kd_calloc((size_t)kd_graph_n_state(g) + 1, sizeof(want));
    c.used = kd_malloc((size_t)(st.n + 1) * sizeof(int));
    for (int j = 0; j < st.n; j++) c.used[j] = -1;
    for (int i = 0; i < kd_graph_n_state(g); i++) {
        kd_node *n = kd_graph_state(g, i);
        if (!in_model(n, m)) continue;
        want *w = &c.w[c.nw++];
        w->name = n->name + pl;
        w->n = n;
        w->i64 = (n->flags & KD_F_I64) != 0;
        w->ndim = w->i64 ? 0 : n->val.ndim;
        for (int d = 0; d < w->ndim; d++) w->shape[d] = n->val.shape[d];
        w->src = -1;
    }
    /* a file distill wrote uses our names whatever the map says */
    const char *fmt = kd_st_meta(&st, "format");
    int ours = !names || !*names || (fmt && strcmp(fmt, "distill/1") == 0);
    const char *nm = ours ? "" : names + strspn(names, " \t");
    if (ours) {
        s = match_exact(&c);
    } else if (strncmp(nm, "auto", 4) == 0 && nm[4 + strspn(nm + 4, " \t")] == '\0') {
        s = match_auto(&c);
    } else if (nm[0] == '@') {
        char full[4200], ref[4096], *text = NULL;
        snprintf(ref, sizeof ref, "%s", nm + 1);
        trim(ref);
        s = read_map_file(ref, base_dir, full, sizeof full, &text);
        if (s == KD_OK) s = match_map(&c, text, full);
        free(text);
    } else {
        s = match_map(&c, names, NULL);
    }
    if (s == KD_OK) s = copy_in(&c);
    if (s == KD_OK) s = check_unused(&c); /* the other modes have checked already */
    free(c.w);
    free(c.used);
    kd_st_free(&st);
    return s;
}

kd_status kd_checkpoint_load(kd_graph *g, const kd_model *m, const char *path) {
    return kd_checkpoint_load_names(g, m, path, NULL, NULL);
}

/* Parses distill's metadata; *found = 0 when the file has none of it. */
static kd_status info_parse(const kd_safetensors *st, kd_checkpoint_info *info, int *found) {
    memset(info, 0, sizeof *info);
    const char *path = st->path;
    const char *model = kd_st_meta(st, "model"), *classes = kd_st_meta(st, "classes");
    const char *input = kd_st_meta(st, "input"), *norm = kd_st_meta(st, "normalize");
    *found = model || classes || input || norm;
    if (!*found) return KD_OK;
    if (!model || !classes || !input || !norm)
        return kd_errorf(KD_EFORMAT, "%s: metadata has some but not all of 'model', 'classes', 'input', 'normalize'",
                         path);
    snprintf(info->model, sizeof info->model, "%s", model);
    int ok = sscanf(classes, "%d", &info->classes) == 1 && sscanf(input, "%d,%d,%d", &info->c, &info->h, &info->w) == 3 &&
             sscanf(norm, "%f,%f", &info->mean, &info->std) == 2 && info->classes >= 2 && info->c > 0 && info->h > 0 &&
             info->w > 0 && info->std > 0.0f;
    if (!ok) return kd_errorf(KD_EFORMAT, "%s: malformed metadata (classes/input/normalize)", path);
    const char *groups = kd_st_meta(st, "groups");
    info->groups = 1;
    if (groups && (sscanf(groups, "%d", &info->groups) != 1 || info->groups < 1 || info->classes % info->groups != 0 ||
                   info->classes / info->groups < 2))
        return kd_errorf(KD_EFORMAT, "%s: metadata 'groups' = '%s' does not divide 'classes' = %d into >= 2 classes",
                         path, groups, info->classes);
    return KD_OK;
}

kd_status kd_checkpoint_info_peek(const char *path, kd_checkpoint_info *info, int *found) {
    kd_safetensors st;
    *found = 0;
    memset(info, 0, sizeof *info);
    kd_status s = kd_st_read(path, &st);
    if (s != KD_OK) return s;
    s = info_parse(&st, info, found);
    kd_st_free(&st);
    return s;
}

kd_status kd_checkpoint_info_read(const char *path, kd_checkpoint_info *info) {
    int found;
    kd_status s = kd_checkpoint_info_peek(path, info, &found);
    if (s == KD_OK && !found)
        return kd_errorf(KD_EFORMAT,
                         "%s: metadata lacks 'model', 'classes', 'input' and 'normalize' (not written by distill, e.g. a "
                         "PyTorch state_dict?): name the model with distill eval --model SPEC, or load it as a teacher "
                         "through [teacher] model and checkpoint (docs/interop.md)",
                         path);
    return s;
}
