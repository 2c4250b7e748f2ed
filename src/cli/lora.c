/* lora.c - `distill lora merge BASE ADAPTER --out MERGED`: folds LoRA
 * adapters (a NAME.lora.safetensors that `distill run` wrote with [lm] lora
 * or [lm] okd) into their base GPT checkpoint, W' = W + (alpha/r) B A, and
 * writes a plain checkpoint that `distill generate`, `eval` and `export`
 * read like any other. docs/losses/lora.md. */
#include <string.h>

#include "cli/cli.h"
#include "kd_lora.h"

static cli_opt lora_opts[] = {
    {"--out", "FILE", "merged checkpoint to write", NULL},
};

static cli_cmd lora_cmd = {
    .name = "lora",
    .synopsis = "merge BASE.safetensors ADAPTER.safetensors --out MERGED.safetensors",
    .about = "Merges LoRA adapters into the base GPT checkpoint they were trained on: every\n"
             "adapted weight becomes W + (alpha/r) B A; other tensors and the metadata are\n"
             "copied. The adapter file's model spec and vocabulary must be the base's.\n"
             "See docs/losses/lora.md.",
    .examples = "  distill lora merge runs/lora/student.safetensors runs/lora/student.lora.safetensors --out merged.safetensors\n"
                "  distill lora merge teacher.safetensors runs/okd/teacher.lora.safetensors --out teacher_okd.safetensors\n",
    .opts = lora_opts,
    .n_opts = 1,
};

int cmd_lora(int argc, char **argv) {
    const char *pos[3];
    int npos = 0, help = 0;
    kd_status st = cli_parse(&lora_cmd, argc, argv, pos, 3, &npos, NULL, 0, NULL, &help);
    if (st == KD_OK && help) {
        cli_usage(&lora_cmd, stdout);
        return 0;
    }
    if (st == KD_OK && (npos != 3 || strcmp(pos[0], "merge") != 0))
        st = kd_errorf(KD_EUSAGE, "usage: distill lora merge BASE ADAPTER --out MERGED (see distill lora --help)");
    if (st == KD_OK && !cli_get(&lora_cmd, "--out"))
        st = kd_errorf(KD_EUSAGE, "distill lora merge needs --out FILE");
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 2;
    }
    const char *out = cli_get(&lora_cmd, "--out");
    st = kd_lora_merge(pos[1], pos[2], out);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return 1;
    }
    printf("distill: merged %s into %s: wrote %s\n", pos[2], pos[1], out);
    return 0;
}
