/* test_lm.c - language models end to end: the GPT graph against the
 * incremental (KV-cache) path and PyTorch, gradients of the whole model,
 * training, distillation, the top-k teacher cache, on-policy batches,
 * sequence-level KD samples, and `distill run` / `cache` / `generate`. */
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "gradcheck.h"
#include "kd_io.h"
#include "kd_lm.h"
#include "test.h"

static char dir[300], corpus[400];

/* a corpus of short documents with learnable structure */
static void write_corpus(void) {
    snprintf(dir, sizeof dir, "%s/lm", kd_test_tmpdir());
    mkdir(dir, 0755);
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", dir);
    FILE *f = fopen(corpus, "w");
    const char *words[] = {"cat", "dog", "bird", "fish", "cow"};
    for (int i = 0; i < 400; i++) {
        fprintf(f, "the %s sat on the %s and the %s ran. number %d.\n", words[i % 5], words[(i / 5) % 5],
                words[(i * 3 + 1) % 5], i);
        fprintf(f, "\n");
    }
    fclose(f);
}

static void fill_ids(kd_rng *r, kd_node *x, int V) {
    for (int64_t i = 0; i < kd_numel(&x->val); i++) x->val.data[i] = (float)kd_rng_below(r, (uint32_t)V);
}

/* non-trivial LayerNorm parameters */
static void perturb_ln(kd_lm *lm, kd_rng *r) {
    for (int i = 0; i < kd_graph_n_state(lm->g); i++) {
        kd_node *n = kd_graph_state(lm->g, i);
        if (strstr(n->name, "ln_") || strstr(n->name, ".bias")) kd_gc_fill(r, n, 0.3f, strstr(n->name, "weight") ? 1.0f : 0.0f);
    }
}

static void test_graph_vs_runner(void) {
    TEST("gpt graph logits equal the KV-cache runner's at every position") {
        const char *spec = "gpt: layers=2 dim=16 heads=2 ctx=8";
        int V = 11, B = 3, T = 7;
        kd_lm lm;
        kd_lm_setup s = {.student = spec, .vocab = V, .seq = T, .max_batch = B};
        CHECK_MSG(kd_lm_new(&lm, &s, 5) == KD_OK, "%s", kd_error_message());
        if (!lm.g) break;
        kd_rng r;
        kd_rng_seed(&r, 3);
        perturb_ln(&lm, &r);
        fill_ids(&r, lm.x, V);
        for (int i = 0; i < B * T; i++) lm.y->val.data[i] = 0;
        kd_graph_set_batch(lm.g, B);
        kd_graph_forward_to(lm.g, 0, lm.m.logits);
        kd_gpt_cfg cfg;
        CHECK(kd_gpt_cfg_parse(spec, V, &cfg) == KD_OK);
        kd_lm_view view = {lm.g, &lm.m};
        kd_gpt_runner *run = NULL;
        CHECK_MSG(kd_gpt_runner_new(&run, &cfg, kd_lm_lookup, &view, B) == KD_OK, "%s", kd_error_message());
        float logits[3 * 11], want[3 * 11];
        int tok[3], bad = 0;
        for (int t = 0; t < T && run; t++) {
            for (int b = 0; b < B; b++) {
                tok[b] = (int)lm.x->val.data[b * T + t];
                memcpy(want + b * V, lm.m.logits->val.data + ((size_t)b * T + t) * V, V * sizeof(float));
            }
            kd_gpt_runner_step(run, B, tok, logits);
            bad += !kd_test_close_arrays("logits", logits, want, B * V, 1e-4, 1e-4);
        }
        CHECK_MSG(run && bad == 0, "%d positions differ", bad);
        kd_gpt_runner_free(run);
        kd_lm_free(&lm);
    }
}

static void test_gradients(void) {
    TEST("gpt: finite-difference gradients through the whole model (tied head)") {
        kd_graph *g = kd_graph_new();
        int xs[2] = {2, 5};
        kd_node *x = kd_input(g, "x", 2, xs);
        kd_model m;
        CHECK_MSG(kd_model_build(g, "gpt: layers=2 dim=8 heads=2 ctx=6", "", x, 7, &m) == KD_OK, "%s",
                  kd_error_message());
        kd_gc p = kd_gradcheck_project(g, m.logits);
        if (!kd_gc_compile(g, 2, 11)) break;
        kd_rng r;
        kd_rng_seed(&r, 4);
        fill_ids(&r, x, 7);
        for (int i = 0; i < kd_graph_n_state(g); i++) { /* larger weights: a non-trivial function */
            kd_node *n = kd_graph_state(g, i);
            if (n->val.ndim == 2) kd_gc_fill(&r, n, 0.4f, 0.0f);
            if (strstr(n->name, "ln_") && strstr(n->name, "weight")) kd_gc_fill(&r, n, 0.3f, 1.0f);
        }
        kd_gradcheck_randomize(&p, 9);
        const char *names[] = {"wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.attn.c_attn.weight",
                               "h.1.attn.c_proj.bias", "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight", "ln_f.bias"};
        kd_node *wrt[8];
        int n = 0;
        for (int i = 0; i < 8; i++)
            if ((wrt[n] = kd_graph_find(g, names[i]))) n++;
        CHECK_MSG(n == 8, "found %d of 8 parameters by their GPT-2 names", n);
        double err = kd_gradcheck(g, &p, wrt, n, 1e-2, 1);
        CHECK_MSG(err < 2e-2, "relative gradient error %g", err);
        kd_graph_free(g);
    }
}

static void test_pytorch_fixture(void) {
    TEST("gpt graph reproduces PyTorch's logits (fixtures from gen_gpt.py)") {
        char fx[512], rf[512];
        kd_test_fixture("gpt_tiny.safetensors", fx, sizeof fx);
        kd_test_fixture("gpt_tiny_ref.safetensors", rf, sizeof rf);
        kd_safetensors st, ref;
        memset(&ref, 0, sizeof ref);
        CHECK_MSG(kd_st_read(fx, &st) == KD_OK && kd_st_read(rf, &ref) == KD_OK, "%s", kd_error_message());
        const char *spec = st.buf ? kd_st_meta(&st, "model") : NULL, *vs = st.buf ? kd_st_meta(&st, "vocab") : NULL;
        const kd_st_tensor *tok = ref.buf ? kd_st_find(&ref, "tokens") : NULL;
        CHECK(spec && vs && tok && tok->ndim == 2);
        if (spec && vs && tok && tok->ndim == 2) {
            int V = atoi(vs), B = (int)tok->shape[0], T = (int)tok->shape[1];
            kd_lm lm;
            kd_lm_setup s = {.student = spec, .vocab = V, .seq = T, .max_batch = B};
            CHECK_MSG(kd_lm_new(&lm, &s, 1) == KD_OK, "%s", kd_error_message());
            if (lm.g) {
                CHECK_MSG(kd_lm_load(lm.g, &lm.m, fx) == KD_OK, "%s", kd_error_message());
                float *want = kd_malloc((size_t)B * T * V * sizeof(float));
                int ts[2] = {B, T}, ls[3] = {B, T, V};
                CHECK(kd_st_get_f32(&ref, "tokens", lm.x->val.data, 2, ts) == KD_OK);
                CHECK(kd_st_get_f32(&ref, "logits", want, 3, ls) == KD_OK);
                kd_graph_set_batch(lm.g, B);
                kd_graph_forward_to(lm.g, 0, lm.m.logits);
                CHECK_ARRAYS("logits vs torch", lm.m.logits->val.data, want, (long)B * T * V, 1e-5, 1e-4);
                free(want);
                kd_lm_free(&lm);
            }
        }
        if (st.buf) kd_st_free(&st);
        if (ref.buf) kd_st_free(&ref);
    }
}

/* trains a tiny model on the corpus; returns its checkpoint path in out */
static kd_lm_train_opts tiny_opts(int64_t steps) {
    kd_lm_train_opts o = {.steps = steps, .batch = 8, .seed = 1, .log_every = 0, .eval_every = 1000, .eval_windows = 16,
                          .role = "test", .prompt = 8};
    o.opt = (kd_optim_cfg){.kind = KD_OPTIM_ADAMW, .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.99f, .eps = 1e-8f,
                           .sched = KD_SCHED_COSINE, .step_epochs = 1, .gamma = 1.0f, .clip = 1.0f};
    o.warmup_steps = 10;
    o.sample = (kd_sample_opts){.temperature = 1.0f, .top_k = 0, .top_p = 1.0f};
    return o;
}

static const char *TSPEC = "gpt: layers=1 dim=32 heads=2 ctx=24";
static const char *SSPEC = "gpt: layers=1 dim=16 heads=2 ctx=24";

static void test_train_and_distill(void) {
    kd_text_data d;
    char tck[512];
    snprintf(tck, sizeof tck, "%s/teacher.safetensors", dir);
    kd_log lg = {0};
    int have_teacher = 0;
    TEST("lm: a tiny GPT learns the corpus (validation loss drops far below uniform)") {
        char spec[512];
        snprintf(spec, sizeof spec, "text:%s", corpus);
        CHECK_MSG(kd_text_load(&d, spec, NULL, 0.1f) == KD_OK, "%s", kd_error_message());
        CHECK(d.n_train > 1000 && d.n_val > 100);
        kd_lm lm;
        kd_lm_setup s = {.student = TSPEC, .vocab = d.vocab, .seq = 24, .max_batch = 8};
        CHECK_MSG(kd_lm_new(&lm, &s, 2) == KD_OK, "%s", kd_error_message());
        if (!lm.g) break;
        kd_lm_eval_result e0 = kd_lm_evaluate(&lm, &d, 1, 8, 16, 0);
        CHECK_CLOSE(e0.loss, log(256.0), 0.3, 0.0); /* small init: near uniform */
        kd_lm_train_result tr;
        kd_lm_train_opts o = tiny_opts(300);
        CHECK_MSG(kd_lm_train(&lm, &d, &o, &lg, &tr) == KD_OK, "%s", kd_error_message());
        CHECK_MSG(tr.val.loss < 2.0 && tr.val.loss < e0.loss - 3.0, "val loss %g (from %g)", tr.val.loss, e0.loss);
        CHECK_CLOSE(tr.val.ppl, exp(tr.val.loss), 0.0, 1e-9);
        CHECK(kd_lm_save(lm.g, &lm.m, d.vocab, NULL, tck) == KD_OK);
        /* round trip */
        kd_lm lm2;
        CHECK(kd_lm_new(&lm2, &s, 99) == KD_OK);
        CHECK_MSG(kd_lm_load(lm2.g, &lm2.m, tck) == KD_OK, "%s", kd_error_message());
        kd_lm_eval_result e1 = kd_lm_evaluate(&lm, &d, 1, 8, 16, 0), e2 = kd_lm_evaluate(&lm2, &d, 1, 8, 16, 0);
        CHECK_CLOSE(e2.loss, e1.loss, 1e-6, 0.0);
        kd_lm_free(&lm2);
        kd_lm_free(&lm);
        have_teacher = 1;
    }
    TEST("lm: distilling with fkl lowers KL(teacher || student) and raises agreement") {
        if (!have_teacher) break;
        kd_lm lm;
        kd_lm_setup s = {.student = SSPEC, .loss = "fkl(T=1)", .n_teachers = 1, .teachers = {TSPEC},
                         .vocab = d.vocab, .seq = 24, .max_batch = 8};
        CHECK_MSG(kd_lm_new(&lm, &s, 3) == KD_OK, "%s", kd_error_message());
        if (!lm.g) break;
        CHECK_MSG(kd_lm_load(lm.g, &lm.teachers[0], tck) == KD_OK, "%s", kd_error_message());
        kd_lm_eval_result e0 = kd_lm_evaluate(&lm, &d, 1, 8, 16, 1);
        kd_lm_train_result tr;
        kd_lm_train_opts o = tiny_opts(150);
        CHECK_MSG(kd_lm_train(&lm, &d, &o, &lg, &tr) == KD_OK, "%s", kd_error_message());
        kd_lm_eval_result e1 = kd_lm_evaluate(&lm, &d, 1, 8, 16, 1);
        CHECK_MSG(e1.kl < 0.5 * e0.kl && e1.agree > e0.agree + 0.2, "kl %g -> %g, agreement %g -> %g", e0.kl, e1.kl,
                  e0.agree, e1.agree);
        CHECK(e1.t_loss > 0 && e1.t_loss < 2.0); /* the teacher's own loss */
        kd_lm_free(&lm);
    }
    TEST("lm: on-policy batches are the student's continuations, masked to the sampled positions") {
        if (!have_teacher) break;
        kd_lm lm;
        kd_lm_setup s = {.student = SSPEC, .loss = "jsd(beta=0.5)", .n_teachers = 1, .teachers = {TSPEC},
                         .vocab = d.vocab, .seq = 24, .max_batch = 8};
        CHECK_MSG(kd_lm_new(&lm, &s, 3) == KD_OK, "%s", kd_error_message());
        if (!lm.g) break;
        CHECK(kd_lm_load(lm.g, &lm.teachers[0], tck) == KD_OK);
        kd_lm_train_result tr;
        kd_lm_train_opts o = tiny_opts(4);
        o.onpolicy = 1.0f;
        o.prompt = 6;
        CHECK_MSG(kd_lm_train(&lm, &d, &o, &lg, &tr) == KD_OK, "%s", kd_error_message());
        CHECK(tr.onpolicy_batches == 4 && tr.gen_seconds > 0);
        /* one batch by hand: the prompt is training text, the rest sampled */
        kd_gpt_cfg cfg;
        kd_gpt_runner *run = NULL;
        kd_lm_view view = {lm.g, &lm.m};
        CHECK(kd_gpt_cfg_parse(SSPEC, 256, &cfg) == KD_OK);
        CHECK(kd_gpt_runner_new(&run, &cfg, kd_lm_lookup, &view, 8) == KD_OK);
        int prompt[8 * 6], gen[8 * 25];
        kd_rng rng;
        kd_rng_seed(&rng, 5);
        kd_graph_set_batch(lm.g, 8);
        if (run) kd_lm_onpolicy_batch(&lm, run, &d, &o, &rng, 8, prompt, gen);
        int ok = run != NULL;
        for (int b = 0; b < 8 && ok; b++)
            for (int t = 0; t < 24; t++) {
                float x = lm.x->val.data[b * 24 + t];
                ok &= lm.y->val.data[b * 24 + t] == -1.0f;
                ok &= lm.mask->val.data[b * 24 + t] == (t >= 5 ? 1.0f : 0.0f);
                ok &= t < 6 ? x == (float)prompt[b * 6 + t] : x == (float)gen[b * 19 + t - 6];
            }
        CHECK(ok);
        /* the divergence then counts only the 19 sampled positions per row: finite and positive */
        kd_graph_forward(lm.g, 1);
        CHECK(lm.terms.terms[0].value->val.data[0] > 0.0f && isfinite(lm.terms.terms[0].value->val.data[0]));
        CHECK(lm.ce->val.data[0] == 0.0f); /* every label ignored */
        kd_gpt_runner_free(run);
        kd_lm_free(&lm);
    }
    TEST("lm: sequence-level KD windows: a data prompt continued by the teacher, deterministic per seed") {
        if (!have_teacher) break;
        kd_gpt_cfg cfg;
        kd_gpt_runner *run = NULL;
        char *tj = NULL;
        CHECK_MSG(kd_gpt_load(tck, &cfg, &run, &tj) == KD_OK, "%s", kd_error_message());
        if (!run) break;
        kd_gpt_runner_reserve(run, 4);
        uint16_t a[5 * 25], b[5 * 25];
        kd_sample_opts so = {.temperature = 0.8f, .top_k = 0, .top_p = 1.0f};
        CHECK(kd_lm_sample_windows(run, &d, 5, 24, 6, 4, &so, 7, a) == KD_OK);
        CHECK(kd_lm_sample_windows(run, &d, 5, 24, 6, 4, &so, 7, b) == KD_OK);
        CHECK(memcmp(a, b, sizeof a) == 0);
        /* each prompt is a run of 6 consecutive training tokens */
        int found = 0;
        for (int w = 0; w < 5; w++)
            for (size_t i = 0; i + 6 <= d.n_train; i++) {
                int eq = 1;
                for (int t = 0; t < 6 && eq; t++) eq = d.train[i + t] == a[w * 25 + t];
                if (eq) {
                    found++;
                    break;
                }
            }
        CHECK_MSG(found == 5, "%d of 5 prompts found in the training text", found);
        kd_gpt_runner_free(run);
        free(tj);
    }
    TEST("lm cache: top-k log-probs, distinct ids, and a student trained from it moves toward the teacher") {
        if (!have_teacher) break;
        char cp[512];
        snprintf(cp, sizeof cp, "%s/top8.cache", dir);
        double secs;
        CHECK_MSG(kd_lm_cache_build(tck, &d, 24, 8, 1.0f, 8, 40, cp, &secs) == KD_OK, "%s", kd_error_message());
        kd_lm_cache c;
        CHECK_MSG(kd_lm_cache_open(cp, &c) == KD_OK, "%s", kd_error_message());
        if (!c.open) break;
        CHECK(c.n == 40 && c.k == 8 && c.seq == 24 && c.vocab == 256);
        /* log-probs sorted descending, total mass <= 1, and the window tokens are the data's */
        int ok = 1;
        for (int64_t r = 0; r < c.n * 24; r++) {
            double mass = 0;
            for (int j = 0; j < 8; j++) {
                float v = kd_f16_to_f32(c.w.logp[r * 8 + j]);
                mass += exp(v);
                if (j) ok &= v <= kd_f16_to_f32(c.w.logp[r * 8 + j - 1]);
            }
            ok &= mass <= 1.0 + 1e-2 && mass > 0.5;
        }
        CHECK(ok);
        float x[24], y[24];
        kd_text_window(&d, 0, 3, 24, x, y);
        int same = 1;
        for (int t = 0; t < 24; t++) same &= c.w.tokens[3 * 25 + t] == (uint16_t)x[t];
        CHECK(same && c.w.tokens[3 * 25 + 24] == (uint16_t)y[23]);
        kd_lm lm;
        kd_lm_setup s = {.student = SSPEC, .loss = "ce(weight=0.5) + fkl(weight=0.5)", .cache_k = 8, .cache_T = 1.0f,
                         .vocab = 256, .seq = 24, .max_batch = 8};
        CHECK_MSG(kd_lm_new(&lm, &s, 3) == KD_OK, "%s", kd_error_message());
        if (lm.g) {
            kd_lm_train_result tr;
            kd_lm_train_opts o = tiny_opts(120);
            o.windows = &c.w;
            float first = 0;
            CHECK_MSG(kd_lm_train(&lm, &d, &o, &lg, &tr) == KD_OK, "%s", kd_error_message());
            first = lm.terms.terms[1].value->val.data[0];
            CHECK_MSG(first < 1.0 && tr.val.loss < 3.5, "cached fkl %g, val loss %g", first, tr.val.loss);
            kd_lm_free(&lm);
        }
        /* rlkd reads the cache's peaks (k <= the cache's k) */
        s.loss = "ce + rlkd(k=4, tau=0.5, weight=0.5)";
        CHECK_MSG(kd_lm_new(&lm, &s, 3) == KD_OK, "%s", kd_error_message());
        if (lm.g) {
            float x[24], y[24];
            kd_graph_set_batch(lm.g, 1);
            kd_text_window(&d, 0, 3, 24, x, y);
            memcpy(lm.x->val.data, x, sizeof x);
            memcpy(lm.y->val.data, y, sizeof y);
            for (int t = 0; t < 24; t++) lm.mask->val.data[t] = 1.0f;
            for (int j = 0; j < 24 * 8; j++) {
                lm.t_ids->val.data[j] = c.w.ids[3 * 24 * 8 + j];
                lm.t_logp->val.data[j] = kd_f16_to_f32(c.w.logp[3 * 24 * 8 + j]);
            }
            kd_graph_forward(lm.g, 1);
            float r = lm.terms.terms[1].value->val.data[0];
            CHECK_MSG(r >= 0.0f && r <= 2.0f && isfinite(r), "rlkd on the cache: %g", r);
            /* the dense view: cached values at their ids, the rest equal and below them */
            kd_node *dn = NULL;
            for (int i = 0; i < kd_graph_n_nodes(lm.g); i++)
                if (kd_graph_node(lm.g, i)->op == KD_OP_TOPK_DENSE) dn = kd_graph_node(lm.g, i);
            CHECK(dn != NULL);
            if (dn) {
                const float *row = dn->val.data + 5 * 256;
                double mass = 0;
                for (int v = 0; v < 256; v++) mass += exp(row[v]);
                CHECK_CLOSE(mass, 1.0, 2e-3, 0.0);
                CHECK(row[(int)lm.t_ids->val.data[5 * 8]] == lm.t_logp->val.data[5 * 8]);
            }
            kd_lm_free(&lm);
        }
        s.loss = "rlkd(k=9)";
        CHECK(kd_lm_new(&lm, &s, 3) == KD_ECONFIG && strstr(kd_error_message(), "top-k"));
        /* a loss temperature other than the cache's is refused */
        s.loss = "fkl(T=2)";
        CHECK(kd_lm_new(&lm, &s, 3) == KD_ECONFIG && strstr(kd_error_message(), "temperature"));
        s.loss = "dkd";
        CHECK(kd_lm_new(&lm, &s, 3) == KD_ECONFIG);
        kd_lm_cache_close(&c);
        /* a corrupted cache: a repeated id at one position */
        kd_safetensors st;
        CHECK(kd_st_read(cp, &st) == KD_OK);
        kd_st_writer *w = kd_st_writer_new();
        for (int i = 0; i < st.n; i++) {
            kd_st_tensor *t = &st.tensors[i];
            uint8_t *copy = kd_malloc(t->nbytes);
            memcpy(copy, t->data, t->nbytes);
            if (strcmp(t->name, "lm.ids") == 0) memcpy(copy + 2, copy, 2);
            kd_st_add(w, t->name, t->dtype, t->ndim, t->shape, copy);
            free(copy);
        }
        for (int i = 0; i < st.n_meta; i++) kd_st_set_meta(w, st.meta_keys[i], st.meta_vals[i]);
        char bad[512];
        snprintf(bad, sizeof bad, "%s/bad.cache", dir);
        CHECK(kd_st_write(w, bad) == KD_OK);
        kd_st_writer_free(w);
        kd_st_free(&st);
        CHECK(kd_lm_cache_open(bad, &c) == KD_EFORMAT && strstr(kd_error_message(), "bad.cache") &&
              strstr(kd_error_message(), "repeated"));
    }
    kd_text_free(&d);
}

/* ---------------------------------------------------------------- CLI */

static void test_cli(void) {
    const char *bin = getenv("KD_DISTILL") ? getenv("KD_DISTILL") : "build/distill";
    char ini[512], out[512];
    snprintf(ini, sizeof ini, "%s/tiny.ini", dir);
    snprintf(out, sizeof out, "%s/runs", dir);
    FILE *f = fopen(ini, "w");
    fprintf(f,
            "[run]\nname = tiny\nout = %s\n[data]\ntrain = text:%s\n[teacher]\nmodel = %s\n[student]\nmodel = %s\n"
            "[distill]\nloss = ce(weight=0.5) + rkl(weight=0.5)\n[lm]\nsteps = 40\nseq = 24\nval_frac = 0.1\n"
            "eval_every = 20\neval_windows = 0\nwarmup = 5\n[train]\nbatch = 8\noptimizer = adamw\nlr = 3e-3\n"
            "clip = 1\nlog_every = 10\n",
            out, corpus, TSPEC, SSPEC);
    fclose(f);
    TEST("distill run on text: teacher, baseline and student with validation loss and agreement") {
        int rc = kd_test_sh("%s run %s --quiet --threads 1 > %s/run.out 2> %s/run.err", bin, ini, dir, dir);
        CHECK_MSG(rc == 0, "exit %d", rc);
        char p[700];
        snprintf(p, sizeof p, "%s/tiny/summary.json", out);
        char *s = kd_test_slurp(p, NULL);
        CHECK_MSG(s && strstr(s, "\"teacher\"") && strstr(s, "\"baseline\"") && strstr(s, "\"student\"") &&
                      strstr(s, "\"val_ppl\"") && strstr(s, "\"agreement\""),
                  "%s", s ? s : "(no summary)");
        free(s);
        snprintf(p, sizeof p, "%s/tiny/metrics.jsonl", out);
        s = kd_test_slurp(p, NULL);
        CHECK(s && strstr(s, "\"role\":\"student\"") && strstr(s, "\"val_loss\""));
        free(s);
    }
    TEST("distill generate continues a prompt from the run's student, same seed same text") {
        int a = kd_test_sh("%s generate %s/tiny/student.safetensors --prompt 'the cat' --tokens 30 --seed 3 > %s/g1.txt 2>&1",
                   bin, out, dir);
        int b = kd_test_sh("%s generate %s/tiny/student.safetensors --prompt 'the cat' --tokens 30 --seed 3 > %s/g2.txt 2>&1",
                   bin, out, dir);
        CHECK(a == 0 && b == 0);
        char p1[600], p2[600];
        snprintf(p1, sizeof p1, "%s/g1.txt", dir);
        snprintf(p2, sizeof p2, "%s/g2.txt", dir);
        char *s1 = kd_test_slurp(p1, NULL), *s2 = kd_test_slurp(p2, NULL);
        CHECK(s1 && s2 && strcmp(s1, s2) == 0 && strncmp(s1, "the cat", 7) == 0);
        free(s1);
        free(s2);
    }
    TEST("distill eval on text: the student's validation loss, as the run reported") {
        int rc = kd_test_sh("%s eval %s/tiny/student.safetensors --data text:%s --val 0.1 --seq 24 > %s/eval.txt 2>&1", bin,
                    out, corpus, dir);
        char p[600];
        snprintf(p, sizeof p, "%s/eval.txt", dir);
        char *s = kd_test_slurp(p, NULL);
        snprintf(p, sizeof p, "%s/tiny/summary.json", out);
        char *js = kd_test_slurp(p, NULL);
        double want = -1, got = -2;
        const char *st = js ? strstr(js, "\"student\"") : NULL;
        const char *vl = st ? strstr(st, "\"val_loss\"") : NULL;
        if (vl) sscanf(strchr(vl, ':') + 1, "%lf", &want);
        const char *lp = s ? strstr(s, "loss ") : NULL;
        if (lp) sscanf(lp + 5, "%lf", &got);
        /* both sweep every validation window of the same split: the same loss (printed to 4 decimals) */
        CHECK_MSG(rc == 0 && got > 0 && fabs(got - want) < 2e-4, "rc %d, eval %g vs run %g: %s", rc, got, want,
                  s ? s : "");
        free(s);
        free(js);
        rc = kd_test_sh("%s eval %s/tiny/student.safetensors --data text:%s/nonexistent > /dev/null 2>&1", bin, out, dir);
        CHECK(rc == 1);
    }
    TEST("distill cache (LM) then a cached run") {
        int rc = kd_test_sh("%s cache %s/tiny/teacher.safetensors --data text:%s --val 0.1 --seq 24 --topk 4 --out %s/c4.cache"
                    " --limit 30 > /dev/null 2> %s/cache.err",
                    bin, out, corpus, dir, dir);
        CHECK_MSG(rc == 0, "exit %d", rc);
        rc = kd_test_sh("%s run %s --quiet --threads 1 --run.name=cached --teacher.cache=%s/c4.cache "
                "--distill.loss='ce(weight=0.5)+fkl(weight=0.5)' --distill.baseline=0 > /dev/null 2> %s/run2.err",
                bin, ini, dir, dir);
        CHECK_MSG(rc == 0, "exit %d", rc);
        rc = kd_test_sh("%s run %s --quiet --threads 1 --run.name=cached2 --teacher.cache=%s/c4.cache "
                "--distill.loss='fkl(T=3)' --distill.baseline=0 > /dev/null 2> %s/run3.err",
                bin, ini, dir, dir);
        CHECK(rc == 1);
    }
    TEST("BPE end to end: distill tokenize, a run with [lm] tokenizer, generate decodes with the checkpoint's tokenizer") {
        int rc = kd_test_sh("%s tokenize --data text:%s --vocab 300 --val 0.1 --out %s/tok.json > /dev/null 2>&1", bin, corpus,
                    dir);
        CHECK_MSG(rc == 0, "tokenize exit %d", rc);
        rc = kd_test_sh("%s run %s --quiet --threads 1 --run.name=bpe --lm.tokenizer=%s/tok.json --lm.steps=20 "
                "--distill.baseline=0 > /dev/null 2> %s/bpe.err",
                bin, ini, dir, dir);
        CHECK_MSG(rc == 0, "run exit %d", rc);
        char p[600];
        snprintf(p, sizeof p, "%s/bpe/student.safetensors", out);
        kd_safetensors st;
        int ok = kd_st_read(p, &st) == KD_OK;
        CHECK_MSG(ok && kd_st_meta(&st, "tokenizer") && atoi(kd_st_meta(&st, "vocab")) > 256, "%s", kd_error_message());
        if (ok) kd_st_free(&st);
        rc = kd_test_sh("%s generate %s --prompt 'the dog sat' --tokens 12 --seed 2 > %s/bpe_gen.txt 2>&1", bin, p, dir);
        snprintf(p, sizeof p, "%s/bpe_gen.txt", dir);
        char *s = kd_test_slurp(p, NULL);
        /* 12 BPE tokens decode to at least 12 bytes after the prompt */
        CHECK_MSG(rc == 0 && s && strncmp(s, "the dog sat", 11) == 0 && strlen(s) >= 11 + 12 + 1, "rc %d: %s", rc,
                  s ? s : "");
        free(s);
    }
    TEST("distill run on text refuses a non-GPT model with a message naming the key") {
        int rc = kd_test_sh("%s run %s --quiet --student.model='mlp: 32' > /dev/null 2> %s/bad.err", bin, ini, dir);
        char p[600];
        snprintf(p, sizeof p, "%s/bad.err", dir);
        char *s = kd_test_slurp(p, NULL);
        CHECK_MSG(rc != 0 && s && strstr(s, "[student] model") && strstr(s, "gpt"), "rc %d: %s", rc, s ? s : "");
        free(s);
    }
}

void test_lm(void) {
    write_corpus();
    test_graph_vs_runner();
    test_gradients();
    test_pytorch_fixture();
    test_train_and_distill();
    test_cli();
}
