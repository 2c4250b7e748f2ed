/* main.c - `distill COMMAND ...`: dispatch, --help, --version. */
#include <string.h>

#include "cli/cli.h"

static void usage(FILE *f) {
    fprintf(f,
            "distill %s - knowledge distillation in C\n\n"
            "usage: distill COMMAND [options]\n\n"
            "commands:\n"
            "  run CONFIG [--section.key=value ...]   train as a config says (teacher, students)\n"
            "  eval CHECKPOINT --data SPEC             accuracy of a checkpoint on a dataset\n"
            "  cache TEACHER --out FILE                store a teacher's logits for cached distillation\n"
            "  export CHECKPOINT --c DIR               the model as dependency-free C99\n"
            "  loss \"SPEC\" --in X --out Y             a loss and its gradients on given tensors\n"
            "  report RUN... [--out FILE]              self-contained HTML report of runs (overlaid)\n"
            "  tokenize --data text:PATH --vocab N --out FILE   learn a BPE tokenizer from text\n"
            "  generate CHECKPOINT --prompt TEXT       continue a text with a GPT checkpoint\n"
            "  lora merge BASE ADAPTER --out FILE      fold LoRA adapters into their base checkpoint\n\n"
            "Every command takes --help. distill --version prints the version.\n",
            KD_VERSION);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *c = argv[1];
    if (strcmp(c, "--help") == 0 || strcmp(c, "-h") == 0 || strcmp(c, "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(c, "--version") == 0) {
        printf("distill %s\n", KD_VERSION);
        return 0;
    }
    if (strcmp(c, "run") == 0) return cmd_run(argc - 2, argv + 2);
    if (strcmp(c, "eval") == 0) return cmd_eval(argc - 2, argv + 2);
    if (strcmp(c, "loss") == 0) return cmd_loss(argc - 2, argv + 2);
    if (strcmp(c, "cache") == 0) return cmd_cache(argc - 2, argv + 2);
    if (strcmp(c, "export") == 0) return cmd_export(argc - 2, argv + 2);
    if (strcmp(c, "tokenize") == 0) return cmd_tokenize(argc - 2, argv + 2);
    if (strcmp(c, "generate") == 0) return cmd_generate(argc - 2, argv + 2);
    if (strcmp(c, "report") == 0) return cmd_report(argc - 2, argv + 2);
    if (strcmp(c, "lora") == 0) return cmd_lora(argc - 2, argv + 2);
    fprintf(stderr, "distill: unknown command '%s'\n\n", c);
    usage(stderr);
    return 2;
}
