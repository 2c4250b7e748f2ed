/* kd_gpt.h - incremental (KV-cache) inference for distill's GPT models, a
 * token sampler, and checkpoint loading for `distill generate`.
 *
 * The model is the fixed pre-LayerNorm GPT-2 block of docs/generate.md
 * (tensor names "wte.weight", "h.0.attn.c_attn.weight", ...; the LM head is
 * tied to wte). This path does not use the training graph: a runner reads
 * the weights through a lookup callback once, at creation, and keeps the
 * pointers it was given, never a copy. So a runner can serve a checkpoint
 * (kd_gpt_load: the runner owns the weights) or borrow the live parameter
 * arrays of a training graph (on-policy distillation: the runner sees every
 * optimiser update, and the arrays must outlive it).
 *
 *     kd_gpt_cfg cfg;
 *     kd_gpt_runner *r;
 *     if (kd_gpt_load("lm.safetensors", &cfg, &r, NULL) != KD_OK) ... kd_error_message() ...
 *     kd_gpt_runner_reserve(r, 4);                      // up to 4 sequences at once
 *     kd_sample_opts o = {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f};
 *     kd_rng rng;
 *     kd_rng_seed(&rng, 1);
 *     kd_gpt_generate(r, 4, prompt, P, 100, &o, &rng, out); // prompt (4,P) -> out (4,100)
 *     kd_gpt_runner_free(r);
 *
 * A step allocates nothing: the KV caches (layers, max_batch, ctx, C) for K
 * and V, the activations and the sampler's scratch are allocated when the
 * runner is created (or reserved). Matrix products go through cblas. A
 * runner serves one caller at a time (its caches and buffers are shared).
 */
#ifndef KD_GPT_H
#define KD_GPT_H
#include "kd.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- config */

typedef struct kd_gpt_cfg {
    int layers, dim, heads, ctx, vocab;
} kd_gpt_cfg;

/* Limits accepted by kd_gpt_cfg_parse (sane maxima, not hardware limits). */
#define KD_GPT_MAX_LAYERS 256
#define KD_GPT_MAX_DIM 16384
#define KD_GPT_MAX_CTX 65536
#define KD_GPT_MAX_VOCAB (1 << 22)

/* Parses "gpt: layers=6 dim=256 heads=8 ctx=128 [vocab=N]" (keys in any
 * order, separated by spaces or commas). vocab is the data's vocabulary,
 * used unless the spec has vocab=N. Errors (KD_ECONFIG) quote the spec and
 * name the offending token: unknown or repeated key, a value that is not a
 * positive integer or is over its maximum, a missing key, dim % heads != 0,
 * no vocabulary at all. */
kd_status kd_gpt_cfg_parse(const char *spec, int vocab, kd_gpt_cfg *cfg);
/* Writes the canonical spec "gpt: layers=L dim=C heads=NH ctx=T" into buf. */
const char *kd_gpt_cfg_str(const kd_gpt_cfg *cfg, char *buf, size_t n);
/* Number of parameters (the tied head counted once). */
int64_t kd_gpt_n_params(const kd_gpt_cfg *cfg);
/* The model's tensors in canonical order (wte, wpe, h.0.ln_1.weight, ...,
 * ln_f.bias): kd_gpt_n_tensors of them; kd_gpt_tensor_info writes the i-th
 * one's name (buf of n bytes, 64 is plenty) and shape (ndim 1 or 2). */
int kd_gpt_n_tensors(const kd_gpt_cfg *cfg);
void kd_gpt_tensor_info(const kd_gpt_cfg *cfg, int i, char *name, size_t n, int *ndim, int shape[2]);

/* ---------------------------------------------------------------- runner */

/* Returns the tensor's data (float32, row-major, the shape given) or NULL
 * when it is missing or of another shape. The pointer must stay valid, and
 * its contents are read at every step, for the runner's whole life. */
typedef const float *(*kd_gpt_lookup)(void *ctx, const char *name, int ndim, const int *shape);

typedef struct kd_gpt_runner kd_gpt_runner;

/* Looks up every tensor (keeping the pointers) and allocates the caches and
 * buffers for up to max_batch sequences. Errors (KD_EFORMAT) name the first
 * missing or mis-shaped tensor and the shape expected. */
kd_status kd_gpt_runner_new(kd_gpt_runner **out, const kd_gpt_cfg *cfg, kd_gpt_lookup lookup, void *lctx,
                            int max_batch);
void kd_gpt_runner_free(kd_gpt_runner *r);
/* Re-sizes the caches and buffers for max_batch sequences when that is more
 * than the runner holds (an allocation: not for a training step's inner
 * loop); resets the runner. */
void kd_gpt_runner_reserve(kd_gpt_runner *r, int max_batch);
const kd_gpt_cfg *kd_gpt_runner_cfg(const kd_gpt_runner *r);
int kd_gpt_runner_max_batch(const kd_gpt_runner *r);
/* Empties the KV caches: the next token goes to position 0. */
void kd_gpt_runner_reset(kd_gpt_runner *r);
/* Number of tokens in the caches (the position of the next token). */
int kd_gpt_runner_pos(const kd_gpt_runner *r);
/* Feeds one token per sequence (tokens (B), B <= max_batch, each in
 * [0, vocab); all sequences at the same position < ctx) and writes the
 * next-token logits (B,vocab). Sequences are independent: sequence b of one
 * call continues sequence b of the previous calls since the last reset. */
void kd_gpt_runner_step(kd_gpt_runner *r, int B, const int *tokens, float *logits);
/* Feeds T tokens per sequence at once (tokens (B,T), pos + T <= ctx), the
 * same as T steps but with row-batched matrix products; writes the logits
 * after the last one (B,vocab), or nothing when logits is NULL. */
void kd_gpt_runner_prefill(kd_gpt_runner *r, int B, int T, const int *tokens, float *logits);

/* The plain-loop reference: the full causal forward pass of one sequence
 * ids (T), T <= ctx, giving every position's logits (T,vocab). Slow, and it
 * allocates; kept beside the runner so tests can compare the two. Returns
 * KD_EFORMAT, naming the tensor, when a lookup fails. */
kd_status kd_gpt_forward_naive(const kd_gpt_cfg *cfg, kd_gpt_lookup lookup, void *lctx, int T, const int *ids,
                               float *logits);

/* ---------------------------------------------------------------- sampling */

/* Applied in this order: temperature (<= 0 means greedy: the argmax, the
 * lowest index on ties), top_k (keep the k largest logits; <= 0 or >= V
 * off), top_p (of what is left, renormalised, keep the smallest set of the
 * most probable tokens whose mass is >= top_p; >= 1 off). */
typedef struct kd_sample_opts {
    float temperature;
    int top_k;
    float top_p;
} kd_sample_opts;

/* Draws one token from logits (V). scratch: kd_sample_scratch_bytes(V)
 * bytes (V (float, int) pairs, i.e. 2*V four-byte words), aligned for float;
 * unused (may be NULL) when greedy. Ties between equal logits are broken by
 * the lower index. Allocates nothing; one draw from rng, none when greedy or
 * top_k == 1 (both the argmax). */
int kd_sample_token(const float *logits, int V, const kd_sample_opts *o, kd_rng *rng, void *scratch);
size_t kd_sample_scratch_bytes(int V);
/* KD_ECONFIG with a message when temperature is not finite or top_p is NaN
 * or <= 0 (top_p >= 1 turns it off; any top_k is valid, <= 0 is off). */
kd_status kd_sample_opts_check(const kd_sample_opts *o);

/* ---------------------------------------------------------------- generation */

/* Generates n_new tokens after a prompt for B sequences: prompt (B,P), the
 * same P >= 1 for all; out (B,n_new). Resets the runner first. A prompt
 * longer than ctx is cut to its last ctx tokens. When the context is full
 * and another token must be fed, the runner is reset and re-primed with the
 * last max(1, ctx/2) tokens (the newest included), so generation goes on
 * past ctx with a sliding window that halves when it fills. One rng draw per
 * sequence per token, sequences in order. Allocates nothing. Errors
 * (KD_EUSAGE): B out of [1, max_batch], P < 1, n_new < 0, a prompt token
 * outside [0, vocab), bad sampling options. */
kd_status kd_gpt_generate(kd_gpt_runner *r, int B, const int *prompt, int P, int n_new, const kd_sample_opts *o,
                          kd_rng *rng, int *out);

/* ---------------------------------------------------------------- checkpoints */

/* Loads a safetensors checkpoint (metadata "model" = the spec, "vocab" = V;
 * every tensor of the model, F32/F16/BF16/F64 converted to float32, and no
 * other) into a runner that owns the weights, for max_batch 1 (see
 * kd_gpt_runner_reserve). *tokenizer_json, when that pointer is non-NULL,
 * gets a malloc'd copy of the metadata "tokenizer" or NULL when there is
 * none (a byte-level model). Errors name the file and the tensor or
 * metadata key: KD_EIO/KD_EFORMAT for the file, missing, mis-shaped or
 * unexpected tensors, KD_ECONFIG for a bad spec. */
kd_status kd_gpt_load(const char *path, kd_gpt_cfg *cfg, kd_gpt_runner **out, char **tokenizer_json);

#ifdef __cplusplus
}
#endif
#endif
