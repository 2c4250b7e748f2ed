/* bench_lm.c - language-model speed: a teacher training step, a
 * distillation step (frozen teacher forward + student step with 0.5 CE +
 * 0.5 KL), and generation with the KV-cache runner. Random tokens (speed
 * does not depend on the text). One JSON line; bench/lm.sh runs it beside
 * bench/torch_lm.py.
 *   bench_lm --mode train|distill|generate [--teacher SPEC] [--student SPEC]
 *            [--batch 16] [--seq 128] [--threads 2] [--seconds 5] [--profile 1]
 */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "kd_lm.h"

void openblas_set_num_threads(int);

int main(int argc, char **argv) {
    const char *mode = "train", *tspec = "gpt: layers=4 dim=256 heads=8 ctx=128";
    const char *sspec = "gpt: layers=2 dim=128 heads=4 ctx=128";
    int B = 16, T = 128, V = 256, threads = 2;
    double secs = 5;
    int profile = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--mode")) mode = argv[i + 1];
        else if (!strcmp(argv[i], "--teacher")) tspec = argv[i + 1];
        else if (!strcmp(argv[i], "--student")) sspec = argv[i + 1];
        else if (!strcmp(argv[i], "--batch")) B = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seq")) T = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds")) secs = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--profile")) profile = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "bench_lm: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    omp_set_num_threads(threads);
    openblas_set_num_threads(threads);
    int distill = !strcmp(mode, "distill"), gen = !strcmp(mode, "generate");
    kd_lm lm;
    kd_lm_setup s = {.student = distill ? sspec : tspec, .vocab = V, .seq = T, .max_batch = B};
    if (distill) {
        s.loss = "ce(weight=0.5) + fkl(T=1, weight=0.5)";
        s.n_teachers = 1;
        s.teachers[0] = tspec;
    }
    if (kd_lm_new(&lm, &s, 1) != KD_OK) {
        fprintf(stderr, "bench_lm: %s\n", kd_error_message());
        return 1;
    }
    kd_rng r;
    kd_rng_seed(&r, 1);
    if (gen) {
        kd_gpt_cfg cfg;
        kd_gpt_cfg_parse(tspec, V, &cfg);
        kd_lm_view view = {lm.g, &lm.m};
        double out[2];
        int bs[2] = {1, B};
        for (int k = 0; k < 2; k++) {
            kd_gpt_runner *run;
            if (kd_gpt_runner_new(&run, &cfg, kd_lm_lookup, &view, bs[k]) != KD_OK) return 1;
            int *prompt = calloc((size_t)bs[k], sizeof(int)), *o = malloc((size_t)bs[k] * T * sizeof(int));
            kd_sample_opts so = {.temperature = 1.0f, .top_p = 1.0f};
            int64_t n = 0;
            double t0 = kd_now();
            while (kd_now() - t0 < secs / 2) {
                kd_gpt_runner_reset(run);
                kd_gpt_generate(run, bs[k], prompt, 1, T - 1, &so, &r, o);
                n += (int64_t)bs[k] * (T - 1);
            }
            out[k] = n / (kd_now() - t0);
            kd_gpt_runner_free(run);
            free(prompt);
            free(o);
        }
        printf("{\"mode\":\"generate\",\"model\":\"%s\",\"tokens_per_s_b1\":%.1f,\"tokens_per_s_b%d\":%.1f}\n", tspec,
               out[0], B, out[1]);
        kd_lm_free(&lm);
        return 0;
    }
    kd_optim_cfg oc = {.kind = KD_OPTIM_ADAMW, .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
                       .weight_decay = 0.1f, .clip = 1.0f};
    kd_optim *opt = kd_optim_new(&oc, kd_graph_param_count(lm.g));
    for (int i = 0; i < B * T; i++) {
        lm.x->val.data[i] = (float)kd_rng_below(&r, V);
        lm.y->val.data[i] = (float)kd_rng_below(&r, V);
        lm.mask->val.data[i] = 1.0f;
    }
    kd_graph_set_batch(lm.g, B);
    int64_t n = 0;
    double t0 = 0;
    for (int it = 0;; it++) {
        if (it == 3) t0 = kd_now();
        kd_graph_forward(lm.g, 1);
        kd_graph_backward(lm.g, lm.loss);
        kd_clip_grad_norm(kd_graph_param_grad(lm.g), kd_graph_param_count(lm.g), 1.0f);
        kd_optim_step(opt, kd_graph_param_data(lm.g), kd_graph_param_grad(lm.g), 1e-3f);
        if (it >= 3) n++;
        if (it >= 3 && kd_now() - t0 > secs) break;
    }
    double dt = kd_now() - t0;
    if (profile) {
        kd_graph_set_profile(lm.g, 1);
        for (int it = 0; it < 3; it++) {
            kd_graph_forward(lm.g, 1);
            kd_graph_backward(lm.g, lm.loss);
        }
        kd_graph_profile_print(lm.g, stderr);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"mode\":\"%s\",\"tokens_per_s\":%.1f,\"steps\":%lld,\"arena_mb\":%.1f,\"peak_rss_mb\":%.1f}\n", mode,
           n * (double)B * T / dt, (long long)n, kd_graph_arena_bytes(lm.g) / 1048576.0, ru.ru_maxrss / 1024.0);
    kd_optim_free(opt);
    kd_lm_free(&lm);
    return 0;
}
