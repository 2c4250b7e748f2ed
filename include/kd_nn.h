/* kd_nn.h - models built from a one-line spec (grammar in docs/models.md).
 *
 *   mlp: 256 128                       hidden sizes; ReLU between
 *   cnn: c32 c32 p c64 c64 p f256 d0.3 cN conv3x3+BN+ReLU, p maxpool 2,
 *                                      fN linear+ReLU, dX dropout; bn=0 drops BN
 *   resnet: depth=20 width=16          CIFAR-style basic blocks, 3 stages
 *   gpt: layers=6 dim=256 heads=8 ctx=128   a GPT language model on token ids
 *
 * The final linear layer to n_classes ("head") is implied. Every node a loss
 * may tap has a stable name, prefixed by `prefix` (e.g. "t." for a teacher).
 */
#ifndef KD_NN_H
#define KD_NN_H
#include "kd.h"

#define KD_MAX_TAPS 32
typedef struct kd_model {
    kd_node *input;
    kd_node *logits;
    kd_node *feat; /* the input of the head */
    int n_taps;
    kd_node *taps[KD_MAX_TAPS]; /* named nodes, in order */
    char prefix[16];
    char spec[256];
} kd_model;

/* Builds the model on input x (B,C,H,W). Spec errors name the token. */
kd_status kd_model_build(kd_graph *g, const char *spec, const char *prefix, kd_node *x, int n_classes, kd_model *m);
/* Parameters (trainable or frozen, not buffers) whose name starts with the model's prefix. */
int64_t kd_model_params(const kd_graph *g, const kd_model *m);
/* A tap by its unprefixed name ("block2", "logits"), or NULL. */
kd_node *kd_model_tap(const kd_model *m, const char *name);

/* GPT (src/nn/gpt.c, names and layout in docs/models.md): ids (B,T) token
 * ids as floats, T <= cfg->ctx; taps "emb", "h0".."h{L-1}" (block outputs),
 * "ln_f" (m->feat) and "logits" (B,T,vocab). kd_model_build dispatches
 * "gpt: ..." specs here with vocab = n_classes. */
struct kd_gpt_cfg;
kd_status kd_gpt_build(kd_graph *g, const struct kd_gpt_cfg *cfg, const char *prefix, kd_node *ids, kd_model *m);

#endif
