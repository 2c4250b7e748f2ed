/* kd_text.h - text datasets and a byte-pair-encoding tokenizer for language
 * models.
 *
 * Overview
 *   A text dataset is a file or a directory of UTF-8 text cut into documents
 *   (fortune entries separated by "%" lines, or blank-line separated
 *   paragraphs). Each document goes to the training or the validation split
 *   by a hash of its bytes, so the split does not depend on file names or
 *   order. Each split is one token stream: its documents joined by '\n',
 *   encoded by a tokenizer (bytes when none is given).
 *
 *     kd_tokenizer tok;
 *     uint8_t *text; size_t n;
 *     kd_text_read_split("text:corpus/", 0.05f, 0, &text, &n, NULL); // training text
 *     kd_tokenizer_train(&tok, text, n, 1024);
 *     kd_tokenizer_save(&tok, "tok.json");
 *     kd_text_data d;
 *     kd_text_load(&d, "text:corpus/", &tok, 0.05f);
 *     kd_text_check(&d, 0, T);  kd_text_check(&d, 1, T);      // before batching
 *     kd_text_batch(&d, 0, &rng, B, T, x, y);                   // x, y (B,T)
 *     kd_text_free(&d); kd_tokenizer_free(&tok); free(text);
 *
 * The tokenizer is byte-level BPE: every byte is a token (ids 0..255) and
 * merge i joins two earlier tokens into token 256+i. Text is first cut into
 * chunks (the pre-split, below) and merges never cross a chunk boundary, so
 * decode(encode(x)) == x for any bytes, valid UTF-8 or not.
 *
 * Pre-split (version 1): bytes fall into five classes: space (0x20), other
 * whitespace (\t \n \v \f \r), letters (A-Z a-z and every byte >= 0x80, so
 * multi-byte UTF-8 stays together), digits, and the rest (punctuation and
 * control bytes). A chunk is a run of one class, where a run of letters,
 * digits or punctuation takes the one space just before it; the other spaces
 * of a run of spaces form a chunk of their own. A chunk is at most
 * KD_TEXT_MAX_CHUNK bytes (longer runs are cut). So " world" can be one
 * token, "hello " never is. See docs/text.md.
 */
#ifndef KD_TEXT_H
#define KD_TEXT_H
#include "kd.h"

#define KD_TEXT_MAX_VOCAB 65536
/* The longest pre-split chunk, hence the longest token, in bytes. */
#define KD_TEXT_MAX_CHUNK 64
/* Default corpus of the spec "text" (the Debian package fortunes). */
#define KD_TEXT_DEFAULT_DIR "/usr/share/games/fortunes"

typedef struct kd_tokenizer {
    int vocab; /* 256 + n_merges */
    int n_merges;
    int32_t (*merges)[2]; /* (n_merges, 2): merge i joins merges[i][0], merges[i][1] into token 256+i */
    uint32_t *tok_off;    /* (vocab+1): token t is tok_bytes[tok_off[t] .. tok_off[t+1]) */
    uint8_t *tok_bytes;
    /* (a, b) -> merge index, open addressing; empty slots hold key UINT32_MAX */
    uint32_t *map_key; /* (map_mask+1) keys a << 16 | b */
    int32_t *map_val;  /* (map_mask+1) */
    uint32_t map_mask;
} kd_tokenizer;

/* The identity byte-level tokenizer: vocab 256, no merges. Free with
 * kd_tokenizer_free. */
void kd_tokenizer_bytes(kd_tokenizer *tok);
/* Learns vocab-256 merges from text (256 < vocab <= 65536; else KD_ECONFIG).
 * Each step merges the most frequent adjacent pair within pre-split chunks;
 * ties go to the smallest (left id, right id). Stops early (tok->vocab <
 * vocab) when no pair occurs at least twice. tok is overwritten. */
kd_status kd_tokenizer_train(kd_tokenizer *tok, const uint8_t *text, size_t n, int vocab);
/* JSON (docs/formats.md, "Tokenizer"), written atomically (temp, fsync, rename). */
kd_status kd_tokenizer_save(const kd_tokenizer *tok, const char *path);
/* Reads what save writes. The file is hostile: every field is checked
 * (types, version, vocab == 256 + merges, merges referencing earlier tokens
 * only, no repeated merge, tokens at most KD_TEXT_MAX_CHUNK bytes); errors
 * (KD_EIO, KD_EFORMAT) name the file and what is wrong. On error tok is
 * zeroed (nothing to free). */
kd_status kd_tokenizer_load(kd_tokenizer *tok, const char *path);
/* The JSON save writes (also embedded in checkpoints' "tokenizer" metadata);
 * malloc'd, the caller frees. */
char *kd_tokenizer_to_json(const kd_tokenizer *tok);
/* Parses JSON as kd_tokenizer_load does; origin names the source in errors
 * ("tok.json", "ckpt.safetensors: metadata 'tokenizer'"). */
kd_status kd_tokenizer_from_json(kd_tokenizer *tok, const char *json, const char *origin);
/* Encodes n bytes into out, which has room for n ids; returns the count. */
size_t kd_tokenizer_encode(const kd_tokenizer *tok, const uint8_t *text, size_t n, uint16_t *out);
/* Writes the bytes of n ids into out (at most cap bytes); returns the bytes
 * needed, which may exceed cap (the output is then truncated). Ids >= vocab
 * (a model whose vocab exceeds its tokenizer's) decode to nothing. */
size_t kd_tokenizer_decode(const kd_tokenizer *tok, const uint16_t *ids, size_t n, uint8_t *out, size_t cap);
/* The pre-split: the end of the chunk that starts at i < n (i < end <= n). */
size_t kd_tokenizer_chunk_end(const uint8_t *text, size_t n, size_t i);
/* Bytes of one token (NULL and *len 0 for ids out of range). */
const uint8_t *kd_tokenizer_token(const kd_tokenizer *tok, int id, size_t *len);
void kd_tokenizer_free(kd_tokenizer *tok);

typedef struct kd_text_data {
    uint16_t *train, *val; /* (n_train), (n_val) token ids */
    size_t n_train, n_val;
    int vocab;   /* the tokenizer's */
    int n_files; /* text files read */
    int n_docs_train, n_docs_val;
    size_t n_bytes;   /* bytes of the files read (each real file once) */
    int n_skipped;    /* files skipped: NUL bytes, invalid UTF-8, not a regular file */
    int n_duplicates; /* paths skipped as another name of a file already read (symlinks, hard links) */
    char name[256];   /* "text:PATH" */
    char info[256];   /* one line for a log: files, bytes, skipped, documents, tokens */
} kd_text_data;

/* spec "text:PATH" (a file, or a directory read recursively in sorted name
 * order, following symlinks) or "text" alone = text:KD_TEXT_DEFAULT_DIR
 * (the environment variable KD_TEXT_DIR overrides it). tok NULL = bytes.
 * val_frac in [0, 0.5]. Errors name the path: missing path (KD_EIO), bad
 * spec or val_frac (KD_ECONFIG), no text at all or no training document
 * (KD_EFORMAT). The splits may be shorter than a model's context: check
 * with kd_text_check before kd_text_batch / kd_text_window. */
kd_status kd_text_load(kd_text_data *d, const char *spec, const kd_tokenizer *tok, float val_frac);
/* KD_OK when split (0 train, 1 val) holds at least T+1 tokens (one window);
 * else KD_EFORMAT with a message naming the data and the counts. */
kd_status kd_text_check(const kd_text_data *d, int split, int T);
/* The raw text of all documents (training and validation, file order)
 * joined by '\n' (for tokenizer training); *bytes malloc'd, caller frees. */
kd_status kd_text_read_bytes(const char *spec, uint8_t **bytes, size_t *n);
/* The raw text of one split (0 train, 1 val) as kd_text_load would encode
 * it; *bytes malloc'd, caller frees. n_docs (may be NULL) gets the count. */
kd_status kd_text_read_split(const char *spec, float val_frac, int split, uint8_t **bytes, size_t *n, int *n_docs);
void kd_text_free(kd_text_data *d);

/* B random contiguous windows of T+1 tokens from split (0 train, 1 val):
 * x (B,T) the tokens, y (B,T) the next tokens, both as floats; start offsets
 * uniform over the n-T possible ones. The split must hold at least T+1
 * tokens (kd_text_check): a shorter one is a caller bug (KD_ASSERT). */
void kd_text_batch(const kd_text_data *d, int split, kd_rng *rng, int B, int T, float *x, float *y);
/* The deterministic evaluation sweep: window i covers tokens i*T .. i*T+T
 * (non-overlapping inputs, each token predicted once). 0 when the split is
 * shorter than T+1 tokens. */
size_t kd_text_n_windows(const kd_text_data *d, int split, int T);
/* x (T), y (T) of window i < kd_text_n_windows (else KD_ASSERT). */
void kd_text_window(const kd_text_data *d, int split, size_t i, int T, float *x, float *y);

#endif
