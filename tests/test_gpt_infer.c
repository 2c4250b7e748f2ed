/* test_gpt_infer.c - tests of GPT inference (src/nn/gpt_infer.c), the
 * sampler (src/nn/sample.c) and `distill generate` (src/cli/generate.c).
 *
 *   1. the spec parser: keys in any order, vocab override, every error
 *      naming its token; the tensor list and parameter count;
 *   2. parity with PyTorch through tests/fixtures/gpt_tiny*.safetensors
 *      (tests/fixtures/gen_gpt.py): the runner stepping token by token, three
 *      sequences at once, prefill, and the plain-loop reference, against
 *      torch's full-sequence logits at every position;
 *   3. the runner against the plain-loop reference on random weights of odd
 *      sizes (heads of 1 and 4 dims, ctx longer than a prefill chunk, vocab
 *      larger than dim, batches below the maximum); borrowed weights are
 *      read at every step (changing them changes the output), never looked
 *      up again; lookup failures name the tensor;
 *   4. the sampler: greedy and top_k = 1 are the argmax; empirical
 *      frequencies match the (filtered, renormalised) softmax by a
 *      chi-square bound; top-k never leaves the k largest (ties included);
 *      top-p keeps the smallest prefix reaching p on a hand-made
 *      distribution;
 *   5. generation: greedy output equals a simulation of the documented
 *      re-priming rule with the reference forward pass (past ctx, a prompt
 *      longer than ctx, ctx = 1), batch rows are independent, seeds
 *      reproduce, argument errors;
 *   6. kd_gpt_load errors (missing, mis-shaped, unexpected tensor, bad spec,
 *      bad metadata, missing file), each naming the file and the culprit;
 *   7. the CLI end to end (fork/exec of $KD_DISTILL): output layout, seeds,
 *      --prompt-file, --n, greedy output equal to the library's, and errors.
 * Not here: speed (docs/generate.md reports it), BPE tokenizers.
 */
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kd_gpt.h"
#include "kd_io.h"
#include "test.h"

/* Runner vs PyTorch (float64 reference rounded to float32) and vs our
 * double-accumulating reference: the runner computes in float32, through
 * LN, attention and GEMMs of a few layers; measured differences are ~1e-6
 * on logits of magnitude up to 10. */
#define ATOL 1e-5
#define RTOL 1e-5

/* ---------------------------------------------------------------- weight tables */

/* Named float arrays served by a lookup: the weights a runner borrows. */
typedef struct wtab {
    kd_gpt_cfg cfg;
    int n;
    char (*names)[64];
    int *ndim;
    int (*shape)[2];
    float **data;
    int lookups;
} wtab;

static void wtab_init(wtab *t, const kd_gpt_cfg *cfg) {
    memset(t, 0, sizeof *t);
    t->cfg = *cfg;
    t->n = kd_gpt_n_tensors(cfg);
    t->names = calloc((size_t)t->n, sizeof *t->names);
    t->ndim = calloc((size_t)t->n, sizeof *t->ndim);
    t->shape = calloc((size_t)t->n, sizeof *t->shape);
    t->data = calloc((size_t)t->n, sizeof *t->data);
    for (int i = 0; i < t->n; i++) {
        kd_gpt_tensor_info(cfg, i, t->names[i], sizeof t->names[i], &t->ndim[i], t->shape[i]);
        t->data[i] = calloc((size_t)kd_shape_numel(t->ndim[i], t->shape[i]), sizeof(float));
    }
}

static void wtab_free(wtab *t) {
    for (int i = 0; i < t->n; i++) free(t->data[i]);
    free(t->names);
    free(t->ndim);
    free(t->shape);
    free(t->data);
}

static float *wtab_get(wtab *t, const char *name) {
    for (int i = 0; i < t->n; i++)
        if (strcmp(t->names[i], name) == 0) return t->data[i];
    return NULL;
}

/* the scales of gen_gpt.py: attention far from uniform, GELU on both sides */
static void wtab_random(wtab *t, uint64_t seed) {
    kd_rng rng;
    kd_rng_seed(&rng, seed);
    for (int i = 0; i < t->n; i++) {
        const char *nm = t->names[i];
        int is_w = strstr(nm, "weight") != NULL, is_ln = strstr(nm, "ln_") != NULL;
        float base = is_ln && is_w ? 1.0f : 0.0f;
        float sd = !strcmp(nm, "wte.weight")   ? 1.0f
                   : !strcmp(nm, "wpe.weight") ? 0.5f
                   : is_ln                     ? (is_w ? 0.2f : 0.1f)
                   : is_w                      ? 0.3f
                                               : 0.1f;
        for (int64_t j = 0; j < kd_shape_numel(t->ndim[i], t->shape[i]); j++)
            t->data[i][j] = base + sd * kd_rng_normal(&rng);
    }
}

static const float *wtab_lookup(void *ctx, const char *name, int ndim, const int *shape) {
    wtab *t = ctx;
    t->lookups++;
    for (int i = 0; i < t->n; i++)
        if (strcmp(t->names[i], name) == 0)
            return t->ndim[i] == ndim && t->shape[i][0] == shape[0] && (ndim == 1 || t->shape[i][1] == shape[1])
                       ? t->data[i]
                       : NULL;
    return NULL;
}

static int argmax_f(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

static void random_tokens(int *tok, int n, int V, uint64_t seed) {
    kd_rng rng;
    kd_rng_seed(&rng, seed);
    for (int i = 0; i < n; i++) tok[i] = (int)kd_rng_below(&rng, (uint32_t)V);
}

/* ---------------------------------------------------------------- 1. spec */

static void test_spec(void) {
    TEST("gpt_infer: spec parse") {
        kd_gpt_cfg c;
        CHECK(kd_gpt_cfg_parse("gpt: layers=6 dim=256 heads=8 ctx=128", 256, &c) == KD_OK);
        CHECK(c.layers == 6 && c.dim == 256 && c.heads == 8 && c.ctx == 128 && c.vocab == 256);
        CHECK(kd_gpt_cfg_parse("  gpt:ctx=8,heads=2   dim=16,layers=1 vocab=99", 11, &c) == KD_OK);
        CHECK(c.layers == 1 && c.dim == 16 && c.heads == 2 && c.ctx == 8 && c.vocab == 99);
        char buf[128];
        kd_gpt_cfg c2;
        CHECK(kd_gpt_cfg_parse(kd_gpt_cfg_str(&c, buf, sizeof buf), 99, &c2) == KD_OK);
        CHECK(memcmp(&c, &c2, sizeof c) == 0);
        CHECK(strcmp(buf, "gpt: layers=1 dim=16 heads=2 ctx=8") == 0);
    }
    TEST("gpt_infer: spec errors name the token") {
        static const struct {
            const char *spec, *needle;
            int vocab;
        } bad[] = {
            {"mlp: 256", "'mlp:'", 10},
            {"gpt: layers=2 dim=16 heads=2", "'ctx='", 10},
            {"gpt: layers=2 heads=2 ctx=8", "'dim='", 10},
            {"gpt: layers=2 dim=15 heads=2 ctx=8", "dim=15", 10},
            {"gpt: layers=2 dim=16 heads=32 ctx=8", "heads=32", 10},
            {"gpt: layers=2 dim=16 heads=2 ctx=8 foo=3", "'foo=3'", 10},
            {"gpt: layers=2 dim=16 heads=2 ctx=8 layers", "unknown key 'layers'", 10},
            {"gpt: layers=0 dim=16 heads=2 ctx=8", "'layers=0'", 10},
            {"gpt: layers=x dim=16 heads=2 ctx=8", "'layers=x'", 10},
            {"gpt: layers=2 dim=16 heads=2 ctx=8 ctx=9", "twice: 'ctx=9'", 10},
            {"gpt: layers=2 dim=16 heads=2 ctx=999999", "maximum of 65536: 'ctx=999999'", 10},
            {"gpt: layers=99999999999999999999999 dim=16 heads=2 ctx=8", "maximum", 10},
            {"gpt: layers=2 dim=16 heads=2 ctx=8 vocab=-3", "'vocab=-3'", 10},
            {"gpt: layers=2 dim=16 heads=2 ctx=8 dim=16x", "'dim=16x'", 10},
            {"gpt: layers=2 dim=16 heads=2 ctx=8", "vocab", 0},
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            kd_gpt_cfg c;
            kd_status st = kd_gpt_cfg_parse(bad[i].spec, bad[i].vocab, &c);
            const char *m = kd_error_message();
            CHECK_MSG(st == KD_ECONFIG && strstr(m, bad[i].needle) && strstr(m, bad[i].spec),
                      "spec '%s': status %d, message '%s', wanted '%s'", bad[i].spec, (int)st, m, bad[i].needle);
        }
    }
    TEST("gpt_infer: tensor list and parameter count") {
        kd_gpt_cfg c = {3, 12, 3, 20, 7};
        int64_t total = 0;
        int nt = kd_gpt_n_tensors(&c), dup = 0;
        char names[64][64];
        CHECK(nt == 2 + 12 * 3 + 2 && nt <= 64);
        for (int i = 0; i < nt && i < 64; i++) {
            int nd, sh[2];
            kd_gpt_tensor_info(&c, i, names[i], 64, &nd, sh);
            total += kd_shape_numel(nd, sh);
            for (int j = 0; j < i; j++) dup += strcmp(names[i], names[j]) == 0;
        }
        CHECK(dup == 0);
        CHECK(total == kd_gpt_n_params(&c));
        CHECK(strcmp(names[0], "wte.weight") == 0 && strcmp(names[4], "h.0.attn.c_attn.weight") == 0 &&
              strcmp(names[nt - 1], "ln_f.bias") == 0);
    }
}

/* ---------------------------------------------------------------- 2. PyTorch */

static void test_torch(void) {
    char path[512], rpath[512];
    kd_test_fixture("gpt_tiny.safetensors", path, sizeof path);
    kd_test_fixture("gpt_tiny_ref.safetensors", rpath, sizeof rpath);
    kd_gpt_cfg cfg;
    kd_gpt_runner *r = NULL;
    char *tok = (char *)"unset";
    kd_safetensors ref, ck;
    int have = 0;
    TEST("gpt_infer: torch fixture loads") {
        kd_status s1 = kd_gpt_load(path, &cfg, &r, &tok), s2 = kd_st_read(rpath, &ref);
        CHECK_MSG(s1 == KD_OK, "%s", kd_error_message());
        CHECK_MSG(s2 == KD_OK, "%s", kd_error_message());
        if (s1 != KD_OK || s2 != KD_OK) {
            if (s2 == KD_OK) kd_st_free(&ref);
            kd_gpt_runner_free(r);
            return;
        }
        have = 1;
        CHECK(tok == NULL);
        CHECK(cfg.layers == 2 && cfg.dim == 16 && cfg.heads == 2 && cfg.ctx == 8 && cfg.vocab == 11);
        CHECK(kd_gpt_runner_max_batch(r) == 1 && kd_gpt_runner_pos(r) == 0);
    }
    if (!have) return;
    enum { NB = 3, T = 8, V = 11 };
    float tf[NB * T], want[NB * T * V], got[NB * V], n_params = 0;
    int toks[NB * T];
    int sh_t[2] = {NB, T}, sh_l[3] = {NB, T, V}, sh_n[1] = {1};
    TEST("gpt_infer: torch reference tensors") {
        CHECK(kd_st_get_f32(&ref, "tokens", tf, 2, sh_t) == KD_OK);
        CHECK(kd_st_get_f32(&ref, "logits", want, 3, sh_l) == KD_OK);
        CHECK(kd_st_get_f32(&ref, "n_params", &n_params, 1, sh_n) == KD_OK);
        for (int i = 0; i < NB * T; i++) toks[i] = (int)tf[i];
        CHECK((int64_t)n_params == kd_gpt_n_params(&cfg));
    }
    TEST("gpt_infer: torch parity, one token at a time") {
        for (int t = 0; t < T; t++) {
            kd_gpt_runner_step(r, 1, &toks[t], got);
            char what[32];
            snprintf(what, sizeof what, "logits[0,%d]", t);
            CHECK_ARRAYS(what, got, want + t * V, V, ATOL, RTOL);
        }
        CHECK(kd_gpt_runner_pos(r) == T);
    }
    TEST("gpt_infer: torch parity, three sequences at once") {
        kd_gpt_runner_reserve(r, NB);
        CHECK(kd_gpt_runner_max_batch(r) == NB && kd_gpt_runner_pos(r) == 0);
        for (int t = 0; t < T; t++) {
            int step[NB];
            for (int b = 0; b < NB; b++) step[b] = toks[b * T + t];
            kd_gpt_runner_step(r, NB, step, got);
            for (int b = 0; b < NB; b++) {
                char what[32];
                snprintf(what, sizeof what, "logits[%d,%d]", b, t);
                CHECK_ARRAYS(what, got + b * V, want + (b * T + t) * V, V, ATOL, RTOL);
            }
        }
    }
    TEST("gpt_infer: torch parity, prefill then steps") {
        kd_gpt_runner_reset(r);
        kd_gpt_runner_prefill(r, NB, T, toks, got);
        for (int b = 0; b < NB; b++) CHECK_ARRAYS("prefill", got + b * V, want + (b * T + T - 1) * V, V, ATOL, RTOL);
        kd_gpt_runner_reset(r);
        int part[NB * 5];
        for (int b = 0; b < NB; b++) memcpy(part + b * 5, toks + b * T, 5 * sizeof(int));
        kd_gpt_runner_prefill(r, NB, 5, part, got);
        CHECK(kd_gpt_runner_pos(r) == 5);
        for (int b = 0; b < NB; b++) CHECK_ARRAYS("prefill 5", got + b * V, want + (b * T + 4) * V, V, ATOL, RTOL);
        for (int t = 5; t < T; t++) {
            int step[NB];
            for (int b = 0; b < NB; b++) step[b] = toks[b * T + t];
            kd_gpt_runner_step(r, NB, step, got);
            for (int b = 0; b < NB; b++) CHECK_ARRAYS("step", got + b * V, want + (b * T + t) * V, V, ATOL, RTOL);
        }
    }
    TEST("gpt_infer: torch parity, reference forward pass") {
        wtab w;
        wtab_init(&w, &cfg);
        CHECK(kd_st_read(path, &ck) == KD_OK);
        for (int i = 0; i < w.n; i++) CHECK(kd_st_get_f32(&ck, w.names[i], w.data[i], w.ndim[i], w.shape[i]) == KD_OK);
        CHECK(ck.n == w.n); /* the file holds exactly the model's tensors */
        kd_st_free(&ck);
        float full[T * V];
        for (int b = 0; b < NB; b++) {
            CHECK(kd_gpt_forward_naive(&cfg, wtab_lookup, &w, T, toks + b * T, full) == KD_OK);
            CHECK_ARRAYS("naive", full, want + b * T * V, T * V, ATOL, RTOL);
        }
        wtab_free(&w);
    }
    kd_st_free(&ref);
    kd_gpt_runner_free(r);
}

/* ---------------------------------------------------------------- 3. runner vs reference */

static void check_vs_naive(const kd_gpt_cfg *cfg, uint64_t seed) {
    enum { NB = 5 };
    int T = cfg->ctx, V = cfg->vocab;
    static char label[200];
    char spec[96];
    snprintf(label, sizeof label, "gpt_infer: runner = reference, %s vocab=%d", kd_gpt_cfg_str(cfg, spec, sizeof spec),
             V);
    TEST(label) {
        wtab w;
        wtab_init(&w, cfg);
        wtab_random(&w, seed);
        int *toks = malloc(sizeof(int) * NB * T);
        float *want = malloc(sizeof(float) * NB * T * V), *got = malloc(sizeof(float) * NB * V);
        random_tokens(toks, NB * T, V, seed + 1);
        for (int b = 0; b < NB; b++)
            CHECK(kd_gpt_forward_naive(cfg, wtab_lookup, &w, T, toks + b * T, want + b * T * V) == KD_OK);
        kd_gpt_runner *r = NULL;
        CHECK(kd_gpt_runner_new(&r, cfg, wtab_lookup, &w, NB) == KD_OK);
        if (r) {
            /* steps, all NB sequences */
            int ok = 1;
            for (int t = 0; t < T; t++) {
                int step[NB];
                for (int b = 0; b < NB; b++) step[b] = toks[b * T + t];
                kd_gpt_runner_step(r, NB, step, got);
                for (int b = 0; b < NB; b++)
                    ok &= kd_test_close_arrays("step", got + b * V, want + (b * T + t) * V, V, ATOL, RTOL);
            }
            CHECK(ok);
            /* a batch below the maximum: sequences 0 and 1 */
            kd_gpt_runner_reset(r);
            ok = 1;
            for (int t = 0; t < T; t++) {
                int step[2] = {toks[t], toks[T + t]};
                kd_gpt_runner_step(r, 2, step, got);
                for (int b = 0; b < 2; b++)
                    ok &= kd_test_close_arrays("B=2", got + b * V, want + (b * T + t) * V, V, ATOL, RTOL);
            }
            CHECK(ok);
            /* prefill of T-1 (in chunks when NB*(T-1) > 64 rows), then one step */
            if (T > 1) {
                kd_gpt_runner_reset(r);
                int *part = malloc(sizeof(int) * NB * (T - 1)), last[NB];
                for (int b = 0; b < NB; b++) {
                    memcpy(part + b * (T - 1), toks + b * T, sizeof(int) * (T - 1));
                    last[b] = toks[b * T + T - 1];
                }
                kd_gpt_runner_prefill(r, NB, T - 1, part, got);
                for (int b = 0; b < NB; b++)
                    CHECK_ARRAYS("prefill", got + b * V, want + (b * T + T - 2) * V, V, ATOL, RTOL);
                kd_gpt_runner_step(r, NB, last, got);
                for (int b = 0; b < NB; b++)
                    CHECK_ARRAYS("after prefill", got + b * V, want + (b * T + T - 1) * V, V, ATOL, RTOL);
                CHECK(kd_gpt_runner_pos(r) == T);
                /* prefill without logits, then a step: same as above */
                kd_gpt_runner_reset(r);
                kd_gpt_runner_prefill(r, NB, T - 1, part, NULL);
                kd_gpt_runner_step(r, NB, last, got);
                for (int b = 0; b < NB; b++)
                    CHECK_ARRAYS("after prefill(NULL)", got + b * V, want + (b * T + T - 1) * V, V, ATOL, RTOL);
                free(part);
            }
        }
        kd_gpt_runner_free(r);
        free(toks);
        free(want);
        free(got);
        wtab_free(&w);
    }
}

static void test_runner(void) {
    check_vs_naive(&(kd_gpt_cfg){3, 12, 3, 20, 7}, 11); /* head dim 4 */
    check_vs_naive(&(kd_gpt_cfg){1, 6, 1, 5, 300}, 12); /* one head, vocab > dim */
    check_vs_naive(&(kd_gpt_cfg){2, 8, 2, 70, 5}, 13);  /* prefill in chunks */
    check_vs_naive(&(kd_gpt_cfg){1, 4, 1, 1, 3}, 14);   /* ctx 1 */
#ifdef _OPENMP
    TEST("gpt_infer: 1 and 2 threads give the same bits (parallel attention, LN, GELU)") {
        /* big enough that every parallel loop runs threaded (over 32768
         * elements of work): 600 sequences, one position per prefill chunk,
         * so LN sees 600 x 64 and GELU 600 x 256 */
        enum { NB = 600, T = 10, V = 50 };
        kd_gpt_cfg cfg = {1, 64, 4, T, V};
        wtab w;
        wtab_init(&w, &cfg);
        wtab_random(&w, 15);
        /* the scales of wtab_random suit dim <= 16; halve the matrices for
         * dim 64 so activations keep the same size (and so the rounding) */
        for (int i = 0; i < w.n; i++)
            if (w.ndim[i] == 2 && strncmp(w.names[i], "h.", 2) == 0)
                for (int64_t j = 0; j < kd_shape_numel(2, w.shape[i]); j++) w.data[i][j] *= 0.5f;
        int *toks = malloc(sizeof(int) * NB * T), *part = malloc(sizeof(int) * NB * (T - 1)), last[NB];
        float *want = malloc(sizeof(float) * T * V),
              *got[2] = {malloc(sizeof(float) * NB * V), malloc(sizeof(float) * NB * V)};
        random_tokens(toks, NB * T, V, 16);
        for (int b = 0; b < NB; b++) {
            memcpy(part + b * (T - 1), toks + b * T, sizeof(int) * (T - 1));
            last[b] = toks[b * T + T - 1];
        }
        kd_gpt_runner *r = NULL;
        CHECK(kd_gpt_runner_new(&r, &cfg, wtab_lookup, &w, NB) == KD_OK);
        int threads0 = omp_get_max_threads();
        for (int k = 0; k < 2 && r; k++) {
            omp_set_num_threads(k + 1);
            kd_gpt_runner_reset(r);
            kd_gpt_runner_prefill(r, NB, T - 1, part, NULL);
            kd_gpt_runner_step(r, NB, last, got[k]);
        }
        omp_set_num_threads(threads0);
        CHECK(r && memcmp(got[0], got[1], sizeof(float) * NB * V) == 0);
        for (int b = 0; b < NB; b += 299) {
            CHECK(kd_gpt_forward_naive(&cfg, wtab_lookup, &w, T, toks + b * T, want) == KD_OK);
            CHECK_ARRAYS("threaded", got[1] + b * V, want + (T - 1) * V, V, ATOL, RTOL);
        }
        kd_gpt_runner_free(r);
        free(toks);
        free(part);
        free(want);
        free(got[0]);
        free(got[1]);
        wtab_free(&w);
    }
#endif
    TEST("gpt_infer: borrowed weights are read at every step, looked up once") {
        kd_gpt_cfg cfg = {1, 8, 2, 6, 9};
        wtab w;
        wtab_init(&w, &cfg);
        wtab_random(&w, 21);
        kd_gpt_runner *r = NULL;
        CHECK(kd_gpt_runner_new(&r, &cfg, wtab_lookup, &w, 1) == KD_OK);
        CHECK(w.lookups == w.n);
        int toks[3] = {4, 1, 7};
        float a[9], b[9], want[3 * 9];
        for (int t = 0; t < 3; t++) kd_gpt_runner_step(r, 1, &toks[t], a);
        /* as an optimiser would: change the arrays in place */
        float *fc = wtab_get(&w, "h.0.mlp.c_fc.weight"), *lnf = wtab_get(&w, "ln_f.bias");
        for (int i = 0; i < 4 * 8 * 8; i++) fc[i] *= 1.5f;
        for (int i = 0; i < 8; i++) lnf[i] += 0.25f;
        kd_gpt_runner_reset(r);
        for (int t = 0; t < 3; t++) kd_gpt_runner_step(r, 1, &toks[t], b);
        CHECK(w.lookups == w.n);
        CHECK(kd_gpt_forward_naive(&cfg, wtab_lookup, &w, 3, toks, want) == KD_OK);
        CHECK_ARRAYS("updated weights", b, want + 2 * 9, 9, ATOL, RTOL);
        int differ = 0;
        for (int i = 0; i < 9; i++) differ |= fabsf(a[i] - b[i]) > 1e-3f;
        CHECK(differ);
        kd_gpt_runner_free(r);
        wtab_free(&w);
    }
    TEST("gpt_infer: a missing or mis-shaped tensor is named") {
        kd_gpt_cfg cfg = {2, 8, 2, 6, 9};
        wtab w;
        wtab_init(&w, &cfg);
        kd_gpt_runner *r = (kd_gpt_runner *)&w; /* must be set to NULL on failure */
        strcpy(w.names[2 + 12 + 9], "renamed"); /* h.1.mlp.c_fc.bias */
        CHECK(kd_gpt_runner_new(&r, &cfg, wtab_lookup, &w, 2) == KD_EFORMAT);
        CHECK_MSG(strstr(kd_error_message(), "'h.1.mlp.c_fc.bias'") && strstr(kd_error_message(), "(32)"), "%s",
                  kd_error_message());
        CHECK(r == NULL);
        strcpy(w.names[2 + 12 + 9], "h.1.mlp.c_fc.bias");
        w.shape[1][0] = 7; /* wpe (7, 8) instead of (6, 8) */
        CHECK(kd_gpt_runner_new(&r, &cfg, wtab_lookup, &w, 2) == KD_EFORMAT);
        CHECK_MSG(strstr(kd_error_message(), "'wpe.weight'") && strstr(kd_error_message(), "(6, 8)"), "%s",
                  kd_error_message());
        int toks[2] = {1, 2};
        float lg[9];
        CHECK(kd_gpt_forward_naive(&cfg, wtab_lookup, &w, 2, toks, lg) == KD_EFORMAT);
        CHECK(strstr(kd_error_message(), "'wpe.weight'") != NULL);
        w.shape[1][0] = 6;
        CHECK(kd_gpt_runner_new(&r, &cfg, wtab_lookup, &w, 2) == KD_OK);
        kd_gpt_runner_free(r);
        wtab_free(&w);
    }
}

/* ---------------------------------------------------------------- 4. sampler */

/* p (n): softmax of z/T */
static void softmax_t(double *p, const float *z, int n, double T) {
    double m = z[0], s = 0.0;
    for (int i = 1; i < n; i++) m = z[i] > m ? z[i] : m;
    for (int i = 0; i < n; i++) s += p[i] = exp((z[i] - m) / T);
    for (int i = 0; i < n; i++) p[i] /= s;
}

/* Draws N tokens; returns the chi-square statistic of the counts against
 * p over the tokens with p > 0 and its limit df + 6 sqrt(2 df) (the mean
 * plus six standard deviations: a correct sampler exceeds it with a
 * probability under 1e-3, and the fixed seed makes the outcome fixed);
 * *outside counts draws out of range or where p is 0. */
static double chi_square(const float *z, int V, const kd_sample_opts *o, const double *p, long N, uint64_t seed,
                         double *lim, int *outside) {
    long *cnt = calloc((size_t)V, sizeof *cnt);
    void *scratch = malloc(kd_sample_scratch_bytes(V));
    kd_rng rng;
    kd_rng_seed(&rng, seed);
    *outside = 0;
    for (long i = 0; i < N; i++) {
        int t = kd_sample_token(z, V, o, &rng, scratch);
        if (t < 0 || t >= V || p[t] == 0.0)
            (*outside)++;
        else
            cnt[t]++;
    }
    double chi = 0.0;
    int df = -1;
    for (int i = 0; i < V; i++) {
        if (p[i] == 0.0) continue;
        double e = N * p[i];
        chi += (cnt[i] - e) * (cnt[i] - e) / e;
        df++;
    }
    *lim = df + 6.0 * sqrt(2.0 * (df > 0 ? df : 1));
    free(cnt);
    free(scratch);
    return chi;
}

static void check_freq(const char *what, const float *z, int V, const kd_sample_opts *o, const double *p, long N,
                       uint64_t seed) {
    double lim;
    int outside;
    double chi = chi_square(z, V, o, p, N, seed, &lim, &outside);
    CHECK_MSG(outside == 0, "%s: %d tokens drawn that have probability 0", what, outside);
    CHECK_MSG(chi < lim, "%s: chi-square %.2f, limit %.2f", what, chi, lim);
}

static void test_sampler(void) {
    TEST("gpt_infer: greedy and top_k=1 are the argmax") {
        kd_rng rng, rng0;
        kd_rng_seed(&rng, 5);
        float z[37];
        void *scratch = malloc(kd_sample_scratch_bytes(37));
        int ok = 1;
        for (int trial = 0; trial < 200; trial++) {
            for (int i = 0; i < 37; i++) z[i] = kd_rng_normal(&rng) * 3.0f;
            if (trial % 3 == 0) z[trial % 37] = z[(trial + 5) % 37] = 20.0f; /* a tie: the lower index */
            int want = argmax_f(z, 37);
            rng0 = rng;
            ok &= kd_sample_token(z, 37, &(kd_sample_opts){0.0f, 0, 1.0f}, &rng, scratch) == want;
            ok &= kd_sample_token(z, 37, &(kd_sample_opts){-1.0f, 10, 0.5f}, &rng, NULL) == want;
            ok &= kd_sample_token(z, 37, &(kd_sample_opts){1.0f, 1, 1.0f}, &rng, scratch) == want;
            ok &= kd_sample_token(z, 37, &(kd_sample_opts){5.0f, 1, 0.3f}, &rng, scratch) == want;
            ok &= rng.s == rng0.s; /* greedy draws nothing */
        }
        CHECK(ok);
        float one = 0.5f;
        CHECK(kd_sample_token(&one, 1, &(kd_sample_opts){1.0f, 0, 1.0f}, &rng, scratch) == 0);
        free(scratch);
    }
    TEST("gpt_infer: sampling frequencies match the softmax") {
        const float z[6] = {1.0f, -0.5f, 2.0f, 0.3f, -1.2f, 0.9f};
        double p[6];
        softmax_t(p, z, 6, 1.0);
        check_freq("T=1", z, 6, &(kd_sample_opts){1.0f, 0, 1.0f}, p, 40000, 1);
        softmax_t(p, z, 6, 2.5);
        check_freq("T=2.5", z, 6, &(kd_sample_opts){2.5f, 0, 1.0f}, p, 40000, 2);
        /* top-k 3 at T 0.7: the three largest (2.0, 1.0, 0.9), renormalised */
        const float zk[3] = {1.0f, 2.0f, 0.9f};
        double pk[3], pp[6] = {0};
        softmax_t(pk, zk, 3, 0.7);
        pp[0] = pk[0], pp[2] = pk[1], pp[5] = pk[2];
        check_freq("top-k 3", z, 6, &(kd_sample_opts){0.7f, 3, 1.0f}, pp, 40000, 3);
        /* the check has power: T=1 draws measured against T=2.5 fail it */
        double lim;
        int outside;
        softmax_t(p, z, 6, 2.5);
        double chi = chi_square(z, 6, &(kd_sample_opts){1.0f, 0, 1.0f}, p, 40000, 4, &lim, &outside);
        CHECK_MSG(chi > lim, "wrong temperature not noticed: chi-square %.2f, limit %.2f", chi, lim);
    }
    TEST("gpt_infer: top-k never leaves the k largest") {
        enum { V = 50 };
        kd_rng rng;
        kd_rng_seed(&rng, 9);
        float z[V];
        void *scratch = malloc(kd_sample_scratch_bytes(V));
        int ok = 1, seen_boundary = 0;
        for (int trial = 0; trial < 40; trial++) {
            for (int i = 0; i < V; i++) z[i] = (float)(int)(kd_rng_normal(&rng) * 3.0f); /* many ties */
            int k = 1 + trial % 7;
            for (int d = 0; d < 300; d++) {
                int t = kd_sample_token(z, V, &(kd_sample_opts){3.0f, k, 1.0f}, &rng, scratch);
                int rank = 0; /* how many rank before t: larger, or equal with a lower index */
                for (int j = 0; j < V; j++) rank += z[j] > z[t] || (z[j] == z[t] && j < t);
                ok &= t >= 0 && t < V && rank < k;
                seen_boundary |= rank == k - 1 && k > 1;
            }
        }
        CHECK(ok);
        CHECK(seen_boundary); /* the k-th token itself is reachable */
        free(scratch);
    }
    TEST("gpt_infer: top-p keeps the smallest prefix reaching p") {
        /* probabilities 0.1 0.4 0.2 0.3 (as log-probabilities, shuffled) */
        const float z[4] = {logf(0.1f), logf(0.4f), logf(0.2f), logf(0.3f)};
        double p1[4] = {0, 1, 0, 0}, p2[4] = {0, 0.4 / 0.7, 0, 0.3 / 0.7}, p3[4] = {0, 0.4 / 0.9, 0.2 / 0.9, 0.3 / 0.9},
               p4[4] = {0.1, 0.4, 0.2, 0.3};
        check_freq("top-p 0.3", z, 4, &(kd_sample_opts){1.0f, 0, 0.3f}, p1, 2000, 5);
        check_freq("top-p 0.69", z, 4, &(kd_sample_opts){1.0f, 0, 0.69f}, p2, 40000, 6);
        check_freq("top-p 0.71", z, 4, &(kd_sample_opts){1.0f, 0, 0.71f}, p3, 40000, 7);
        check_freq("top-p 0.95", z, 4, &(kd_sample_opts){1.0f, 0, 0.95f}, p4, 40000, 8);
        check_freq("top-p 1", z, 4, &(kd_sample_opts){1.0f, 0, 1.0f}, p4, 40000, 9);
        /* after top-k 3 (0.4 0.3 0.2, renormalised by 0.9), p = 0.75 needs 0.4+0.3 = 0.78 */
        check_freq("top-k 3, top-p 0.75", z, 4, &(kd_sample_opts){1.0f, 3, 0.75f}, p2, 40000, 10);
    }
    TEST("gpt_infer: sampling options are checked") {
        CHECK(kd_sample_opts_check(&(kd_sample_opts){0.8f, 5, 0.9f}) == KD_OK);
        CHECK(kd_sample_opts_check(&(kd_sample_opts){0.0f, 0, 2.0f}) == KD_OK);
        CHECK(kd_sample_opts_check(&(kd_sample_opts){NAN, 0, 1.0f}) == KD_ECONFIG);
        CHECK(kd_sample_opts_check(&(kd_sample_opts){INFINITY, 0, 1.0f}) == KD_ECONFIG);
        CHECK(kd_sample_opts_check(&(kd_sample_opts){1.0f, 0, 0.0f}) == KD_ECONFIG);
        CHECK(kd_sample_opts_check(&(kd_sample_opts){1.0f, 0, NAN}) == KD_ECONFIG);
        CHECK(strstr(kd_error_message(), "top_p") != NULL);
    }
}

/* ---------------------------------------------------------------- 5. generation */

/* The documented rule, with the reference forward pass: the window is the
 * prompt's last ctx tokens; each new token is the argmax after the window;
 * a full window is replaced by its last max(1, ctx/2) - 1 tokens and the
 * new one, otherwise the new token is appended. */
static void greedy_sim(const kd_gpt_cfg *cfg, wtab *w, const int *prompt, int P, int n_new, int *out) {
    int ctx = cfg->ctx, V = cfg->vocab, keep = ctx / 2 > 0 ? ctx / 2 : 1;
    int L = P < ctx ? P : ctx, *win = malloc(sizeof(int) * ctx);
    float *lg = malloc(sizeof(float) * ctx * V);
    memcpy(win, prompt + P - L, sizeof(int) * L);
    for (int i = 0; i < n_new; i++) {
        if (kd_gpt_forward_naive(cfg, wtab_lookup, w, L, win, lg) != KD_OK) break;
        int t = out[i] = argmax_f(lg + (L - 1) * V, V);
        if (L == ctx) {
            memmove(win, win + ctx - (keep - 1), sizeof(int) * (keep - 1));
            win[keep - 1] = t;
            L = keep;
        } else {
            win[L++] = t;
        }
    }
    free(win);
    free(lg);
}

static void check_greedy(const kd_gpt_cfg *cfg, int P, int n_new, uint64_t seed) {
    enum { NB = 3 };
    static char label[200];
    char spec[96];
    snprintf(label, sizeof label, "gpt_infer: greedy generation = re-priming rule, %s, P=%d, %d new",
             kd_gpt_cfg_str(cfg, spec, sizeof spec), P, n_new);
    TEST(label) {
        wtab w;
        wtab_init(&w, cfg);
        wtab_random(&w, seed);
        int *prompt = malloc(sizeof(int) * NB * P), *out = malloc(sizeof(int) * NB * n_new),
            *one = malloc(sizeof(int) * n_new), *want = malloc(sizeof(int) * n_new);
        random_tokens(prompt, NB * P, cfg->vocab, seed + 1);
        kd_gpt_runner *r = NULL;
        CHECK(kd_gpt_runner_new(&r, cfg, wtab_lookup, &w, NB) == KD_OK);
        kd_rng rng;
        kd_rng_seed(&rng, 1);
        kd_sample_opts g = {0.0f, 0, 1.0f};
        if (r) {
            CHECK_MSG(kd_gpt_generate(r, NB, prompt, P, n_new, &g, &rng, out) == KD_OK, "%s", kd_error_message());
            for (int b = 0; b < NB; b++) {
                greedy_sim(cfg, &w, prompt + b * P, P, n_new, want);
                CHECK_MSG(memcmp(out + b * n_new, want, sizeof(int) * n_new) == 0, "sequence %d differs", b);
                /* the same sequence alone: batch rows are independent */
                CHECK(kd_gpt_generate(r, 1, prompt + b * P, P, n_new, &g, &rng, one) == KD_OK);
                CHECK(memcmp(one, want, sizeof(int) * n_new) == 0);
            }
        }
        kd_gpt_runner_free(r);
        free(prompt);
        free(out);
        free(one);
        free(want);
        wtab_free(&w);
    }
}

static void test_generate(void) {
    check_greedy(&(kd_gpt_cfg){2, 8, 2, 6, 13}, 4, 20, 31); /* re-primes several times */
    check_greedy(&(kd_gpt_cfg){2, 8, 2, 6, 13}, 9, 7, 32);  /* prompt longer than ctx */
    check_greedy(&(kd_gpt_cfg){1, 4, 1, 1, 5}, 2, 6, 33);   /* ctx 1: a window of one token */
    check_greedy(&(kd_gpt_cfg){1, 8, 2, 7, 9}, 7, 9, 34);   /* prompt exactly ctx, odd ctx */
    kd_gpt_cfg cfg = {2, 8, 2, 6, 13};
    wtab w;
    wtab_init(&w, &cfg);
    wtab_random(&w, 41);
    kd_gpt_runner *r = NULL;
    TEST("gpt_infer: sampled generation past ctx, seeds") {
        CHECK(kd_gpt_runner_new(&r, &cfg, wtab_lookup, &w, 2) == KD_OK);
        if (!r) break;
        enum { N = 50 };
        int prompt[2 * 3] = {1, 2, 3, 4, 5, 6}, a[2 * N], b[2 * N], c[2 * N];
        kd_sample_opts o = {1.0f, 0, 1.0f};
        kd_rng rng;
        kd_rng_seed(&rng, 7);
        CHECK(kd_gpt_generate(r, 2, prompt, 3, N, &o, &rng, a) == KD_OK);
        int ok = 1;
        for (int i = 0; i < 2 * N; i++) ok &= a[i] >= 0 && a[i] < 13;
        CHECK(ok);
        kd_rng_seed(&rng, 7);
        CHECK(kd_gpt_generate(r, 2, prompt, 3, N, &o, &rng, b) == KD_OK);
        CHECK(memcmp(a, b, sizeof a) == 0);
        kd_rng_seed(&rng, 8);
        CHECK(kd_gpt_generate(r, 2, prompt, 3, N, &o, &rng, c) == KD_OK);
        CHECK(memcmp(a, c, sizeof a) != 0);
        o = (kd_sample_opts){0.9f, 4, 0.8f};
        CHECK(kd_gpt_generate(r, 2, prompt, 3, N, &o, &rng, c) == KD_OK);
        CHECK(kd_gpt_generate(r, 2, prompt, 3, 0, &o, &rng, NULL) == KD_OK);
    }
    TEST("gpt_infer: generation argument errors") {
        if (!r) break;
        int prompt[4] = {1, 2, 3, 4}, out[8];
        kd_rng rng;
        kd_rng_seed(&rng, 1);
        kd_sample_opts o = {1.0f, 0, 1.0f};
        CHECK(kd_gpt_generate(r, 0, prompt, 2, 4, &o, &rng, out) == KD_EUSAGE);
        CHECK(kd_gpt_generate(r, 3, prompt, 1, 4, &o, &rng, out) == KD_EUSAGE);
        CHECK(kd_gpt_generate(r, 1, prompt, 0, 4, &o, &rng, out) == KD_EUSAGE);
        CHECK(kd_gpt_generate(r, 1, prompt, 2, -1, &o, &rng, out) == KD_EUSAGE);
        int badp[2] = {3, 13};
        CHECK(kd_gpt_generate(r, 1, badp, 2, 4, &o, &rng, out) == KD_EUSAGE);
        CHECK_MSG(strstr(kd_error_message(), "token 13") && strstr(kd_error_message(), "position 1"), "%s",
                  kd_error_message());
        badp[1] = -1;
        CHECK(kd_gpt_generate(r, 1, badp, 2, 4, &o, &rng, out) == KD_EUSAGE);
        o.top_p = 0.0f;
        CHECK(kd_gpt_generate(r, 1, prompt, 2, 4, &o, &rng, out) == KD_ECONFIG);
    }
    kd_gpt_runner_free(r);
    wtab_free(&w);
}

/* ---------------------------------------------------------------- 6. load errors */

/* Writes t as a checkpoint, with: tensor `skip` left out, tensor `reshape`
 * given one more row, an extra tensor `extra`, metadata model/vocab/
 * tokenizer (NULL: none). */
static int write_ckpt(const char *path, const wtab *t, const char *skip, const char *reshape, const char *extra,
                      const char *model, const char *vocab, const char *tokenizer) {
    kd_st_writer *wr = kd_st_writer_new();
    for (int i = 0; i < t->n; i++) {
        if (skip && !strcmp(t->names[i], skip)) continue;
        int sh[2] = {t->shape[i][0], t->shape[i][1]};
        float *d = t->data[i], *big = NULL;
        if (reshape && !strcmp(t->names[i], reshape)) {
            int64_t n = kd_shape_numel(t->ndim[i], sh), row = t->ndim[i] == 2 ? sh[1] : 1;
            big = calloc((size_t)(n + row), sizeof(float));
            memcpy(big, d, sizeof(float) * (size_t)n);
            sh[0]++;
            d = big;
        }
        kd_st_add_f32(wr, t->names[i], t->ndim[i], sh, d);
        free(big);
    }
    if (extra) {
        int sh[1] = {3};
        float z[3] = {0};
        kd_st_add_f32(wr, extra, 1, sh, z);
    }
    if (model) kd_st_set_meta(wr, "model", model);
    if (vocab) kd_st_set_meta(wr, "vocab", vocab);
    if (tokenizer) kd_st_set_meta(wr, "tokenizer", tokenizer);
    kd_status st = kd_st_write(wr, path);
    kd_st_writer_free(wr);
    return st == KD_OK;
}

static char gdir[300];

static const char *gpath(char *buf, const char *name) {
    snprintf(buf, 512, "%s/%s", gdir, name);
    return buf;
}

/* kd_gpt_load(path) fails with status want and a message holding the path and needle */
static void expect_load_error(const char *path, kd_status want, const char *needle) {
    kd_gpt_cfg cfg;
    kd_gpt_runner *r = (kd_gpt_runner *)&cfg;
    char *tok = (char *)"unset";
    kd_status st = kd_gpt_load(path, &cfg, &r, &tok);
    const char *m = kd_error_message();
    CHECK_MSG(st == want && strstr(m, path) && strstr(m, needle) && r == NULL && tok == NULL,
              "status %d (want %d), message '%s' (want '%s')", (int)st, (int)want, m, needle);
    if (st == KD_OK) kd_gpt_runner_free(r);
}

static void test_load(void) {
    kd_gpt_cfg cfg = {2, 8, 2, 6, 13};
    const char *spec = "gpt: layers=2 dim=8 heads=2 ctx=6";
    wtab w;
    wtab_init(&w, &cfg);
    wtab_random(&w, 51);
    char p[512];
    TEST("gpt_infer: load a written checkpoint, tokenizer metadata") {
        CHECK(write_ckpt(gpath(p, "good.safetensors"), &w, NULL, NULL, NULL, spec, "13", "{\"model\": {}}"));
        kd_gpt_cfg c;
        kd_gpt_runner *r = NULL;
        char *tok = NULL;
        CHECK_MSG(kd_gpt_load(p, &c, &r, &tok) == KD_OK, "%s", kd_error_message());
        CHECK(memcmp(&c, &cfg, sizeof c) == 0);
        CHECK(tok && strcmp(tok, "{\"model\": {}}") == 0);
        if (r) {
            int toks[4] = {3, 0, 12, 5};
            float got[13], want[4 * 13];
            CHECK(kd_gpt_forward_naive(&cfg, wtab_lookup, &w, 4, toks, want) == KD_OK);
            for (int t = 0; t < 4; t++) kd_gpt_runner_step(r, 1, &toks[t], got);
            CHECK_ARRAYS("loaded", got, want + 3 * 13, 13, ATOL, RTOL);
        }
        free(tok);
        kd_gpt_runner_free(r);
        /* vocab from the spec when the metadata has none */
        CHECK(write_ckpt(gpath(p, "novocab.safetensors"), &w, NULL, NULL, NULL,
                         "gpt: vocab=13 layers=2 dim=8 heads=2 ctx=6", NULL, NULL));
        CHECK_MSG(kd_gpt_load(p, &c, &r, NULL) == KD_OK, "%s", kd_error_message());
        kd_gpt_runner_free(r);
    }
    TEST("gpt_infer: load errors name the file and the culprit") {
        CHECK(write_ckpt(gpath(p, "missing.safetensors"), &w, "h.1.attn.c_proj.bias", NULL, NULL, spec, "13", NULL));
        expect_load_error(p, KD_EFORMAT, "'h.1.attn.c_proj.bias' not found");
        CHECK(write_ckpt(gpath(p, "shape.safetensors"), &w, NULL, "h.0.mlp.c_fc.weight", NULL, spec, "13", NULL));
        expect_load_error(p, KD_EFORMAT, "h.0.mlp.c_fc.weight");
        CHECK(write_ckpt(gpath(p, "extra.safetensors"), &w, NULL, NULL, "lm_head.weight", spec, "13", NULL));
        expect_load_error(p, KD_EFORMAT, "unexpected tensor 'lm_head.weight'");
        CHECK(write_ckpt(gpath(p, "spec.safetensors"), &w, NULL, NULL, NULL, "gpt: layers=2 dim=8 heads=3 ctx=6", "13",
                         NULL));
        expect_load_error(p, KD_ECONFIG, "heads=3");
        CHECK(write_ckpt(gpath(p, "spec2.safetensors"), &w, NULL, NULL, NULL, "mlp: 256", "13", NULL));
        expect_load_error(p, KD_ECONFIG, "'mlp:'");
        CHECK(write_ckpt(gpath(p, "nomodel.safetensors"), &w, NULL, NULL, NULL, NULL, "13", NULL));
        expect_load_error(p, KD_EFORMAT, "'model'");
        CHECK(write_ckpt(gpath(p, "badvocab.safetensors"), &w, NULL, NULL, NULL, spec, "13x", NULL));
        expect_load_error(p, KD_EFORMAT, "'vocab' = '13x'");
        CHECK(write_ckpt(gpath(p, "othervocab.safetensors"), &w, NULL, NULL, NULL, spec, "14", NULL));
        expect_load_error(p, KD_EFORMAT, "wte.weight");
        CHECK(write_ckpt(gpath(p, "novocab2.safetensors"), &w, NULL, NULL, NULL, spec, NULL, NULL));
        expect_load_error(p, KD_ECONFIG, "vocab");
        expect_load_error(gpath(p, "does-not-exist.safetensors"), KD_EIO, "does-not-exist");
    }
    wtab_free(&w);
}

/* ---------------------------------------------------------------- 7. CLI */

typedef struct cli_res {
    int code; /* exit code, or -1 when killed */
    char *out, *err;
    size_t out_len;
} cli_res;

static cli_res run_cli(const char *first, ...) {
    const char *argv[40];
    int argc = 0;
    const char *b = getenv("KD_DISTILL");
    argv[argc++] = b && *b ? b : "build/distill";
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && argc < 39; a = va_arg(ap, const char *)) argv[argc++] = a;
    va_end(ap);
    argv[argc] = NULL;
    static int n_calls;
    char op[512], ep[512];
    snprintf(op, sizeof op, "%s/cli%03d.out", gdir, n_calls);
    snprintf(ep, sizeof ep, "%s/cli%03d.err", gdir, n_calls++);
    fflush(stdout);
    fflush(stderr);
    cli_res r = {.code = -1};
    pid_t pid = fork();
    if (pid == 0) {
        int fo = open(op, O_WRONLY | O_CREAT | O_TRUNC, 0644), fe = open(ep, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fo < 0 || fe < 0 || dup2(fo, 1) < 0 || dup2(fe, 2) < 0) _exit(126);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    int status = 0;
    if (pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status)) r.code = WEXITSTATUS(status);
    r.out = kd_test_slurp(op, &r.out_len);
    r.err = kd_test_slurp(ep, NULL);
    return r;
}

static void res_free(cli_res *r) {
    free(r->out);
    free(r->err);
}

/* exit code `code` and one line "distill: error: ..." holding needle */
static int cli_err(const cli_res *r, int code, const char *needle) {
    const char *e = strstr(r->err, "distill: error: ");
    const char *nl = e ? strchr(e, '\n') : NULL;
    int ok = r->code == code && e && strstr(e, needle) && nl && nl[1] == '\0' && !strstr(e + 1, "distill: error: ");
    if (!ok) fprintf(stderr, "  exit %d (want %d), stderr: %s  (want '%s')\n", r->code, code, r->err, needle);
    return ok;
}

static void test_cli_generate(void) {
    char ck[512], tiny[512], pf[512], tk[512];
    kd_test_fixture("gpt_bytes.safetensors", ck, sizeof ck);
    kd_test_fixture("gpt_tiny.safetensors", tiny, sizeof tiny);
    const char *b = getenv("KD_DISTILL");
    if (access(b && *b ? b : "build/distill", X_OK) != 0) {
        TEST("gpt_infer: distill binary present") CHECK_MSG(0, "set KD_DISTILL");
        return;
    }
    TEST("gpt_infer: distill generate prints prompt + continuation, seeds") {
        cli_res a = run_cli("generate", ck, "--prompt", "ab", "--tokens", "20", "--temperature", "0.8", "--top-k", "5",
                            "--top-p", "0.9", "--seed", "1", "--threads", "1", NULL);
        cli_res a2 = run_cli("generate", ck, "--prompt", "ab", "--tokens", "20", "--temperature", "0.8", "--top-k", "5",
                             "--top-p", "0.9", "--seed", "1", "--threads", "1", NULL);
        cli_res c = run_cli("generate", ck, "--prompt", "ab", "--tokens", "20", "--temperature", "0.8", "--top-k", "5",
                            "--top-p", "0.9", "--seed", "2", "--threads", "1", NULL);
        CHECK_MSG(a.code == 0 && a2.code == 0 && c.code == 0, "exit %d %d %d: %s", a.code, a2.code, c.code, a.err);
        CHECK_MSG(a.out_len == 2 + 20 + 1 && memcmp(a.out, "ab", 2) == 0 && a.out[22] == '\n', "output of %zu bytes",
                  a.out_len);
        CHECK(a.out_len == a2.out_len && memcmp(a.out, a2.out, a.out_len) == 0);
        CHECK(c.out_len == a.out_len && memcmp(a.out, c.out, a.out_len) != 0);
        CHECK(a.err[0] == '\0');
        res_free(&a);
        res_free(&a2);
        res_free(&c);
    }
    TEST("gpt_infer: distill generate --n, --prompt-file, past ctx") {
        /* 40 tokens with ctx 16: re-primes twice */
        cli_res a = run_cli("generate", ck, "--prompt", "hello", "--tokens", "40", "--n", "3", "--seed", "5", NULL);
        size_t one = 5 + 40 + 1;
        CHECK_MSG(a.code == 0 && a.out_len == 3 * one + 2 * 4, "exit %d, %zu bytes: %s", a.code, a.out_len, a.err);
        if (a.out_len == 3 * one + 2 * 4) {
            for (int s = 0; s < 3; s++) {
                const char *o = a.out + s * (one + 4);
                CHECK(memcmp(o, "hello", 5) == 0 && o[one - 1] == '\n');
                if (s < 2) CHECK(memcmp(o + one, "---\n", 4) == 0);
            }
        }
        FILE *f = fopen(gpath(pf, "prompt.txt"), "wb");
        CHECK(f && fwrite("hello", 1, 5, f) == 5 && fclose(f) == 0);
        cli_res b2 = run_cli("generate", ck, "--prompt-file", pf, "--tokens", "40", "--n", "3", "--seed", "5", NULL);
        CHECK(b2.code == 0 && b2.out_len == a.out_len && memcmp(a.out, b2.out, a.out_len) == 0);
        cli_res st = run_cli("generate", ck, "--prompt", "x", "--tokens", "10", "--stats", NULL);
        CHECK(st.code == 0 && strstr(st.err, "tokens/s"));
        res_free(&a);
        res_free(&b2);
        res_free(&st);
    }
    TEST("gpt_infer: distill generate greedy = kd_gpt_generate") {
        kd_gpt_cfg cfg;
        kd_gpt_runner *r = NULL;
        enum { N = 30 };
        int prompt[3] = {'a', 'b', 'c'}, out[N];
        kd_rng rng;
        kd_rng_seed(&rng, 0);
        CHECK(kd_gpt_load(ck, &cfg, &r, NULL) == KD_OK);
        CHECK(cfg.vocab == 256 && cfg.ctx < N);
        if (r) CHECK(kd_gpt_generate(r, 1, prompt, 3, N, &(kd_sample_opts){0.0f, 0, 1.0f}, &rng, out) == KD_OK);
        kd_gpt_runner_free(r);
        char want[3 + N + 1];
        memcpy(want, "abc", 3);
        for (int i = 0; i < N; i++) want[3 + i] = (char)out[i];
        want[3 + N] = '\n';
        cli_res a = run_cli("generate", ck, "--prompt", "abc", "--tokens", "30", "--temperature", "0", NULL);
        CHECK(a.code == 0 && a.out_len == sizeof want && memcmp(a.out, want, sizeof want) == 0);
        res_free(&a);
    }
    TEST("gpt_infer: distill generate errors") {
        static const struct {
            const char *a[6];
            int code;
            const char *needle;
        } bad[] = {
            {{"--prompt", "ab", "--tokens", "-1"}, 2, "--tokens"},
            {{"--prompt", "ab", "--tokens", "ten"}, 2, "--tokens"},
            {{"--prompt", "ab", "--temperature", "hot"}, 2, "--temperature"},
            {{"--prompt", "ab", "--temperature", "-1"}, 2, "--temperature"},
            {{"--prompt", "ab", "--temperature", "nan"}, 2, "--temperature"},
            {{"--prompt", "ab", "--top-p", "0"}, 2, "--top-p"},
            {{"--prompt", "ab", "--top-p", "1.5"}, 2, "--top-p"},
            {{"--prompt", "ab", "--top-k", "-2"}, 2, "--top-k"},
            {{"--prompt", "ab", "--n", "0"}, 2, "--n"},
            {{"--prompt", "ab", "--seed", "-3"}, 2, "--seed"},
            {{"--prompt", "ab", "--bogus", "1"}, 2, "--bogus"},
            {{"--tokens", "5"}, 2, "--prompt"},
            {{"--prompt", "ab", "--prompt-file", "x"}, 2, "--prompt"},
            {{"--prompt", ""}, 2, "empty"},
            {{"--prompt-file", "/nonexistent/p.txt"}, 1, "/nonexistent/p.txt"},
        };
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            const char *const *x = bad[i].a;
            cli_res r = run_cli("generate", ck, x[0], x[1], x[2], x[3], x[4], x[5], NULL);
            CHECK_MSG(cli_err(&r, bad[i].code, bad[i].needle), "case %zu", i);
            res_free(&r);
        }
        cli_res r = run_cli("generate", "--prompt", "ab", NULL);
        CHECK(cli_err(&r, 2, "CHECKPOINT"));
        res_free(&r);
        r = run_cli("generate", gpath(pf, "nope.safetensors"), "--prompt", "ab", NULL);
        CHECK(cli_err(&r, 1, "nope.safetensors"));
        res_free(&r);
        /* vocab 11: text cannot be encoded as bytes */
        r = run_cli("generate", tiny, "--prompt", "ab", NULL);
        CHECK(cli_err(&r, 2, "outside the vocabulary") && strstr(r.err, "11 tokens"));
        res_free(&r);
        /* a broken BPE tokenizer in the metadata */
        kd_safetensors st;
        CHECK(kd_st_read(ck, &st) == KD_OK);
        kd_st_writer *wr = kd_st_writer_new();
        for (int i = 0; i < st.n; i++)
            kd_st_add(wr, st.tensors[i].name, st.tensors[i].dtype, st.tensors[i].ndim, st.tensors[i].shape,
                      st.tensors[i].data);
        for (int i = 0; i < st.n_meta; i++) kd_st_set_meta(wr, st.meta_keys[i], st.meta_vals[i]);
        kd_st_set_meta(wr, "tokenizer", "{\"merges\": []}");
        CHECK(kd_st_write(wr, gpath(tk, "bpe.safetensors")) == KD_OK);
        kd_st_writer_free(wr);
        kd_st_free(&st);
        r = run_cli("generate", tk, "--prompt", "ab", NULL);
        CHECK(cli_err(&r, 1, "bpe.safetensors")); /* a malformed tokenizer in the metadata, named by its file */
        res_free(&r);
        r = run_cli("generate", "--help", NULL);
        CHECK(r.code == 0 && strstr(r.out, "--prompt-file") && strstr(r.out, "--top-p"));
        res_free(&r);
    }
}

void test_gpt_infer(void) {
    snprintf(gdir, sizeof gdir, "%s/gpt_infer", kd_test_tmpdir());
    mkdir(gdir, 0755);
    test_spec();
    test_torch();
    test_runner();
    test_sampler();
    test_generate();
    test_load();
    test_cli_generate();
}
