/* export.c - `distill export CKPT --c DIR [--int8]`: the model as dependency-free C99. */
#include "cli/cli.h"
#include "kd_export.h"

static cli_opt export_opts[] = {
    {"--c", "DIR", "write DIR/model.h and DIR/model.c", NULL},
    {"--int8", NULL, "int8 weights per output channel, int8 activations, int32 sums (docs/export.md)", NULL},
};

static cli_cmd export_cmd = {
    .name = "export",
    .synopsis = "CHECKPOINT --c DIR [--int8]",
    .about = "Writes the model as standalone C99: weights as static const arrays, one entry\n"
             "point int model_predict(const float *input, float *logits), no malloc, only libm.\n"
             "Supports mlp, cnn and resnet models (see docs/export.md).",
    .examples = "  distill export runs/fashion_kd/student.safetensors --c out/\n  cc -O2 -c out/model.c\n"
                "  distill export runs/fashion_kd/student.safetensors --c out8/ --int8\n",
    .opts = export_opts,
    .n_opts = (int)(sizeof export_opts / sizeof export_opts[0]),
};

int cmd_export(int argc, char **argv) {
    const char *pos[1];
    int npos, help;
    kd_status st = cli_parse(&export_cmd, argc, argv, pos, 1, &npos, NULL, 0, NULL, &help);
    if (st == KD_OK && help) {
        cli_usage(&export_cmd, stdout);
        return 0;
    }
    if (st == KD_OK && (npos != 1 || !cli_get(&export_cmd, "--c")))
        st = kd_errorf(KD_EUSAGE, "distill export needs CHECKPOINT and --c DIR (see distill export --help)");
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 2;
    }
    cli_set_threads(1);
    kd_export_opts o = {.int8 = cli_get(&export_cmd, "--int8") != NULL};
    st = kd_export_c_opts(pos[0], cli_get(&export_cmd, "--c"), &o);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return st == KD_EUSAGE ? 2 : 1;
    }
    printf("wrote %s/model.h and %s/model.c (%s)\n", cli_get(&export_cmd, "--c"), cli_get(&export_cmd, "--c"),
           o.int8 ? "int8" : "float32");
    return 0;
}
