/* tokenize.c - `distill tokenize --data text:PATH --vocab N --out tok.json`:
 * learns a byte-pair-encoding tokenizer from the training split of a text
 * dataset (the validation documents stay unseen) and reports its compression
 * on both splits. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "kd_text.h"

static cli_opt tokenize_opts[] = {
    {"--data", "SPEC", "text:PATH (a file or a directory) or text (default: " KD_TEXT_DEFAULT_DIR ")", NULL},
    {"--vocab", "N", "vocabulary size, 257..65536 (256 bytes + N-256 merges)", NULL},
    {"--out", "FILE", "tokenizer to write (JSON)", NULL},
    {"--val", "F", "fraction of documents held out for validation, 0..0.5 (default 0.05)", NULL},
};

static cli_cmd tokenize_cmd = {
    .name = "tokenize",
    .synopsis = "--data text:PATH --vocab N --out FILE [--val F]",
    .about = "Learns a byte-level BPE tokenizer from the training split of a text dataset\n"
             "(validation documents are not seen) and prints its size, the compression\n"
             "(bytes per token) on both splits, and the time taken. See docs/text.md.",
    .examples = "  distill tokenize --data text:/usr/share/games/fortunes --vocab 1024 --out runs/tok.json\n"
                "  distill tokenize --data text:corpus.txt --vocab 512 --val 0.1 --out tok.json\n",
    .opts = tokenize_opts,
    .n_opts = (int)(sizeof tokenize_opts / sizeof tokenize_opts[0]),
};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int fail(int code) {
    fprintf(stderr, "distill: error: %s\n", kd_error_message());
    return code;
}

int cmd_tokenize(int argc, char **argv) {
    const char *pos[1];
    int npos, help;
    kd_status st = cli_parse(&tokenize_cmd, argc, argv, pos, 0, &npos, NULL, 0, NULL, &help);
    if (st == KD_OK && help) {
        cli_usage(&tokenize_cmd, stdout);
        return 0;
    }
    if (st == KD_OK && (!cli_get(&tokenize_cmd, "--vocab") || !cli_get(&tokenize_cmd, "--out")))
        st = kd_errorf(KD_EUSAGE, "distill tokenize needs --vocab N and --out FILE (see distill tokenize --help)");
    int vocab = 0;
    if (st == KD_OK) st = cli_parse_int("--vocab", cli_get(&tokenize_cmd, "--vocab"), 257, KD_TEXT_MAX_VOCAB, &vocab);
    float val = 0.05f;
    const char *vs = cli_get(&tokenize_cmd, "--val");
    if (st == KD_OK && vs) {
        char *end;
        double v = strtod(vs, &end);
        if (end == vs || *end || !(v >= 0.0 && v <= 0.5))
            st = kd_errorf(KD_EUSAGE, "--val: '%s' is not a number in [0, 0.5]", vs);
        val = (float)v;
    }
    if (st != KD_OK) return fail(2);
    const char *spec = cli_get(&tokenize_cmd, "--data") ? cli_get(&tokenize_cmd, "--data") : "text";
    const char *out = cli_get(&tokenize_cmd, "--out");

    uint8_t *tr = NULL, *va = NULL;
    size_t nt = 0, nv = 0;
    int dt = 0, dv = 0;
    st = kd_text_read_split(spec, val, 0, &tr, &nt, &dt);
    if (st == KD_OK) st = kd_text_read_split(spec, val, 1, &va, &nv, &dv);
    if (st == KD_OK && dt == 0)
        st = kd_errorf(KD_EFORMAT, "%s: no training documents (all %d fell in the validation split)", spec, dv);
    if (st != KD_OK) {
        free(tr);
        free(va);
        return fail(st == KD_ECONFIG ? 2 : 1);
    }
    kd_tokenizer tok;
    double t0 = now_s();
    st = kd_tokenizer_train(&tok, tr, nt, vocab);
    double t_train = now_s() - t0;
    if (st == KD_OK) st = kd_tokenizer_save(&tok, out);
    if (st != KD_OK) {
        kd_tokenizer_free(&tok);
        free(tr);
        free(va);
        return fail(1);
    }
    uint16_t *ids = kd_malloc((nt > nv ? nt : nv) * sizeof(uint16_t) + 2);
    t0 = now_s();
    size_t kt = kd_tokenizer_encode(&tok, tr, nt, ids);
    size_t kv = kd_tokenizer_encode(&tok, va, nv, ids);
    double t_enc = now_s() - t0;
    printf("%s: vocab %d (%d merges)%s\n", out, tok.vocab, tok.n_merges,
           tok.vocab < vocab ? " - stopped early: no pair occurs twice any more" : "");
    printf("data %s: %d train documents (%.2f MB), %d val documents (%.2f MB)\n", spec, dt, (double)nt / 1e6, dv,
           (double)nv / 1e6);
    printf("bytes per token: train %.3f, val %s", kt ? (double)nt / (double)kt : 0.0, kv ? "" : "- (empty)\n");
    if (kv) printf("%.3f\n", (double)nv / (double)kv);
    printf("time: training %.2f s, encoding both splits %.2f s (%.1f MB/s)\n", t_train, t_enc,
           t_enc > 0 ? (double)(nt + nv) / 1e6 / t_enc : 0.0);
    free(ids);
    kd_tokenizer_free(&tok);
    free(tr);
    free(va);
    return 0;
}
