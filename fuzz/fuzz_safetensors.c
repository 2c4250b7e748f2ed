/* fuzz_safetensors.c - libFuzzer harness for the safetensors reader.
 *
 * The input is a whole file. kd_st_read must either reject it with a status
 * or hand out tensors that are safe to read; then every tensor is converted
 * with kd_st_get_f32 (must succeed with its own shape, and fail with
 * KD_ESHAPE on a wrong one), and a file that was accepted is written back
 * with the writer and read again: names, dtypes, shapes, bytes and metadata
 * must survive the round trip.
 */
#include "fuzz.h"
#include "kd_io.h"

static fz_file in;
static char out_path[128];

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    fz_file_init(&in, "st");
    snprintf(out_path, sizeof out_path, "%s/rt.safetensors", fz_dir());
    return 0;
}

static void convert_all(const kd_safetensors *st) {
    for (int i = 0; i < st->n; i++) {
        const kd_st_tensor *t = &st->tensors[i];
        FZ_CHECK(kd_st_find(st, t->name) == t, "tensor '%s' not found by its own name", t->name);
        int shape[KD_ST_MAX_DIM], fits = 1;
        for (int d = 0; d < t->ndim; d++) {
            if (t->shape[d] > INT32_MAX) fits = 0;
            shape[d] = fits ? (int)t->shape[d] : 0;
        }
        if (!fits) continue; /* an int shape cannot name it (only possible with a zero dim) */
        size_t n = t->nbytes / kd_dtype_size(t->dtype);
        FZ_CHECK(n * kd_dtype_size(t->dtype) == t->nbytes, "tensor '%s': %zu bytes", t->name, t->nbytes);
        float *dst = malloc((n ? n : 1) * sizeof(float));
        if (!dst) abort();
        kd_status s = kd_st_get_f32(st, t->name, dst, t->ndim, shape);
        FZ_CHECK(s == KD_OK, "tensor '%s' does not convert with its own shape", t->name);
        if (t->ndim > 0) {
            shape[0] = shape[0] == 1 ? 2 : 1;
            FZ_CHECK(kd_st_get_f32(st, t->name, dst, t->ndim, shape) == KD_ESHAPE, "wrong shape accepted for '%s'",
                     t->name);
        }
        free(dst);
    }
    for (int i = 0; i < st->n_meta; i++)
        FZ_CHECK(kd_st_meta(st, st->meta_keys[i]) == st->meta_vals[i], "metadata key '%s'", st->meta_keys[i]);
}

static void round_trip(const kd_safetensors *st) {
    kd_st_writer *w = kd_st_writer_new();
    for (int i = 0; i < st->n; i++) {
        const kd_st_tensor *t = &st->tensors[i];
        kd_st_add(w, t->name, t->dtype, t->ndim, t->shape, t->data);
    }
    for (int i = 0; i < st->n_meta; i++) kd_st_set_meta(w, st->meta_keys[i], st->meta_vals[i]);
    kd_status s = kd_st_write(w, out_path);
    kd_st_writer_free(w);
    FZ_CHECK(s == KD_OK, "writing %s", out_path);
    kd_safetensors back;
    s = kd_st_read(out_path, &back);
    FZ_CHECK(s == KD_OK, "what the writer wrote does not read back");
    FZ_CHECK(back.n == st->n && back.n_meta == st->n_meta, "%d tensors / %d metadata became %d / %d", st->n, st->n_meta,
             back.n, back.n_meta);
    for (int i = 0; i < st->n; i++) {
        const kd_st_tensor *a = &st->tensors[i], *b = kd_st_find(&back, a->name);
        FZ_CHECK(b, "tensor '%s' lost", a->name);
        FZ_CHECK(a->dtype == b->dtype && a->ndim == b->ndim && a->nbytes == b->nbytes, "tensor '%s' changed", a->name);
        for (int d = 0; d < a->ndim; d++) FZ_CHECK(a->shape[d] == b->shape[d], "tensor '%s' dim %d", a->name, d);
        FZ_CHECK(a->nbytes == 0 || memcmp(a->data, b->data, a->nbytes) == 0, "tensor '%s' bytes", a->name);
    }
    for (int i = 0; i < st->n_meta; i++) {
        const char *v = kd_st_meta(&back, st->meta_keys[i]);
        FZ_CHECK(v && strcmp(v, st->meta_vals[i]) == 0, "metadata '%s' changed", st->meta_keys[i]);
    }
    kd_st_free(&back);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fz_file_set(&in, data, size);
    kd_safetensors st;
    kd_status s = kd_st_read(in.path, &st);
    if (s != KD_OK) {
        FZ_CHECK(s == KD_EFORMAT, "status %d for a malformed file", (int)s);
        FZ_CHECK(st.n == 0 && st.buf == NULL, "a failed read left data behind");
        return 0;
    }
    convert_all(&st);
    round_trip(&st);
    kd_st_free(&st);
    return 0;
}
