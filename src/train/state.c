/* state.c - the training state of one stage: everything a trainer needs to
 * continue exactly where it stopped, in one safetensors file beside the
 * stage's weights (docs/formats.md "Training state", docs/resume.md).
 *
 * Tensors:
 *   model.NODE    every parameter and buffer of the graph that is not frozen,
 *                 F32 in the node's shape, under its graph name (a frozen
 *                 teacher is reloaded from its own checkpoint instead);
 *   optim.m       the optimiser's momentum / first moments over the flat
 *                 parameter array, optim.v the second moments (AdamW);
 *   opstate.NODE  the raw workspace of ops that keep state from one step to
 *                 the next (crd_nce's memory banks), U8.
 * Metadata: the format version, the stage, the counters and accumulators
 * as decimal strings (doubles with 17 significant digits, so they read back
 * bit for bit), the resolved config and its hash.
 *
 * Saving refuses non-finite values (nothing is written, so the last good
 * state stays); loading validates every tensor and key before it changes
 * anything. Deliberately not here: when to save (the trainer) and which
 * stages of a run are finished (the CLI's progress.json).
 */
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_io.h"
#include "kd_train.h"

/* Ops whose workspace carries state between steps. */
static int keeps_state(const kd_node *n) { return n->op == KD_OP_CRD_NCE && n->ws && n->ws_bytes > 0; }

static int saved_node(const kd_node *n) { return !(n->flags & KD_F_FROZEN); }

/* ---------------------------------------------------------------- config */

/* Keys that may change on resume without changing the result's meaning. */
static int ignored_key(const char *section, const char *key) {
    return (!strcmp(section, "run") && !strcmp(key, "threads")) ||
           (!strcmp(section, "train") && !strcmp(key, "checkpoint_every"));
}

typedef struct kv {
    char section[64], key[64];
    const char *val;
    int vlen;
} kv;

/* Splits resolved INI text ("[section]" and "key = value" lines; ';'
 * comments) into its keys, ignored keys left out. Returns the count. */
static int parse_ini(const char *text, kv **out) {
    int n = 0, cap = 64;
    kv *a = kd_malloc((size_t)cap * sizeof *a);
    char sec[64] = "";
    for (const char *p = text; *p;) {
        size_t len = strcspn(p, "\n");
        const char *q = p, *end = p + len;
        while (q < end && (*q == ' ' || *q == '\t')) q++;
        if (q < end && *q == '[') {
            const char *r = memchr(q, ']', (size_t)(end - q));
            size_t k = r ? (size_t)(r - q - 1) : 0;
            if (k >= sizeof sec) k = sizeof sec - 1;
            memcpy(sec, q + 1, k);
            sec[k] = '\0';
        } else if (q < end && *q != ';' && *q != '#') {
            const char *eq = memchr(q, '=', (size_t)(end - q));
            if (eq) {
                const char *ke = eq;
                while (ke > q && (ke[-1] == ' ' || ke[-1] == '\t')) ke--;
                const char *v = eq + 1;
                while (v < end && (*v == ' ' || *v == '\t')) v++;
                kv e = {.val = v, .vlen = (int)(end - v)};
                size_t kl = (size_t)(ke - q) < sizeof e.key ? (size_t)(ke - q) : sizeof e.key - 1;
                memcpy(e.key, q, kl);
                e.key[kl] = '\0';
                snprintf(e.section, sizeof e.section, "%s", sec);
                if (!ignored_key(e.section, e.key)) {
                    if (n == cap) a = kd_realloc(a, (size_t)(cap *= 2) * sizeof *a);
                    a[n++] = e;
                }
            }
        }
        p = *end ? end + 1 : end;
    }
    *out = a;
    return n;
}

void kd_state_config_hash(const char *config, char out[17]) {
    kv *a;
    int n = parse_ini(config, &a);
    uint64_t h = 0xcbf29ce484222325ull; /* FNV-1a 64 over "section.key=value\n" */
    for (int i = 0; i < n; i++) {
        char head[140];
        int k = snprintf(head, sizeof head, "%s.%s=", a[i].section, a[i].key);
        for (int j = 0; j < k; j++) h = (h ^ (uint8_t)head[j]) * 0x100000001b3ull;
        for (int j = 0; j < a[i].vlen; j++) h = (h ^ (uint8_t)a[i].val[j]) * 0x100000001b3ull;
        h = (h ^ '\n') * 0x100000001b3ull;
    }
    free(a);
    snprintf(out, 17, "%016" PRIx64, h);
}

static const kv *find_kv(const kv *a, int n, const char *section, const char *key) {
    for (int i = 0; i < n; i++)
        if (!strcmp(a[i].section, section) && !strcmp(a[i].key, key)) return &a[i];
    return NULL;
}

int kd_state_config_diff(const char *was, const char *now, char *out, size_t n) {
    kv *a, *b;
    int na = parse_ini(was, &a), nb = parse_ini(now, &b), diffs = 0;
    size_t at = 0;
    out[0] = '\0';
    for (int pass = 0; pass < 2; pass++) {
        const kv *x = pass ? b : a, *y = pass ? a : b;
        int nx = pass ? nb : na, ny = pass ? na : nb;
        for (int i = 0; i < nx; i++) {
            const kv *o = find_kv(y, ny, x[i].section, x[i].key);
            if (pass && o) continue; /* compared in the first pass */
            if (o && o->vlen == x[i].vlen && memcmp(o->val, x[i].val, (size_t)o->vlen) == 0) continue;
            if (diffs++ && at < n) at += (size_t)snprintf(out + at, n - at, "; ");
            if (at >= n) continue;
            if (!o)
                at += (size_t)snprintf(out + at, n - at, "[%s] %s only %s", x[i].section, x[i].key,
                                       pass ? "now" : "before");
            else
                at += (size_t)snprintf(out + at, n - at, "[%s] %s was '%.*s', now '%.*s'", x[i].section, x[i].key,
                                       x[i].vlen > 200 ? 200 : x[i].vlen, x[i].val, o->vlen > 200 ? 200 : o->vlen,
                                       o->val);
        }
    }
    free(a);
    free(b);
    return diffs;
}

/* ---------------------------------------------------------------- saving */

static const char *first_bad(const float *x, size_t n, size_t *at) {
    for (size_t i = 0; i < n; i++)
        if (!isfinite(x[i])) {
            *at = i;
            return "";
        }
    return NULL;
}

const char *kd_state_nonfinite(const kd_graph *g, const kd_optim *opt) {
    size_t at;
    for (int i = 0; i < kd_graph_n_state(g); i++) {
        kd_node *v = kd_graph_state(g, i);
        if (saved_node(v) && first_bad(v->val.data, (size_t)kd_numel(&v->val), &at)) return v->name;
    }
    if (opt && first_bad(opt->m, opt->n, &at)) return "optim.m";
    if (opt && opt->v && first_bad(opt->v, opt->n, &at)) return "optim.v";
    return NULL;
}

static void meta_i64(kd_st_writer *w, const char *key, int64_t v) {
    char b[32];
    snprintf(b, sizeof b, "%" PRId64, v);
    kd_st_set_meta(w, key, b);
}

static void meta_f64(kd_st_writer *w, const char *key, double v) {
    char b[40];
    snprintf(b, sizeof b, "%.17g", v);
    kd_st_set_meta(w, key, b);
}

kd_status kd_state_save(const char *path, const kd_graph *g, const kd_optim *opt, const kd_train_state *s,
                        const char *config) {
    const char *bad = kd_state_nonfinite(g, opt);
    if (bad) return kd_errorf(KD_ENUMERIC, "%s: not written: tensor '%s' holds a NaN or Inf", path, bad);
    kd_st_writer *w = kd_st_writer_new();
    char name[160];
    for (int i = 0; i < kd_graph_n_state(g); i++) {
        kd_node *v = kd_graph_state(g, i);
        if (!saved_node(v)) continue;
        snprintf(name, sizeof name, "model.%s", v->name);
        kd_st_add_f32(w, name, v->val.ndim, v->val.shape, v->val.data);
    }
    KD_ASSERT(opt->n <= (size_t)INT32_MAX, "optimiser of %zu parameters", opt->n);
    int np = (int)opt->n;
    kd_st_add_f32(w, "optim.m", 1, &np, opt->m);
    if (opt->v) kd_st_add_f32(w, "optim.v", 1, &np, opt->v);
    for (int i = 0; i < kd_graph_n_nodes(g); i++) {
        kd_node *v = kd_graph_node(g, i);
        if (!keeps_state(v)) continue;
        snprintf(name, sizeof name, "opstate.%s", v->name);
        int64_t sh[1] = {(int64_t)v->ws_bytes};
        kd_st_add(w, name, KD_U8, 1, sh, v->ws);
    }
    kd_st_set_meta(w, "format", KD_STATE_FORMAT);
    kd_st_set_meta(w, "stage", s->stage);
    meta_i64(w, "step", s->step);
    meta_i64(w, "epoch", s->epoch);
    meta_i64(w, "batch", s->batch);
    meta_i64(w, "epochs", s->epochs);
    meta_i64(w, "steps_per_epoch", s->steps_per_epoch);
    char b[32];
    snprintf(b, sizeof b, "%" PRIu64, s->seed);
    kd_st_set_meta(w, "seed", b);
    char rb[KD_STATE_RNGS * 24];
    size_t k = 0;
    for (int i = 0; i < KD_STATE_RNGS; i++)
        k += (size_t)snprintf(rb + k, sizeof rb - k, i ? ",%" PRIu64 : "%" PRIu64, s->rng[i]);
    kd_st_set_meta(w, "rng", rb);
    meta_i64(w, "metrics_offset", s->metrics_offset);
    meta_f64(w, "eloss", s->eloss);
    meta_i64(w, "eseen", s->eseen);
    meta_f64(w, "win", s->win);
    meta_i64(w, "wsteps", s->wsteps);
    meta_i64(w, "samples", s->samples);
    meta_f64(w, "seconds", s->seconds);
    meta_f64(w, "final_loss", s->final_loss);
    meta_f64(w, "test_acc", s->test.acc);
    meta_f64(w, "test_loss", s->test.loss);
    meta_i64(w, "test_n", s->test.n);
    meta_i64(w, "threads", s->threads);
    kd_st_set_meta(w, "optimizer", opt->cfg.kind == KD_OPTIM_ADAMW ? "adamw" : "sgd");
    meta_i64(w, "optim_t", opt->t);
    char hash[17];
    kd_state_config_hash(config ? config : "", hash);
    kd_st_set_meta(w, "config_hash", hash);
    kd_st_set_meta(w, "config", config ? config : "");
    kd_status st = kd_st_write(w, path);
    kd_st_writer_free(w);
    return st;
}

/* ---------------------------------------------------------------- loading */

static kd_status need_meta(const kd_safetensors *st, const char *key, const char **v) {
    *v = kd_st_meta(st, key);
    if (!*v) return kd_errorf(KD_EFORMAT, "%s: training state lacks metadata '%s'", st->path, key);
    return KD_OK;
}

static kd_status get_i64(const kd_safetensors *st, const char *key, int64_t lo, int64_t hi, int64_t *out) {
    const char *v;
    kd_status s = need_meta(st, key, &v);
    if (s != KD_OK) return s;
    char *end;
    long long x = strtoll(v, &end, 10);
    if (end == v || *end || x < lo || x > hi)
        return kd_errorf(KD_EFORMAT, "%s: training state metadata '%s' = '%.40s' is not an integer in [%lld, %lld]",
                         st->path, key, v, (long long)lo, (long long)hi);
    *out = x;
    return KD_OK;
}

static kd_status get_u64(const kd_safetensors *st, const char *key, uint64_t *out) {
    const char *v;
    kd_status s = need_meta(st, key, &v);
    if (s != KD_OK) return s;
    char *end;
    unsigned long long x = strtoull(v, &end, 10);
    if (end == v || *end || *v == '-')
        return kd_errorf(KD_EFORMAT, "%s: training state metadata '%s' = '%.40s' is not an unsigned integer", st->path,
                         key, v);
    *out = x;
    return KD_OK;
}

/* "a,b,c,d": KD_STATE_RNGS unsigned integers */
static kd_status get_rngs(const kd_safetensors *st, uint64_t *out) {
    const char *v;
    kd_status s = need_meta(st, "rng", &v);
    if (s != KD_OK) return s;
    const char *p = v;
    for (int i = 0; i < KD_STATE_RNGS; i++) {
        char *end;
        if (*p < '0' || *p > '9') break;
        out[i] = strtoull(p, &end, 10);
        p = end;
        if (i == KD_STATE_RNGS - 1 && *p == '\0') return KD_OK;
        if (*p != ',') break;
        p++;
    }
    return kd_errorf(KD_EFORMAT,
                     "%s: training state metadata 'rng' = '%.100s' is not %d comma-separated unsigned integers",
                     st->path, v, KD_STATE_RNGS);
}

static kd_status get_f64(const kd_safetensors *st, const char *key, double *out) {
    const char *v;
    kd_status s = need_meta(st, key, &v);
    if (s != KD_OK) return s;
    char *end;
    double x = strtod(v, &end);
    if (end == v || *end || !isfinite(x))
        return kd_errorf(KD_EFORMAT, "%s: training state metadata '%s' = '%.40s' is not a finite number", st->path, key,
                         v);
    *out = x;
    return KD_OK;
}

static kd_status read_meta(const kd_safetensors *st, kd_train_state *s) {
    const char *v;
    int64_t x;
    kd_status r = need_meta(st, "stage", &v);
    if (r != KD_OK) return r;
    snprintf(s->stage, sizeof s->stage, "%s", v);
#define I64(key, lo, hi, field)                                                                                        \
    do {                                                                                                               \
        if ((r = get_i64(st, key, lo, hi, &x)) != KD_OK) return r;                                                     \
        s->field = x;                                                                                                  \
    } while (0)
    I64("step", 0, INT64_MAX, step);
    I64("epoch", 0, INT32_MAX, epoch);
    I64("batch", 0, INT32_MAX, batch);
    I64("epochs", 0, INT32_MAX, epochs);
    I64("steps_per_epoch", 0, INT32_MAX, steps_per_epoch);
    I64("metrics_offset", 0, INT64_MAX, metrics_offset);
    I64("eseen", 0, INT64_MAX, eseen);
    I64("wsteps", 0, INT32_MAX, wsteps);
    I64("samples", 0, INT64_MAX, samples);
    I64("test_n", 0, INT32_MAX, test.n);
    I64("threads", 0, INT32_MAX, threads);
#undef I64
    if ((r = get_u64(st, "seed", &s->seed)) != KD_OK) return r;
    if ((r = get_rngs(st, s->rng)) != KD_OK) return r;
    if ((r = get_f64(st, "eloss", &s->eloss)) != KD_OK) return r;
    if ((r = get_f64(st, "win", &s->win)) != KD_OK) return r;
    if ((r = get_f64(st, "seconds", &s->seconds)) != KD_OK) return r;
    if ((r = get_f64(st, "final_loss", &s->final_loss)) != KD_OK) return r;
    if ((r = get_f64(st, "test_acc", &s->test.acc)) != KD_OK) return r;
    if ((r = get_f64(st, "test_loss", &s->test.loss)) != KD_OK) return r;
    if (s->steps_per_epoch > 0 && s->batch > s->steps_per_epoch)
        return kd_errorf(KD_EFORMAT, "%s: training state has batch %d of an epoch of %d", st->path, s->batch,
                         s->steps_per_epoch);
    if (s->epoch > s->epochs)
        return kd_errorf(KD_EFORMAT, "%s: training state has epoch %d of %d", st->path, s->epoch, s->epochs);
    return KD_OK;
}

static int shape_is(const kd_st_tensor *t, int ndim, const int *shape) {
    if (t->ndim != ndim) return 0;
    for (int d = 0; d < ndim; d++)
        if (t->shape[d] != shape[d]) return 0;
    return 1;
}

/* The tensor `name` as F32 of the given shape, or an error naming it. */
static kd_status want_f32(const kd_safetensors *st, const char *name, int ndim, const int *shape,
                          const kd_st_tensor **t) {
    *t = kd_st_find(st, name);
    char a[96], b[96];
    if (!*t) return kd_errorf(KD_EFORMAT, "%s: training state lacks tensor '%s'", st->path, name);
    if ((*t)->dtype != KD_F32)
        return kd_errorf(KD_EFORMAT, "%s: tensor '%s' is %s, a training state holds F32", st->path, name,
                         kd_dtype_name((*t)->dtype));
    if (!shape_is(*t, ndim, shape)) {
        size_t k = (size_t)snprintf(a, sizeof a, "(");
        for (int d = 0; d < (*t)->ndim && k < sizeof a; d++)
            k += (size_t)snprintf(a + k, sizeof a - k, d ? ", %lld" : "%lld", (long long)(*t)->shape[d]);
        if (k < sizeof a) snprintf(a + k, sizeof a - k, ")");
        return kd_errorf(KD_ESHAPE, "%s: tensor '%s' has shape %s, the model here needs %s (another model?)", st->path,
                         name, a, kd_shape_str(ndim, shape, b, sizeof b));
    }
    return KD_OK;
}

kd_status kd_state_load(const char *path, kd_graph *g, kd_optim *opt, kd_train_state *s, const char *stage,
                        const char *config) {
    kd_safetensors st;
    kd_status r = kd_st_read(path, &st);
    if (r != KD_OK) return kd_error_prefix(r, "training state");
    kd_train_state tmp;
    memset(&tmp, 0, sizeof tmp);
    const char *fmt = kd_st_meta(&st, "format"), *v;
    int ngraph = kd_graph_n_nodes(g);
    const kd_st_tensor **src = kd_calloc((size_t)ngraph + 1, sizeof *src);
    int used = 0;
    if (!fmt || strncmp(fmt, "distill-state/", 14) != 0)
        r = kd_errorf(KD_EFORMAT, "%s: not a training state (metadata 'format' is %s%s%s, expected '%s')", path,
                      fmt ? "'" : "", fmt ? fmt : "missing", fmt ? "'" : "", KD_STATE_FORMAT);
    else if (strcmp(fmt, KD_STATE_FORMAT) != 0)
        r = kd_errorf(KD_EFORMAT, "%s: training state format '%s'; this distill reads '%s'", path, fmt,
                      KD_STATE_FORMAT);
    if (r == KD_OK) r = read_meta(&st, &tmp);
    if (r == KD_OK && stage && strcmp(tmp.stage, stage) != 0)
        r = kd_errorf(KD_EFORMAT, "%s: training state of stage '%s', expected '%s'", path, tmp.stage, stage);
    if (r == KD_OK && config) {
        const char *hash, *was;
        char now[17];
        r = need_meta(&st, "config_hash", &hash);
        if (r == KD_OK) r = need_meta(&st, "config", &was);
        kd_state_config_hash(config, now);
        if (r == KD_OK && strcmp(hash, now) != 0) {
            char diff[1000];
            int nd = kd_state_config_diff(was, config, diff, sizeof diff);
            r = kd_errorf(
                KD_ECONFIG,
                "%s: written under another configuration (%s); resume with the original config and overrides, "
                "or run without --resume to start over",
                path, nd ? diff : "the stored config does not match its hash");
        }
    }
    if (r == KD_OK && (r = need_meta(&st, "optimizer", &v)) == KD_OK &&
        strcmp(v, opt->cfg.kind == KD_OPTIM_ADAMW ? "adamw" : "sgd") != 0)
        r = kd_errorf(KD_EFORMAT, "%s: training state of optimizer '%.20s', the run uses %s", path, v,
                      opt->cfg.kind == KD_OPTIM_ADAMW ? "adamw" : "sgd");
    int64_t t = 0;
    if (r == KD_OK) r = get_i64(&st, "optim_t", 0, INT64_MAX, &t);
    /* every tensor is checked before anything is copied */
    char name[160];
    for (int i = 0; i < kd_graph_n_state(g) && r == KD_OK; i++) {
        kd_node *n = kd_graph_state(g, i);
        if (!saved_node(n)) continue;
        snprintf(name, sizeof name, "model.%s", n->name);
        r = want_f32(&st, name, n->val.ndim, n->val.shape, &src[n->id]);
        used++;
    }
    const kd_st_tensor *tm = NULL, *tv = NULL;
    int np = (int)opt->n;
    if (r == KD_OK) r = want_f32(&st, "optim.m", 1, &np, &tm);
    if (r == KD_OK && opt->v) r = want_f32(&st, "optim.v", 1, &np, &tv);
    used += 1 + (opt->v != NULL);
    for (int i = 0; i < ngraph && r == KD_OK; i++) {
        kd_node *n = kd_graph_node(g, i);
        if (!keeps_state(n)) continue;
        snprintf(name, sizeof name, "opstate.%s", n->name);
        const kd_st_tensor *o = kd_st_find(&st, name);
        if (!o || o->dtype != KD_U8 || o->nbytes != n->ws_bytes)
            r = kd_errorf(KD_EFORMAT, "%s: tensor '%s' %s (U8, %zu bytes expected)", path, name,
                          o ? "has the wrong type or size" : "is missing", n->ws_bytes);
        else
            src[n->id] = o; /* an op-state node is never a parameter: no clash */
        used++;
    }
    if (r == KD_OK && used != st.n)
        for (int j = 0; j < st.n && r == KD_OK; j++) {
            const char *tn = st.tensors[j].name;
            kd_node *n = NULL;
            if (!strncmp(tn, "model.", 6))
                n = kd_graph_find(g, tn + 6);
            else if (!strncmp(tn, "opstate.", 8))
                n = kd_graph_find(g, tn + 8);
            int known =
                !strcmp(tn, "optim.m") || (!strcmp(tn, "optim.v") && opt->v) || (n && src[n->id] == &st.tensors[j]);
            if (!known)
                r = kd_errorf(KD_EFORMAT, "%s: unexpected tensor '%s' (a state of another model or optimizer?)", path,
                              tn);
        }
    if (r == KD_OK) {
        for (int i = 0; i < ngraph; i++) {
            kd_node *n = kd_graph_node(g, i);
            if (!src[i]) continue;
            if (keeps_state(n))
                memcpy(n->ws, src[i]->data, n->ws_bytes);
            else
                memcpy(n->val.data, src[i]->data, src[i]->nbytes);
        }
        memcpy(opt->m, tm->data, tm->nbytes);
        if (tv) memcpy(opt->v, tv->data, tv->nbytes);
        opt->t = t;
        *s = tmp;
    }
    free(src);
    kd_st_free(&st);
    return r;
}
