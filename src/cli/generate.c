/* generate.c - `distill generate CKPT --prompt TEXT`: text from a GPT
 * checkpoint (byte-level, or BPE with the checkpoint's own tokenizer).
 *
 * Loads the checkpoint into a KV-cache runner (src/nn/gpt_infer.c), turns
 * the prompt into tokens, generates --n samples as one batch (in
 * chunks of at most 64) and prints each as the prompt followed by its
 * continuation, samples separated by a line "---". Checkpoints that carry a
 * BPE tokenizer in their metadata encode the prompt and decode the samples
 * with it.
 */
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli/cli.h"
#include "kd_gpt.h"
#include "kd_text.h"

#define MAX_CHUNK 64                /* samples generated at once */
#define MAX_PROMPT_FILE (64u << 20) /* bytes */

static cli_opt gen_opts[] = {
    {"--prompt", "TEXT", "the text to continue", NULL},
    {"--prompt-file", "FILE", "read the prompt from FILE (bytes as they are)", NULL},
    {"--tokens", "N", "tokens to generate per sample (default 100)", NULL},
    {"--n", "N", "number of samples (default 1)", NULL},
    {"--temperature", "T", "softmax temperature; 0 = greedy (default 1)", NULL},
    {"--top-k", "K", "sample among the K most likely tokens; 0 = off (default 0)", NULL},
    {"--top-p", "P", "sample among the most likely tokens holding mass P; 1 = off (default 1)", NULL},
    {"--seed", "S", "random seed (default 0); the same seed and threads give the same text", NULL},
    {"--threads", "N", "threads (default: all cores)", NULL},
    {"--stats", NULL, "print tokens per second to stderr", NULL},
};

static cli_cmd gen_cmd = {
    .name = "generate",
    .synopsis = "CHECKPOINT (--prompt TEXT | --prompt-file FILE) [options]",
    .about = "Continues a prompt with a GPT checkpoint written by distill (metadata \"model\" =\n"
             "\"gpt: ...\"). Byte-level: each byte of the prompt is a token, each token\n"
             "generated is printed as a byte. Prints each sample as the prompt followed by\n"
             "its continuation; samples are separated by a line \"---\". Past the model's\n"
             "context, generation goes on over the last ctx/2 tokens (see docs/generate.md).",
    .examples = "  distill generate runs/lm/student.safetensors --prompt \"In the beginning\" --tokens 200\n"
                "  distill generate lm.safetensors --prompt-file p.txt --n 4 --temperature 0.8 --top-k 40 --seed 7\n",
    .opts = gen_opts,
    .n_opts = (int)(sizeof gen_opts / sizeof gen_opts[0]),
};

static kd_status parse_float(const char *opt, const char *s, float *out) {
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (end == s || *end || errno || !isfinite(v)) return kd_errorf(KD_EUSAGE, "%s: '%s' is not a number", opt, s);
    *out = v;
    return KD_OK;
}

static kd_status parse_seed(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    if (*s < '0' || *s > '9') return kd_errorf(KD_EUSAGE, "--seed: '%s' is not a non-negative integer", s);
    unsigned long long v = strtoull(s, &end, 10);
    if (*end || errno) return kd_errorf(KD_EUSAGE, "--seed: '%s' is not a non-negative integer", s);
    *out = (uint64_t)v;
    return KD_OK;
}

/* the whole file; *len bytes, NUL-terminated */
static kd_status read_prompt_file(const char *path, char **buf, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return kd_errorf(KD_EIO, "--prompt-file %s: %s", path, strerror(errno));
    size_t cap = 4096, n = 0;
    char *b = kd_malloc(cap);
    for (;;) {
        if (n + 1 == cap) {
            if (cap > MAX_PROMPT_FILE) {
                free(b);
                fclose(f);
                return kd_errorf(KD_EUSAGE, "--prompt-file %s: larger than %u MB", path, MAX_PROMPT_FILE >> 20);
            }
            b = kd_realloc(b, cap *= 2);
        }
        size_t got = fread(b + n, 1, cap - n - 1, f);
        n += got;
        if (got == 0) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(b);
        return kd_errorf(KD_EIO, "--prompt-file %s: read error", path);
    }
    b[n] = '\0';
    *buf = b;
    *len = n;
    return KD_OK;
}

typedef struct gen_args {
    const char *ckpt, *prompt_arg, *prompt_file;
    int tokens, n, threads, stats;
    kd_sample_opts so;
    uint64_t seed;
} gen_args;

static kd_status parse_args(int npos, const char **pos, gen_args *a) {
    const char *v;
    kd_status st = KD_OK;
    *a = (gen_args){.tokens = 100, .n = 1, .so = {1.0f, 0, 1.0f}};
    if (npos != 1) return kd_errorf(KD_EUSAGE, "distill generate needs one CHECKPOINT (see distill generate --help)");
    a->ckpt = pos[0];
    a->prompt_arg = cli_get(&gen_cmd, "--prompt");
    a->prompt_file = cli_get(&gen_cmd, "--prompt-file");
    if (!a->prompt_arg == !a->prompt_file)
        return kd_errorf(KD_EUSAGE, "distill generate needs exactly one of --prompt TEXT and --prompt-file FILE");
    if (st == KD_OK && (v = cli_get(&gen_cmd, "--tokens"))) st = cli_parse_int("--tokens", v, 0, 1000000, &a->tokens);
    if (st == KD_OK && (v = cli_get(&gen_cmd, "--n"))) st = cli_parse_int("--n", v, 1, 100000, &a->n);
    if (st == KD_OK && (v = cli_get(&gen_cmd, "--threads"))) st = cli_parse_int("--threads", v, 0, 1024, &a->threads);
    if (st == KD_OK && (v = cli_get(&gen_cmd, "--temperature")))
        st = parse_float("--temperature", v, &a->so.temperature);
    if (st == KD_OK && (v = cli_get(&gen_cmd, "--top-k")))
        st = cli_parse_int("--top-k", v, 0, KD_GPT_MAX_VOCAB, &a->so.top_k);
    if (st == KD_OK && (v = cli_get(&gen_cmd, "--top-p"))) {
        st = parse_float("--top-p", v, &a->so.top_p);
        if (st == KD_OK && (a->so.top_p <= 0.0f || a->so.top_p > 1.0f))
            st = kd_errorf(KD_EUSAGE, "--top-p: '%s' is not in (0, 1]", v);
    }
    if (st == KD_OK && a->so.temperature < 0.0f)
        st = kd_errorf(KD_EUSAGE, "--temperature: '%s' is negative (0 = greedy)", cli_get(&gen_cmd, "--temperature"));
    if (st == KD_OK && (v = cli_get(&gen_cmd, "--seed"))) st = parse_seed(v, &a->seed);
    a->stats = cli_get(&gen_cmd, "--stats") != NULL;
    return st;
}

/* Loads the model and the prompt, generates, prints. */
static kd_status generate(const gen_args *a) {
    kd_gpt_cfg cfg;
    kd_gpt_runner *r = NULL;
    char *tok_json = NULL, *text = NULL;
    size_t P = 0;
    kd_status st = kd_gpt_load(a->ckpt, &cfg, &r, &tok_json);
    kd_tokenizer tok;
    int bpe = 0;
    if (st == KD_OK && tok_json) { /* a BPE model: its tokenizer travels in the checkpoint */
        st = kd_tokenizer_from_json(&tok, tok_json, a->ckpt);
        bpe = st == KD_OK;
        if (st == KD_OK && tok.vocab != cfg.vocab)
            st = kd_errorf(KD_EFORMAT, "%s: the tokenizer has %d tokens, the model %d", a->ckpt, tok.vocab, cfg.vocab);
    }
    if (st == KD_OK && !bpe && cfg.vocab > 256)
        st = kd_errorf(KD_ECONFIG, "%s: vocabulary of %d tokens and no tokenizer: byte-level text needs at most 256",
                       a->ckpt, cfg.vocab);
    if (st == KD_OK) {
        if (a->prompt_file) {
            st = read_prompt_file(a->prompt_file, &text, &P);
        } else {
            text = kd_strdup(a->prompt_arg);
            P = strlen(text);
        }
    }
    if (st == KD_OK && P == 0)
        st = kd_errorf(KD_EUSAGE, "the prompt%s%s is empty (at least one byte is needed)",
                       a->prompt_file ? " file " : "", a->prompt_file ? a->prompt_file : "");
    if (st == KD_OK && P > (size_t)MAX_PROMPT_FILE) st = kd_errorf(KD_EUSAGE, "the prompt is too long");
    /* the prompt as token ids */
    uint16_t *ids = NULL;
    size_t n_ids = 0;
    if (st == KD_OK) {
        ids = kd_malloc((P + 1) * sizeof *ids);
        if (bpe) {
            n_ids = kd_tokenizer_encode(&tok, (const uint8_t *)text, P, ids);
        } else {
            for (size_t i = 0; i < P; i++) ids[i] = (unsigned char)text[i];
            n_ids = P;
        }
    }
    for (size_t i = 0; st == KD_OK && !bpe && i < P; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c >= cfg.vocab)
            st = kd_errorf(KD_EUSAGE,
                           "prompt byte 0x%02x ('%c') at offset %zu is outside the vocabulary of %s (%d tokens): it "
                           "cannot encode this text as bytes (byte-level models have vocab 256)",
                           c, c >= 32 && c < 127 ? c : '?', i, a->ckpt, cfg.vocab);
    }
    int chunk = a->n < MAX_CHUNK ? a->n : MAX_CHUNK;
    int *prompt = NULL, *out = NULL;
    uint16_t *ob = NULL;
    uint8_t *dec = NULL;
    size_t dec_cap = 0;
    if (st == KD_OK) {
        kd_gpt_runner_reserve(r, chunk);
        prompt = kd_malloc((size_t)chunk * n_ids * sizeof(int));
        out = kd_malloc((size_t)chunk * (size_t)(a->tokens > 0 ? a->tokens : 1) * sizeof(int));
        ob = kd_malloc((size_t)(a->tokens > 0 ? a->tokens : 1) * sizeof *ob);
        dec_cap = bpe ? (size_t)(a->tokens > 0 ? a->tokens : 1) * KD_TEXT_MAX_CHUNK : 1;
        dec = kd_malloc(dec_cap);
        for (int b = 0; b < chunk; b++)
            for (size_t i = 0; i < n_ids; i++) prompt[(size_t)b * n_ids + i] = ids[i];
    }
    kd_rng rng;
    kd_rng_seed(&rng, a->seed);
    double secs = 0.0;
    for (int s0 = 0; st == KD_OK && s0 < a->n; s0 += chunk) {
        int B = a->n - s0 < chunk ? a->n - s0 : chunk;
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        st = kd_gpt_generate(r, B, prompt, (int)n_ids, a->tokens, &a->so, &rng, out);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        secs += (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        for (int b = 0; st == KD_OK && b < B; b++) {
            if (s0 + b > 0) fputs("---\n", stdout);
            fwrite(text, 1, P, stdout);
            if (bpe) {
                for (int i = 0; i < a->tokens; i++) ob[i] = (uint16_t)out[(size_t)b * a->tokens + i];
                size_t nb = kd_tokenizer_decode(&tok, ob, (size_t)a->tokens, dec, dec_cap);
                fwrite(dec, 1, nb < dec_cap ? nb : dec_cap, stdout);
            } else {
                for (int i = 0; i < a->tokens; i++) putchar(out[(size_t)b * a->tokens + i]);
            }
            putchar('\n');
        }
    }
    if (st == KD_OK && fflush(stdout) != 0) st = kd_errorf(KD_EIO, "writing the output: %s", strerror(errno));
    if (st == KD_OK && a->stats) {
        double n_tok = (double)a->n * a->tokens;
        fprintf(stderr, "%s: %.0f tokens (%d samples, batches of %d) in %.3f s: %.1f tokens/s\n", a->ckpt, n_tok, a->n,
                chunk, secs, secs > 0 ? n_tok / secs : 0.0);
    }
    free(prompt);
    free(out);
    free(ob);
    free(dec);
    free(ids);
    free(text);
    free(tok_json);
    if (bpe) kd_tokenizer_free(&tok);
    kd_gpt_runner_free(r);
    return st;
}

int cmd_generate(int argc, char **argv) {
    const char *pos[1];
    int npos, help;
    kd_status st = cli_parse(&gen_cmd, argc, argv, pos, 1, &npos, NULL, 0, NULL, &help);
    if (st == KD_OK && help) {
        cli_usage(&gen_cmd, stdout);
        return 0;
    }
    gen_args a;
    if (st == KD_OK) st = parse_args(npos, pos, &a);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 2;
    }
    cli_set_threads(a.threads);
    st = generate(&a);
    if (st != KD_OK) {
        fflush(stdout);
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return st == KD_EUSAGE ? 2 : 1;
    }
    return 0;
}
