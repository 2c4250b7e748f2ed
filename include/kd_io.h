/* kd_io.h - safetensors checkpoints.
 *
 * Format (https://github.com/huggingface/safetensors): 8-byte little-endian
 * header length N, N bytes of JSON {"name": {"dtype", "shape", "data_offsets":
 * [begin, end]}, "__metadata__": {str: str}}, then the raw little-endian data.
 * The reader treats the header as hostile; see docs/formats.md.
 */
#ifndef KD_IO_H
#define KD_IO_H
#include "kd.h"

typedef enum kd_dtype { KD_F32, KD_F16, KD_BF16, KD_F64, KD_I64, KD_I32, KD_I16, KD_I8, KD_U8, KD_BOOL } kd_dtype;
const char *kd_dtype_name(kd_dtype dt);
size_t kd_dtype_size(kd_dtype dt);

#define KD_ST_MAX_DIM 8
typedef struct kd_st_tensor {
    char *name;
    kd_dtype dtype;
    int ndim;
    int64_t shape[KD_ST_MAX_DIM];
    const uint8_t *data; /* points into the file's payload */
    size_t nbytes;
} kd_st_tensor;

typedef struct kd_safetensors {
    char *path;
    int n;
    kd_st_tensor *tensors;
    int n_meta;
    char **meta_keys, **meta_vals;
    uint8_t *buf; /* whole file */
    size_t buf_len;
} kd_safetensors;

/* Reads and validates the whole file: header length bounded (100 MB) and
 * within the file, JSON well-formed, every entry has a known dtype, a shape
 * of non-negative dims, offsets in order within the payload whose length
 * equals numel * dtype size, no overlaps. Errors name the file and tensor. */
kd_status kd_st_read(const char *path, kd_safetensors *out);
void kd_st_free(kd_safetensors *st);
const kd_st_tensor *kd_st_find(const kd_safetensors *st, const char *name);
const char *kd_st_meta(const kd_safetensors *st, const char *key);
/* Copies tensor `name` into dst as float32, converting F16/BF16/F64/integer
 * types; the shape must equal (ndim, shape) exactly. Errors name the file,
 * the tensor, the expected and the found shape or dtype. */
kd_status kd_st_get_f32(const kd_safetensors *st, const char *name, float *dst, int ndim, const int *shape);

typedef struct kd_st_writer kd_st_writer;
kd_st_writer *kd_st_writer_new(void);
void kd_st_writer_free(kd_st_writer *w);
/* Adds a tensor; data is copied. Names must be unique (assert). */
void kd_st_add(kd_st_writer *w, const char *name, kd_dtype dt, int ndim, const int64_t *shape, const void *data);
/* float32 data written as F32, shape given as ints */
void kd_st_add_f32(kd_st_writer *w, const char *name, int ndim, const int *shape, const float *data);
void kd_st_set_meta(kd_st_writer *w, const char *key, const char *value);
/* Writes atomically: PATH.tmp.PID, fsync, rename; on any failure the temp
 * file is removed and an existing PATH is left untouched. */
kd_status kd_st_write(const kd_st_writer *w, const char *path);

/* fp16/bf16 conversions (round to nearest even) */
float kd_f16_to_f32(uint16_t h);
uint16_t kd_f32_to_f16(float f);
float kd_bf16_to_f32(uint16_t h);
uint16_t kd_f32_to_bf16(float f);

#endif
