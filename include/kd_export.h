/* kd_export.h - a trained model as dependency-free C99.
 *
 * `distill export CKPT --c DIR` writes DIR/model.h and DIR/model.c: the
 * weights as static const arrays and one entry point,
 *     int model_predict(const float *input, float *logits);
 * input (C*H*W floats) is the image as pixel/255 in [0, 1], row-major CHW;
 * the normalisation the model was trained with is applied inside. No
 * malloc, no library beyond libm; activations live in a static workspace
 * of MODEL_WORKSPACE_FLOATS floats (so model_predict is not reentrant).
 * Supported: mlp and cnn specs (batch norm is evaluated with its running
 * statistics, dropout is the identity). Not yet: resnet, int8.
 */
#ifndef KD_EXPORT_H
#define KD_EXPORT_H
#include "kd.h"

kd_status kd_export_c(const char *checkpoint, const char *dir);

#endif
