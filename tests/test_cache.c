/* test_cache.c - cached teacher outputs: a run reading a full-logit cache
 * trains exactly as the online run (bit-identical metrics), top-k records
 * keep the teacher's top-k and tail mass, augmented views are checked
 * against the loader's, and bad caches are refused with the file named. */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "kd_cache.h"
#include "kd_io.h"
#include "kd_train.h"
#include "test.h"

/* the student's lines of a metrics file */
static char *student_lines(const char *path) {
    char *all = kd_test_slurp(path, NULL);
    if (!all) return NULL;
    char *out = calloc(strlen(all) + 1, 1);
    for (char *line = strtok(all, "\n"); line; line = strtok(NULL, "\n"))
        if (strstr(line, "\"role\":\"student\"")) strcat(strcat(out, line), "\n");
    free(all);
    return out;
}

void test_cache(void) {
    char dir[512], ini[600], ck[600], cache[600], path[700], path2[700];
    snprintf(dir, sizeof dir, "%s/cache", kd_test_tmpdir());
    kd_test_sh("mkdir -p %s", dir);
    snprintf(ini, sizeof ini, "%s/t.ini", dir);
    snprintf(ck, sizeof ck, "%s/teacher.safetensors", dir);
    FILE *f = fopen(ini, "w");
    fprintf(f,
            "[run]\nout = %s/runs\n[data]\nlimit = 600\ntest_limit = 300\n[teacher]\nmodel = cnn: c4 p f16\n"
            "checkpoint = %s\nepochs = 1\n[student]\nmodel = mlp: 24\n[distill]\n"
            "loss = ce(weight=0.5) + kd(T=2, weight=0.5)\nbaseline = 0\n[train]\nepochs = 2\nbatch = 50\nlog_every = 3\n",
            dir, ck);
    fclose(f);
    TEST("a full-logit cache trains exactly like the online teacher") {
        CHECK(kd_test_sh("%s run %s --quiet --threads 2 --run.name=online > /dev/null", kd_test_bin(), ini) == 0);
        snprintf(cache, sizeof cache, "%s/full.cache", dir);
        CHECK(kd_test_sh("%s cache %s --limit 600 --out %s > /dev/null", kd_test_bin(), ck, cache) == 0);
        CHECK(kd_test_sh("%s run %s --quiet --threads 2 --run.name=cached --teacher.cache=%s > /dev/null", kd_test_bin(), ini, cache) == 0);
        snprintf(path, sizeof path, "%s/runs/online/metrics.jsonl", dir);
        snprintf(path2, sizeof path2, "%s/runs/cached/metrics.jsonl", dir);
        char *a = student_lines(path), *b = student_lines(path2);
        CHECK(a && b && strlen(a) > 100);
        CHECK_MSG(a && b && strcmp(a, b) == 0, "online:\n%s\ncached:\n%s", a ? a : "", b ? b : "");
        free(a);
        free(b);
        /* the cache holds the teacher's logits for each example */
        kd_cache c;
        CHECK(kd_cache_open(cache, &c) == KD_OK);
        CHECK(c.n == 600 && c.K == 10 && c.views == 0 && c.topk == 0);
        kd_cache_close(&c);
    }
    TEST("top-k records keep the top k and the tail's mass") {
        char full[600], top[600];
        snprintf(full, sizeof full, "%s/full.cache", dir);
        snprintf(top, sizeof top, "%s/top3.cache", dir);
        CHECK(kd_test_sh("%s cache %s --limit 600 --topk 3 --out %s > /dev/null", kd_test_bin(), ck, top) == 0);
        kd_cache a, b;
        CHECK(kd_cache_open(full, &a) == KD_OK);
        CHECK(kd_cache_open(top, &b) == KD_OK);
        int aug[4 * 4] = {0, 0, 0, 0, 0, 0, 0, 17, 0, 0, 0, 599, 0, 0, 0, 300};
        float za[40], zb[40];
        CHECK(kd_cache_fill(&a, 0, aug, 4, za) == KD_OK);
        CHECK(kd_cache_fill(&b, 0, aug, 4, zb) == KD_OK);
        int bad = 0;
        for (int r = 0; r < 4; r++) {
            double ma = -1e30, mb = -1e30, sa = 0, sb = 0;
            for (int k = 0; k < 10; k++) ma = fmax(ma, za[r * 10 + k]), mb = fmax(mb, zb[r * 10 + k]);
            for (int k = 0; k < 10; k++) sa += exp(za[r * 10 + k] - ma), sb += exp(zb[r * 10 + k] - mb);
            /* the three largest probabilities agree (F16 values: ~1e-3), and so does the rest's total */
            int idx[10];
            for (int k = 0; k < 10; k++) idx[k] = k;
            for (int i = 0; i < 3; i++)
                for (int j = i + 1; j < 10; j++)
                    if (za[r * 10 + idx[j]] > za[r * 10 + idx[i]]) {
                        int t = idx[i];
                        idx[i] = idx[j];
                        idx[j] = t;
                    }
            double rest_a = 1, rest_b = 1;
            for (int i = 0; i < 3; i++) {
                double pa = exp(za[r * 10 + idx[i]] - ma) / sa, pb = exp(zb[r * 10 + idx[i]] - mb) / sb;
                bad += fabs(pa - pb) > 2e-3;
                rest_a -= pa;
                rest_b -= pb;
            }
            bad += fabs(rest_a - rest_b) > 3e-3;
        }
        CHECK_MSG(bad == 0, "%d mismatches", bad);
        kd_cache_close(&a);
        kd_cache_close(&b);
    }
    TEST("augmented views: the run must draw the cached views") {
        snprintf(cache, sizeof cache, "%s/views.cache", dir);
        CHECK(kd_test_sh("%s cache %s --limit 600 --views 2 --crop 2 --flip 1 --seed 5 --out %s > /dev/null", kd_test_bin(), ck, cache) ==
              0);
        /* 3 epochs over 2 views: epoch 2 reuses view 0; every batch is checked */
        CHECK(kd_test_sh("%s run %s --quiet --threads 2 --run.name=views --run.seed=5 --data.crop=2 --data.flip=1 "
                 "--train.epochs=3 --teacher.cache=%s > /dev/null",
                 kd_test_bin(), ini, cache) == 0);
        snprintf(path, sizeof path, "%s/err.txt", dir);
        CHECK(kd_test_sh("%s run %s --quiet --run.name=views2 --run.seed=6 --data.crop=2 --data.flip=1 --teacher.cache=%s 2> %s",
                 kd_test_bin(), ini, cache, path) == 1);
        char *e = kd_test_slurp(path, NULL);
        CHECK_MSG(e && strstr(e, "views.cache") && strstr(e, "seed 5"), "%s", e ? e : "");
        free(e);
        CHECK(kd_test_sh("%s run %s --quiet --run.name=views3 --teacher.cache=%s/full.cache --data.flip=1 2> /dev/null", kd_test_bin(), ini,
                 dir) == 1);
    }
    TEST("assistant chain and born-again generations write every stage") {
        CHECK(kd_test_sh("%s run %s --quiet --threads 2 --run.name=chain --assistant.model=\"mlp: 30\" "
                 "--distill.generations=2 --train.epochs=1 > /dev/null",
                 kd_test_bin(), ini) == 0);
        const char *files[] = {"assistant", "student", "student_g2"};
        for (int i = 0; i < 3; i++) {
            snprintf(path, sizeof path, "%s/runs/chain/%s.safetensors", dir, files[i]);
            FILE *g = fopen(path, "rb");
            CHECK_MSG(g != NULL, "%s missing", path);
            if (g) fclose(g);
        }
        snprintf(path, sizeof path, "%s/runs/chain/summary.json", dir);
        char *j = kd_test_slurp(path, NULL);
        CHECK(j && strstr(j, "\"assistant\"") && strstr(j, "\"student_g2\"") && strstr(j, "\"teacher\""));
        free(j);
    }
    TEST("bad caches are refused, naming the file") {
        snprintf(path, sizeof path, "%s/err.txt", dir);
        /* a checkpoint is not a cache */
        CHECK(kd_test_sh("%s run %s --quiet --run.name=bad --teacher.cache=%s 2> %s", kd_test_bin(), ini, ck, path) == 1);
        char *e = kd_test_slurp(path, NULL);
        CHECK_MSG(e && strstr(e, "not a teacher cache"), "%s", e ? e : "");
        free(e);
        /* a cache of fewer examples than the training set */
        snprintf(cache, sizeof cache, "%s/small.cache", dir);
        CHECK(kd_test_sh("%s cache %s --limit 100 --out %s > /dev/null", kd_test_bin(), ck, cache) == 0);
        CHECK(kd_test_sh("%s run %s --quiet --run.name=bad2 --teacher.cache=%s 2> %s", kd_test_bin(), ini, cache, path) == 1);
        e = kd_test_slurp(path, NULL);
        CHECK_MSG(e && strstr(e, "100 examples"), "%s", e ? e : "");
        free(e);
        /* feature losses need the teacher's features */
        CHECK(kd_test_sh("%s run %s --quiet --run.name=bad3 --teacher.cache=%s/full.cache --distill.loss=\"fitnet\" 2> %s", kd_test_bin(),
                 ini, dir, path) == 1);
        e = kd_test_slurp(path, NULL);
        CHECK_MSG(e && strstr(e, "cache holds logits only"), "%s", e ? e : "");
        free(e);
    }
}
