/* eval.c - `distill eval CHECKPOINT --data SPEC`: rebuild the model named
 * in the checkpoint's metadata, load it strictly, report accuracy. */
#include <string.h>

#include "cli/cli.h"
#include "kd_train.h"

static cli_opt eval_opts[] = {
    {"--data", "SPEC", "dataset: fashion-mnist:test (default), fashion-mnist:train, idx:IMAGES,LABELS", NULL},
    {"--batch", "N", "batch size (default 256)", NULL},
    {"--threads", "N", "threads (default: all cores)", NULL},
};

static cli_cmd eval_cmd = {
    .name = "eval",
    .synopsis = "CHECKPOINT [--data SPEC] [options]",
    .about = "Evaluates a checkpoint written by distill (its metadata names the model) and\n"
             "prints accuracy and mean cross-entropy.",
    .examples = "  distill eval runs/fashion_teacher/teacher.safetensors --data fashion-mnist:test\n",
    .opts = eval_opts,
    .n_opts = 3,
};

int cmd_eval(int argc, char **argv) {
    const char *pos[1];
    int npos, help;
    kd_status st = cli_parse(&eval_cmd, argc, argv, pos, 1, &npos, NULL, 0, NULL, &help);
    if (st == KD_OK && help) {
        cli_usage(&eval_cmd, stdout);
        return 0;
    }
    if (st == KD_OK && npos != 1) {
        cli_usage(&eval_cmd, stderr);
        return 2;
    }
    int batch = 256, threads = 0;
    if (st == KD_OK && cli_get(&eval_cmd, "--batch")) st = cli_parse_int("--batch", cli_get(&eval_cmd, "--batch"), 1, 65536, &batch);
    if (st == KD_OK && cli_get(&eval_cmd, "--threads"))
        st = cli_parse_int("--threads", cli_get(&eval_cmd, "--threads"), 0, 1024, &threads);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 2;
    }
    cli_set_threads(threads);
    const char *spec = cli_get(&eval_cmd, "--data") ? cli_get(&eval_cmd, "--data") : "fashion-mnist:test";
    kd_checkpoint_info info;
    kd_dataset ds = {0};
    kd_classifier c = {0};
    st = kd_checkpoint_info_read(pos[0], &info);
    if (st == KD_OK) st = kd_dataset_load(spec, &ds);
    if (st == KD_OK && (ds.c != info.c || ds.h != info.h || ds.w != info.w))
        st = kd_errorf(KD_ESHAPE, "%s: images are %dx%dx%d, the checkpoint %s expects %dx%dx%d", spec, ds.c, ds.h, ds.w,
                       pos[0], info.c, info.h, info.w);
    if (st == KD_OK) {
        ds.mean = info.mean;
        ds.std = info.std;
        if (ds.n_classes > info.classes)
            st = kd_errorf(KD_ESHAPE, "%s has labels up to %d, the checkpoint %s has %d classes", spec, ds.n_classes - 1,
                           pos[0], info.classes);
        ds.n_classes = info.classes;
    }
    if (st == KD_OK) st = kd_classifier_new(&c, info.model, "", &ds, batch, 0.0f, 0);
    if (st == KD_OK) st = kd_checkpoint_load(c.g, &c.m, pos[0]);
    if (st == KD_OK) {
        kd_eval_result r = kd_evaluate(&c, &ds, batch);
        printf("%s on %s: accuracy %.2f%% (%d examples), loss %.4f\n", pos[0], spec, 100.0 * r.acc, r.n, r.loss);
    }
    kd_classifier_free(&c);
    kd_dataset_free(&ds);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 1;
    }
    return 0;
}
