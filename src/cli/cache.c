/* cache.c - `distill cache TEACHER --data SPEC --out FILE`: run a teacher
 * once over a training set and store its logits (all, or the top k) per
 * example, optionally per augmented view for E epochs. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "kd_cache.h"
#include "kd_train.h"

static cli_opt cache_opts[] = {
    {"--data", "SPEC", "training set (default fashion-mnist:train)", NULL},
    {"--out", "FILE", "cache file to write (safetensors)", NULL},
    {"--topk", "K", "store the K largest logits and the rest's mass (default: all logits)", NULL},
    {"--fp16", NULL, "store full logits as F16 (top-k values always are)", NULL},
    {"--views", "E", "store E augmented views per example (default 0: un-augmented)", NULL},
    {"--crop", "P", "augmentation: random crop after P pixels of zero padding (with --views)", NULL},
    {"--flip", "0|1", "augmentation: random horizontal flip (with --views)", NULL},
    {"--seed", "S", "seed of the views; runs using the cache need the same [run] seed (default 0)", NULL},
    {"--limit", "N", "only the first N examples", NULL},
    {"--batch", "N", "batch size (default 256)", NULL},
    {"--threads", "N", "threads (default: all cores)", NULL},
};

static cli_cmd cache_cmd = {
    .name = "cache",
    .synopsis = "TEACHER.safetensors --out FILE [options]",
    .about = "Runs the teacher once over the training set and stores its logits per example,\n"
             "so distillation runs read them instead of running the teacher ([teacher] cache).\n"
             "With --views, one record per augmented view and epoch; the view is stored too.",
    .examples = "  distill cache runs/fashion_teacher/teacher.safetensors --out runs/teacher.cache\n"
                "  distill cache runs/fashion_teacher/teacher.safetensors --topk 3 --out runs/teacher_top3.cache\n"
                "  distill cache runs/fashion_teacher/teacher.safetensors --views 8 --crop 2 --flip 1 --out runs/aug.cache\n",
    .opts = cache_opts,
    .n_opts = 11,
};

static kd_status opt_int(const char *name, int lo, int hi, int def, int *out) {
    const char *v = cli_get(&cache_cmd, name);
    *out = def;
    return v ? cli_parse_int(name, v, lo, hi, out) : KD_OK;
}

int cmd_cache(int argc, char **argv) {
    const char *pos[1];
    int npos, help;
    kd_status st = cli_parse(&cache_cmd, argc, argv, pos, 1, &npos, NULL, 0, NULL, &help);
    if (st == KD_OK && help) {
        cli_usage(&cache_cmd, stdout);
        return 0;
    }
    if (st == KD_OK && (npos != 1 || !cli_get(&cache_cmd, "--out")))
        st = kd_errorf(KD_EUSAGE, "distill cache needs TEACHER.safetensors and --out FILE (see distill cache --help)");
    kd_cache_opts o = {.fp16 = cli_get(&cache_cmd, "--fp16") != NULL};
    int limit = 0, threads = 0, seed = 0;
    if (st == KD_OK) st = opt_int("--topk", 0, 1 << 20, 0, &o.topk);
    if (st == KD_OK) st = opt_int("--views", 0, 10000, 0, &o.views);
    if (st == KD_OK) st = opt_int("--crop", 0, 16, 0, &o.crop);
    if (st == KD_OK) st = opt_int("--flip", 0, 1, 0, &o.flip);
    if (st == KD_OK) st = opt_int("--seed", 0, 2147483647, 0, &seed);
    if (st == KD_OK) st = opt_int("--limit", 0, 2147483647, 0, &limit);
    if (st == KD_OK) st = opt_int("--batch", 1, 65536, 256, &o.batch);
    if (st == KD_OK) st = opt_int("--threads", 0, 1024, 0, &threads);
    if (st == KD_OK && o.views == 0 && (o.crop || o.flip))
        st = kd_errorf(KD_EUSAGE, "--crop/--flip describe augmented views: give --views E too");
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 2;
    }
    o.seed = (uint64_t)seed;
    cli_set_threads(threads);
    const char *spec = cli_get(&cache_cmd, "--data") ? cli_get(&cache_cmd, "--data") : "fashion-mnist:train";
    kd_dataset ds = {0};
    double secs = 0;
    st = kd_dataset_load(spec, &ds);
    if (st == KD_OK) {
        kd_dataset_limit(&ds, limit);
        st = kd_cache_build(pos[0], &ds, &o, cli_get(&cache_cmd, "--out"), &secs);
    }
    if (st == KD_OK) {
        struct stat sb;
        long long bytes = stat(cli_get(&cache_cmd, "--out"), &sb) == 0 ? (long long)sb.st_size : -1;
        printf("%s: %d examples x %d view(s), %s, %.1f MB, built in %.1f s\n", cli_get(&cache_cmd, "--out"), ds.n,
               o.views > 0 ? o.views : 1, o.topk ? "top-k logits" : (o.fp16 ? "F16 logits" : "F32 logits"),
               bytes / 1e6, secs);
    }
    kd_dataset_free(&ds);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 1;
    }
    return 0;
}
