/* config.c - the INI schema, parsing through inih, typed access.
 *
 * Debian's inih does not pass line numbers to the handler, so we parse
 * through ini_parse_stream with our own line reader that counts lines; the
 * handler reads the count. Values are validated by type when they are set
 * (from the file or the command line) so a bad value is reported with its
 * origin, and nothing downstream has to parse strings.
 */
#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "kd_config.h"

typedef enum { T_INT, T_FLOAT, T_STR, T_BOOL } vtype;

typedef struct entry {
    const char *section, *key;
    vtype type;
    const char *def;
    const char *help;
} entry;

/* The schema: one line per key. */
static const entry schema[] = {
    {"run", "name", T_STR, "", "run name; output goes to OUT/NAME (default: config file name)"},
    {"run", "out", T_STR, "runs", "directory holding run directories"},
    {"run", "seed", T_INT, "0", "seed for initialisation, shuffling, augmentation and dropout"},
    {"run", "threads", T_INT, "0", "threads (0: all cores); results are reproducible per thread count"},
    {"data", "train", T_STR, "fashion-mnist:train", "training set: fashion-mnist:train or idx:IMAGES,LABELS"},
    {"data", "test", T_STR, "fashion-mnist:test", "test set"},
    {"data", "limit", T_INT, "0", "use only the first N training examples (0: all)"},
    {"data", "test_limit", T_INT, "0", "use only the first N test examples (0: all)"},
    {"data", "crop", T_INT, "0", "random crop after zero padding of this many pixels (0: off)"},
    {"data", "flip", T_BOOL, "0", "random horizontal flip"},
    {"data", "labeled", T_INT, "0",
     "only the first N training examples keep labels; the rest are an unlabelled transfer set (0: all labelled)"},
    {"data", "label_map", T_STR, "",
     "new label of each class, in class order (\"0 0 0 0 0 1 1 1 1 1\": Fashion-MNIST as 0-4 vs 5-9); empty: as stored"},
    {"teacher", "model", T_STR, "cnn: c32 c32 p c64 c64 p f256 d0.3", "teacher model spec (docs/models.md)"},
    {"teacher", "checkpoint", T_STR, "", "load the teacher from here if the file exists, else train and save it here"},
    {"teacher", "names", T_STR, "",
     "checkpoint from PyTorch: auto, THEIRS=OURS pairs or @FILE of them (docs/interop.md); empty: our names"},
    {"teacher", "cache", T_STR, "", "read the teacher's logits from this file (distill cache) instead of running it"},
    {"teacher", "ensemble", T_STR, "",
     "several teacher checkpoints (space-separated) whose averaged logits teach; replaces model/checkpoint"},
    {"teacher", "ensemble_weights", T_STR, "", "weights of the ensemble's teachers (space-separated; default equal)"},
    {"teacher", "epochs", T_INT, "0", "epochs when the teacher is trained here (0: [train] epochs)"},
    {"teacher", "lr", T_FLOAT, "0", "learning rate when the teacher is trained here (0: [train] lr)"},
    {"teacher", "crop", T_INT, "-1", "crop padding when the teacher is trained here (-1: [data] crop)"},
    {"teacher", "flip", T_INT, "-1", "flip when the teacher is trained here (-1: [data] flip)"},
    {"student", "model", T_STR, "", "student model spec; empty: train only the teacher"},
    {"assistant", "model", T_STR, "",
     "teacher-assistant chain: distil the teacher into this model first, then it teaches the student"},
    {"distill", "loss", T_STR, "ce(weight=0.1) + kd(T=4, weight=0.9)", "loss spec (docs/losses.md, distill loss --help)"},
    {"distill", "baseline", T_BOOL, "1", "also train the student with cross-entropy alone, for comparison"},
    {"distill", "baseline_epochs", T_INT, "0", "epochs of the baseline (0: [train] epochs)"},
    {"distill", "generations", T_INT, "1",
     "born-again: after the student, distil N-1 more generations, each taught by the previous one"},
    {"distill", "mutual", T_BOOL, "0", "deep mutual learning: the student and a peer teach each other (no teacher)"},
    {"distill", "peer", T_STR, "", "the peer's model spec for mutual learning (default: the student's)"},
    {"distill", "lelp", T_INT, "0",
     "LELP: S pseudo-subclasses per class from the teacher's embeddings; the student gets an S*K-way head (0: off; "
     "docs/losses/lelp.md)"},
    {"distill", "lelp_T", T_FLOAT, "1", "LELP: temperature of the softmax over a class's standardised PCA coordinates"},
    {"distill", "lelp_null", T_BOOL, "1", "LELP: project the embeddings onto the null space of the teacher's head"},
    {"distill", "lelp_rotate", T_BOOL, "1", "LELP: rotate the kept directions randomly, then to equal variances"},
    {"train", "epochs", T_INT, "15", "training epochs"},
    {"train", "batch", T_INT, "128", "batch size"},
    {"train", "optimizer", T_STR, "sgd", "sgd or adamw"},
    {"train", "lr", T_FLOAT, "0.05", "peak learning rate"},
    {"train", "momentum", T_FLOAT, "0.9", "SGD momentum"},
    {"train", "nesterov", T_BOOL, "1", "Nesterov momentum"},
    {"train", "weight_decay", T_FLOAT, "5e-4", "weight decay (L2 for SGD, decoupled for AdamW)"},
    {"train", "beta1", T_FLOAT, "0.9", "AdamW beta1"},
    {"train", "beta2", T_FLOAT, "0.999", "AdamW beta2"},
    {"train", "eps", T_FLOAT, "1e-8", "AdamW epsilon"},
    {"train", "schedule", T_STR, "cosine", "constant, cosine (per step, to min_lr) or step"},
    {"train", "min_lr", T_FLOAT, "0", "cosine floor"},
    {"train", "warmup_epochs", T_FLOAT, "0", "linear warm-up length in epochs (fractions allowed)"},
    {"train", "step_epochs", T_INT, "30", "step schedule: decay every N epochs"},
    {"train", "gamma", T_FLOAT, "0.1", "step schedule: decay factor"},
    {"train", "clip", T_FLOAT, "0", "clip gradients to this global L2 norm (0: off)"},
    {"train", "smoothing", T_FLOAT, "0", "label smoothing of the cross-entropy"},
    {"train", "log_every", T_INT, "50", "steps between training-loss lines in metrics.jsonl"},
    {"train", "eval_every", T_INT, "1", "epochs between test-set evaluations (the last epoch always)"},
    {"train", "checkpoint_every", T_INT, "0",
     "steps between training-state checkpoints for --resume (0: at epoch ends only; docs/resume.md)"},
    {"lm", "steps", T_INT, "1000", "language models: optimiser steps of each model trained"},
    {"lm", "teacher_steps", T_INT, "0", "language models: steps when the teacher is trained here (0: [lm] steps)"},
    {"lm", "seq", T_INT, "0", "language models: tokens per training window (0: the model's context)"},
    {"lm", "val_frac", T_FLOAT, "0.05", "language models: fraction of documents held out for validation"},
    {"lm", "tokenizer", T_STR, "", "language models: BPE tokenizer file (distill tokenize); empty: bytes"},
    {"lm", "warmup", T_INT, "100", "language models: linear warm-up steps"},
    {"lm", "eval_every", T_INT, "200", "language models: steps between validation evaluations (the last always)"},
    {"lm", "eval_windows", T_INT, "0", "language models: validation windows per evaluation (0: all)"},
    {"lm", "onpolicy", T_FLOAT, "0", "on-policy distillation: fraction of batches continued by the student (GKD)"},
    {"lm", "prompt", T_INT, "32", "on-policy and sequence-level KD: data tokens before the sampled continuation"},
    {"lm", "seqkd", T_INT, "0", "sequence-level KD: train the student on this many teacher-sampled windows (0: off)"},
    {"lm", "temperature", T_FLOAT, "1", "sampling temperature for on-policy and sequence-level KD"},
    {"lm", "top_k", T_INT, "0", "sampling top-k for on-policy and sequence-level KD (0: off)"},
    {"lm", "top_p", T_FLOAT, "1", "sampling nucleus mass for on-policy and sequence-level KD (1: off)"},
    {"lm", "init", T_STR, "", "language models: the distilled student starts from this checkpoint (e.g. a KD warm start)"},
    {"lm", "llmr", T_INT, "0", "LLMR: the last N of [lm] steps are REINFORCE steps with the teacher-induced reward (0: off)"},
    {"lm", "llmr_gamma", T_FLOAT, "1", "LLMR: discount of the return"},
    {"lm", "llmr_baseline", T_STR, "batch", "LLMR: batch (leave-one-out mean return at each position) or none"},
    {"lm", "sample_eval", T_INT, "0", "after training: the teacher's NLL of this many student samples (0: off)"},
    {"lm", "lora", T_STR, "",
     "LoRA adapters on the student, e.g. \"r=8 alpha=16 targets=attn,mlp\"; its base weights frozen (docs/losses/lora.md)"},
    {"lm", "lora_base", T_STR, "", "LoRA: the student's base weights (a GPT checkpoint); required with [lm] lora"},
    {"lm", "okd", T_BOOL, "0", "OKD: trainable adapters on the teacher, trained with the student (docs/losses/okd.md)"},
    {"lm", "okd_lora", T_STR, "r=8 alpha=16 targets=all", "OKD: the teacher's adapters (LoRA spec)"},
    {"lm", "okd_loss", T_STR, "ce + fkl",
     "OKD: the teacher adapters' loss spec, roles swapped (s = the teacher, t = the student)"},
    {"multitask", "tasks", T_STR, "",
     "task names (space-separated); non-empty: a multi-task run, one student trunk with a head per task (docs/losses/multitask.md)"},
    {"multitask", "maps", T_STR, "", "label map of each task over the data's classes, '|' between tasks (\"0 1 2 ... | 0 1 0 ...\")"},
    {"multitask", "teachers", T_STR, "",
     "teacher checkpoint of each task (space-separated); a missing one is trained there with [teacher] model on the task's labels"},
    {"multitask", "weights", T_STR, "", "weight of each task's loss (space-separated; empty: 1 each)"},
    {"textcls", "steps", T_INT, "600", "text classification ([data] train = textcls:...): optimiser steps of each model"},
    {"textcls", "teacher_steps", T_INT, "0", "text classification: steps when the teacher is trained here (0: [textcls] steps)"},
    {"textcls", "seq", T_INT, "128", "text classification: bytes per document (longer ones are cut, shorter padded)"},
    {"textcls", "test_frac", T_FLOAT, "0.2", "text classification: fraction of documents held out for testing (by hash)"},
    {"textcls", "warmup", T_INT, "50", "text classification: linear warm-up steps"},
    {"textcls", "rationale", T_FLOAT, "0",
     "weight of the rationale tagging loss: the student tags the teacher's top-k saliency tokens (0: off)"},
    {"textcls", "rationale_k", T_INT, "8", "rationale tags: the k tokens of highest gradient x input saliency per document"},
};
#define N_SCHEMA ((int)(sizeof schema / sizeof schema[0]))

typedef struct value {
    char *text;
    char origin[256];
    int line; /* 0: default or command line */
    int set;
} value;

struct kd_config {
    value v[N_SCHEMA];
};

static int find(const char *section, const char *key) {
    for (int i = 0; i < N_SCHEMA; i++)
        if (strcmp(schema[i].section, section) == 0 && strcmp(schema[i].key, key) == 0) return i;
    return -1;
}

static int section_known(const char *section) {
    for (int i = 0; i < N_SCHEMA; i++)
        if (strcmp(schema[i].section, section) == 0) return 1;
    return 0;
}

/* index of the first schema entry of i's section: a section's first
 * appearance, so lists and help follow the schema's order of sections */
static int section_first(int i) {
    for (int j = 0; j < i; j++)
        if (strcmp(schema[j].section, schema[i].section) == 0) return j;
    return i;
}

/* "run, data, ..." from the schema */
static const char *known_sections(void) {
    static char buf[512];
    if (!buf[0]) {
        size_t n = 0;
        for (int i = 0; i < N_SCHEMA; i++)
            if (section_first(i) == i)
                n += (size_t)snprintf(buf + n, sizeof buf - n, "%s%s", n ? ", " : "", schema[i].section);
    }
    return buf;
}

kd_config *kd_config_new(void) {
    kd_config *c = kd_calloc(1, sizeof *c);
    for (int i = 0; i < N_SCHEMA; i++) {
        c->v[i].text = kd_strdup(schema[i].def);
        snprintf(c->v[i].origin, sizeof c->v[i].origin, "default");
    }
    return c;
}

void kd_config_free(kd_config *c) {
    if (!c) return;
    for (int i = 0; i < N_SCHEMA; i++) free(c->v[i].text);
    free(c);
}

static void where(char *buf, size_t n, const char *origin, int line) {
    if (line > 0)
        snprintf(buf, n, "%s:%d", origin, line);
    else
        snprintf(buf, n, "%s", origin);
}

static kd_status check_value(const entry *e, const char *val, const char *origin, int line) {
    char w[300];
    where(w, sizeof w, origin, line);
    const char *p = val;
    char *end;
    switch (e->type) {
    case T_INT: {
        errno = 0;
        long x = strtol(p, &end, 10);
        if (end == p || *end || errno || x < -2147483647L || x > 2147483647L)
            return kd_errorf(KD_ECONFIG, "%s: [%s] %s: '%s' is not an integer", w, e->section, e->key, val);
        break;
    }
    case T_FLOAT: {
        errno = 0;
        double x = strtod(p, &end);
        if (end == p || *end || errno || !isfinite(x))
            return kd_errorf(KD_ECONFIG, "%s: [%s] %s: '%s' is not a number", w, e->section, e->key, val);
        break;
    }
    case T_BOOL:
        if (strcmp(val, "0") && strcmp(val, "1") && strcmp(val, "true") && strcmp(val, "false"))
            return kd_errorf(KD_ECONFIG, "%s: [%s] %s: '%s' is not a boolean (0, 1, true, false)", w, e->section,
                             e->key, val);
        break;
    case T_STR: break;
    }
    return KD_OK;
}

kd_status kd_config_set(kd_config *c, const char *section, const char *key, const char *value_text,
                        const char *origin, int line) {
    char w[300];
    where(w, sizeof w, origin, line);
    if (!section_known(section))
        return kd_errorf(KD_ECONFIG, "%s: unknown section [%s] (known: %s)", w, section, known_sections());
    int i = find(section, key);
    if (i < 0) return kd_errorf(KD_ECONFIG, "%s: unknown key '%s' in section [%s]", w, key, section);
    for (const char *q = value_text; *q; q++)
        if ((unsigned char)*q < 0x20 && *q != '\t')
            return kd_errorf(KD_ECONFIG, "%s: [%s] %s: value contains a control character", w, section, key);
    /* strip matching quotes, a convenience for spec strings */
    size_t n = strlen(value_text);
    char *val = kd_strdup(value_text);
    if (n >= 2 && ((val[0] == '"' && val[n - 1] == '"') || (val[0] == '\'' && val[n - 1] == '\''))) {
        memmove(val, val + 1, n - 2);
        val[n - 2] = '\0';
    }
    kd_status st = check_value(&schema[i], val, origin, line);
    if (st != KD_OK) {
        free(val);
        return st;
    }
    if (schema[i].type == T_BOOL) {
        const char *b = (strcmp(val, "1") == 0 || strcmp(val, "true") == 0) ? "1" : "0";
        free(val);
        val = kd_strdup(b);
    }
    free(c->v[i].text);
    c->v[i].text = val;
    snprintf(c->v[i].origin, sizeof c->v[i].origin, "%s", origin);
    c->v[i].line = line;
    c->v[i].set = 1;
    return KD_OK;
}

/* ---- parsing with line numbers */

typedef struct reader {
    FILE *f;
    const char *s; /* string source when f is NULL */
    int line;
    int mid_line; /* the last chunk read did not end the line */
    kd_config *c;
    const char *origin;
    kd_status st;
    int err_line; /* line of st when st != KD_OK */
} reader;

/* inih reads a line longer than its buffer in several chunks and drops all
 * but the first; count lines, not chunks, and report the truncation. */
static char *read_line(char *buf, int num, void *stream) {
    reader *r = stream;
    int more; /* input left after this chunk */
    if (r->f) {
        if (!fgets(buf, num, r->f)) return NULL;
        int ch = getc(r->f);
        more = ch != EOF;
        if (more) ungetc(ch, r->f);
    } else {
        if (!*r->s) return NULL;
        int i = 0;
        while (*r->s && i < num - 1) {
            char ch = *r->s++;
            buf[i++] = ch;
            if (ch == '\n') break;
        }
        buf[i] = '\0';
        more = *r->s != '\0';
    }
    if (!r->mid_line) r->line++;
    size_t k = strlen(buf);
    int was_mid = r->mid_line;
    r->mid_line = more && (k == 0 || buf[k - 1] != '\n');
    if (r->mid_line && !was_mid && r->st == KD_OK) {
        r->st = kd_errorf(KD_ECONFIG, "%s:%d: line longer than %d characters", r->origin, r->line, num - 2);
        r->err_line = r->line;
    }
    return buf;
}

static int handler(void *user, const char *section, const char *name, const char *val) {
    reader *r = user;
    if (r->st != KD_OK) return 1; /* keep the first error */
    if (!*section) {
        r->st = kd_errorf(KD_ECONFIG, "%s:%d: key '%s' outside any [section]", r->origin, r->line, name);
        r->err_line = r->line;
        return 1;
    }
    r->st = kd_config_set(r->c, section, name, val, r->origin, r->line);
    r->err_line = r->line;
    return 1;
}

static kd_status parse(kd_config *c, reader *r) {
    r->c = c;
    r->st = KD_OK;
    /* an indented line would otherwise silently replace the value above it */
    ini_allow_multiline = false;
    int rc = ini_parse_stream(read_line, r, handler, r);
    /* report the earlier of our first error and inih's first malformed line */
    if (r->st != KD_OK && (rc <= 0 || r->err_line <= rc)) return r->st;
    if (rc > 0) return kd_errorf(KD_ECONFIG, "%s:%d: malformed line (expected [section] or key = value)", r->origin, rc);
    if (rc < 0) return kd_errorf(KD_EIO, "%s: could not be parsed (out of memory)", r->origin);
    /* a section header alone is fine; an unknown empty section is not caught by
     * the handler, so scan the headers */
    return KD_OK;
}

static kd_status check_sections(const char *text, const char *origin) {
    int line = 0;
    const char *p = text;
    while (*p) {
        line++;
        while (*p == ' ' || *p == '\t') p++;
        if (*p == '[') {
            const char *e = strchr(p, ']');
            const char *nl = strchr(p, '\n');
            if (e && (!nl || e < nl)) {
                char sec[64];
                size_t n = (size_t)(e - p - 1);
                if (n >= sizeof sec) n = sizeof sec - 1;
                memcpy(sec, p + 1, n);
                sec[n] = '\0';
                if (!section_known(sec))
                    return kd_errorf(KD_ECONFIG, "%s:%d: unknown section [%s] (known: %s)", origin, line, sec,
                                     known_sections());
            }
        }
        const char *nl = strchr(p, '\n');
        if (!nl) break;
        p = nl + 1;
    }
    return KD_OK;
}

kd_status kd_config_load_string(kd_config *c, const char *text, const char *origin) {
    kd_status st = check_sections(text, origin);
    if (st != KD_OK) return st;
    reader r = {.s = text, .origin = origin};
    return parse(c, &r);
}

kd_status kd_config_load(kd_config *c, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return kd_errorf(KD_EIO, "%s: cannot open config: %s", path, strerror(errno));
    char *text = NULL;
    size_t len = 0, cap = 0;
    char chunk[4096];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, f)) > 0) {
        if (len + got + 1 > cap) {
            cap = 2 * (len + got + 1);
            text = kd_realloc(text, cap);
        }
        memcpy(text + len, chunk, got);
        len += got;
        if (len > (1u << 20)) {
            fclose(f);
            free(text);
            return kd_errorf(KD_ECONFIG, "%s: config larger than 1 MB", path);
        }
    }
    int err = ferror(f);
    fclose(f);
    if (err) {
        free(text);
        return kd_errorf(KD_EIO, "%s: read error", path);
    }
    if (!text) text = kd_strdup("");
    text[len] = '\0';
    if (strlen(text) != len) {
        free(text);
        return kd_errorf(KD_ECONFIG, "%s: config contains a NUL byte (not a text file?)", path);
    }
    kd_status st = kd_config_load_string(c, text, path);
    free(text);
    return st;
}

kd_status kd_config_override(kd_config *c, const char *a) {
    const char *dot = strchr(a, '.'), *eq = strchr(a, '=');
    if (!dot || !eq || dot > eq)
        return kd_errorf(KD_EUSAGE, "command line: '--%s' is not of the form --section.key=value", a);
    char section[64], key[64];
    size_t ns = (size_t)(dot - a), nk = (size_t)(eq - dot - 1);
    if (ns >= sizeof section || nk >= sizeof key || ns == 0 || nk == 0)
        return kd_errorf(KD_EUSAGE, "command line: '--%s' is not of the form --section.key=value", a);
    memcpy(section, a, ns);
    section[ns] = '\0';
    memcpy(key, dot + 1, nk);
    key[nk] = '\0';
    return kd_config_set(c, section, key, eq + 1, "command line", 0);
}

static int must_find(const char *section, const char *key, vtype t) {
    int i = find(section, key);
    KD_ASSERT(i >= 0, "config key [%s] %s is not in the schema", section, key);
    KD_ASSERT(schema[i].type == t || (t == T_INT && schema[i].type == T_BOOL), "config key [%s] %s read as wrong type",
              section, key);
    return i;
}

int kd_config_int(const kd_config *c, const char *section, const char *key) {
    return (int)strtol(c->v[must_find(section, key, T_INT)].text, NULL, 10);
}

double kd_config_float(const kd_config *c, const char *section, const char *key) {
    return strtod(c->v[must_find(section, key, T_FLOAT)].text, NULL);
}

const char *kd_config_str(const kd_config *c, const char *section, const char *key) {
    return c->v[must_find(section, key, T_STR)].text;
}

int kd_config_is_set(const kd_config *c, const char *section, const char *key) {
    int i = find(section, key);
    KD_ASSERT(i >= 0, "config key [%s] %s is not in the schema", section, key);
    return c->v[i].set;
}

const char *kd_config_origin(const kd_config *c, const char *section, const char *key) {
    int i = find(section, key);
    KD_ASSERT(i >= 0, "config key [%s] %s is not in the schema", section, key);
    return c->v[i].origin;
}

kd_status kd_config_error(const kd_config *c, const char *section, const char *key, const char *fmt, ...) {
    int i = find(section, key);
    KD_ASSERT(i >= 0, "config key [%s] %s is not in the schema", section, key);
    char msg[1024], w[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    where(w, sizeof w, c->v[i].origin, c->v[i].line);
    return kd_errorf(KD_ECONFIG, "%s: [%s] %s = '%s': %s", w, section, key, c->v[i].text, msg);
}

/* Appends printf-style text to a growing buffer. */
static void append(char **s, size_t *n, size_t *cap, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void append(char **s, size_t *n, size_t *cap, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    KD_ASSERT(k >= 0, "vsnprintf failed");
    if (*n + (size_t)k + 1 > *cap) {
        while (*n + (size_t)k + 1 > *cap) *cap *= 2;
        *s = kd_realloc(*s, *cap);
    }
    va_start(ap, fmt);
    vsnprintf(*s + *n, *cap - *n, fmt, ap);
    va_end(ap);
    *n += (size_t)k;
}

char *kd_config_text(const kd_config *c) {
    size_t n = 0, cap = 4096;
    char *s = kd_malloc(cap);
    s[0] = '\0';
    const char *sec = "";
    append(&s, &n, &cap, "; resolved configuration written by distill %s\n", KD_VERSION);
    for (int i = 0; i < N_SCHEMA; i++) {
        if (strcmp(sec, schema[i].section) != 0) {
            sec = schema[i].section;
            append(&s, &n, &cap, "\n[%s]\n", sec);
        }
        append(&s, &n, &cap, "%s = %s\n", schema[i].key, c->v[i].text);
    }
    return s;
}

kd_status kd_config_write(const kd_config *c, const char *path) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return kd_errorf(KD_EIO, "%s: cannot write: %s", tmp, strerror(errno));
    char *text = kd_config_text(c);
    int bad = fputs(text, f) < 0;
    free(text);
    bad |= ferror(f);
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path) != 0) {
        remove(tmp);
        return kd_errorf(KD_EIO, "%s: write failed: %s", path, strerror(errno));
    }
    return KD_OK;
}

void kd_config_print_schema(FILE *f) {
    /* each section once, at its first appearance, with all its keys */
    for (int s = 0; s < N_SCHEMA; s++) {
        if (section_first(s) != s) continue;
        fprintf(f, "  [%s]\n", schema[s].section);
        for (int i = s; i < N_SCHEMA; i++) {
            if (strcmp(schema[i].section, schema[s].section) != 0) continue;
            fprintf(f, "    %-14s %-8s %s (default: %s)\n", schema[i].key,
                schema[i].type == T_INT     ? "int"
                : schema[i].type == T_FLOAT ? "number"
                : schema[i].type == T_BOOL  ? "0|1"
                                            : "string",
                    schema[i].help, *schema[i].def ? schema[i].def : "none");
        }
    }
}
