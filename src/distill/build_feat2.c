/* build_feat2.c - loss table rows for the second family of feature losses
 * (filled in as they land). */
#include "distill/build.h"

const kd_loss_def kd_loss_defs_feat2[] = {
    {NULL, NULL, NULL, NULL, 0},
};
