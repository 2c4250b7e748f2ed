/* bench_engine.c - times the teacher's training step and eval forward at a
 * batch size, and cblas_sgemm on the teacher's largest convolution GEMM, in
 * one run. Verifies before it times: the step must reduce the loss on a
 * fixed batch. Prints one JSON line (read by bench/run.sh).
 *
 *   build/bench_engine [--model SPEC] [--batch N] [--seconds S] [--threads N]
 */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kd_optim.h"
#include "kd_train.h"

static double model_flops_per_sample(const kd_graph *g, int training) {
    /* multiply-adds of matmul and conv nodes, x2; training adds two backward GEMMs
     * (one when the input needs no gradient) */
    double f = 0;
    for (int i = 0; i < kd_graph_n_nodes(g); i++) {
        kd_node *n = kd_graph_node(g, i);
        double mac = 0;
        int B = n->val.shape[0];
        if (n->op == KD_OP_CONV2D) {
            const kd_tensor *w = &n->in[1]->val;
            mac = (double)kd_numel(&n->val) / B * w->shape[1] * w->shape[2] * w->shape[3];
        } else if (n->op == KD_OP_MATMUL) {
            mac = (double)kd_numel(&n->val) / B * n->in[1]->val.shape[1];
        }
        if (mac == 0) continue;
        double mult = 1;
        if (training) mult += (n->in[0]->flags & KD_F_NEED_GRAD) ? 2 : 1;
        f += 2 * mac * mult;
    }
    return f;
}

typedef struct timed {
    kd_graph *g;
    kd_node *loss;
    kd_optim *opt;
    kd_optim_cfg oc;
    uint64_t step;
} timed;

static void step_of(timed *t) {
    kd_graph_set_step(t->g, t->step++);
    kd_graph_forward(t->g, 1);
    kd_graph_backward(t->g, t->loss);
    kd_optim_step(t->opt, kd_graph_param_data(t->g), kd_graph_param_grad(t->g), t->oc.lr);
}

/* samples/s of training steps on graph g (inputs already filled) */
static double time_steps(kd_graph *g, kd_node *loss, int batch, double seconds) {
    timed t = {.g = g, .loss = loss, .oc = {.kind = KD_OPTIM_SGD, .lr = 0.01f, .momentum = 0.9f, .nesterov = 1}};
    t.opt = kd_optim_new(&t.oc, kd_graph_param_count(g));
    for (int i = 0; i < 3; i++) step_of(&t);
    int n = 0;
    double t0 = kd_now(), el;
    do {
        step_of(&t);
        n++;
        el = kd_now() - t0;
    } while (el < seconds || n < 5);
    kd_optim_free(t.opt);
    return (double)batch * n / el;
}

static void fill(kd_node *x, kd_node *y, int batch, uint64_t seed) {
    kd_rng r;
    kd_rng_seed(&r, seed);
    for (int i = 0; i < batch * 784; i++) x->val.data[i] = kd_rng_normal(&r);
    for (int i = 0; i < batch; i++) y->val.data[i] = (float)kd_rng_below(&r, 10);
}

/* the distillation step: teacher forward + student forward/backward/update
 * (online), the same with the teacher's logits from a cache (an input),
 * and the plain student step */
static int bench_distill(const char *tspec, const char *sspec, const kd_dataset *ds, int batch, int threads,
                         double seconds) {
    const char *loss = "ce(weight=0.1) + kd(T=4, weight=0.9)";
    kd_distiller on, ca;
    kd_classifier pl;
    if (kd_distiller_new(&on, tspec, sspec, loss, ds, batch, 1) != KD_OK ||
        kd_distiller_new_cached(&ca, sspec, loss, ds, batch, 1) != KD_OK ||
        kd_classifier_new(&pl, sspec, "", ds, batch, 0.0f, 1) != KD_OK) {
        fprintf(stderr, "bench_engine: %s\n", kd_error_message());
        return 1;
    }
    fill(on.c.x, on.c.y, batch, 5);
    fill(ca.c.x, ca.c.y, batch, 5);
    fill(pl.x, pl.y, batch, 5);
    kd_rng r;
    kd_rng_seed(&r, 6);
    for (int i = 0; i < batch * 10; i++) ca.t_logits->val.data[i] = 3 * kd_rng_normal(&r);
    double s_on = time_steps(on.c.g, on.c.loss, batch, seconds);
    double s_ca = time_steps(ca.c.g, ca.c.loss, batch, seconds);
    double s_pl = time_steps(pl.g, pl.loss, batch, seconds);
    printf("{\"engine\":\"distill\",\"teacher\":\"%s\",\"student\":\"%s\",\"batch\":%d,\"threads\":%d,"
           "\"kd_online_samples_per_s\":%.1f,\"kd_cached_samples_per_s\":%.1f,\"student_samples_per_s\":%.1f}\n",
           tspec, sspec, batch, threads, s_on, s_ca, s_pl);
    kd_distiller_free(&on);
    kd_distiller_free(&ca);
    kd_classifier_free(&pl);
    return 0;
}

int main(int argc, char **argv) {
    const char *spec = "cnn: c32 c32 p c64 c64 p f256 d0.3", *student = NULL;
    int batch = 128, threads = 2;
    double seconds = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model")) spec = argv[i + 1];
        else if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) seconds = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--student")) student = argv[i + 1];
        else {
            fprintf(stderr, "bench_engine: unknown option %s\n", argv[i]);
            return 2;
        }
    }
#ifdef _OPENMP
    omp_set_num_threads(threads);
#endif
    openblas_set_num_threads(threads);
    kd_dataset ds = {.n = batch, .c = 1, .h = 28, .w = 28, .n_classes = 10, .mean = 0.286f, .std = 0.353f};
    if (student) return bench_distill(spec, student, &ds, batch, threads, seconds);
    kd_classifier c;
    if (kd_classifier_new(&c, spec, "", &ds, batch, 0.0f, 1) != KD_OK) {
        fprintf(stderr, "bench_engine: %s\n", kd_error_message());
        return 1;
    }
    kd_rng r;
    kd_rng_seed(&r, 5);
    for (int i = 0; i < batch * 784; i++) c.x->val.data[i] = kd_rng_normal(&r);
    for (int i = 0; i < batch; i++) c.y->val.data[i] = (float)kd_rng_below(&r, 10);
    kd_optim_cfg oc = {.kind = KD_OPTIM_SGD, .lr = 0.01f, .momentum = 0.9f, .nesterov = 1, .weight_decay = 5e-4f};
    kd_optim *opt = kd_optim_new(&oc, kd_graph_param_count(c.g));
    float *p = kd_graph_param_data(c.g), *gr = kd_graph_param_grad(c.g);
    uint64_t step = 0;
#define TRAIN_STEP()                                   \
    do {                                               \
        kd_graph_set_step(c.g, step++);                \
        kd_graph_forward(c.g, 1);                      \
        kd_graph_backward(c.g, c.loss);                \
        kd_optim_step(opt, p, gr, oc.lr);              \
    } while (0)
    /* verify: a few steps on one batch reduce the loss */
    kd_graph_forward(c.g, 1);
    float l0 = c.loss->val.data[0];
    for (int i = 0; i < 8; i++) TRAIN_STEP();
    kd_graph_forward(c.g, 1);
    float l1 = c.loss->val.data[0];
    if (!(l1 < l0)) {
        fprintf(stderr, "bench_engine: training does not reduce the loss (%g -> %g)\n", l0, l1);
        return 1;
    }
    if (getenv("KD_PROFILE")) {
        kd_graph_set_profile(c.g, 1);
        for (int i = 0; i < 10; i++) TRAIN_STEP();
        fprintf(stderr, "training step profile:\n");
        kd_graph_profile_print(c.g, stderr);
        kd_graph_set_profile(c.g, 0);
    }
    int n = 0;
    double t0 = kd_now(), el;
    do {
        TRAIN_STEP();
        n++;
        el = kd_now() - t0;
    } while (el < seconds || n < 5);
    double train_sps = (double)batch * n / el;
    n = 0;
    t0 = kd_now();
    do {
        kd_graph_forward_to(c.g, 0, c.m.logits);
        n++;
        el = kd_now() - t0;
    } while (el < seconds || n < 5);
    double eval_sps = (double)batch * n / el;
    /* sgemm on the largest conv GEMM shape per image, all threads busy */
    int M = 64, N = 196, K = 576;
    for (int i = 0; i < kd_graph_n_nodes(c.g); i++) {
        kd_node *v = kd_graph_node(c.g, i);
        if (v->op != KD_OP_CONV2D) continue;
        const kd_tensor *w = &v->in[1]->val;
        int k = w->shape[1] * w->shape[2] * w->shape[3], nn = v->val.shape[2] * v->val.shape[3];
        if ((double)w->shape[0] * k * nn > (double)M * N * K) {
            M = w->shape[0];
            K = k;
            N = nn;
        }
    }
    float *A = kd_malloc((size_t)M * K * 4), *Bm = kd_malloc((size_t)threads * K * N * 4),
          *C = kd_malloc((size_t)threads * M * N * 4);
    for (long i = 0; i < (long)M * K; i++) A[i] = kd_rng_normal(&r);
    for (long i = 0; i < (long)threads * K * N; i++) Bm[i] = kd_rng_normal(&r);
    n = 0;
    t0 = kd_now();
    do {
#pragma omp parallel for num_threads(threads)
        for (int t = 0; t < threads * 16; t++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, A, K,
                        Bm + (size_t)(t % threads) * K * N, N, 0.0f, C + (size_t)(t % threads) * M * N, N);
        n++;
        el = kd_now() - t0;
    } while (el < 1.0);
    double gemm_gflops = 2.0 * M * N * K * threads * 16 * n / el / 1e9;
    double ftrain = model_flops_per_sample(c.g, 1), feval = model_flops_per_sample(c.g, 0);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"engine\":\"distill\",\"model\":\"%s\",\"batch\":%d,\"threads\":%d,\"train_samples_per_s\":%.1f,"
           "\"eval_samples_per_s\":%.1f,\"train_gflops\":%.1f,\"eval_gflops\":%.1f,\"sgemm_gflops\":%.1f,"
           "\"sgemm_shape\":[%d,%d,%d],\"arena_mb\":%.1f,\"peak_rss_mb\":%.1f}\n",
           spec, batch, threads, train_sps, eval_sps, train_sps * ftrain / 1e9, eval_sps * feval / 1e9, gemm_gflops,
           M, N, K, kd_graph_arena_bytes(c.g) / 1048576.0, ru.ru_maxrss / 1024.0);
    free(A);
    free(Bm);
    free(C);
    kd_optim_free(opt);
    kd_classifier_free(&c);
    return 0;
}
