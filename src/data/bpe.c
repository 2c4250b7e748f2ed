/* bpe.c - a byte-level byte-pair-encoding tokenizer: training, encoding,
 * decoding, and its JSON form.
 *
 * Tokens 0..255 are the bytes; merge i joins two earlier tokens into token
 * 256+i (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
 * Subword Units", on bytes as in GPT-2). Text is first cut into chunks by the
 * pre-split of kd_text.h (a run of one byte class, optionally led by one
 * space, at most KD_TEXT_MAX_CHUNK bytes) and merges never cross a chunk.
 *
 * Training counts each distinct chunk once with its multiplicity ("words"),
 * keeps the count of every adjacent pair over all words, and for every pair
 * the list of words it occurs in. A merge rewrites only the words on its
 * pair's list: their old pairs are subtracted, the word is rewritten, its new
 * pairs added. The most frequent pair comes from a max-heap with lazy
 * deletion: an entry may hold a count above the pair's current one (counts
 * only fall, except for pairs holding the new token, which are pushed fresh);
 * a popped stale entry is pushed back with the current count. Ties go to the
 * smallest (left, right) pair, so training is deterministic. Pairs seen only
 * once are never merged (memorising a single occurrence compresses nothing a
 * model will see again), so training may stop below the requested vocab.
 *
 * Encoding a chunk applies, again and again, the lowest-ranked merge present
 * to all its non-overlapping occurrences from the left; this gives exactly
 * the segmentation training gave (a merge can only enable merges of higher
 * rank). Chunks are at most 64 bytes, so this quadratic loop is cheap.
 *
 * Deliberately not here: regular-expression pre-splits, Unicode categories
 * (bytes >= 0x80 all count as letters), special tokens, dropout.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kd_text.h"

#define BPE_FORMAT "distill-bpe"
#define BPE_VERSION 1
#define BPE_MIN_COUNT 2
/* a tokenizer file is ~15 bytes per merge: 16 MB bounds any honest one */
#define BPE_MAX_FILE (16u << 20)

/* ---------------------------------------------------------------- pre-split */

enum { CL_SPACE, CL_WS, CL_LETTER, CL_DIGIT, CL_PUNCT };

static int byte_class(uint8_t c) {
    if (c == ' ') return CL_SPACE;
    if (c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r') return CL_WS;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80) return CL_LETTER;
    if (c >= '0' && c <= '9') return CL_DIGIT;
    return CL_PUNCT;
}

size_t kd_tokenizer_chunk_end(const uint8_t *b, size_t n, size_t i) {
    size_t lim = n - i > KD_TEXT_MAX_CHUNK ? i + KD_TEXT_MAX_CHUNK : n;
    int c = byte_class(b[i]);
    if (c == CL_SPACE) {
        size_t j = i;
        while (j < n && b[j] == ' ') j++;
        int next = j < n ? byte_class(b[j]) : CL_SPACE;
        if (next == CL_LETTER || next == CL_DIGIT || next == CL_PUNCT) {
            /* all but the last space on their own, the last leads the run */
            if (j - i > 1) return j - 1 < lim ? j - 1 : lim;
            size_t k = j;
            while (k < lim && byte_class(b[k]) == next) k++;
            return k;
        }
        return j < lim ? j : lim;
    }
    size_t k = i + 1;
    while (k < lim && byte_class(b[k]) == c) k++;
    return k;
}

/* ---------------------------------------------------------------- tokens */

static uint32_t pair_key(int a, int b) { return (uint32_t)a << 16 | (uint32_t)b; }

static uint32_t mix32(uint32_t k) {
    k ^= k >> 16;
    k *= 0x7feb352dU;
    k ^= k >> 15;
    k *= 0x846ca68bU;
    k ^= k >> 16;
    return k;
}

static int32_t merge_rank(const kd_tokenizer *tok, int a, int b) {
    if (!tok->map_key) return -1;
    uint32_t key = pair_key(a, b);
    for (uint32_t h = mix32(key) & tok->map_mask;; h = (h + 1) & tok->map_mask) {
        if (tok->map_key[h] == key) return tok->map_val[h];
        if (tok->map_key[h] == UINT32_MAX) return -1;
    }
}

void kd_tokenizer_free(kd_tokenizer *tok) {
    free(tok->merges);
    free(tok->tok_off);
    free(tok->tok_bytes);
    free(tok->map_key);
    free(tok->map_val);
    memset(tok, 0, sizeof *tok);
}

/* Fills tok_off/tok_bytes and the merge map from vocab, n_merges, merges.
 * The merges must already be valid (earlier tokens only). Returns the index
 * of the first merge whose token would exceed KD_TEXT_MAX_CHUNK bytes, or
 * the index of a merge repeating an earlier one (*dup set to it), or -1. */
static int tok_build(kd_tokenizer *tok, int *dup) {
    *dup = -1;
    tok->tok_off = kd_malloc(((size_t)tok->vocab + 1) * sizeof(uint32_t));
    size_t total = 256;
    for (int i = 0; i < tok->n_merges; i++) total += KD_TEXT_MAX_CHUNK; /* upper bound */
    tok->tok_bytes = kd_malloc(total);
    for (int t = 0; t < 256; t++) {
        tok->tok_off[t] = (uint32_t)t;
        tok->tok_bytes[t] = (uint8_t)t;
    }
    uint32_t off = 256;
    tok->tok_off[256] = off;
    uint32_t cap = 16;
    while (cap < 2u * (uint32_t)tok->n_merges) cap <<= 1;
    tok->map_mask = cap - 1;
    tok->map_key = kd_malloc(cap * sizeof(uint32_t));
    tok->map_val = kd_malloc(cap * sizeof(int32_t));
    memset(tok->map_key, 0xff, cap * sizeof(uint32_t));
    for (int i = 0; i < tok->n_merges; i++) {
        int a = tok->merges[i][0], b = tok->merges[i][1];
        uint32_t la = tok->tok_off[a + 1] - tok->tok_off[a], lb = tok->tok_off[b + 1] - tok->tok_off[b];
        if (la + lb > KD_TEXT_MAX_CHUNK) return i;
        memcpy(tok->tok_bytes + off, tok->tok_bytes + tok->tok_off[a], la);
        memcpy(tok->tok_bytes + off + la, tok->tok_bytes + tok->tok_off[b], lb);
        off += la + lb;
        tok->tok_off[256 + i + 1] = off;
        uint32_t key = pair_key(a, b), h = mix32(key) & tok->map_mask;
        while (tok->map_key[h] != UINT32_MAX && tok->map_key[h] != key) h = (h + 1) & tok->map_mask;
        if (tok->map_key[h] == key) {
            *dup = tok->map_val[h];
            return i;
        }
        tok->map_key[h] = key;
        tok->map_val[h] = i;
    }
    return -1;
}

void kd_tokenizer_bytes(kd_tokenizer *tok) {
    memset(tok, 0, sizeof *tok);
    tok->vocab = 256;
    int dup;
    tok_build(tok, &dup);
}

const uint8_t *kd_tokenizer_token(const kd_tokenizer *tok, int id, size_t *len) {
    if (id < 0 || id >= tok->vocab) {
        *len = 0;
        return NULL;
    }
    *len = tok->tok_off[id + 1] - tok->tok_off[id];
    return tok->tok_bytes + tok->tok_off[id];
}

/* ---------------------------------------------------------------- encode, decode */

/* Encodes one chunk (len <= KD_TEXT_MAX_CHUNK) into out; returns the count. */
static size_t encode_chunk(const kd_tokenizer *tok, const uint8_t *b, size_t len, uint16_t *out) {
    int sym[KD_TEXT_MAX_CHUNK];
    size_t n = len;
    for (size_t i = 0; i < n; i++) sym[i] = b[i];
    while (n > 1 && tok->n_merges) {
        int32_t best = INT32_MAX;
        for (size_t i = 0; i + 1 < n; i++) {
            int32_t r = merge_rank(tok, sym[i], sym[i + 1]);
            if (r >= 0 && r < best) best = r;
        }
        if (best == INT32_MAX) break;
        int a = tok->merges[best][0], c = tok->merges[best][1];
        size_t w = 0;
        for (size_t i = 0; i < n;) {
            if (i + 1 < n && sym[i] == a && sym[i + 1] == c) {
                sym[w++] = 256 + best;
                i += 2;
            } else {
                sym[w++] = sym[i++];
            }
        }
        n = w;
    }
    for (size_t i = 0; i < n; i++) out[i] = (uint16_t)sym[i];
    return n;
}

size_t kd_tokenizer_encode(const kd_tokenizer *tok, const uint8_t *text, size_t n, uint16_t *out) {
    size_t m = 0;
    if (tok->n_merges == 0) {
        for (size_t i = 0; i < n; i++) out[i] = text[i];
        return n;
    }
    for (size_t i = 0; i < n;) {
        size_t e = kd_tokenizer_chunk_end(text, n, i);
        m += encode_chunk(tok, text + i, e - i, out + m);
        i = e;
    }
    return m;
}

size_t kd_tokenizer_decode(const kd_tokenizer *tok, const uint16_t *ids, size_t n, uint8_t *out, size_t cap) {
    size_t need = 0;
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const uint8_t *p = kd_tokenizer_token(tok, ids[i], &len);
        if (len && need < cap) memcpy(out + need, p, len < cap - need ? len : cap - need);
        need += len;
    }
    return need;
}

/* ---------------------------------------------------------------- training */

/* A distinct chunk: its current symbols live in sym[off .. off+len). */
typedef struct word {
    size_t off;
    int len;
    int64_t count;
    uint32_t stamp; /* last merge that visited it */
} word;

typedef struct pair_rec {
    uint64_t key; /* a << 32 | b */
    int64_t count;
    int32_t *words; /* words it occurs in (may hold stale entries and repeats) */
    int n_words, cap_words;
    uint32_t stamp; /* last merge that touched it (dedupes pushes) */
} pair_rec;

typedef struct heap_ent {
    int64_t count;
    int32_t a, b;
} heap_ent;

typedef struct trainer {
    word *words;
    int n_words;
    int32_t *sym;
    pair_rec *pairs;
    int n_pairs, cap_pairs;
    int32_t *slot; /* open addressing: index into pairs, -1 empty */
    size_t slot_mask;
    heap_ent *heap;
    size_t n_heap, cap_heap;
} trainer;

static uint64_t mix64(uint64_t k) { return kd_hash64(k); }

static void slots_rebuild(trainer *t, size_t cap) {
    free(t->slot);
    t->slot = kd_malloc(cap * sizeof(int32_t));
    memset(t->slot, 0xff, cap * sizeof(int32_t));
    t->slot_mask = cap - 1;
    for (int i = 0; i < t->n_pairs; i++) {
        size_t h = mix64(t->pairs[i].key) & t->slot_mask;
        while (t->slot[h] >= 0) h = (h + 1) & t->slot_mask;
        t->slot[h] = i;
    }
}

/* Index of pair (a, b), created with count 0 when absent. */
static int pair_get(trainer *t, int a, int b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    size_t h = mix64(key) & t->slot_mask;
    for (; t->slot[h] >= 0; h = (h + 1) & t->slot_mask)
        if (t->pairs[t->slot[h]].key == key) return t->slot[h];
    if (t->n_pairs == t->cap_pairs) {
        t->cap_pairs = t->cap_pairs ? 2 * t->cap_pairs : 1024;
        t->pairs = kd_realloc(t->pairs, (size_t)t->cap_pairs * sizeof(pair_rec));
    }
    int i = t->n_pairs++;
    memset(&t->pairs[i], 0, sizeof t->pairs[i]);
    t->pairs[i].key = key;
    t->slot[h] = i;
    if ((size_t)t->n_pairs * 2 > t->slot_mask + 1) slots_rebuild(t, 2 * (t->slot_mask + 1));
    return i;
}

static void pair_add_word(pair_rec *p, int w) {
    if (p->n_words && p->words[p->n_words - 1] == w) return;
    if (p->n_words == p->cap_words) {
        p->cap_words = p->cap_words ? 2 * p->cap_words : 4;
        p->words = kd_realloc(p->words, (size_t)p->cap_words * sizeof(int32_t));
    }
    p->words[p->n_words++] = w;
}

/* heap order: larger count first, then smaller a, then smaller b */
static int heap_before(const heap_ent *x, const heap_ent *y) {
    if (x->count != y->count) return x->count > y->count;
    if (x->a != y->a) return x->a < y->a;
    return x->b < y->b;
}

static void heap_push(trainer *t, int64_t count, uint64_t key) {
    if (t->n_heap == t->cap_heap) {
        t->cap_heap = t->cap_heap ? 2 * t->cap_heap : 1024;
        t->heap = kd_realloc(t->heap, t->cap_heap * sizeof(heap_ent));
    }
    heap_ent e = {count, (int32_t)(key >> 32), (int32_t)(key & 0xffffffffu)};
    size_t i = t->n_heap++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_before(&e, &t->heap[p])) break;
        t->heap[i] = t->heap[p];
        i = p;
    }
    t->heap[i] = e;
}

static heap_ent heap_pop(trainer *t) {
    heap_ent top = t->heap[0], last = t->heap[--t->n_heap];
    size_t i = 0, n = t->n_heap;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap_before(&t->heap[c + 1], &t->heap[c])) c++;
        if (!heap_before(&t->heap[c], &last)) break;
        t->heap[i] = t->heap[c];
        i = c;
    }
    if (n) t->heap[i] = last;
    return top;
}

/* Distinct chunks of text with their counts, as words of byte symbols. */
static void collect_words(trainer *t, const uint8_t *text, size_t n) {
    size_t cap = 1024, mask = cap - 1, cap_words = 256, n_sym = 0, cap_sym = 4096;
    int32_t *slot = kd_malloc(cap * sizeof(int32_t));
    memset(slot, 0xff, cap * sizeof(int32_t));
    uint64_t *hash = kd_malloc(cap_words * sizeof(uint64_t));
    t->words = kd_malloc(cap_words * sizeof(word));
    t->sym = kd_malloc(cap_sym * sizeof(int32_t));
    /* first occurrence of each word, to compare bytes */
    size_t *first = kd_malloc(cap_words * sizeof(size_t));
    for (size_t i = 0; i < n;) {
        size_t e = kd_tokenizer_chunk_end(text, n, i), len = e - i;
        uint64_t h = 1469598103934665603ull;
        for (size_t k = i; k < e; k++) h = (h ^ text[k]) * 1099511628211ull;
        h = kd_hash64(h);
        size_t s = h & mask;
        int found = -1;
        for (; slot[s] >= 0; s = (s + 1) & mask) {
            int w = slot[s];
            if (hash[w] == h && (size_t)t->words[w].len == len && memcmp(text + first[w], text + i, len) == 0) {
                found = w;
                break;
            }
        }
        if (found >= 0) {
            t->words[found].count++;
        } else {
            if ((size_t)t->n_words == cap_words) {
                cap_words *= 2;
                t->words = kd_realloc(t->words, cap_words * sizeof(word));
                hash = kd_realloc(hash, cap_words * sizeof(uint64_t));
                first = kd_realloc(first, cap_words * sizeof(size_t));
            }
            while (n_sym + len > cap_sym) {
                cap_sym *= 2;
                t->sym = kd_realloc(t->sym, cap_sym * sizeof(int32_t));
            }
            int w = t->n_words++;
            t->words[w] = (word){.off = n_sym, .len = (int)len, .count = 1, .stamp = 0};
            for (size_t k = 0; k < len; k++) t->sym[n_sym + k] = text[i + k];
            n_sym += len;
            hash[w] = h;
            first[w] = i;
            slot[s] = w;
            if ((size_t)t->n_words * 2 > cap) {
                cap *= 2;
                mask = cap - 1;
                free(slot);
                slot = kd_malloc(cap * sizeof(int32_t));
                memset(slot, 0xff, cap * sizeof(int32_t));
                for (int v = 0; v < t->n_words; v++) {
                    size_t q = hash[v] & mask;
                    while (slot[q] >= 0) q = (q + 1) & mask;
                    slot[q] = v;
                }
            }
        }
        i = e;
    }
    free(slot);
    free(hash);
    free(first);
}

static void trainer_free(trainer *t) {
    for (int i = 0; i < t->n_pairs; i++) free(t->pairs[i].words);
    free(t->pairs);
    free(t->slot);
    free(t->words);
    free(t->sym);
    free(t->heap);
}

kd_status kd_tokenizer_train(kd_tokenizer *tok, const uint8_t *text, size_t n, int vocab) {
    memset(tok, 0, sizeof *tok);
    if (vocab <= 256 || vocab > KD_TEXT_MAX_VOCAB)
        return kd_errorf(KD_ECONFIG, "tokenizer vocab %d: must be in 257..%d (256 bytes + merges)", vocab,
                         KD_TEXT_MAX_VOCAB);
    if (n == 0) return kd_errorf(KD_ECONFIG, "tokenizer training: no text to learn from");
    trainer t = {0};
    collect_words(&t, text, n);
    slots_rebuild(&t, 1u << 12);
    for (int w = 0; w < t.n_words; w++) {
        const int32_t *s = t.sym + t.words[w].off;
        for (int k = 0; k + 1 < t.words[w].len; k++) {
            int p = pair_get(&t, s[k], s[k + 1]);
            t.pairs[p].count += t.words[w].count;
            pair_add_word(&t.pairs[p], w);
        }
    }
    for (int p = 0; p < t.n_pairs; p++) heap_push(&t, t.pairs[p].count, t.pairs[p].key);

    int max_merges = vocab - 256, m = 0;
    tok->merges = kd_malloc((size_t)max_merges * sizeof *tok->merges);
    int *touched = NULL, n_touched = 0, cap_touched = 0;
    while (m < max_merges && t.n_heap > 0) {
        heap_ent e = heap_pop(&t);
        int pi = pair_get(&t, e.a, e.b);
        int64_t cur = t.pairs[pi].count;
        if (cur != e.count) { /* stale: requeue at its true count */
            if (cur > 0) heap_push(&t, cur, t.pairs[pi].key);
            continue;
        }
        if (cur < BPE_MIN_COUNT) break;
        int a = e.a, b = e.b, nt = 256 + m;
        uint32_t stamp = (uint32_t)m + 1;
        tok->merges[m][0] = a;
        tok->merges[m][1] = b;
        /* pair_get below may move t.pairs, never this list (only pairs
         * holding nt gain words during this merge) */
        int32_t *list = t.pairs[pi].words, n_list = t.pairs[pi].n_words;
        n_touched = 0;
        for (int li = 0; li < n_list; li++) {
            int w = list[li];
            word *wd = &t.words[w];
            if (wd->stamp == stamp) continue;
            wd->stamp = stamp;
            int32_t *s = t.sym + wd->off;
            int len = wd->len, has = 0;
            for (int k = 0; k + 1 < len && !has; k++) has = s[k] == a && s[k + 1] == b;
            if (!has) continue;
            for (int k = 0; k + 1 < len; k++) t.pairs[pair_get(&t, s[k], s[k + 1])].count -= wd->count;
            int out = 0;
            for (int k = 0; k < len;) {
                if (k + 1 < len && s[k] == a && s[k + 1] == b) {
                    s[out++] = nt;
                    k += 2;
                } else {
                    s[out++] = s[k++];
                }
            }
            wd->len = len = out;
            for (int k = 0; k + 1 < len; k++) {
                int p = pair_get(&t, s[k], s[k + 1]);
                t.pairs[p].count += wd->count;
                if (s[k] == nt || s[k + 1] == nt) {
                    pair_add_word(&t.pairs[p], w);
                    if (t.pairs[p].stamp != stamp) {
                        t.pairs[p].stamp = stamp;
                        if (n_touched == cap_touched) {
                            cap_touched = cap_touched ? 2 * cap_touched : 256;
                            touched = kd_realloc(touched, (size_t)cap_touched * sizeof(int));
                        }
                        touched[n_touched++] = p;
                    }
                }
            }
        }
        pi = pair_get(&t, a, b);
        KD_ASSERT(t.pairs[pi].count == 0, "pair (%d, %d) still counted %lld after its merge", a, b,
                  (long long)t.pairs[pi].count);
        free(t.pairs[pi].words);
        t.pairs[pi].words = NULL;
        t.pairs[pi].n_words = t.pairs[pi].cap_words = 0;
        for (int k = 0; k < n_touched; k++)
            if (t.pairs[touched[k]].count > 0) heap_push(&t, t.pairs[touched[k]].count, t.pairs[touched[k]].key);
        m++;
    }
    free(touched);
    trainer_free(&t);
    tok->n_merges = m;
    tok->vocab = 256 + m;
    int dup;
    int bad = tok_build(tok, &dup);
    KD_ASSERT(bad < 0, "trained merge %d is too long or repeated", bad);
    return KD_OK;
}

/* ---------------------------------------------------------------- JSON */

char *kd_tokenizer_to_json(const kd_tokenizer *tok) {
    /* written by hand: one compact line, merges as [a,b] pairs */
    size_t cap = 128 + (size_t)tok->n_merges * 14, k = 0;
    char *s = kd_malloc(cap);
    k += (size_t)snprintf(s + k, cap - k, "{\"format\":\"%s\",\"version\":%d,\"vocab\":%d,\"merges\":[", BPE_FORMAT,
                          BPE_VERSION, tok->vocab);
    for (int i = 0; i < tok->n_merges; i++)
        k += (size_t)snprintf(s + k, cap - k, "%s[%d,%d]", i ? "," : "", tok->merges[i][0], tok->merges[i][1]);
    snprintf(s + k, cap - k, "]}");
    return s;
}

/* An integer in [lo, hi] held by a JSON number; else -1 (lo >= 0). */
static long json_int(const cJSON *v, long lo, long hi) {
    if (!cJSON_IsNumber(v)) return -1;
    double d = v->valuedouble;
    if (!(d >= (double)lo && d <= (double)hi) || d != floor(d)) return -1;
    return (long)d;
}

static const char *json_type(const cJSON *v) {
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNull(v)) return "null";
    return "invalid";
}

kd_status kd_tokenizer_from_json(kd_tokenizer *tok, const char *json, const char *origin) {
    memset(tok, 0, sizeof *tok);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithOpts(json, &end, 1);
    if (!root) {
        size_t at = end && end >= json ? (size_t)(end - json) : 0;
        return kd_errorf(KD_EFORMAT, "%s: tokenizer: malformed JSON near byte %zu%s", origin, at,
                         json[at] ? "" : " (truncated?)");
    }
    kd_status st = KD_OK;
    const cJSON *fmt = NULL, *ver = NULL, *voc = NULL, *mer = NULL, *it;
    if (!cJSON_IsObject(root)) {
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer: expected a JSON object, found %s", origin, json_type(root));
        goto done;
    }
    cJSON_ArrayForEach(it, root) {
        const char *k = it->string;
        const cJSON **slot = strcmp(k, "format") == 0    ? &fmt
                             : strcmp(k, "version") == 0 ? &ver
                             : strcmp(k, "vocab") == 0   ? &voc
                             : strcmp(k, "merges") == 0  ? &mer
                                                         : NULL;
        if (slot && *slot) {
            st = kd_errorf(KD_EFORMAT, "%s: tokenizer: key \"%s\" appears twice", origin, k);
            goto done;
        }
        if (slot) {
            *slot = it;
        } else {
            st = kd_errorf(KD_EFORMAT, "%s: tokenizer: unknown key \"%.64s\" (expected format, version, vocab, merges)",
                           origin, k);
            goto done;
        }
    }
    if (!fmt || !cJSON_IsString(fmt) || strcmp(fmt->valuestring, BPE_FORMAT) != 0) {
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer: \"format\" must be the string \"%s\"%s%s", origin, BPE_FORMAT,
                       fmt ? ", found " : " (missing)", fmt ? json_type(fmt) : "");
        goto done;
    }
    if (!ver || json_int(ver, 0, INT_MAX) != BPE_VERSION) {
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer: \"version\" must be %d%s", origin, BPE_VERSION,
                       ver ? " (this file is of another version or has a bad value)" : " (missing)");
        goto done;
    }
    long vocab = voc ? json_int(voc, 256, KD_TEXT_MAX_VOCAB) : -1;
    if (vocab < 0) {
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer: \"vocab\" must be an integer in 256..%d%s%s", origin,
                       KD_TEXT_MAX_VOCAB, voc ? ", found " : " (missing)", voc ? json_type(voc) : "");
        goto done;
    }
    if (!mer || !cJSON_IsArray(mer)) {
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer: \"merges\" must be an array of [left, right] pairs%s%s", origin,
                       mer ? ", found " : " (missing)", mer ? json_type(mer) : "");
        goto done;
    }
    int n_merges = cJSON_GetArraySize(mer);
    if ((long)n_merges != vocab - 256) {
        st = kd_errorf(KD_EFORMAT,
                       "%s: tokenizer: vocab %ld needs %ld merges (256 bytes + one token per merge), found %d", origin,
                       vocab, vocab - 256, n_merges);
        goto done;
    }
    tok->vocab = (int)vocab;
    tok->n_merges = n_merges;
    tok->merges = kd_malloc((size_t)(n_merges ? n_merges : 1) * sizeof *tok->merges);
    int i = 0;
    cJSON_ArrayForEach(it, mer) {
        if (!cJSON_IsArray(it) || cJSON_GetArraySize(it) != 2) {
            st = kd_errorf(KD_EFORMAT, "%s: tokenizer: merge %d must be an array of two token ids, found %s", origin, i,
                           cJSON_IsArray(it) ? "an array of another length" : json_type(it));
            goto done;
        }
        for (int s = 0; s < 2; s++) {
            const cJSON *v = cJSON_GetArrayItem(it, s);
            long id = json_int(v, 0, KD_TEXT_MAX_VOCAB);
            if (id < 0) {
                st = kd_errorf(KD_EFORMAT, "%s: tokenizer: merge %d: %s id must be a non-negative integer, found %s",
                               origin, i, s ? "right" : "left", json_type(v));
                goto done;
            }
            if (id >= 256 + i) {
                st = kd_errorf(KD_EFORMAT,
                               "%s: tokenizer: merge %d (making token %d) uses token %ld, which is not defined yet "
                               "(merges may only join bytes and earlier tokens)",
                               origin, i, 256 + i, id);
                goto done;
            }
            tok->merges[i][s] = (int32_t)id;
        }
        i++;
    }
    int dup, bad = tok_build(tok, &dup);
    if (bad >= 0 && dup >= 0)
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer: merge %d repeats merge %d ([%d, %d])", origin, bad, dup,
                       tok->merges[bad][0], tok->merges[bad][1]);
    else if (bad >= 0)
        st = kd_errorf(KD_EFORMAT,
                       "%s: tokenizer: merge %d makes a token longer than %d bytes (the longest pre-split chunk)",
                       origin, bad, KD_TEXT_MAX_CHUNK);
done:
    cJSON_Delete(root);
    if (st != KD_OK) kd_tokenizer_free(tok);
    return st;
}

kd_status kd_tokenizer_load(kd_tokenizer *tok, const char *path) {
    memset(tok, 0, sizeof *tok);
    FILE *f = fopen(path, "rb");
    if (!f) return kd_errorf(KD_EIO, "%s: cannot open tokenizer: %s", path, strerror(errno));
    /* grows with the bytes actually there, up to one past the limit */
    size_t cap = 1u << 16, n = 0, got;
    char *buf = kd_malloc(cap + 1);
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap && cap <= BPE_MAX_FILE) {
            cap = cap * 2 > BPE_MAX_FILE + 1 ? BPE_MAX_FILE + 1 : cap * 2;
            buf = kd_realloc(buf, cap + 1);
        }
        if (n > BPE_MAX_FILE) break;
    }
    int err = ferror(f);
    fclose(f);
    kd_status st;
    if (err)
        st = kd_errorf(KD_EIO, "%s: cannot read tokenizer", path);
    else if (n > BPE_MAX_FILE)
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer file larger than %u bytes", path, BPE_MAX_FILE);
    else if (n == 0)
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer file is empty", path);
    else if (memchr(buf, '\0', n))
        st = kd_errorf(KD_EFORMAT, "%s: tokenizer file holds a NUL byte (not JSON)", path);
    else {
        buf[n] = '\0';
        st = kd_tokenizer_from_json(tok, buf, path);
    }
    free(buf);
    return st;
}

kd_status kd_tokenizer_save(const kd_tokenizer *tok, const char *path) {
    char *js = kd_tokenizer_to_json(tok);
    size_t len = strlen(js);
    char *text = kd_malloc(len + 1);
    memcpy(text, js, len);
    text[len] = '\n';
    free(js);
    kd_status st = kd_write_atomic(path, text, len + 1);
    free(text);
    return st;
}
