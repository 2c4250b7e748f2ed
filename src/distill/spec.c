/* spec.c - the loss spec language: "ce(weight=0.1) + kd(T=4, weight=0.9)".
 *
 *   spec  := term ('+' term)*
 *   term  := NAME [ '(' [arg (',' arg)*] ')' ]
 *   arg   := KEY '=' VALUE          VALUE: a number or a bare word (tap names);
 *                                    '+' inside a value joins words into a
 *                                    list of taps ("s=block1+block2")
 *
 * This file only parses; which names and keys exist, their defaults and
 * ranges are checked by the loss builder (build.c), which knows the losses.
 * Errors quote the spec and point at the offending position.
 */
#include <ctype.h>
#include <stdio.h>
#include <string.h>

#include "kd_losses.h"

static kd_status spec_err(const char *spec, const char *p, const char *what) {
    int col = (int)(p - spec);
    return kd_errorf(KD_ECONFIG, "loss spec \"%s\": %s at column %d ('%.12s')", spec, what, col + 1, *p ? p : "end");
}

static const char *skip_ws(const char *p) {
    while (*p && isspace((unsigned char)*p)) p++;
    return p;
}

/* in a value (between '=' and ',' or ')') '+' is part of the word: terms
 * are only joined outside the parentheses. *too_long is set when the word
 * does not fit in out (n bytes with the terminator): never cut it silently. */
static const char *word(const char *p, char *out, size_t n, int value, int *too_long) {
    size_t k = 0;
    *too_long = 0;
    while (*p && (isalnum((unsigned char)*p) || *p == '_' || *p == '.' || *p == '-' || (value && *p == '+'))) {
        if (k + 1 < n)
            out[k++] = *p;
        else
            *too_long = 1;
        p++;
    }
    out[k] = '\0';
    return p;
}

kd_status kd_loss_spec_parse(const char *spec, kd_loss_spec *out) {
    memset(out, 0, sizeof *out);
    const char *p = skip_ws(spec);
    if (!*p) return kd_errorf(KD_ECONFIG, "loss spec is empty (e.g. \"ce + kd(T=4)\")");
    for (;;) {
        if (out->n == KD_MAX_TERMS) return spec_err(spec, p, "too many terms");
        kd_loss_term *t = &out->terms[out->n++];
        p = skip_ws(p);
        const char *start = p;
        int long_word;
        p = word(p, t->name, sizeof t->name, 0, &long_word);
        if (long_word) return spec_err(spec, start, "loss name too long");
        if (p == start || !isalpha((unsigned char)t->name[0])) return spec_err(spec, start, "expected a loss name");
        p = skip_ws(p);
        if (*p == '(') {
            p = skip_ws(p + 1);
            while (*p != ')') {
                if (t->n_args == KD_MAX_ARGS) return spec_err(spec, p, "too many arguments");
                kd_loss_arg *a = &t->args[t->n_args++];
                const char *ks = p;
                p = word(p, a->key, sizeof a->key, 0, &long_word);
                if (long_word) return spec_err(spec, ks, "argument name too long");
                if (p == ks) return spec_err(spec, ks, "expected an argument name");
                p = skip_ws(p);
                if (*p != '=') return spec_err(spec, p, "expected '=' after the argument name");
                p = skip_ws(p + 1);
                const char *vs = p;
                p = word(p, a->value, sizeof a->value, 1, &long_word);
                if (long_word) {
                    char what[64];
                    snprintf(what, sizeof what, "value longer than %d characters", (int)sizeof a->value - 1);
                    return spec_err(spec, vs, what);
                }
                if (p == vs) return spec_err(spec, vs, "expected a value");
                for (int j = 0; j < t->n_args - 1; j++)
                    if (strcmp(t->args[j].key, a->key) == 0) return spec_err(spec, ks, "argument given twice");
                p = skip_ws(p);
                if (*p == ',') {
                    p = skip_ws(p + 1);
                    continue;
                }
                if (*p != ')') return spec_err(spec, p, "expected ',' or ')'");
            }
            p = skip_ws(p + 1);
        }
        if (!*p) break;
        if (*p != '+') return spec_err(spec, p, "expected '+' between terms");
        p = skip_ws(p + 1);
    }
    return KD_OK;
}
