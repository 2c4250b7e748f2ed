/* test_config.c - tests for src/io/config.c.
 *
 * Valid configs from strings and from a file (typed reads, defaults, quotes,
 * comments, boolean forms, later lines and command-line overrides winning),
 * one case per rejection rule with the status code and the exact "FILE:LINE:"
 * and key the message must name, kd_config_error's origin, and a write/reload
 * round trip of every key in the schema.
 *
 * Deliberately not here: what the CLI does with the values (range checks such
 * as "epochs must be at least 1" live in src/cli/run.c and its tests).
 */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd_config.h"
#include "test.h"

static const char *tpath(const char *name, char *buf, size_t n) {
    snprintf(buf, n, "%s/%s", kd_test_tmpdir(), name);
    return buf;
}

static int write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    int ok = fputs(text, f) >= 0;
    return (fclose(f) == 0) && ok;
}

/* The current error message contains needle (NULL: nothing to check). */
#define CHECK_ERRMSG(needle)                                                                                           \
    do {                                                                                                               \
        const char *_n = (needle);                                                                                     \
        if (_n) CHECK_MSG(strstr(kd_error_message(), _n) != NULL, "message '%s' lacks '%s'", kd_error_message(), _n);  \
    } while (0)

/* Loads text (origin "cfg.ini") into a fresh config expecting status want;
 * the message must contain each non-NULL needle. */
static void expect_load_error(const char *text, kd_status want, const char *n1, const char *n2, const char *n3) {
    kd_config *c = kd_config_new();
    kd_status st = kd_config_load_string(c, text, "cfg.ini");
    CHECK_MSG(st == want, "status %d, expected %d, for <<%s>> (message: %s)", (int)st, (int)want, text,
              kd_error_message());
    CHECK_ERRMSG(n1);
    CHECK_ERRMSG(n2);
    CHECK_ERRMSG(n3);
    kd_config_free(c);
}

/* Applies a command-line override to a fresh config expecting status want;
 * on failure the value of [train] lr must be left alone. */
static void expect_override_error(const char *assignment, kd_status want, const char *n1, const char *n2,
                                  const char *n3) {
    kd_config *c = kd_config_new();
    kd_status st = kd_config_override(c, assignment);
    CHECK_MSG(st == want, "status %d, expected %d, for '%s' (message: %s)", (int)st, (int)want, assignment,
              kd_error_message());
    CHECK_ERRMSG(n1);
    CHECK_ERRMSG(n2);
    CHECK_ERRMSG(n3);
    CHECK(kd_config_float(c, "train", "lr") == 0.05 && !kd_config_is_set(c, "train", "lr"));
    kd_config_free(c);
}

/* ---------------------------------------------------------------- valid input */

static void test_defaults(void) {
    TEST("defaults") {
        kd_config *c = kd_config_new();
        CHECK(kd_config_int(c, "train", "epochs") == 15);
        CHECK(kd_config_int(c, "train", "batch") == 128);
        CHECK(kd_config_float(c, "train", "lr") == 0.05);
        CHECK(kd_config_float(c, "train", "weight_decay") == 5e-4);
        CHECK(kd_config_float(c, "train", "eps") == 1e-8);
        CHECK(strcmp(kd_config_str(c, "train", "optimizer"), "sgd") == 0);
        CHECK(strcmp(kd_config_str(c, "run", "name"), "") == 0);
        CHECK(strcmp(kd_config_str(c, "teacher", "model"), "cnn: c32 c32 p c64 c64 p f256 d0.3") == 0);
        CHECK(kd_config_int(c, "train", "nesterov") == 1); /* booleans read as int */
        CHECK(kd_config_int(c, "data", "flip") == 0);
        CHECK(!kd_config_is_set(c, "train", "lr"));
        CHECK(!kd_config_is_set(c, "run", "name"));
        kd_config_free(c);
    }
}

static void test_load_string(void) {
    TEST("load from string: typed reads, quotes, comments") {
        const char *text = "; a comment\n"
                           "# another comment\n"
                           "[run]\n"
                           "name = \"my run\"\n"
                           "seed=-7\n"
                           "\n"
                           "[data]\n"
                           "  flip = true  \n"
                           "limit = 100\n"
                           "[teacher]\n"
                           "model = 'cnn: c8 p f16'\n"
                           "checkpoint = \"\"\n"
                           "[train]\n"
                           "lr = 1e-3 ; inline comment\n"
                           "epochs: 3\n" /* inih also accepts ':' */
                           "nesterov = false\n"
                           "optimizer = adamw\n"
                           "warmup_epochs = 0.5\n";
        kd_config *c = kd_config_new();
        kd_status st = kd_config_load_string(c, text, "cfg.ini");
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        CHECK(strcmp(kd_config_str(c, "run", "name"), "my run") == 0);
        CHECK(kd_config_int(c, "run", "seed") == -7);
        CHECK(kd_config_int(c, "data", "flip") == 1);
        CHECK(kd_config_int(c, "data", "limit") == 100);
        CHECK(strcmp(kd_config_str(c, "teacher", "model"), "cnn: c8 p f16") == 0);
        CHECK(strcmp(kd_config_str(c, "teacher", "checkpoint"), "") == 0);
        CHECK(kd_config_float(c, "train", "lr") == 1e-3);
        CHECK(kd_config_int(c, "train", "epochs") == 3);
        CHECK(kd_config_int(c, "train", "nesterov") == 0);
        CHECK(strcmp(kd_config_str(c, "train", "optimizer"), "adamw") == 0);
        CHECK(kd_config_float(c, "train", "warmup_epochs") == 0.5);
        CHECK(kd_config_is_set(c, "train", "lr") && kd_config_is_set(c, "teacher", "checkpoint"));
        /* untouched keys keep their defaults and are not marked set */
        CHECK(kd_config_int(c, "train", "batch") == 128 && !kd_config_is_set(c, "train", "batch"));
        /* a key set in the file is reported at its line */
        CHECK(kd_config_error(c, "train", "lr", "must be %s", "positive") == KD_ECONFIG);
        CHECK_ERRMSG("cfg.ini:14:");
        CHECK_ERRMSG("lr");
        CHECK_ERRMSG("must be positive");
        kd_config_free(c);
    }
    TEST("empty input, CRLF line endings, string without final newline") {
        kd_config *c = kd_config_new();
        CHECK(kd_config_load_string(c, "", "cfg.ini") == KD_OK);
        CHECK(kd_config_load_string(c, "[train]\r\nlr = 0.25\r\nbatch = 64", "cfg.ini") == KD_OK);
        CHECK(kd_config_float(c, "train", "lr") == 0.25);
        CHECK(kd_config_int(c, "train", "batch") == 64);
        kd_config_free(c);
    }
    TEST("boolean forms") {
        const char *forms[] = {"0", "1", "true", "false", "\"true\""};
        const int want[] = {0, 1, 1, 0, 1};
        for (int i = 0; i < 5; i++) {
            char text[64];
            snprintf(text, sizeof text, "[data]\nflip = %s\n", forms[i]);
            kd_config *c = kd_config_new();
            CHECK_MSG(kd_config_load_string(c, text, "cfg.ini") == KD_OK, "%s: %s", forms[i], kd_error_message());
            CHECK_MSG(kd_config_int(c, "data", "flip") == want[i], "flip = %s read as %d", forms[i],
                      kd_config_int(c, "data", "flip"));
            kd_config_free(c);
        }
    }
    TEST("int range limits accepted") {
        kd_config *c = kd_config_new();
        CHECK(kd_config_load_string(c, "[run]\nseed = 2147483647\n", "cfg.ini") == KD_OK);
        CHECK(kd_config_int(c, "run", "seed") == 2147483647);
        CHECK(kd_config_load_string(c, "[run]\nseed = -2147483647\n", "cfg.ini") == KD_OK);
        CHECK(kd_config_int(c, "run", "seed") == -2147483647);
        kd_config_free(c);
    }
    TEST("a later line overrides an earlier one") {
        const char *text = "[train]\n"
                           "lr = 0.1\n"
                           "[data]\n"
                           "limit = 5\n"
                           "[train]\n"
                           "epochs = 2\n"
                           "lr = 0.2\n";
        kd_config *c = kd_config_new();
        CHECK(kd_config_load_string(c, text, "cfg.ini") == KD_OK);
        CHECK(kd_config_float(c, "train", "lr") == 0.2);
        kd_config_error(c, "train", "lr", "x");
        CHECK_ERRMSG("cfg.ini:7:");
        /* a second load on top keeps what it does not mention */
        CHECK(kd_config_load_string(c, "[train]\nlr = 0.3\n", "more.ini") == KD_OK);
        CHECK(kd_config_float(c, "train", "lr") == 0.3);
        CHECK(kd_config_int(c, "data", "limit") == 5);
        kd_config_error(c, "train", "lr", "x");
        CHECK_ERRMSG("more.ini:2:");
        kd_config_free(c);
    }
}

static void test_load_file(void) {
    char path[512];
    tpath("cfg.ini", path, sizeof path);
    TEST("load from file, then a command-line override wins") {
        const char *text = "[train]\n"
                           "batch = 32\n"
                           "lr = 0.1\n"
                           "[teacher]\n"
                           "model = mlp: f64\n";
        CHECK(write_text(path, text));
        kd_config *c = kd_config_new();
        kd_status st = kd_config_load(c, path);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        CHECK(kd_config_int(c, "train", "batch") == 32);
        CHECK(kd_config_float(c, "train", "lr") == 0.1);
        CHECK(strcmp(kd_config_str(c, "teacher", "model"), "mlp: f64") == 0);
        kd_config_error(c, "train", "lr", "too big");
        char want[600];
        snprintf(want, sizeof want, "%s:3:", path); /* the full path as given */
        CHECK_ERRMSG(want);
        CHECK_ERRMSG("lr");
        CHECK_ERRMSG("too big");

        CHECK(kd_config_override(c, "train.lr=0.3") == KD_OK);
        CHECK(kd_config_float(c, "train", "lr") == 0.3);
        CHECK(kd_config_int(c, "train", "batch") == 32); /* the rest of the file stays */
        kd_config_error(c, "train", "lr", "too big");
        CHECK_ERRMSG("command line: [train] lr");
        CHECK_ERRMSG("'0.3'");
        kd_config_free(c);
    }
    TEST("error in a file names the path and line") {
        CHECK(write_text(path, "[train]\n\nepochs = 1O\n"));
        kd_config *c = kd_config_new();
        CHECK(kd_config_load(c, path) == KD_ECONFIG);
        char want[600];
        snprintf(want, sizeof want, "%s:3:", path);
        CHECK_ERRMSG(want);
        CHECK_ERRMSG("epochs");
        CHECK_ERRMSG("'1O'");
        kd_config_free(c);
    }
    TEST("missing file") {
        char missing[512];
        tpath("no_such.ini", missing, sizeof missing);
        kd_config *c = kd_config_new();
        CHECK(kd_config_load(c, missing) == KD_EIO);
        CHECK_ERRMSG(missing);
        kd_config_free(c);
    }
    TEST("file with a NUL byte") {
        FILE *f = fopen(path, "wb");
        CHECK(f != NULL);
        if (!f) break;
        fwrite("[train]\nlr = 1\0\n", 1, 16, f);
        fclose(f);
        kd_config *c = kd_config_new();
        CHECK(kd_config_load(c, path) == KD_ECONFIG);
        CHECK_ERRMSG(path);
        kd_config_free(c);
    }
}

/* ---------------------------------------------------------------- rejection */

static void test_errors(void) {
    TEST("unknown section with keys") {
        expect_load_error("[train]\nlr = 0.1\n[bogus]\nx = 1\n", KD_ECONFIG, "cfg.ini:3:", "[bogus]", NULL);
        /* the list of known sections comes from the schema: every section of all_keys is named */
        expect_load_error("[bogus]\n", KD_ECONFIG, "known: run, data, teacher", "lm, multitask, textcls", NULL);
    }
    TEST("unknown empty section") {
        expect_load_error("[run]\nseed = 1\n\n[empty]\n", KD_ECONFIG, "cfg.ini:4:", "[empty]", NULL);
        expect_load_error("[run]\n; c\n  [nothere]", KD_ECONFIG, "cfg.ini:3:", "[nothere]", NULL);
        /* section names are case-sensitive */
        expect_load_error("[Train]\n", KD_ECONFIG, "cfg.ini:1:", "[Train]", NULL);
    }
    TEST("unknown key") {
        expect_load_error("[train]\nlr = 0.1\nlearning_rate = 0.1\n", KD_ECONFIG, "cfg.ini:3:", "learning_rate",
                          "[train]");
        /* a real key in the wrong section */
        expect_load_error("[data]\n\nlr = 0.1\n", KD_ECONFIG, "cfg.ini:3:", "'lr'", "[data]");
    }
    TEST("key outside any section") {
        expect_load_error("; header\n\nlr = 0.1\n[train]\n", KD_ECONFIG, "cfg.ini:3:", "'lr'", "outside");
    }
    TEST("non-numeric int") {
        expect_load_error("[train]\nepochs = ten\n", KD_ECONFIG, "cfg.ini:2:", "epochs", "'ten'");
        expect_load_error("[train]\nlr = 1\nbatch = 3.5\n", KD_ECONFIG, "cfg.ini:3:", "batch", "'3.5'");
        expect_load_error("[train]\nbatch = 12abc\n", KD_ECONFIG, "cfg.ini:2:", "batch", NULL);
        expect_load_error("[train]\nbatch =\n", KD_ECONFIG, "cfg.ini:2:", "batch", NULL);
    }
    TEST("non-numeric float") {
        expect_load_error("[train]\n\nlr = fast\n", KD_ECONFIG, "cfg.ini:3:", "lr", "'fast'");
        expect_load_error("[train]\nmomentum = 0.9x\n", KD_ECONFIG, "cfg.ini:2:", "momentum", NULL);
        expect_load_error("[train]\nlr = nan\n", KD_ECONFIG, "cfg.ini:2:", "lr", NULL);
        expect_load_error("[train]\nlr = inf\n", KD_ECONFIG, "cfg.ini:2:", "lr", NULL);
        expect_load_error("[train]\nlr = 1e999\n", KD_ECONFIG, "cfg.ini:2:", "lr", NULL);
        expect_load_error("[train]\nlr = \"\"\n", KD_ECONFIG, "cfg.ini:2:", "lr", NULL);
    }
    TEST("int overflow") {
        expect_load_error("[run]\nseed = 2147483648\n", KD_ECONFIG, "cfg.ini:2:", "seed", "2147483648");
        expect_load_error("[run]\nseed = -2147483649\n", KD_ECONFIG, "cfg.ini:2:", "seed", NULL);
        expect_load_error("[train]\nepochs = 99999999999999999999999\n", KD_ECONFIG, "cfg.ini:2:", "epochs", NULL);
    }
    TEST("bad bool") {
        expect_load_error("[train]\nnesterov = yes\n", KD_ECONFIG, "cfg.ini:2:", "nesterov", "'yes'");
        expect_load_error("[data]\n\n\nflip = 2\n", KD_ECONFIG, "cfg.ini:4:", "flip", NULL);
        expect_load_error("[data]\nflip = TRUE\n", KD_ECONFIG, "cfg.ini:2:", "flip", NULL);
        expect_load_error("[data]\nflip =\n", KD_ECONFIG, "cfg.ini:2:", "flip", NULL);
    }
    TEST("malformed line") {
        expect_load_error("[train]\nlr = 0.1\nthis line has no equals sign\n", KD_ECONFIG, "cfg.ini:3:", "malformed",
                          NULL);
        expect_load_error("[train\nlr = 0.1\n", KD_ECONFIG, "cfg.ini:1:", "malformed", NULL);
    }
    TEST("line numbers with CRLF endings") {
        expect_load_error("[train]\r\nlr = 0.1\r\n\r\nbatch = x\r\n", KD_ECONFIG, "cfg.ini:4:", "batch", NULL);
    }
    TEST("overlong line is an error at its own line, not silently cut") {
        char text[1200];
        char big[700];
        memset(big, 'c', sizeof big - 1);
        big[sizeof big - 1] = '\0';
        snprintf(text, sizeof text, "[teacher]\n; fine\nmodel = %s\n[train]\nbogus = 1\n", big);
        expect_load_error(text, KD_ECONFIG, "cfg.ini:3:", "line longer", NULL);
        /* the limit: 198 characters before the newline are fine and kept whole */
        kd_config *c = kd_config_new();
        snprintf(text, sizeof text, "[teacher]\nmodel = %.190s\n[train]\nlr = 2\n", big);
        CHECK_MSG(kd_config_load_string(c, text, "cfg.ini") == KD_OK, "%s", kd_error_message());
        CHECK(strlen(kd_config_str(c, "teacher", "model")) == 190);
        CHECK(kd_config_float(c, "train", "lr") == 2.0);
        kd_config_free(c);
        snprintf(text, sizeof text, "[teacher]\nmodel = %.191s\n", big);
        expect_load_error(text, KD_ECONFIG, "cfg.ini:2:", "line longer", NULL);
    }
    TEST("the first error is reported") {
        expect_load_error("[train]\nlr = x\nepochs = y\n", KD_ECONFIG, "cfg.ini:2:", "lr", NULL);
    }
}

/* ---------------------------------------------------------------- overrides */

static void test_overrides(void) {
    TEST("override good") {
        kd_config *c = kd_config_new();
        CHECK(kd_config_override(c, "train.lr=0.5") == KD_OK);
        CHECK(kd_config_float(c, "train", "lr") == 0.5);
        CHECK(kd_config_is_set(c, "train", "lr"));
        CHECK(kd_config_override(c, "teacher.model='mlp: f32 f32'") == KD_OK);
        CHECK(strcmp(kd_config_str(c, "teacher", "model"), "mlp: f32 f32") == 0);
        CHECK(kd_config_override(c, "data.flip=true") == KD_OK);
        CHECK(kd_config_int(c, "data", "flip") == 1);
        CHECK(kd_config_override(c, "run.name=") == KD_OK); /* empty string is a valid string */
        CHECK(strcmp(kd_config_str(c, "run", "name"), "") == 0 && kd_config_is_set(c, "run", "name"));
        /* '=' in the value and '.' in the value are fine */
        CHECK(kd_config_override(c, "run.out=a=b.c") == KD_OK);
        CHECK(strcmp(kd_config_str(c, "run", "out"), "a=b.c") == 0);
        kd_config_free(c);
    }
    TEST("override bad") {
        expect_override_error("trainlr=0.1", KD_EUSAGE, "'--trainlr=0.1'", "--section.key=value", NULL);
        expect_override_error("train.lr", KD_EUSAGE, "'--train.lr'", NULL, NULL);
        expect_override_error("lr=0.1.5", KD_EUSAGE, "lr=0.1.5", NULL, NULL); /* the dot after '=' */
        expect_override_error(".lr=0.1", KD_EUSAGE, ".lr=0.1", NULL, NULL);
        expect_override_error("train.=0.1", KD_EUSAGE, "train.=0.1", NULL, NULL);
        expect_override_error("train.bogus=1", KD_ECONFIG, "command line", "'bogus'", "[train]");
        expect_override_error("trian.lr=1", KD_ECONFIG, "command line", "[trian]", NULL);
        expect_override_error("train.lr=fast", KD_ECONFIG, "command line: [train] lr", "'fast'", NULL);
        expect_override_error("train.epochs=2147483648", KD_ECONFIG, "command line: [train] epochs", NULL, NULL);
        expect_override_error("train.nesterov=yes", KD_ECONFIG, "command line: [train] nesterov", NULL, NULL);
    }
    TEST("kd_config_error names the origin") {
        kd_config *c = kd_config_new();
        CHECK(kd_config_error(c, "train", "batch", "must be in [%d, %d]", 1, 65536) == KD_ECONFIG);
        CHECK_ERRMSG("default: [train] batch = '128': must be in [1, 65536]");
        CHECK(kd_config_load_string(c, "[run]\n[train]\n\nbatch = 0\n", "my.ini") == KD_OK);
        kd_config_error(c, "train", "batch", "must be in [1, 65536]");
        CHECK_ERRMSG("my.ini:4: [train] batch = '0'");
        kd_config_free(c);
    }
}

/* ---------------------------------------------------------------- write */

/* Every key of the schema with a non-default value, in schema order. */
static const struct {
    const char *section, *key, *value;
} all_keys[] = {
    {"run", "name", "round trip"},
    {"run", "out", "/tmp/some dir"},
    {"run", "seed", "-12"},
    {"run", "threads", "3"},
    {"data", "train", "idx:a.idx,b.idx"},
    {"data", "test", "idx:c.idx,d.idx"},
    {"data", "limit", "1000"},
    {"data", "test_limit", "200"},
    {"data", "crop", "2"},
    {"data", "flip", "1"},
    {"data", "labeled", "5000"},
    {"data", "label_map", "0 0 1 1"},
    {"teacher", "model", "mlp: f128 d0.1 f64"},
    {"teacher", "checkpoint", "teach.safetensors"},
    {"teacher", "names", "features.0 = conv1, classifier.1 = fc1"},
    {"teacher", "cache", "t.cache"},
    {"teacher", "ensemble", "a.st b.st"},
    {"teacher", "ensemble_weights", "1 2"},
    {"teacher", "epochs", "3"},
    {"teacher", "lr", "0.1"},
    {"teacher", "crop", "2"},
    {"teacher", "flip", "1"},
    {"student", "model", "mlp: 64"},
    {"assistant", "model", "mlp: 256"},
    {"distill", "loss", "ce + dkd(T=2)"},
    {"distill", "baseline", "0"},
    {"distill", "baseline_epochs", "12"},
    {"distill", "generations", "3"},
    {"distill", "mutual", "1"},
    {"distill", "peer", "mlp: 32"},
    {"distill", "lelp", "5"},
    {"distill", "lelp_T", "0.5"},
    {"distill", "lelp_null", "0"},
    {"distill", "lelp_rotate", "0"},
    {"train", "epochs", "7"},
    {"train", "batch", "96"},
    {"train", "optimizer", "adamw"},
    {"train", "lr", "0.00125"},
    {"train", "momentum", "0.95"},
    {"train", "nesterov", "0"},
    {"train", "weight_decay", "0.01"},
    {"train", "beta1", "0.8"},
    {"train", "beta2", "0.98"},
    {"train", "eps", "1e-6"},
    {"train", "schedule", "step"},
    {"train", "min_lr", "1e-5"},
    {"train", "warmup_epochs", "0.25"},
    {"train", "step_epochs", "4"},
    {"train", "gamma", "0.3"},
    {"train", "clip", "2.5"},
    {"train", "smoothing", "0.1"},
    {"train", "log_every", "9"},
    {"train", "eval_every", "5"},
    {"train", "checkpoint_every", "25"},
    {"lm", "steps", "321"},
    {"lm", "teacher_steps", "654"},
    {"lm", "seq", "64"},
    {"lm", "val_frac", "0.1"},
    {"lm", "tokenizer", "tok.json"},
    {"lm", "warmup", "7"},
    {"lm", "eval_every", "50"},
    {"lm", "eval_windows", "16"},
    {"lm", "onpolicy", "0.5"},
    {"lm", "prompt", "8"},
    {"lm", "seqkd", "128"},
    {"lm", "temperature", "0.7"},
    {"lm", "top_k", "40"},
    {"lm", "top_p", "0.9"},
    {"multitask", "tasks", "fine wear"},
    {"multitask", "maps", "0 1 2 3 4 5 6 7 8 9 | 0 1 0 0 0 1 0 1 0 1"},
    {"multitask", "teachers", "a.st b.st"},
    {"multitask", "weights", "1 0.5"},
    {"lm", "init", "runs/warm/student.safetensors"},
    {"lm", "llmr", "5"},
    {"lm", "llmr_gamma", "0.9"},
    {"lm", "llmr_baseline", "none"},
    {"lm", "sample_eval", "16"},
    {"textcls", "steps", "77"},
    {"textcls", "teacher_steps", "55"},
    {"textcls", "seq", "64"},
    {"textcls", "test_frac", "0.25"},
    {"textcls", "warmup", "9"},
    {"textcls", "rationale", "0.5"},
    {"textcls", "rationale_k", "6"},
    {"lm", "lora", "r=4 alpha=8 targets=attn"},
    {"lm", "lora_base", "base.safetensors"},
    {"lm", "okd", "1"},
    {"lm", "okd_lora", "r=2 alpha=4"},
    {"lm", "okd_loss", "ce + rkl"},
};
#define N_KEYS ((int)(sizeof all_keys / sizeof all_keys[0]))

static void test_write(void) {
    char path[512];
    tpath("resolved.ini", path, sizeof path);
    TEST("write then reload: every key") {
        kd_config *a = kd_config_new();
        for (int i = 0; i < N_KEYS; i++) {
            char assign[256];
            snprintf(assign, sizeof assign, "%s.%s=%s", all_keys[i].section, all_keys[i].key, all_keys[i].value);
            CHECK_MSG(kd_config_override(a, assign) == KD_OK, "%s: %s", assign, kd_error_message());
        }
        CHECK_MSG(kd_config_write(a, path) == KD_OK, "%s", kd_error_message());

        /* the file holds exactly one "key = value" line per schema key, so a
         * key added to the schema but not to all_keys fails here */
        FILE *f = fopen(path, "r");
        CHECK(f != NULL);
        int n_assign = 0;
        char line[512];
        while (f && fgets(line, sizeof line, f))
            if (strstr(line, " = ")) n_assign++;
        if (f) fclose(f);
        CHECK_MSG(n_assign == N_KEYS, "%d keys written, the test knows %d", n_assign, N_KEYS);

        kd_config *b = kd_config_new();
        CHECK_MSG(kd_config_load(b, path) == KD_OK, "%s", kd_error_message());
        for (int i = 0; i < N_KEYS; i++) {
            const char *s = all_keys[i].section, *k = all_keys[i].key;
            /* compared as text, which covers every type: values are stored as validated text */
            CHECK(kd_config_error(b, s, k, "x") == KD_ECONFIG);
            char want[300];
            snprintf(want, sizeof want, "[%s] %s = '%s'", s, k, all_keys[i].value);
            CHECK_ERRMSG(want);
            CHECK_MSG(kd_config_is_set(b, s, k), "[%s] %s not set after reload", s, k);
        }
        /* and the typed reads agree */
        CHECK(kd_config_int(b, "run", "seed") == -12);
        CHECK(kd_config_float(b, "train", "lr") == 0.00125);
        CHECK(strcmp(kd_config_str(b, "teacher", "model"), "mlp: f128 d0.1 f64") == 0);
        char tmp[600];
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        CHECK(access(tmp, F_OK) != 0); /* no temporary left behind */
        kd_config_free(a);
        kd_config_free(b);
    }
    TEST("write then reload: defaults") {
        kd_config *a = kd_config_new(), *b = kd_config_new();
        CHECK(kd_config_write(a, path) == KD_OK);
        CHECK(kd_config_load(b, path) == KD_OK);
        CHECK(strcmp(kd_config_str(b, "teacher", "model"), kd_config_str(a, "teacher", "model")) == 0);
        CHECK(strcmp(kd_config_str(b, "run", "name"), "") == 0);
        CHECK(kd_config_float(b, "train", "weight_decay") == 5e-4);
        CHECK(kd_config_int(b, "train", "nesterov") == 1);
        kd_config_free(a);
        kd_config_free(b);
    }
    TEST("write to an unwritable place") {
        char bad[600];
        snprintf(bad, sizeof bad, "%s/no/such/dir/x.ini", kd_test_tmpdir());
        kd_config *a = kd_config_new();
        CHECK(kd_config_write(a, bad) == KD_EIO);
        CHECK_ERRMSG("no/such/dir");
        kd_config_free(a);
    }
    TEST("write fails at the rename: status, message, no temporary left") {
        char dir[512], tmp[600], inner[600];
        tpath("a_directory", dir, sizeof dir);
        snprintf(inner, sizeof inner, "%s/keep", dir);
        CHECK(mkdir(dir, 0700) == 0 && write_text(inner, "x")); /* a non-empty directory cannot be replaced */
        kd_config *a = kd_config_new();
        CHECK(kd_config_write(a, dir) == KD_EIO);
        CHECK_ERRMSG(dir);
        snprintf(tmp, sizeof tmp, "%s.tmp", dir);
        CHECK(access(tmp, F_OK) != 0);
        kd_config_free(a);
    }
    TEST("schema help lists every key") {
        char hp[512];
        tpath("schema.txt", hp, sizeof hp);
        FILE *f = fopen(hp, "w+");
        CHECK(f != NULL);
        if (!f) break;
        kd_config_print_schema(f);
        rewind(f);
        static char buf[65536];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = '\0';
        fclose(f);
        for (int i = 0; i < N_KEYS; i++) CHECK_MSG(strstr(buf, all_keys[i].key) != NULL, "%s", all_keys[i].key);
        CHECK(strstr(buf, "[teacher]") != NULL);
        /* each section is listed once, with all its keys, whatever the schema's order */
        for (int i = 0; i < N_KEYS; i++) {
            char hdr[80];
            snprintf(hdr, sizeof hdr, "  [%s]\n", all_keys[i].section);
            char *first = strstr(buf, hdr);
            CHECK_MSG(first && !strstr(first + 1, hdr), "section header %s missing or repeated", hdr);
        }
    }
}

void test_config(void) {
    test_defaults();
    test_load_string();
    test_load_file();
    test_errors();
    test_overrides();
    test_write();
}
