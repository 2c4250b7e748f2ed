/* build.h - internal: what a loss table row needs to build its term.
 *
 * Each family of losses keeps its own table (build.c: the core logit and
 * feature losses; more families in their own files) of kd_loss_def rows;
 * kd_loss_build looks names up across all tables listed in build.c. A
 * builder reads its arguments with kd_larg_* (defaults come from the row's
 * `args` string, ranges are checked there) and returns the unweighted loss
 * node; weighting, naming and summing are done by kd_loss_build.
 */
#ifndef KD_DISTILL_BUILD_H
#define KD_DISTILL_BUILD_H
#include "kd_distill.h"
#include "kd_losses.h"

typedef struct kd_lctx {
    kd_graph *g;
    const kd_loss_term *term;
    const kd_loss_inputs *in;
    int index;  /* term number, 1-based, for parameter names ("proj2.weight") */
    int warmup; /* set by a builder whose weight ramps up over epochs */
    kd_node *infer_logits; /* set by simkd: copied to kd_built_loss.infer_logits */
    /* set by a builder with a per-epoch schedule of its own (copied into
     * its kd_built_term, see kd_losses.h) */
    void (*sched)(kd_built_term *t, double epoch);
    kd_node *sched_node;
    float sched_arg[4];
} kd_lctx;

typedef struct kd_loss_def kd_loss_def;
typedef kd_status (*kd_loss_build_fn)(kd_lctx *c, kd_node **out);

struct kd_loss_def {
    const char *name;
    const char *args; /* "key=default ..." (weight=1 is implied) */
    const char *help;
    kd_loss_build_fn build;
    int teacher; /* reads the teacher */
};

/* A table of loss rows, terminated by a row with name NULL. */
extern const kd_loss_def kd_loss_defs_core[];
extern const kd_loss_def kd_loss_defs_feat2[];
extern const kd_loss_def kd_loss_defs_logit2[];
extern const kd_loss_def kd_loss_defs_feat3[];
extern const kd_loss_def kd_loss_defs_geom[];
extern const kd_loss_def kd_loss_defs_anneal[];

const kd_loss_def *kd_loss_def_find(const char *name);
/* default of `key` in an args string, or NULL */
const char *kd_larg_default(const char *args, const char *key, char *buf, size_t n);
/* the term's value for key, else the row's default (asserts the key is in the row);
 * the returned buffer is reused by the next call: copy it if you keep it */
const char *kd_larg_str(kd_lctx *c, const kd_loss_def *d, const char *key);
kd_status kd_larg_float(kd_lctx *c, const kd_loss_def *d, const char *key, double lo, double hi, float *out);
/* an integer argument in [lo, hi] (a non-integer value is an error) */
kd_status kd_larg_int(kd_lctx *c, const kd_loss_def *d, const char *key, int lo, int hi, int *out);
/* the table row of a loss the builders know (asserts it exists) */
const kd_loss_def *kd_loss_def_of(const char *name);
/* x as (N, D): flattened unless already 2-D */
kd_node *kd_lflat2(kd_graph *g, kd_node *x);
kd_status kd_lneed_labels(kd_lctx *c);
kd_status kd_lneed_teacher(kd_lctx *c);
/* the student and teacher taps named by the row's s= and t= arguments */
kd_status kd_ltaps(kd_lctx *c, const kd_loss_def *d, kd_node **fs, kd_node **ft);
kd_status kd_ltap(kd_lctx *c, const kd_loss_def *d, const kd_model *m, const char *side, kd_node *fallback,
                  kd_node **out);
/* maps fs to ft's shape with the row's proj= (auto|none|linear|conv1x1|mlp)
 * and bn= arguments; parameters are named "proj<index>..." */
kd_status kd_lproject(kd_lctx *c, const kd_loss_def *d, kd_node *fs, kd_node *ft, kd_node **out);
int kd_lsame_shape(const kd_node *a, const kd_node *b);
/* kd_lproject M times (M = the row's proj_ensemble=, an integer in [1, 16])
 * with independently initialised projectors, outputs averaged (Chen et al.
 * 2022). M = 1 is kd_lproject itself; for M > 1 the parameters of member m
 * are renamed "proj<index>e<m>..." (build_feat2.c). */
kd_status kd_lproject_ensemble(kd_lctx *c, const kd_loss_def *d, kd_node *fs, kd_node *ft, kd_node **out);

#endif
