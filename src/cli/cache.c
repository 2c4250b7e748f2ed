/* cache.c - `distill cache TEACHER --data SPEC --out FILE`: run a teacher
 * once over a training set and store its logits (all, or the top k) per
 * example, optionally per augmented view for E epochs. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "kd_cache.h"
#include "kd_lm.h"
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
    {"--seq", "T", "language models: window length (default: the model's context)", NULL},
    {"--temperature", "T", "language models: temperature of the stored log-probabilities (default 1)", NULL},
    {"--tokenizer", "FILE", "language models: the BPE tokenizer of the data (default: the checkpoint's, or bytes)", NULL},
    {"--val", "F", "language models: validation fraction held out, as the run's [lm] val_frac (default 0.05)", NULL},
};

static cli_cmd cache_cmd = {
    .name = "cache",
    .synopsis = "TEACHER.safetensors --out FILE [options]",
    .about = "Runs the teacher once over the training set and stores its logits per example,\n"
             "so distillation runs read them instead of running the teacher ([teacher] cache).\n"
             "With --views, one record per augmented view and epoch; the view is stored too.",
    .examples = "  distill cache runs/fashion_teacher/teacher.safetensors --out runs/teacher.cache\n"
                "  distill cache runs/fashion_teacher/teacher.safetensors --topk 3 --out runs/teacher_top3.cache\n"
                "  distill cache runs/fashion_teacher/teacher.safetensors --views 8 --crop 2 --flip 1 --out runs/aug.cache\n"
                "  distill cache runs/lm_teacher/teacher.safetensors --data text --topk 16 --out runs/lm_top16.cache\n",
    .opts = cache_opts,
    .n_opts = (int)(sizeof cache_opts / sizeof cache_opts[0]),
};

static kd_status opt_int(const char *name, int lo, int hi, int def, int *out) {
    const char *v = cli_get(&cache_cmd, name);
    *out = def;
    return v ? cli_parse_int(name, v, lo, hi, out) : KD_OK;
}

/* the language-model cache: top-k log-probabilities per position */
static int cache_lm(const char *ckpt, const char *spec, int k, int batch, int limit) {
    const char *out = cli_get(&cache_cmd, "--out"), *tokp = cli_get(&cache_cmd, "--tokenizer");
    const char *vs = cli_get(&cache_cmd, "--val"), *Ts = cli_get(&cache_cmd, "--temperature");
    float T = Ts ? strtof(Ts, NULL) : 1.0f, vf = vs ? strtof(vs, NULL) : 0.05f;
    int seq = 0;
    kd_status st = KD_OK;
    if (!(T > 0.0f)) st = kd_errorf(KD_EUSAGE, "--temperature must be > 0");
    if (st == KD_OK && !(vf > 0.0f && vf <= 0.5f)) st = kd_errorf(KD_EUSAGE, "--val must be in (0, 0.5]");
    if (st == KD_OK && k < 1) st = kd_errorf(KD_EUSAGE, "language models need --topk K (e.g. 16)");
    if (st == KD_OK) st = opt_int("--seq", 0, 1 << 16, 0, &seq);
    kd_safetensors ck;
    memset(&ck, 0, sizeof ck);
    kd_tokenizer tok;
    int bpe = 0;
    kd_text_data d;
    memset(&d, 0, sizeof d);
    if (st == KD_OK) st = kd_st_read(ckpt, &ck);
    if (st == KD_OK) {
        const char *model = kd_st_meta(&ck, "model"), *tj = kd_st_meta(&ck, "tokenizer");
        kd_gpt_cfg g;
        if (!model || !kd_st_meta(&ck, "vocab"))
            st = kd_errorf(KD_EFORMAT, "%s: not a language-model checkpoint", ckpt);
        if (st == KD_OK) st = kd_gpt_cfg_parse(model, atoi(kd_st_meta(&ck, "vocab")), &g);
        if (st == KD_OK && seq == 0) seq = g.ctx;
        if (st == KD_OK && (seq < 2 || seq > g.ctx)) st = kd_errorf(KD_EUSAGE, "--seq must be in [2, %d]", g.ctx);
        if (st == KD_OK && tokp) {
            st = kd_tokenizer_load(&tok, tokp);
            bpe = st == KD_OK;
        } else if (st == KD_OK && tj) {
            st = kd_tokenizer_from_json(&tok, tj, ckpt);
            bpe = st == KD_OK;
        }
    }
    kd_st_free(&ck);
    if (st == KD_OK) st = kd_text_load(&d, spec, bpe ? &tok : NULL, vf);
    double secs = 0;
    if (st == KD_OK) st = kd_lm_cache_build(ckpt, &d, seq, k, T, batch, limit, out, &secs);
    if (st == KD_OK) {
        struct stat sb;
        long long bytes = stat(out, &sb) == 0 ? (long long)sb.st_size : -1;
        int64_t n = (int64_t)kd_text_n_windows(&d, 0, seq);
        if (limit > 0 && n > limit) n = limit;
        printf("%s: %lld windows x %d positions, top-%d log-probs at T=%g, %.1f MB (%.1f bytes/position; full F32 "
               "logits: %d), built in %.1f s\n",
               out, (long long)n, seq, k, (double)T, bytes / 1e6, (double)bytes / (double)(n * seq), 4 * d.vocab, secs);
    }
    if (bpe) kd_tokenizer_free(&tok);
    kd_text_free(&d);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return st == KD_EUSAGE ? 2 : 1;
    }
    return 0;
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
    if (strncmp(spec, "text", 4) == 0) return cache_lm(pos[0], spec, o.topk, o.batch == 256 ? 16 : o.batch, limit);
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
