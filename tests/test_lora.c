/* test_lora.c - LoRA adapters and OKD: the spec parser, finite-difference
 * gradients through the adapter path, the adapted GPT against PyTorch
 * (fixtures from gen_lora.py), save / load / merge (merged logits equal the
 * adapted model's), refusal of adapters for another model, OKD's
 * stop-gradients (each side's loss reaches only its own parameters), and
 * `distill run` with [lm] okd and [lm] lora, `distill lora merge`. */
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "gradcheck.h"
#include "kd_io.h"
#include "kd_lm.h"
#include "kd_lora.h"
#include "test.h"

static char dir[300];

static void test_spec(void) {
    TEST("lora spec: keys, defaults, canonical string, errors name the token") {
        kd_lora_cfg c;
        char buf[160];
        CHECK(kd_lora_cfg_parse("r=8 alpha=16 targets=attn,mlp", &c) == KD_OK && c.r == 8 && c.alpha == 16.0f &&
              c.targets == KD_LORA_ALL);
        CHECK(kd_lora_cfg_parse("  r=4 ", &c) == KD_OK && c.r == 4 && c.alpha == 4.0f && c.targets == KD_LORA_ALL);
        CHECK(kd_lora_cfg_parse("targets=c_attn,mlp.c_proj r=2", &c) == KD_OK &&
              c.targets == (KD_LORA_C_ATTN | KD_LORA_MLP_PROJ));
        CHECK(strcmp(kd_lora_cfg_str(&c, buf, sizeof buf), "r=2 alpha=2 targets=attn.c_attn,mlp.c_proj") == 0);
        CHECK(kd_lora_targets(&c, "attn.c_attn") && !kd_lora_targets(&c, "attn.c_proj") &&
              kd_lora_targets(&c, "mlp.c_proj") && !kd_lora_targets(&c, "mlp.c_fc"));
        CHECK(kd_lora_cfg_parse("", &c) == KD_OK && c.r == 0);
        CHECK(kd_lora_cfg_parse("r=0", &c) == KD_ECONFIG && strstr(kd_error_message(), "'0'"));
        CHECK(kd_lora_cfg_parse("r=8 beta=2", &c) == KD_ECONFIG && strstr(kd_error_message(), "'beta'"));
        CHECK(kd_lora_cfg_parse("r=8 targets=attn,wte", &c) == KD_ECONFIG && strstr(kd_error_message(), "'wte'"));
        CHECK(kd_lora_cfg_parse("alpha=3", &c) == KD_ECONFIG && strstr(kd_error_message(), "r=N"));
        CHECK(kd_lora_cfg_parse("r=2 r=3", &c) == KD_ECONFIG && strstr(kd_error_message(), "repeated"));
        CHECK(kd_lora_cfg_parse("r=2 alpha=-1", &c) == KD_ECONFIG);
    }
}

/* y = kd_lora_linear on a parameter x (so x gets a gradient too) */
static double linear_gradcheck(int B, int T, int in, int out, int r, float alpha, uint64_t seed) {
    kd_graph *g = kd_graph_new();
    int xs[3] = {B, T, in}, ws[2] = {out, in}, bs[1] = {out};
    kd_node *x = kd_param(g, "x", 3, xs, KD_INIT_ZERO, in);
    kd_node *w = kd_param(g, "h.0.attn.c_attn.weight", 2, ws, KD_INIT_ZERO, in);
    kd_node *b = kd_param(g, "h.0.attn.c_attn.bias", 1, bs, KD_INIT_ZERO, in);
    kd_lora_cfg c = {.r = r, .alpha = alpha, .targets = KD_LORA_C_ATTN};
    kd_node *y = kd_lora_linear(g, &c, "h.0.attn.c_attn", x, w, b);
    kd_gc p = kd_gradcheck_project(g, y);
    if (!kd_gc_compile(g, B, seed)) {
        kd_graph_free(g);
        return INFINITY;
    }
    kd_node *A = kd_graph_find(g, "lora.h.0.attn.c_attn.lora_A"), *Bm = kd_graph_find(g, "lora.h.0.attn.c_attn.lora_B");
    double err = INFINITY;
    if (A && Bm) {
        kd_rng rng;
        kd_rng_seed(&rng, seed + 1);
        kd_node *all[5] = {x, w, b, A, Bm};
        for (int i = 0; i < 5; i++) kd_gc_fill(&rng, all[i], 0.7f, 0.0f); /* B nonzero: A gets a gradient */
        kd_gradcheck_randomize(&p, seed + 2);
        err = kd_gradcheck(g, &p, all, 5, 1e-2, 1);
    }
    kd_graph_free(g);
    return err;
}

static void test_gradients(void) {
    TEST("lora linear: finite-difference gradients of x, W, b, A, B (batch 1 and odd sizes)") {
        double e1 = linear_gradcheck(1, 3, 5, 7, 3, 6.0f, 11);
        double e2 = linear_gradcheck(2, 4, 6, 9, 1, 0.5f, 12);
        CHECK_MSG(e1 < 1e-2 && e2 < 1e-2, "relative gradient errors %g, %g", e1, e2);
    }
    TEST("lora gpt: gradients reach the adapters of the targets only; base weights are frozen constants") {
        kd_graph *g = kd_graph_new();
        int xs[2] = {2, 5};
        kd_node *x = kd_input(g, "x", 2, xs);
        kd_model m;
        kd_lora_cfg c;
        kd_lora_cfg_parse("r=3 alpha=5 targets=c_attn,mlp.c_proj,c_fc", &c);
        CHECK_MSG(kd_lora_model_build(g, "gpt: layers=2 dim=8 heads=2 ctx=6", "s.", x, 7, &c, &m) == KD_OK, "%s",
                  kd_error_message());
        kd_gc p = kd_gradcheck_project(g, m.logits);
        if (!kd_gc_compile(g, 2, 5)) break;
        kd_rng r;
        kd_rng_seed(&r, 8);
        for (int i = 0; i < 10; i++) x->val.data[i] = (float)kd_rng_below(&r, 7);
        for (int i = 0; i < kd_graph_n_state(g); i++) {
            kd_node *n = kd_graph_state(g, i);
            if (n->val.ndim == 2) kd_gc_fill(&r, n, 0.4f, 0.0f);
            if (strstr(n->name, "ln_") && strstr(n->name, "weight")) kd_gc_fill(&r, n, 0.3f, 1.0f);
        }
        /* 3 targets x 2 layers x (A, B); base parameters frozen, adapters trainable */
        int n_ad = 0, frozen_ok = 1;
        for (int i = 0; i < kd_graph_n_state(g); i++) {
            kd_node *n = kd_graph_state(g, i);
            if (strncmp(n->name, "lora.", 5) == 0)
                n_ad += (n->flags & KD_F_NEED_GRAD) != 0;
            else
                frozen_ok &= !(n->flags & KD_F_NEED_GRAD);
        }
        CHECK_MSG(n_ad == 12 && frozen_ok, "%d trainable adapter tensors, base frozen %d", n_ad, frozen_ok);
        CHECK(!kd_graph_find(g, "lora.s.h.0.attn.c_proj.lora_A"));
        CHECK(kd_lora_params(g, &m) == 2 * (3 * (8 + 24) + 3 * (32 + 8) + 3 * (8 + 32)));
        const char *names[] = {"lora.s.h.0.attn.c_attn.lora_A", "lora.s.h.0.attn.c_attn.lora_B",
                               "lora.s.h.1.mlp.c_fc.lora_A", "lora.s.h.1.mlp.c_proj.lora_B"};
        kd_node *wrt[4];
        int n = 0;
        for (int i = 0; i < 4; i++)
            if ((wrt[n] = kd_graph_find(g, names[i]))) n++;
        CHECK(n == 4);
        kd_gradcheck_randomize(&p, 3);
        double err = kd_gradcheck_ex(g, &p, wrt, n, 1e-2, 1, 2e-2); /* float32 through 2 blocks: about 1.5 % */
        CHECK_MSG(err < 2e-2, "relative gradient error %g", err);
        kd_graph_free(g);
    }
}

/* the fixture's adapted model in a kd_lm (base and adapters loaded) */
static int fixture_lm(kd_lm *lm, kd_lora_cfg *lc, int *V, kd_safetensors *ref) {
    char bp[512], ap[512], rp[512];
    kd_test_fixture("lora_base.safetensors", bp, sizeof bp);
    kd_test_fixture("lora_adapter.safetensors", ap, sizeof ap);
    kd_test_fixture("lora_ref.safetensors", rp, sizeof rp);
    kd_safetensors ad;
    if (kd_st_read(ap, &ad) != KD_OK) return 0;
    char text[256];
    snprintf(text, sizeof text, "r=%s alpha=%s targets=%s", kd_st_meta(&ad, "r"), kd_st_meta(&ad, "alpha"),
             kd_st_meta(&ad, "targets"));
    *V = atoi(kd_st_meta(&ad, "vocab"));
    char spec[128];
    snprintf(spec, sizeof spec, "%s", kd_st_meta(&ad, "model"));
    kd_st_free(&ad);
    if (kd_lora_cfg_parse(text, lc) != KD_OK || kd_st_read(rp, ref) != KD_OK) return 0;
    kd_lm_setup s = {.student = spec, .vocab = *V, .seq = 5, .max_batch = 2, .lora = *lc};
    if (kd_lm_new(lm, &s, 1) != KD_OK) return 0;
    kd_status st = kd_lm_load(lm->g, &lm->m, bp);
    if (st == KD_OK) st = kd_lora_load(lm->g, &lm->m, lc, *V, ap);
    int ts[2] = {2, 5};
    if (st == KD_OK) st = kd_st_get_f32(ref, "tokens", lm->x->val.data, 2, ts);
    if (st == KD_OK) st = kd_st_get_f32(ref, "labels", lm->y->val.data, 2, ts);
    for (int i = 0; i < 10; i++) lm->mask->val.data[i] = 1.0f;
    kd_graph_set_batch(lm->g, 2);
    return st == KD_OK;
}

static void test_pytorch(void) {
    TEST("lora gpt reproduces PyTorch's logits, loss and adapter gradients (fixtures from gen_lora.py)") {
        kd_lm lm;
        kd_lora_cfg lc;
        kd_safetensors ref;
        int V = 0;
        memset(&lm, 0, sizeof lm);
        memset(&ref, 0, sizeof ref);
        int ok = fixture_lm(&lm, &lc, &V, &ref);
        CHECK_MSG(ok, "%s", kd_error_message());
        if (ok) {
            CHECK(lc.r == 2 && lc.alpha == 3.0f && lc.targets == (KD_LORA_C_ATTN | KD_LORA_MLP_PROJ));
            float *want = kd_malloc((size_t)10 * V * sizeof(float));
            int ls[3] = {2, 5, V}, one[1] = {1};
            float wl = 0;
            CHECK(kd_st_get_f32(&ref, "logits", want, 3, ls) == KD_OK && kd_st_get_f32(&ref, "loss", &wl, 1, one) == KD_OK);
            kd_graph_forward(lm.g, 1);
            /* float32 against float64 references rounded to float32 */
            CHECK_ARRAYS("adapted logits vs torch", lm.m.logits->val.data, want, 10L * V, 1e-5, 1e-4);
            CHECK_CLOSE(lm.loss->val.data[0], wl, 1e-6, 1e-5);
            kd_graph_backward(lm.g, lm.loss);
            int n = 0;
            for (int i = 0; i < ref.n; i++) {
                const kd_st_tensor *t = &ref.tensors[i];
                if (strncmp(t->name, "grad.", 5) != 0) continue;
                char full[160];
                snprintf(full, sizeof full, "lora.s.%s", t->name + 5);
                kd_node *p = kd_graph_find(lm.g, full);
                CHECK_MSG(p && p->grad.data, "adapter %s in the graph with a gradient", full);
                if (!p || !p->grad.data) continue;
                float *gw = kd_malloc((size_t)kd_numel(&p->val) * sizeof(float));
                CHECK(kd_st_get_f32(&ref, t->name, gw, p->val.ndim, p->val.shape) == KD_OK);
                CHECK_ARRAYS(t->name, p->grad.data, gw, (long)kd_numel(&p->val), 1e-5, 1e-3);
                free(gw);
                n++;
            }
            CHECK_MSG(n == 8, "%d adapter gradients compared", n);
            free(want);
        }
        if (lm.g) kd_lm_free(&lm);
        if (ref.buf) kd_st_free(&ref);
    }
}

static void test_files(void) {
    const char *bin = getenv("KD_DISTILL") ? getenv("KD_DISTILL") : "build/distill";
    char bp[512], ap[512], mp[512], cp[512], fixa[512], fixb[512];
    snprintf(bp, sizeof bp, "%s/base.safetensors", dir);
    snprintf(ap, sizeof ap, "%s/base.lora.safetensors", dir);
    snprintf(mp, sizeof mp, "%s/merged.safetensors", dir);
    snprintf(cp, sizeof cp, "%s/merged_cli.safetensors", dir);
    kd_test_fixture("lora_adapter.safetensors", fixa, sizeof fixa);
    kd_test_fixture("lora_base.safetensors", fixb, sizeof fixb);
    kd_lm lm;
    kd_lora_cfg lc;
    kd_safetensors ref;
    int V = 0;
    memset(&lm, 0, sizeof lm);
    memset(&ref, 0, sizeof ref);
    int ok = fixture_lm(&lm, &lc, &V, &ref);
    float *adapted = kd_malloc((size_t)10 * (V > 0 ? V : 1) * sizeof(float));
    if (ok) {
        kd_graph_forward_to(lm.g, 0, lm.m.logits);
        memcpy(adapted, lm.m.logits->val.data, (size_t)10 * V * sizeof(float));
    }
    TEST("lora: saved adapters reload bit for bit; the merged checkpoint's logits equal the adapted model's") {
        CHECK_MSG(ok, "%s", kd_error_message());
        if (!ok) break;
        CHECK(kd_lm_save(lm.g, &lm.m, V, NULL, bp) == KD_OK);
        CHECK_MSG(kd_lora_save(lm.g, &lm.m, &lc, V, ap) == KD_OK, "%s", kd_error_message());
        /* reload into a fresh adapted model */
        kd_lm l2;
        kd_lm_setup s = {.student = lm.m.spec, .vocab = V, .seq = 5, .max_batch = 2, .lora = lc};
        CHECK(kd_lm_new(&l2, &s, 99) == KD_OK);
        CHECK(kd_lm_load(l2.g, &l2.m, bp) == KD_OK && kd_lora_load(l2.g, &l2.m, &lc, V, ap) == KD_OK);
        memcpy(l2.x->val.data, lm.x->val.data, 10 * sizeof(float));
        kd_graph_set_batch(l2.g, 2);
        kd_graph_forward_to(l2.g, 0, l2.m.logits);
        CHECK(memcmp(l2.m.logits->val.data, adapted, (size_t)10 * V * sizeof(float)) == 0);
        kd_lm_free(&l2);
        /* merged: a plain model */
        CHECK_MSG(kd_lora_merge(bp, ap, mp) == KD_OK, "%s", kd_error_message());
        kd_lm_setup sp = {.student = lm.m.spec, .vocab = V, .seq = 5, .max_batch = 2};
        CHECK(kd_lm_new(&l2, &sp, 7) == KD_OK);
        CHECK_MSG(kd_lm_load(l2.g, &l2.m, mp) == KD_OK, "%s", kd_error_message());
        memcpy(l2.x->val.data, lm.x->val.data, 10 * sizeof(float));
        kd_graph_set_batch(l2.g, 2);
        kd_graph_forward_to(l2.g, 0, l2.m.logits);
        CHECK_ARRAYS("merged vs adapted logits", l2.m.logits->val.data, adapted, 10L * V, 1e-5, 1e-5);
        /* and the merge changed the function: the base alone differs */
        CHECK(kd_lm_load(l2.g, &l2.m, bp) == KD_OK);
        kd_graph_forward_to(l2.g, 0, l2.m.logits);
        double diff = 0;
        for (int i = 0; i < 10 * V; i++) diff = fmax(diff, fabs(l2.m.logits->val.data[i] - adapted[i]));
        CHECK_MSG(diff > 0.1, "base vs adapted max diff %g", diff);
        kd_lm_free(&l2);
    }
    TEST("distill lora merge: the CLI writes the library's merge; bad usage exits 2, a bad file 1") {
        if (!ok) break;
        int rc = kd_test_sh("%s lora merge %s %s --out %s > /dev/null 2>&1", bin, bp, ap, cp);
        CHECK_MSG(rc == 0, "exit %d", rc);
        kd_safetensors a, b;
        memset(&a, 0, sizeof a);
        memset(&b, 0, sizeof b);
        CHECK(kd_st_read(mp, &a) == KD_OK && kd_st_read(cp, &b) == KD_OK);
        int same = a.buf && b.buf && a.n == b.n;
        for (int i = 0; same && i < a.n; i++) {
            const kd_st_tensor *t = kd_st_find(&b, a.tensors[i].name);
            same = t && t->nbytes == a.tensors[i].nbytes && memcmp(t->data, a.tensors[i].data, t->nbytes) == 0;
        }
        CHECK_MSG(same, "CLI and library merges differ");
        CHECK(a.buf && kd_st_meta(&a, "model") && strcmp(kd_st_meta(&a, "model"), lm.m.spec) == 0);
        if (a.buf) kd_st_free(&a);
        if (b.buf) kd_st_free(&b);
        CHECK(kd_test_sh("%s lora merge %s --out %s > /dev/null 2>&1", bin, bp, cp) == 2);
        CHECK(kd_test_sh("%s lora merge %s %s > /dev/null 2>&1", bin, bp, ap) == 2);
        CHECK(kd_test_sh("%s lora merge %s %s --out %s > /dev/null 2>&1", bin, bp, bp, cp) == 1);
    }
    TEST("lora: adapters for another model, rank or shape are refused with the file and the reason") {
        if (!ok) break;
        /* another model spec (ctx differs) */
        kd_lm l2;
        kd_lm_setup s = {.student = "gpt: layers=2 dim=8 heads=2 ctx=7", .vocab = V, .seq = 5, .max_batch = 2, .lora = lc};
        CHECK(kd_lm_new(&l2, &s, 1) == KD_OK);
        kd_status st = kd_lora_load(l2.g, &l2.m, &lc, V, ap);
        CHECK_MSG(st == KD_EFORMAT && strstr(kd_error_message(), ap) && strstr(kd_error_message(), "ctx=7"), "%s",
                  kd_error_message());
        kd_lm_free(&l2);
        /* another rank */
        kd_lora_cfg l3 = lc;
        l3.r = 3;
        s.student = lm.m.spec;
        s.lora = l3;
        CHECK(kd_lm_new(&l2, &s, 1) == KD_OK);
        st = kd_lora_load(l2.g, &l2.m, &l3, V, ap);
        CHECK_MSG(st == KD_EFORMAT && strstr(kd_error_message(), "r=2") && strstr(kd_error_message(), "r=3"), "%s",
                  kd_error_message());
        /* a base checkpoint is not an adapter file */
        st = kd_lora_load(l2.g, &l2.m, &l3, V, bp);
        CHECK(st == KD_EFORMAT && strstr(kd_error_message(), "not a LoRA adapter"));
        kd_lm_free(&l2);
        /* merge into a checkpoint of another model (gpt_tiny: dim 16) */
        char other[512];
        kd_test_fixture("gpt_tiny.safetensors", other, sizeof other);
        st = kd_lora_merge(other, fixa, mp);
        CHECK_MSG(st == KD_EFORMAT && strstr(kd_error_message(), "adapters for model") &&
                      strstr(kd_error_message(), "dim=16"),
                  "%s", kd_error_message());
        /* an adapter tensor of the wrong shape, and one missing */
        kd_safetensors fa;
        if (kd_st_read(fixa, &fa) == KD_OK) {
            for (int drop = 0; drop < 2; drop++) {
                kd_st_writer *w = kd_st_writer_new();
                for (int i = 0; i < fa.n; i++) {
                    const kd_st_tensor *t = &fa.tensors[i];
                    int is = strcmp(t->name, "h.1.mlp.c_proj.lora_B") == 0;
                    if (is && drop) continue;
                    int64_t sh2[2] = {t->shape[0], is ? t->shape[1] - 1 : t->shape[1]};
                    float *buf = kd_calloc((size_t)(sh2[0] * t->shape[1]), sizeof(float));
                    kd_st_add(w, t->name, KD_F32, 2, sh2, buf);
                    free(buf);
                }
                for (int i = 0; i < fa.n_meta; i++) kd_st_set_meta(w, fa.meta_keys[i], fa.meta_vals[i]);
                char bad[512];
                snprintf(bad, sizeof bad, "%s/bad%d.safetensors", dir, drop);
                CHECK(kd_st_write(w, bad) == KD_OK);
                kd_st_writer_free(w);
                st = kd_lora_load(lm.g, &lm.m, &lc, V, bad);
                CHECK_MSG(st != KD_OK && strstr(kd_error_message(), "h.1.mlp.c_proj.lora_B"), "%s", kd_error_message());
                st = kd_lora_merge(fixb, bad, mp);
                CHECK_MSG(st != KD_OK && strstr(kd_error_message(), drop ? "tensors" : "h.1.mlp.c_proj.lora_B"), "%s",
                          kd_error_message());
            }
            kd_st_free(&fa);
        }
    }
    free(adapted);
    if (lm.g) kd_lm_free(&lm);
    if (ref.buf) kd_st_free(&ref);
}

/* ---------------------------------------------------------------- OKD */

/* central differences of the scalar node `f` w.r.t. k random elements of
 * leaf p; returns ||g_a - g_n|| / max(||g_a||, ||g_n||) with g_a = p's
 * gradient after a backward of lm->loss */
static double side_check(kd_lm *lm, kd_node *f, kd_node *p, int k, kd_rng *r, double *gnorm) {
    kd_graph_forward(lm->g, 1);
    kd_graph_backward(lm->g, lm->loss);
    int64_t n = kd_numel(&p->val);
    double da = 0, dn = 0, dd = 0;
    float *ga = kd_malloc((size_t)n * sizeof(float));
    memcpy(ga, p->grad.data, (size_t)n * sizeof(float));
    for (int j = 0; j < k; j++) {
        int64_t i = (int64_t)kd_rng_below(r, (uint32_t)n);
        float v0 = p->val.data[i], eps = 1e-2f;
        p->val.data[i] = v0 + eps;
        kd_graph_forward(lm->g, 1);
        double fp = f->val.data[0];
        p->val.data[i] = v0 - eps;
        kd_graph_forward(lm->g, 1);
        double fm = f->val.data[0];
        p->val.data[i] = v0;
        double num = (fp - fm) / (2.0 * eps);
        da += (double)ga[i] * ga[i];
        dn += num * num;
        dd += (ga[i] - num) * (ga[i] - num);
    }
    free(ga);
    *gnorm = sqrt(da);
    double m = fmax(sqrt(da), sqrt(dn));
    return m > 0 ? sqrt(dd) / m : INFINITY;
}

static void test_okd(void) {
    TEST("okd: each side's loss reaches only its own parameters (finite differences per side)") {
        kd_lm lm;
        kd_lm_setup s = {.student = "gpt: layers=1 dim=8 heads=2 ctx=6",
                         .loss = "ce(weight=0.5) + fkl(weight=0.5)",
                         .n_teachers = 1,
                         .teachers = {"gpt: layers=1 dim=12 heads=2 ctx=6"},
                         .vocab = 9,
                         .seq = 5,
                         .max_batch = 3,
                         .okd = 1,
                         .okd_lora = {.r = 2, .alpha = 4.0f, .targets = KD_LORA_ALL},
                         .okd_loss = "ce(weight=0.7) + fkl(weight=1.3)"};
        CHECK_MSG(kd_lm_new(&lm, &s, 3) == KD_OK, "%s", kd_error_message());
        if (!lm.g) break;
        kd_rng r;
        kd_rng_seed(&r, 21);
        for (int i = 0; i < kd_graph_n_state(lm.g); i++) {
            kd_node *n = kd_graph_state(lm.g, i);
            if (n->val.ndim == 2) kd_gc_fill(&r, n, 0.4f, 0.0f);
            if (strstr(n->name, "ln_") && strstr(n->name, "weight")) kd_gc_fill(&r, n, 0.3f, 1.0f);
        }
        for (int i = 0; i < 15; i++) {
            lm.x->val.data[i] = (float)kd_rng_below(&r, 9);
            lm.y->val.data[i] = (float)kd_rng_below(&r, 9);
            lm.mask->val.data[i] = 1.0f;
        }
        kd_graph_set_batch(lm.g, 3);
        CHECK(lm.t_terms.n == 2 && lm.terms.n == 2);
        /* the teacher's base is a constant, its adapters train */
        kd_node *tw = kd_graph_find(lm.g, "t.h.0.mlp.c_fc.weight");
        kd_node *tA = kd_graph_find(lm.g, "lora.t.h.0.attn.c_attn.lora_A");
        kd_node *tB = kd_graph_find(lm.g, "lora.t.h.0.mlp.c_proj.lora_B");
        kd_node *sw = kd_graph_find(lm.g, "s.h.0.mlp.c_fc.weight");
        CHECK(tw && !(tw->flags & KD_F_NEED_GRAD) && tA && (tA->flags & KD_F_NEED_GRAD) && tB && sw &&
              (sw->flags & KD_F_NEED_GRAD));
        if (!(tw && tA && tB && sw)) {
            kd_lm_free(&lm);
            break;
        }
        /* the teacher side's value, recomputed here: 0.7 CE(t, y) + 1.3 KL(p_s || p_t), means over the 15 rows */
        kd_graph_forward(lm.g, 1);
        double want = 0;
        for (int i = 0; i < 15; i++) {
            const float *zs = lm.m.logits->val.data + i * 9, *zt = lm.t_mix->val.data + i * 9;
            double ms_ = zs[0], mt = zt[0], ss = 0, st_ = 0;
            for (int v = 1; v < 9; v++) ms_ = fmax(ms_, zs[v]), mt = fmax(mt, zt[v]);
            for (int v = 0; v < 9; v++) ss += exp(zs[v] - ms_), st_ += exp(zt[v] - mt);
            double ls = ms_ + log(ss), lt = mt + log(st_), kl = 0;
            for (int v = 0; v < 9; v++) kl += exp(zs[v] - ls) * ((zs[v] - ls) - (zt[v] - lt));
            want += (0.7 * (lt - zt[(int)lm.y->val.data[i]]) + 1.3 * kl) / 15.0;
        }
        CHECK_CLOSE(lm.t_terms.total->val.data[0], want, 1e-5, 1e-5);
        double g1, g2, g3;
        /* teacher adapters: the gradient of the whole loss is that of the teacher side alone */
        double e1 = side_check(&lm, lm.t_terms.total, tA, 12, &r, &g1);
        double e2 = side_check(&lm, lm.t_terms.total, tB, 12, &r, &g2);
        /* student weights: that of the student side alone */
        double e3 = side_check(&lm, lm.terms.total, sw, 12, &r, &g3);
        CHECK_MSG(e1 < 2e-2 && e2 < 2e-2 && e3 < 2e-2 && g1 > 0 && g2 > 0 && g3 > 0,
                  "errors %g %g %g, gradient norms %g %g %g", e1, e2, e3, g1, g2, g3);
        /* the check can fail: the whole loss does depend on the teacher adapters through the student's terms */
        double e4 = side_check(&lm, lm.loss, tB, 12, &r, &g2);
        CHECK_MSG(e4 > 5e-2, "whole-loss difference quotient matches the stopped gradient (%g)", e4);
        kd_lm_free(&lm);
    }
    TEST("okd: refuses a setup without exactly one teacher or without teacher adapters") {
        kd_lm lm;
        kd_lm_setup s = {.student = "gpt: layers=1 dim=8 heads=2 ctx=6", .loss = "ce", .vocab = 9, .seq = 5,
                         .max_batch = 2, .okd = 1, .okd_lora = {.r = 2, .alpha = 2, .targets = KD_LORA_ALL}};
        CHECK(kd_lm_new(&lm, &s, 1) == KD_ECONFIG && strstr(kd_error_message(), "OKD"));
        s.n_teachers = 1;
        s.teachers[0] = "gpt: layers=1 dim=8 heads=2 ctx=6";
        s.okd_lora.r = 0;
        CHECK(kd_lm_new(&lm, &s, 1) == KD_ECONFIG);
        s.okd_lora.r = 2;
        s.okd_loss = "ce + nosuch";
        CHECK(kd_lm_new(&lm, &s, 1) != KD_OK && strstr(kd_error_message(), "nosuch"));
    }
}

static void test_cli(void) {
    const char *bin = getenv("KD_DISTILL") ? getenv("KD_DISTILL") : "build/distill";
    char corpus[400], ini[400], out[400];
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", dir);
    snprintf(ini, sizeof ini, "%s/okd.ini", dir);
    snprintf(out, sizeof out, "%s/runs", dir);
    FILE *f = fopen(corpus, "w");
    const char *words[] = {"cat", "dog", "bird", "fish", "cow"};
    for (int i = 0; i < 300; i++)
        fprintf(f, "the %s sat on the %s. number %d.\n\n", words[i % 5], words[(i / 5) % 5], i);
    fclose(f);
    f = fopen(ini, "w");
    fprintf(f,
            "[run]\nout = %s\n[data]\ntrain = text:%s\n[teacher]\nmodel = gpt: layers=1 dim=16 heads=2 ctx=16\n"
            "[student]\nmodel = gpt: layers=1 dim=8 heads=2 ctx=16\n[distill]\nloss = ce(weight=0.5) + fkl(weight=0.5)\n"
            "baseline = 0\n[lm]\nsteps = 12\nteacher_steps = 30\nseq = 16\nval_frac = 0.1\neval_every = 12\n"
            "eval_windows = 0\nwarmup = 2\n[train]\nbatch = 4\noptimizer = adamw\nlr = 3e-3\nlog_every = 4\n",
            out, corpus);
    fclose(f);
    TEST("distill run with [lm] okd: teacher adapters saved, merged teacher loads; metrics log both sides") {
        int rc = kd_test_sh("%s run %s --run.name=okd --lm.okd=1 --lm.okd_lora='r=2 alpha=4' --quiet --threads 1 > /dev/null "
                    "2> %s/okd.err",
                    bin, ini, dir);
        CHECK_MSG(rc == 0, "exit %d", rc);
        char p[700], q[700], m[700];
        snprintf(p, sizeof p, "%s/okd/summary.json", out);
        char *s = kd_test_slurp(p, NULL);
        CHECK_MSG(s && strstr(s, "\"adapter_params\"") && strstr(s, "\"teacher_val_loss\""), "%s", s ? s : "");
        free(s);
        snprintf(p, sizeof p, "%s/okd/metrics.jsonl", out);
        s = kd_test_slurp(p, NULL);
        CHECK(s && strstr(s, "\"t.1.ce\"") && strstr(s, "\"t.2.fkl\""));
        free(s);
        snprintf(p, sizeof p, "%s/okd/teacher.safetensors", out);
        snprintf(q, sizeof q, "%s/okd/teacher.lora.safetensors", out);
        snprintf(m, sizeof m, "%s/okd_teacher_merged.safetensors", dir);
        CHECK(kd_lora_merge(p, q, m) == KD_OK);
        rc = kd_test_sh("%s generate %s --prompt 'the' --tokens 5 > /dev/null 2>&1", bin, m);
        CHECK(rc == 0);
    }
    TEST("distill run with [lm] lora: adapters on the student, base from lora_base; merged eval equals the run's") {
        char base[700];
        snprintf(base, sizeof base, "%s/okd/student.safetensors", out);
        int rc = kd_test_sh("%s run %s --run.name=lora --lm.lora='r=2 alpha=4 targets=attn' --lm.lora_base=%s "
                    "--teacher.checkpoint=%s/okd/teacher.safetensors --quiet --threads 1 > /dev/null 2> %s/lora.err",
                    bin, ini, base, out, dir);
        CHECK_MSG(rc == 0, "exit %d", rc);
        char p[700], q[700], m[700];
        snprintf(p, sizeof p, "%s/lora/student.safetensors", out);
        snprintf(q, sizeof q, "%s/lora/student.lora.safetensors", out);
        snprintf(m, sizeof m, "%s/lora_merged.safetensors", dir);
        CHECK(kd_test_sh("%s lora merge %s %s --out %s > /dev/null 2>&1", bin, p, q, m) == 0);
        /* the base is unchanged by training: the run's student.safetensors equals lora_base */
        kd_safetensors a, b;
        memset(&a, 0, sizeof a);
        memset(&b, 0, sizeof b);
        CHECK(kd_st_read(p, &a) == KD_OK && kd_st_read(base, &b) == KD_OK);
        const kd_st_tensor *ta = a.buf ? kd_st_find(&a, "h.0.attn.c_attn.weight") : NULL;
        const kd_st_tensor *tb = b.buf ? kd_st_find(&b, "h.0.attn.c_attn.weight") : NULL;
        CHECK(ta && tb && ta->nbytes == tb->nbytes && memcmp(ta->data, tb->data, ta->nbytes) == 0);
        if (a.buf) kd_st_free(&a);
        if (b.buf) kd_st_free(&b);
        /* the merged model's validation loss, swept as the run does (a plain GPT now) */
        double got = -2, want = -1;
        kd_text_data d;
        char spec[600];
        snprintf(spec, sizeof spec, "text:%s", corpus);
        if (kd_text_load(&d, spec, NULL, 0.1f) == KD_OK) {
            kd_lm ml;
            kd_lm_setup ss = {.student = "gpt: layers=1 dim=8 heads=2 ctx=16", .vocab = d.vocab, .seq = 16, .max_batch = 4};
            if (kd_lm_new(&ml, &ss, 1) == KD_OK) {
                if (kd_lm_load(ml.g, &ml.m, m) == KD_OK) got = kd_lm_evaluate(&ml, &d, 1, 4, 0, 0).loss;
                kd_lm_free(&ml);
            }
            kd_text_free(&d);
        }
        snprintf(p, sizeof p, "%s/lora/summary.json", out);
        char *js = kd_test_slurp(p, NULL);
        const char *st = js ? strstr(js, "\"student\"") : NULL;
        const char *vl = st ? strstr(st, "\"val_loss\"") : NULL;
        if (vl) sscanf(strchr(vl, ':') + 1, "%lf", &want);
        CHECK_MSG(rc == 0 && got > 0 && fabs(got - want) < 2e-4, "rc %d, merged model %g vs the run's %g", rc, got, want);
        /* attn targets, one layer of width 8, r = 2: c_attn 2*8 + 24*2, attn.c_proj 2*8 + 8*2 */
        const char *apc = js ? strstr(js, "\"adapter_params\"") : NULL;
        double np = -1;
        if (apc) sscanf(strchr(apc, ':') + 1, "%lf", &np);
        CHECK_MSG(np == 96, "adapter_params %g", np);
        free(js);
    }
    TEST("distill run refuses [lm] lora without lora_base, and with on-policy batches, naming the key") {
        char e[600];
        snprintf(e, sizeof e, "%s/bad.err", dir);
        int rc = kd_test_sh("%s run %s --run.name=bad --lm.lora='r=2' --quiet > /dev/null 2> %s", bin, ini, e);
        char *s = kd_test_slurp(e, NULL);
        CHECK_MSG(rc != 0 && s && strstr(s, "[lm] lora_base"), "rc %d: %s", rc, s ? s : "");
        free(s);
        rc = kd_test_sh("%s run %s --run.name=bad --lm.lora='r=2' --lm.lora_base=x --lm.onpolicy=0.5 --lm.prompt=4 --quiet > /dev/null 2> %s",
                bin, ini, e);
        s = kd_test_slurp(e, NULL);
        CHECK_MSG(rc != 0 && s && strstr(s, "[lm] onpolicy"), "rc %d: %s", rc, s ? s : "");
        free(s);
        rc = kd_test_sh("%s run %s --run.name=bad --lm.lora='r=2 targets=emb' --quiet > /dev/null 2> %s", bin, ini, e);
        s = kd_test_slurp(e, NULL);
        CHECK_MSG(rc != 0 && s && strstr(s, "[lm] lora") && strstr(s, "'emb'"), "rc %d: %s", rc, s ? s : "");
        free(s);
    }
}

void test_lora(void) {
    snprintf(dir, sizeof dir, "%s/lora", kd_test_tmpdir());
    mkdir(dir, 0755);
    test_spec();
    test_gradients();
    test_pytorch();
    test_files();
    test_okd();
    test_cli();
}
