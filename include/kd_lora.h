/* kd_lora.h - LoRA adapters on a GPT's linear layers (Hu et al. 2021), and
 * the files that hold them. docs/losses/lora.md is the guide.
 *
 * A target linear y = x W^T + b (W (out,in)) becomes
 *     y = x W^T + b + (alpha/r) (x A^T) B^T,   A (r,in), B (out,r)
 * with A drawn U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's Linear default, the
 * kaiming_uniform(a=sqrt(5)) peft uses) and B zero, so an adapted model
 * starts equal to its base. When a model has adapters its base weights are
 * frozen: only A and B train.
 *
 *     kd_lora_cfg lc;
 *     kd_lora_cfg_parse("r=8 alpha=16 targets=attn,mlp", &lc);
 *     kd_lm_setup s = {..., .lora = lc};              // kd_lm.h: the student gets adapters
 *     ... kd_lm_new, load the base with kd_lm_load, train ...
 *     kd_lora_save(lm.g, &lm.m, &lc, vocab, "student.lora.safetensors");
 *     kd_lora_merge("student.safetensors", "student.lora.safetensors", "merged.safetensors");
 *
 * In the graph the adapter of the linear "s.h.0.attn.c_attn" is the pair of
 * parameters "lora.s.h.0.attn.c_attn.lora_A" / ".lora_B": outside the
 * model's prefix, so checkpoints of the base model (kd_lm_save/load) never
 * see them. An adapter file holds "h.0.attn.c_attn.lora_A" / "lora_B" per
 * target and metadata format = "distill-lora/1", model (the base's spec),
 * vocab, r, alpha, targets (docs/formats.md).
 */
#ifndef KD_LORA_H
#define KD_LORA_H
#include "kd.h"
#include "kd_nn.h"

/* the four linears of a GPT block */
enum {
    KD_LORA_C_ATTN = 1 << 0,    /* h.i.attn.c_attn (3C, C) */
    KD_LORA_ATTN_PROJ = 1 << 1, /* h.i.attn.c_proj (C, C) */
    KD_LORA_C_FC = 1 << 2,      /* h.i.mlp.c_fc (4C, C) */
    KD_LORA_MLP_PROJ = 1 << 3,  /* h.i.mlp.c_proj (C, 4C) */
    KD_LORA_ALL = 15,
};

typedef struct kd_lora_cfg {
    int r;       /* rank; 0: no adapters */
    float alpha; /* the update is scaled by alpha / r */
    int targets; /* KD_LORA_* bits */
} kd_lora_cfg;

#define KD_LORA_MAX_RANK 4096

/* Parses "r=8 alpha=16 targets=attn,mlp" (space-separated keys in any
 * order). r is required (1..4096); alpha defaults to r (scale 1); targets
 * is a comma list of c_attn, attn.c_proj, c_fc, mlp.c_proj, or the groups
 * attn (the first two), mlp (the last two), all; default all. An empty
 * spec gives r = 0 (off). Errors (KD_ECONFIG) quote the spec and name the
 * token. */
kd_status kd_lora_cfg_parse(const char *spec, kd_lora_cfg *cfg);
/* The canonical spec "r=8 alpha=16 targets=c_attn,attn.c_proj,..." in buf. */
const char *kd_lora_cfg_str(const kd_lora_cfg *cfg, char *buf, size_t n);
/* 1 when the linear named by its suffix ("attn.c_attn", "attn.c_proj",
 * "mlp.c_fc", "mlp.c_proj") is a target of cfg. */
int kd_lora_targets(const kd_lora_cfg *cfg, const char *linear);

/* y = x W^T + b plus the adapter of cfg when `linear` (its name without the
 * model prefix and layer, e.g. "attn.c_attn") is a target. The adapter's
 * parameters are trainable even while the graph builds frozen nodes (a
 * teacher with adapters, OKD). name: the layer's full name ("s.h.0.attn.c_attn"),
 * given to the output node. x (..., in), w (out,in), b (out) or NULL. */
kd_node *kd_lora_linear(kd_graph *g, const kd_lora_cfg *cfg, const char *name, kd_node *x, kd_node *w, kd_node *b);

/* kd_gpt_build (kd_nn.h) with adapters on the linears lora targets (NULL
 * or r = 0: none); with adapters, every base parameter of the model is
 * frozen (KD_F_FROZEN) and only the adapters train. */
struct kd_gpt_cfg;
kd_status kd_gpt_build_lora(kd_graph *g, const struct kd_gpt_cfg *cfg, const char *prefix, kd_node *ids,
                            const kd_lora_cfg *lora, kd_model *m);
/* kd_model_build with adapters: m's prefix and spec set as there; a spec
 * that is not "gpt: ..." is a KD_ECONFIG error when lora->r > 0. */
kd_status kd_lora_model_build(kd_graph *g, const char *spec, const char *prefix, kd_node *ids, int vocab,
                              const kd_lora_cfg *lora, kd_model *m);

/* Adapter parameters of model m in the graph (counted once each). */
int64_t kd_lora_params(const kd_graph *g, const kd_model *m);

/* Writes model m's adapters to path with metadata (model spec, vocab, r,
 * alpha, targets). */
kd_status kd_lora_save(const kd_graph *g, const kd_model *m, const kd_lora_cfg *cfg, int vocab, const char *path);
/* Loads adapters into model m's adapter parameters. The file's model spec,
 * vocab, r, alpha and targets must equal the graph's, and every tensor
 * must be present with its shape and no other: errors (KD_EFORMAT) name
 * the file and the key or tensor. */
kd_status kd_lora_load(kd_graph *g, const kd_model *m, const kd_lora_cfg *cfg, int vocab, const char *path);

/* Writes the base checkpoint with every adapted weight replaced by
 * W + (alpha/r) B A (all other tensors and the metadata copied as they are).
 * Errors name the file: an adapter for another model spec or vocabulary, a
 * missing or mis-shaped tensor, bad metadata. */
kd_status kd_lora_merge(const char *base_path, const char *adapter_path, const char *out_path);

#endif
