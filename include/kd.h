/* kd.h - the public API of distill, a knowledge-distillation toolkit in C11.
 *
 * Overview
 *   A model is a static computation graph of coarse ops (linear, conv2d,
 *   batch norm, cross-entropy, ...). You add nodes with the builder functions
 *   below, compile the graph once for a maximum batch size, then run
 *   forward/backward as many times as you like: the training step allocates
 *   nothing.
 *
 *     kd_graph *g = kd_graph_new();
 *     int xs[2] = {128, 784};
 *     kd_node *x = kd_input(g, "x", 2, xs);
 *     kd_node *y = kd_input(g, "y", 1, xs);           // labels as floats
 *     kd_node *h = kd_relu(g, kd_dense(g, "fc1", x, 128));
 *     kd_node *logits = kd_dense(g, "fc2", h, 10);
 *     kd_node *loss = kd_cross_entropy(g, logits, y, 0.0f);
 *     kd_graph_compile(g, 128, seed);                  // plan memory, init params
 *     ... fill x->val.data, y->val.data ...
 *     kd_graph_forward(g, 1);                          // 1 = training mode
 *     kd_graph_backward(g, loss);                      // grads of all params
 *     kd_graph_free(g);
 *
 * Errors come in two tiers: KD_ASSERT for bugs (prints file:line, aborts),
 * and kd_status return codes for anything a user can cause; the message is
 * read with kd_error_message().
 */
#ifndef KD_H
#define KD_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KD_VERSION "0.1.0"

/* ---------------------------------------------------------------- errors */

typedef enum kd_status {
    KD_OK = 0,
    KD_EIO,      /* a file could not be opened, read or written */
    KD_EFORMAT,  /* a file's content is malformed */
    KD_ECONFIG,  /* a config key or value is wrong */
    KD_ESHAPE,   /* tensor shapes do not fit together */
    KD_ENUMERIC, /* a NaN or Inf appeared */
    KD_EUSAGE,   /* bad command-line usage */
    KD_EINTR,    /* stopped by a signal after saving the training state (docs/resume.md) */
} kd_status;

/* Records a message (printf-style) and returns st. The message is kept in a
 * thread-local buffer until the next call. */
kd_status kd_errorf(kd_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prefixes the current message with more context, e.g. the file name. */
kd_status kd_error_prefix(kd_status st, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *kd_error_message(void);

void kd_panic(const char *file, int line, const char *fmt, ...) __attribute__((noreturn, format(printf, 3, 4)));
#define KD_ASSERT(cond, ...)                                                        \
    do {                                                                            \
        if (!(cond)) kd_panic(__FILE__, __LINE__, "assertion '" #cond "': " __VA_ARGS__); \
    } while (0)

/* Allocation that aborts with a message on failure. */
void *kd_malloc(size_t n);
void *kd_calloc(size_t n, size_t size);
void *kd_realloc(void *p, size_t n);
char *kd_strdup(const char *s);
/* Writes n bytes to path atomically: PATH.tmp.PID, fsync, rename, then an
 * fsync of the directory; on failure the temp file is removed and an
 * existing PATH is left untouched. Errors name the path. */
kd_status kd_write_atomic(const char *path, const void *data, size_t n);

/* ---------------------------------------------------------------- rng */

/* A small counter-free generator (xoshiro128+-like quality is not needed;
 * we use splitmix64 to seed and xorshift64* to draw). Same seed, same stream. */
typedef struct kd_rng {
    uint64_t s;
} kd_rng;
void kd_rng_seed(kd_rng *r, uint64_t seed);
uint64_t kd_rng_u64(kd_rng *r);
float kd_rng_uniform(kd_rng *r);          /* [0, 1) */
float kd_rng_normal(kd_rng *r);           /* N(0, 1) */
uint32_t kd_rng_below(kd_rng *r, uint32_t n); /* [0, n) */
uint64_t kd_hash64(uint64_t x);            /* splitmix64 finaliser, for derived seeds */

/* ---------------------------------------------------------------- tensor */

#define KD_MAX_DIM 4

/* A contiguous row-major float32 array (NCHW for images). Reshape is free. */
typedef struct kd_tensor {
    int ndim;
    int shape[KD_MAX_DIM];
    float *data;
} kd_tensor;

int64_t kd_shape_numel(int ndim, const int *shape);
static inline int64_t kd_numel(const kd_tensor *t) { return kd_shape_numel(t->ndim, t->shape); }
/* Writes "(2, 3, 4)" into buf. */
const char *kd_shape_str(int ndim, const int *shape, char *buf, size_t n);

/* ---------------------------------------------------------------- graph */

typedef struct kd_graph kd_graph;
typedef struct kd_node kd_node;

enum {
    KD_F_PARAM = 1 << 0,     /* trainable leaf: value and gradient in the flat parameter arrays */
    KD_F_BUFFER = 1 << 1,    /* non-trainable state saved in checkpoints (BN running stats) */
    KD_F_INPUT = 1 << 2,     /* leaf filled by the caller each step; first dim is the batch */
    KD_F_NEED_GRAD = 1 << 3, /* set by compile: some parameter's gradient flows through here */
    KD_F_FROZEN = 1 << 4,    /* eval-mode behaviour always (a teacher), no gradients */
    KD_F_I64 = 1 << 5,       /* buffer stored as int64 in checkpoints (num_batches_tracked) */
    KD_F_KEEP = 1 << 6,      /* value must survive the whole step (read by the caller) */
    KD_F_GRAD_FRESH = 1 << 7, /* gradient buffer not yet written this backward: assign, don't add */
};

typedef enum kd_init {
    KD_INIT_ZERO,
    KD_INIT_ONE,
    KD_INIT_UNIFORM_FANIN, /* U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's Linear/Conv default */
    KD_INIT_NORMAL,        /* N(0, scale^2) */
} kd_init;

#define KD_MAX_IN 6

/* A node of the graph. Ops read and write these fields; everyone else
 * should treat them as read-only (except the values of input nodes). */
struct kd_node {
    int op;  /* index into the op table */
    int id;  /* position in the topological order */
    int n_in;
    kd_node *in[KD_MAX_IN];
    kd_tensor val;  /* value; shape re-inferred when the batch changes */
    kd_tensor grad; /* gradient of the loss; data NULL when not needed */
    int flags;
    int ip[8];   /* integer op arguments */
    float fp[8]; /* float op arguments */
    void *ws;    /* op-owned workspace, sized at compile for the max batch */
    size_t ws_bytes;
    kd_init init;
    float init_scale;
    int fan_in;
    int n_consumers;
    int batch_dim; /* 1 when the first dim follows the batch size */
    char name[96];
};

kd_graph *kd_graph_new(void);
void kd_graph_free(kd_graph *g);

/* Leaves. shape[0] of an input is the maximum batch size. */
kd_node *kd_input(kd_graph *g, const char *name, int ndim, const int *shape);
kd_node *kd_param(kd_graph *g, const char *name, int ndim, const int *shape, kd_init init, int fan_in);
kd_node *kd_buffer(kd_graph *g, const char *name, int ndim, const int *shape, float fill);

/* Ops. Builders assert on bugs; shape mismatches a user can cause are
 * reported by kd_graph_compile with the node names. */
kd_node *kd_matmul(kd_graph *g, kd_node *x, kd_node *w, kd_node *b); /* x (B,IN) w (OUT,IN) b (OUT) or NULL -> (B,OUT) */
kd_node *kd_conv2d(kd_graph *g, kd_node *x, kd_node *w, kd_node *b, int stride, int pad); /* x (B,C,H,W) w (OC,C,KH,KW) */
kd_node *kd_maxpool2d(kd_graph *g, kd_node *x, int k, int stride);
kd_node *kd_avgpool2d(kd_graph *g, kd_node *x, int k, int stride);
kd_node *kd_global_avgpool(kd_graph *g, kd_node *x); /* (B,C,H,W) -> (B,C) */
kd_node *kd_batchnorm(kd_graph *g, kd_node *x, kd_node *gamma, kd_node *beta, kd_node *rmean, kd_node *rvar,
                      kd_node *nbt, float momentum, float eps); /* x (B,C) or (B,C,H,W) */
kd_node *kd_relu(kd_graph *g, kd_node *x);
kd_node *kd_gelu(kd_graph *g, kd_node *x); /* exact erf form, as torch.nn.GELU() */
kd_node *kd_dropout(kd_graph *g, kd_node *x, float p);
kd_node *kd_add(kd_graph *g, kd_node *a, kd_node *b); /* same shapes */
kd_node *kd_concat(kd_graph *g, kd_node *a, kd_node *b); /* along dim 1 */
kd_node *kd_reshape(kd_graph *g, kd_node *x, int ndim, const int *shape); /* shape[0] ignored: batch kept */
kd_node *kd_flatten(kd_graph *g, kd_node *x);                              /* (B, ...) -> (B, rest) */
kd_node *kd_softmax(kd_graph *g, kd_node *x);                              /* over the last dim */
kd_node *kd_log_softmax(kd_graph *g, kd_node *x);
/* Mean over the batch of the cross-entropy of logits (B,K) with integer labels
 * stored as floats (B); label smoothing as in torch.nn.CrossEntropyLoss. */
kd_node *kd_cross_entropy(kd_graph *g, kd_node *logits, kd_node *labels, float smoothing);
kd_node *kd_mean(kd_graph *g, kd_node *x); /* mean of all elements -> scalar (1) */
kd_node *kd_sum(kd_graph *g, kd_node *x);  /* sum of all elements -> scalar (1) */
kd_node *kd_scale(kd_graph *g, kd_node *x, float s); /* s * x */

/* Language-model ops (src/ops/lm.c). Token ids are floats holding integers. */
/* ids (B,T), table (V,C) -> (B,T,C): row ids[b,t] of the table. An id that is
 * not an integer in [0,V) is a bug (the data layer checks ids) and aborts
 * naming the node and the id. ids get no gradient; the table's gradient is
 * accumulated, so the table may also feed a tied LM head (kd_matmul). */
kd_node *kd_embedding(kd_graph *g, kd_node *ids, kd_node *table);
/* x (B,T,C) + table[t] for t < T, table (ctx,C): learned positions. T > ctx
 * is a shape error reported by kd_graph_compile. */
kd_node *kd_pos_add(kd_graph *g, kd_node *x, kd_node *table);
/* Layer norm over the last dim, as torch.nn.LayerNorm(C, eps): gamma, beta (C). */
kd_node *kd_layernorm(kd_graph *g, kd_node *x, kd_node *gamma, kd_node *beta, float eps);
/* qkv (B,T,3C) laid out [q | k | v] -> (B,T,C): per head (d = C/heads
 * columns of each part) softmax(q k^T / sqrt(d)) v with a causal mask (row t
 * attends to positions <= t), heads concatenated. 3C must divide by
 * 3*heads (else a shape error at compile). Keeps only a (B,heads,T)
 * log-sum-exp between forward and backward; no (T,T) tensor is stored. */
kd_node *kd_causal_attention(kd_graph *g, kd_node *qkv, int heads);

/* Composite builders: parameters named "<prefix>.weight", "<prefix>.bias", ... */
kd_node *kd_dense(kd_graph *g, const char *prefix, kd_node *x, int out);
kd_node *kd_conv(kd_graph *g, const char *prefix, kd_node *x, int out, int k, int stride, int pad, int bias);
kd_node *kd_bn(kd_graph *g, const char *prefix, kd_node *x);
kd_node *kd_bn_relu(kd_graph *g, const char *prefix, kd_node *x); /* batch norm with a fused ReLU */
/* layer norm over the last dim, weight init ones, bias zeros, eps 1e-5; the node is named prefix */
kd_node *kd_ln(kd_graph *g, const char *prefix, kd_node *x);

/* Gives a node a name by which losses and callers find it ("logits", "block2"). */
void kd_node_set_name(kd_node *n, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Marks every node added from now on as frozen (teacher) or not. */
void kd_graph_set_frozen(kd_graph *g, int frozen);

/* Orders nothing (builders append in topological order), decides which nodes
 * need gradients, infers shapes, plans and allocates all memory for batches up
 * to max_batch, and initialises parameters from seed. */
kd_status kd_graph_compile(kd_graph *g, int max_batch, uint64_t seed);
/* Re-infers shapes for a batch of B <= max_batch rows. */
void kd_graph_set_batch(kd_graph *g, int B);
int kd_graph_batch(const kd_graph *g);
int kd_graph_max_batch(const kd_graph *g);
void kd_graph_set_threads(kd_graph *g, int n);
/* Runs all nodes (training: batch statistics for BN, dropout on). */
void kd_graph_forward(kd_graph *g, int training);
/* Forward only up to and including node `upto` (NULL: all). */
void kd_graph_forward_to(kd_graph *g, int training, kd_node *upto);
/* Forward up to `upto` checking every value as it is produced; returns the
 * first node (leaves included) holding a NaN or Inf, or NULL. For error
 * reports: activations share memory, so they cannot be checked afterwards. */
kd_node *kd_graph_forward_check(kd_graph *g, int training, kd_node *upto);
/* Seeds d(loss)=1 and sweeps backward; parameter gradients (flat array) are
 * zeroed first. Memory is shared by liveness: after backward, only the values
 * of parameters, inputs, nodes flagged KD_F_KEEP and nodes nothing consumes
 * are still valid; read any other value between forward and backward. */
void kd_graph_backward(kd_graph *g, kd_node *loss);
void kd_graph_set_step(kd_graph *g, uint64_t step); /* feeds dropout's RNG */

/* Per-node timing of forward/backward (off by default). */
void kd_graph_set_profile(kd_graph *g, int on);
void kd_graph_profile_print(const kd_graph *g, FILE *f);

kd_node *kd_graph_find(const kd_graph *g, const char *name);
int kd_graph_n_nodes(const kd_graph *g);
kd_node *kd_graph_node(const kd_graph *g, int i);
/* Flat parameter storage: value, gradient, and count, valid after compile. */
float *kd_graph_param_data(kd_graph *g);
float *kd_graph_param_grad(kd_graph *g);
size_t kd_graph_param_count(const kd_graph *g);
/* Parameters and buffers in creation order (checkpoint order). */
int kd_graph_n_state(const kd_graph *g);
kd_node *kd_graph_state(const kd_graph *g, int i);
/* Bytes of planned activation/gradient memory (for reports). */
size_t kd_graph_arena_bytes(const kd_graph *g);

/* ---------------------------------------------------------------- op table */

typedef struct kd_ctx {
    int training;
    int threads;
    uint64_t seed;
    uint64_t step;
} kd_ctx;

typedef struct kd_op_def {
    const char *name;
    kd_status (*infer)(kd_node *n);                     /* set n->val.ndim/shape from inputs */
    size_t (*workspace)(const kd_node *n, int threads); /* bytes of workspace at current (max) shapes */
    void (*forward)(kd_node *n, const kd_ctx *ctx);
    void (*backward)(kd_node *n, const kd_ctx *ctx); /* accumulate (+=) into inputs' grads */
    /* 1: backward honours KD_F_GRAD_FRESH on its inputs (kd_grad_take_fresh):
     * it assigns where the flag is set, saving the zeroing pass */
    int grad_overwrite;
    /* 1: the workspace is scratch used within one forward or one backward
     * call (nothing kept in between): all such nodes share one buffer */
    int ws_scratch;
} kd_op_def;

enum {
    KD_OP_LEAF,
    KD_OP_MATMUL,
    KD_OP_CONV2D,
    KD_OP_MAXPOOL,
    KD_OP_AVGPOOL,
    KD_OP_GAP,
    KD_OP_BATCHNORM,
    KD_OP_RELU,
    KD_OP_GELU,
    KD_OP_DROPOUT,
    KD_OP_ADD,
    KD_OP_CONCAT,
    KD_OP_RESHAPE,
    KD_OP_SOFTMAX,
    KD_OP_LOG_SOFTMAX,
    KD_OP_CROSS_ENTROPY,
    KD_OP_MEAN,
    KD_OP_SUM,
    KD_OP_SCALE,
    /* distillation losses (src/distill/), builders in kd_distill.h */
    KD_OP_DIVERGENCE,
    KD_OP_DKD,
    KD_OP_DIST,
    KD_OP_NKD,
    KD_OP_STANDARDIZE,
    KD_OP_MSE,
    KD_OP_AT,
    KD_OP_SP,
    KD_OP_RKD,
    KD_OP_PKT,
    /* logit2 (src/distill/logit2.c) */
    KD_OP_MLKD,
    KD_OP_FKL_TNODE,
    KD_OP_GRAD_REVERSE,
    KD_OP_SIGMOID_RANGE,
    /* feature2 (src/distill/feature2.c) */
    KD_OP_VID_NLL,
    KD_OP_L2NORM,
    KD_OP_CRD_INFONCE,
    KD_OP_CRD_NCE,
    KD_OP_BN_NOAFFINE,
    KD_OP_LOGSUM,
    /* rank alignment (src/distill/rank.c) */
    KD_OP_RANK_ALIGN,
    /* cached top-k teacher (src/distill/topk.c) */
    KD_OP_TOPK_DIVERGENCE,
    KD_OP_TOPK_DENSE,
    /* language models (src/ops/lm.c) */
    KD_OP_EMBEDDING,
    KD_OP_POS_ADD,
    KD_OP_LAYERNORM,
    KD_OP_CAUSAL_ATTENTION,
    /* feature3 (src/distill/feature3.c) */
    KD_OP_HAAR2D,
    KD_OP_BAND_MSE,
    KD_OP_ATTN_MASK,
    KD_OP_MASKED_MSE,
    KD_OP_GAUSS_KL,
    /* geometry and DCD (src/distill/geometry.c, dcd.c) */
    KD_OP_PROCRUSTES,
    KD_OP_GRAM_DIST,
    KD_OP_CKA,
    KD_OP_DCD,
    /* LELP (src/distill/lelp.c) */
    KD_OP_GROUP_LSE,
    /* teacher annealing (src/distill/anneal.c) */
    KD_OP_ANNEAL_CE,
    /* LLMR policy gradient (src/distill/pg.c) */
    KD_OP_PG_NLL,
    KD_OP_PG_ADVANTAGE,
    /* text classification with rationales (src/ops/textcls.c, kd_textcls.h) */
    KD_OP_MASKED_MEAN,
    KD_OP_TOKEN_BCE,
    KD_OP_COUNT
};

extern const kd_op_def *const kd_ops[KD_OP_COUNT];

/* For ops with grad_overwrite: returns 1 (and clears the flag) when the
 * input's gradient must be assigned rather than accumulated. */
static inline int kd_grad_take_fresh(kd_node *u) {
    int f = (u->flags & KD_F_GRAD_FRESH) != 0;
    u->flags &= ~KD_F_GRAD_FRESH;
    return f;
}
kd_node *kd_graph_add_op(kd_graph *g, int op, int n_in, kd_node **in);
/* As kd_graph_add_op, with the op's integer/float arguments (8 each, or
 * NULL) set before its shape is inferred. */
kd_node *kd_graph_add_op_ex(kd_graph *g, int op, int n_in, kd_node **in, const int *ip, const float *fp);

#ifdef __cplusplus
}
#endif
#endif
