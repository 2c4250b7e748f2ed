/* test_optim.c - tests for src/optim/optim.c.
 *
 * PyTorch parity: tests/fixtures/optim.safetensors (written by
 * tests/fixtures/gen_optim.py) holds five-step trajectories of torch.optim.SGD
 * (Nesterov, heavy-ball, plain) and torch.optim.AdamW driven by torch's
 * lr_scheduler, torch's CosineAnnealingLR / warm-up schedules over ten steps,
 * and clip_grad_norm_ outputs; kd_optim_step, kd_schedule_lr and
 * kd_clip_grad_norm must reproduce them. Then closed-form checks of every
 * schedule, and a few properties (state reset per optimiser, weight decay
 * alone, clipping off).
 *
 * Deliberately not here: training end to end (tests/test_train.c). The
 * fixture is committed; a missing fixture is a failure, not a skip.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_io.h"
#include "kd_optim.h"
#include "test.h"

#define N 37 /* must match gen_optim.py */
#define S 5

/* Tolerances. Parameters: PyTorch and we both work in float32 but order the
 * arithmetic differently (torch's foreach kernels fold lr into alpha and
 * divide by sqrt(bc2) after the square root; we divide first), so each step
 * may differ by a few ulps, and five steps compound that: 1e-6 relative to
 * the O(1) parameters plus 1e-7 absolute for entries that pass near zero.
 * Learning rates: torch computes them in double and the fixture rounds them
 * to float32, we compute in float: 1e-6 relative. */
#define P_ATOL 1e-7
#define P_RTOL 1e-6
#define LR_RTOL 1e-6

static int load_fixture(kd_safetensors *st) {
    char path[512];
    kd_test_fixture("optim.safetensors", path, sizeof path);
    kd_status s = kd_st_read(path, st);
    CHECK_MSG(s == KD_OK, "cannot read %s (run python3 tests/fixtures/gen_optim.py): %s", path, kd_error_message());
    return s == KD_OK;
}

/* Reads a float32 vector of n elements (1-d) or rows x n (2-d when rows > 0). */
static int get(const kd_safetensors *st, const char *name, float *dst, int rows, int n) {
    int shape2[2] = {rows, n}, shape1[1] = {n};
    kd_status s = rows > 0 ? kd_st_get_f32(st, name, dst, 2, shape2) : kd_st_get_f32(st, name, dst, 1, shape1);
    CHECK_MSG(s == KD_OK, "%s: %s", name, kd_error_message());
    return s == KD_OK;
}

/* The hyper-parameters of case `name` as gen_optim.py stored them, in a cfg
 * with the schedule the script used for that case. */
static kd_optim_cfg case_cfg(const kd_safetensors *st, const char *name) {
    float hp[8] = {0};
    char key[64];
    snprintf(key, sizeof key, "%s.hp", name);
    get(st, key, hp, 0, 8);
    kd_optim_cfg c = {0};
    c.kind = strcmp(name, "adamw") == 0 ? KD_OPTIM_ADAMW : KD_OPTIM_SGD;
    c.lr = hp[0];
    c.momentum = hp[1];
    c.nesterov = hp[2] != 0.0f;
    c.weight_decay = hp[3];
    c.beta1 = hp[4];
    c.beta2 = hp[5];
    c.eps = hp[6];
    c.warmup_steps = (int64_t)hp[7];
    c.sched = KD_SCHED_COSINE;
    if (strcmp(name, "sgd_nesterov") == 0) c.min_lr = 1e-3f;
    if (strcmp(name, "sgd_plain") == 0) { /* StepLR(step_size=2, gamma=0.5), one step per "epoch" */
        c.sched = KD_SCHED_STEP;
        c.step_epochs = 2;
        c.gamma = 0.5f;
    }
    return c;
}

/* Replays S steps of case `name` and compares the lr and the parameters
 * after every step. */
static void check_case(const kd_safetensors *st, const char *name) {
    TEST(name) {
        float p[N], grads[S * N], lrs[S], want[S * N];
        char key[64];
        int ok = get(st, "p0", p, 0, N) & get(st, "grads", grads, S, N);
        snprintf(key, sizeof key, "%s.lr", name);
        ok &= get(st, key, lrs, 0, S);
        snprintf(key, sizeof key, "%s.p", name);
        ok &= get(st, key, want, S, N);
        if (!ok) break;
        kd_optim_cfg cfg = case_cfg(st, name);
        kd_optim *o = kd_optim_new(&cfg, N);
        for (int s = 0; s < S; s++) {
            float lr = kd_schedule_lr(&cfg, s, S, 1);
            CHECK_CLOSE(lr, lrs[s], 0, LR_RTOL);
            /* step with torch's lr so a schedule bug cannot hide an optimiser bug */
            kd_optim_step(o, p, grads + s * N, lrs[s]);
            char what[64];
            snprintf(what, sizeof what, "%s step %d", name, s);
            CHECK_ARRAYS(what, p, want + s * N, N, P_ATOL, P_RTOL);
        }
        CHECK(o->t == S);
        kd_optim_free(o);
    }
}

static void check_clip(const kd_safetensors *st, const char *name, int clipped) {
    TEST(name) {
        float g[N], out[N], norm, g0[N];
        char key[64];
        snprintf(key, sizeof key, "%s.g", name);
        int ok = get(st, key, g, 0, N);
        snprintf(key, sizeof key, "%s.out", name);
        ok &= get(st, key, out, 0, N);
        snprintf(key, sizeof key, "%s.norm", name);
        ok &= get(st, key, &norm, 0, 1);
        if (!ok) break;
        memcpy(g0, g, sizeof g);
        float got = kd_clip_grad_norm(g, N, 1.0f);
        CHECK_CLOSE(got, norm, 0, 1e-6);
        /* torch scales by max/(norm + 1e-6); float32 rounding only */
        CHECK_ARRAYS(name, g, out, N, 1e-8, 1e-6);
        if (clipped) {
            double ss = 0;
            for (int i = 0; i < N; i++) ss += (double)g[i] * g[i];
            CHECK_CLOSE(sqrt(ss), 1.0, 0, 2e-6);
        } else {
            CHECK(memcmp(g, g0, sizeof g) == 0); /* below the limit: untouched, bit for bit */
        }
    }
}

static void test_torch_parity(void) {
    kd_safetensors st;
    TEST("optim fixture") {
        if (!load_fixture(&st)) return;
    }
    check_case(&st, "sgd_nesterov");
    check_case(&st, "sgd_momentum");
    check_case(&st, "sgd_plain");
    check_case(&st, "adamw");
    check_clip(&st, "clip", 1);
    check_clip(&st, "clip_small", 0);

    TEST("cosine schedule vs torch CosineAnnealingLR") {
        float want[10];
        if (!get(&st, "cos10.lr", want, 0, 10)) break;
        kd_optim_cfg c = {.lr = 0.1f, .min_lr = 1e-3f, .sched = KD_SCHED_COSINE};
        for (int s = 0; s < 10; s++) CHECK_CLOSE(kd_schedule_lr(&c, s, 10, 3), want[s], 0, LR_RTOL);
    }
    TEST("warm-up + cosine vs torch LinearLR -> CosineAnnealingLR") {
        float want[10];
        if (!get(&st, "warmcos10.lr", want, 0, 10)) break;
        kd_optim_cfg c = {.lr = 0.1f, .min_lr = 1e-3f, .sched = KD_SCHED_COSINE, .warmup_steps = 3};
        for (int s = 0; s < 10; s++) CHECK_CLOSE(kd_schedule_lr(&c, s, 10, 3), want[s], 0, LR_RTOL);
    }
    kd_st_free(&st);
}

/* ---------------------------------------------------------------- closed forms */

static void test_schedules(void) {
    TEST("constant schedule") {
        kd_optim_cfg c = {.lr = 0.3f, .sched = KD_SCHED_CONSTANT};
        CHECK(kd_schedule_lr(&c, 0, 100, 10) == 0.3f);
        CHECK(kd_schedule_lr(&c, 57, 100, 10) == 0.3f);
        CHECK(kd_schedule_lr(&c, 99, 100, 10) == 0.3f);
    }
    TEST("cosine schedule closed form") {
        const float lr = 0.2f, mn = 0.01f;
        const int64_t total = 1000;
        kd_optim_cfg c = {.lr = lr, .min_lr = mn, .sched = KD_SCHED_COSINE};
        CHECK_CLOSE(kd_schedule_lr(&c, 0, total, 100), lr, 0, 1e-7);
        CHECK_CLOSE(kd_schedule_lr(&c, total / 2, total, 100), 0.5 * (lr + mn), 0, 1e-6);
        CHECK_CLOSE(kd_schedule_lr(&c, total / 4, total, 100), mn + (lr - mn) * 0.5 * (1 + cos(M_PI / 4)), 0, 1e-6);
        /* the last update is one step short of the floor: 1 - cos(pi/total) ~ 5e-6 of the range */
        CHECK_CLOSE(kd_schedule_lr(&c, total - 1, total, 100), mn, 1e-6, 0);
        CHECK(kd_schedule_lr(&c, total - 1, total, 100) >= mn);
        int mono = 1;
        for (int64_t s = 1; s < total; s++)
            mono &= kd_schedule_lr(&c, s, total, 100) <= kd_schedule_lr(&c, s - 1, total, 100);
        CHECK_MSG(mono, "cosine schedule is not non-increasing");
    }
    TEST("linear warm-up then cosine") {
        const float lr = 0.1f, mn = 0.0f;
        const int64_t W = 8, total = 108;
        kd_optim_cfg c = {.lr = lr, .min_lr = mn, .sched = KD_SCHED_COSINE, .warmup_steps = W};
        for (int64_t s = 0; s < W; s++)
            CHECK_CLOSE(kd_schedule_lr(&c, s, total, 10), lr * (double)(s + 1) / W, 0, 1e-6);
        /* cosine over the remaining total - W = 100 steps */
        CHECK_CLOSE(kd_schedule_lr(&c, W, total, 10), lr, 0, 1e-7);
        CHECK_CLOSE(kd_schedule_lr(&c, W + 50, total, 10), 0.5 * (lr + mn), 0, 1e-6);
        CHECK_CLOSE(kd_schedule_lr(&c, W + 25, total, 10), lr * 0.5 * (1 + cos(M_PI / 4)), 0, 1e-6);
        /* last update: one step of 100 short of the floor */
        CHECK_CLOSE(kd_schedule_lr(&c, total - 1, total, 10), lr * 0.5 * (1 + cos(M_PI * 99 / 100)), 1e-9, 1e-5);
        CHECK(kd_schedule_lr(&c, total - 1, total, 10) < 3e-5f);
        /* warm-up applies to the other schedules too */
        c.sched = KD_SCHED_CONSTANT;
        CHECK_CLOSE(kd_schedule_lr(&c, 1, total, 10), lr * 2.0 / W, 0, 1e-6);
        CHECK(kd_schedule_lr(&c, W + 3, total, 10) == lr);
    }
    TEST("step schedule") {
        kd_optim_cfg c = {.lr = 0.5f, .sched = KD_SCHED_STEP, .step_epochs = 3, .gamma = 0.1f};
        const int64_t spe = 7; /* steps per epoch */
        for (int64_t s = 0; s < 10 * spe; s++) {
            int64_t epoch = s / spe;
            double want = 0.5 * pow(0.1, (double)(epoch / 3));
            CHECK_CLOSE(kd_schedule_lr(&c, s, 10 * spe, spe), want, 0, 1e-6);
        }
        /* boundaries exactly: last step of epoch 2 keeps lr, first of epoch 3 decays */
        CHECK(kd_schedule_lr(&c, 3 * spe - 1, 100, spe) == 0.5f);
        CHECK_CLOSE(kd_schedule_lr(&c, 3 * spe, 100, spe), 0.05, 0, 1e-6);
    }
}

/* ---------------------------------------------------------------- properties */

static void test_properties(void) {
    TEST("SGD without momentum, closed form") {
        kd_optim_cfg c = {.kind = KD_OPTIM_SGD, .weight_decay = 0.1f};
        float p[3] = {1, -2, 0.5f}, g[3] = {0.5f, 0, -1};
        kd_optim *o = kd_optim_new(&c, 3);
        kd_optim_step(o, p, g, 0.1f);
        /* p - lr*(g + wd*p) */
        CHECK_CLOSE(p[0], 1 - 0.1 * (0.5 + 0.1), 0, 1e-6);
        CHECK_CLOSE(p[1], -2 - 0.1 * (0 - 0.2), 0, 1e-6);
        CHECK_CLOSE(p[2], 0.5 - 0.1 * (-1 + 0.05), 0, 1e-6);
        kd_optim_free(o);
    }
    TEST("Nesterov momentum, two steps by hand") {
        kd_optim_cfg c = {.kind = KD_OPTIM_SGD, .momentum = 0.5f, .nesterov = 1};
        float p[1] = {1}, g1[1] = {1}, g2[1] = {2};
        kd_optim *o = kd_optim_new(&c, 1);
        kd_optim_step(o, p, g1, 0.1f); /* buf = 1, d = 1 + 0.5 = 1.5 */
        CHECK_CLOSE(p[0], 1 - 0.15, 0, 1e-7);
        kd_optim_step(o, p, g2, 0.1f); /* buf = 0.5 + 2 = 2.5, d = 2 + 1.25 = 3.25 */
        CHECK_CLOSE(p[0], 0.85 - 0.325, 0, 1e-6);
        kd_optim_free(o);
    }
    TEST("AdamW first step moves each weight by lr (bias correction)") {
        kd_optim_cfg c = {.kind = KD_OPTIM_ADAMW, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f};
        float p[4] = {0, 1, -1, 3}, g[4] = {1e-3f, -5, 0.25f, 100};
        kd_optim *o = kd_optim_new(&c, 4);
        kd_optim_step(o, p, g, 0.01f);
        CHECK_CLOSE(p[0], -0.01, 0, 1e-4); /* |m/sqrt(v)| = 1 whatever |g| */
        CHECK_CLOSE(p[1], 1.01, 0, 1e-6);
        CHECK_CLOSE(p[2], -1.01, 0, 1e-6);
        CHECK_CLOSE(p[3], 2.99, 0, 1e-6);
        kd_optim_free(o);
    }
    TEST("AdamW decoupled weight decay with zero gradient") {
        kd_optim_cfg c = {.kind = KD_OPTIM_ADAMW, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.5f};
        float p[2] = {2, -4}, g[2] = {0, 0};
        kd_optim *o = kd_optim_new(&c, 2);
        kd_optim_step(o, p, g, 0.1f);
        CHECK_CLOSE(p[0], 2 * (1 - 0.05), 0, 1e-7);
        CHECK_CLOSE(p[1], -4 * (1 - 0.05), 0, 1e-7);
        kd_optim_free(o);
    }
    TEST("clip: max_norm 0 is off, norm returned") {
        float g[2] = {3, 4};
        CHECK_CLOSE(kd_clip_grad_norm(g, 2, 0.0f), 5.0, 0, 1e-7);
        CHECK(g[0] == 3 && g[1] == 4);
        CHECK_CLOSE(kd_clip_grad_norm(g, 2, 1.0f), 5.0, 0, 1e-7);
        CHECK_CLOSE(g[0], 0.6, 0, 1e-6);
        CHECK_CLOSE(g[1], 0.8, 0, 1e-6);
    }
}

void test_optim(void) {
    test_torch_parity();
    test_schedules();
    test_properties();
}
