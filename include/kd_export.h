/* kd_export.h - a trained model as dependency-free C99.
 *
 * `distill export CKPT --c DIR [--int8]` writes DIR/model.h and DIR/model.c:
 * the weights as static const arrays and one entry point,
 *     int model_predict(const float *input, float *logits);
 * input (C*H*W floats) is the image as pixel/255 in [0, 1], row-major CHW;
 * the normalisation the model was trained with is applied inside; the
 * return value is the predicted class. No malloc, no library beyond libm;
 * activations live in static arrays of MODEL_WORKSPACE_BYTES bytes in all
 * (so model_predict is not reentrant).
 * Supported: mlp, cnn and resnet specs (batch norm is evaluated with its
 * running statistics, dropout is the identity); anything else is refused
 * with KD_EUSAGE and a message naming the node.
 *
 * int8 (docs/export.md): batch norm folded into the convolution before it,
 * weights int8 per output channel (symmetric, s = max|w|/127), the input of
 * every convolution and linear layer quantised per sample the same way,
 * int32 sums, float scales and biases; pooling, ReLU, additions and the
 * logits in float.
 */
#ifndef KD_EXPORT_H
#define KD_EXPORT_H
#include "kd.h"

typedef struct kd_export_opts {
    int int8; /* 1: int8 weights and activations as above; 0: float32 */
} kd_export_opts;

/* Writes dir/model.h and dir/model.c (dir is created if missing). opts NULL:
 * float32. Errors: KD_EUSAGE for a model that cannot be exported, KD_EIO,
 * and those of reading the checkpoint. */
kd_status kd_export_c_opts(const char *checkpoint, const char *dir, const kd_export_opts *opts);
/* kd_export_c_opts with float32 weights */
kd_status kd_export_c(const char *checkpoint, const char *dir);

#endif
