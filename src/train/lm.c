/* lm.c - language-model training: a GPT student and its teachers in one
 * graph, next-token cross-entropy plus token-level distillation terms,
 * on-policy batches sampled from the student, validation sweeps, and
 * checkpoints with the tokenizer inside.
 *
 * Graph order: inputs x, y, mask (B,T); the student (prefix "s.") and its
 * cross-entropy; then the frozen teachers (or the cache inputs) and the
 * terms. Evaluating the student (forward up to its CE) never runs a teacher.
 *
 * Token-level losses reuse the classification losses row by row: logits
 * (B,T,V) are B*T rows, labels (B,T) are the next tokens (negative:
 * ignored by the CE) and the mask (B,T) selects the rows the divergences
 * average over. Those ops keep a few numbers per row and recompute
 * probabilities from the logits, so no (B*T, V) probability buffer exists
 * beyond the logits themselves (docs/PERFORMANCE.md, memory).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_distill.h"
#include "kd_io.h"
#include "kd_lm.h"

/* ---------------------------------------------------------------- build */

/* The loss spec of a cached teacher: ce and the divergences, each a
 * coarse-grained top-k divergence (docs/losses/topk.md). */
static kd_status build_cached_terms(kd_lm *lm, const char *spec_str, float cache_T) {
    kd_loss_spec spec;
    kd_status st = kd_loss_spec_parse(spec_str, &spec);
    if (st != KD_OK) return st;
    kd_built_loss *L = &lm->terms;
    memset(L, 0, sizeof *L);
    kd_node *t_dense = NULL; /* the cache as dense rows, built once if a rank term needs it */
    for (int i = 0; i < spec.n; i++) {
        const kd_loss_term *t = &spec.terms[i];
        float weight = 1.0f, T = cache_T, prm = 0.5f;
        int has_T = 0;
        for (int a = 0; a < t->n_args && strcmp(t->name, "rlkd") != 0; a++) {
            char *end;
            float v = strtof(t->args[a].value, &end);
            if (end == t->args[a].value || *end)
                return kd_errorf(KD_ECONFIG, "loss '%s': %s=%s is not a number", t->name, t->args[a].key,
                                 t->args[a].value);
            if (strcmp(t->args[a].key, "weight") == 0)
                weight = v;
            else if (strcmp(t->args[a].key, "T") == 0)
                T = v, has_T = 1;
            else if (strcmp(t->args[a].key, "beta") == 0 || strcmp(t->args[a].key, "alpha") == 0)
                prm = v;
            else
                return kd_errorf(KD_ECONFIG, "loss '%s': unknown argument '%s' with a cached LM teacher", t->name,
                                 t->args[a].key);
        }
        kd_node *v = NULL;
        int kind = -1;
        if (strcmp(t->name, "rlkd") == 0) { /* rank alignment on the cached peaks */
            int k = 10;
            float tau = 1.0f;
            weight = 1.0f;
            for (int a = 0; a < t->n_args; a++) {
                float x = strtof(t->args[a].value, NULL);
                if (strcmp(t->args[a].key, "k") == 0)
                    k = (int)x;
                else if (strcmp(t->args[a].key, "tau") == 0)
                    tau = x;
                else if (strcmp(t->args[a].key, "weight") == 0)
                    weight = x;
            }
            if (k < 2 || k > lm->cache_k)
                return kd_errorf(KD_ECONFIG, "loss 'rlkd': k=%d must be in [2, %d] (the cache's top-k)", k, lm->cache_k);
            if (!(tau > 0.0f)) return kd_errorf(KD_ECONFIG, "loss 'rlkd': tau must be > 0");
            if (!t_dense) t_dense = kd_topk_dense(lm->g, lm->t_ids, lm->t_logp, lm->vocab);
            v = kd_rank_align(lm->g, lm->m.logits, t_dense, lm->mask, k, tau);
            kind = KD_DIV_FKL; /* reads the teacher */
            goto add_term;
        }
        if (strcmp(t->name, "ce") == 0)
            v = lm->ce; /* the student's CE, kept for validation */
        else if (strcmp(t->name, "kd") == 0 || strcmp(t->name, "fkl") == 0)
            kind = KD_DIV_FKL;
        else if (strcmp(t->name, "rkl") == 0)
            kind = KD_DIV_RKL;
        else if (strcmp(t->name, "jsd") == 0)
            kind = KD_DIV_JSD;
        else if (strcmp(t->name, "tvd") == 0)
            kind = KD_DIV_TVD;
        else if (strcmp(t->name, "skl") == 0)
            kind = KD_DIV_SKL;
        else if (strcmp(t->name, "srkl") == 0)
            kind = KD_DIV_SRKL;
        else
            return kd_errorf(KD_ECONFIG,
                             "loss '%s' cannot read a cached LM teacher (ce, kd/fkl, rkl, jsd, tvd, skl, srkl, rlkd can)",
                             t->name);
        if (kind >= 0) {
            if (has_T && fabsf(T - cache_T) > 1e-6f)
                return kd_errorf(KD_ECONFIG, "loss '%s': T=%g differs from the cache's temperature %g (cached "
                                 "distributions cannot be re-tempered; rebuild the cache with --temperature %g)",
                                 t->name, (double)T, (double)cache_T, (double)T);
            if ((kind == KD_DIV_JSD || kind == KD_DIV_SKL || kind == KD_DIV_SRKL) && !(prm > 0.0f && prm < 1.0f))
                return kd_errorf(KD_ECONFIG, "loss '%s': beta/alpha must be in (0, 1)", t->name);
            int t2 = kind == KD_DIV_FKL || kind == KD_DIV_RKL;
            v = kd_topk_divergence(lm->g, lm->m.logits, lm->t_ids, lm->t_logp, lm->mask, (kd_div_kind)kind, T, prm,
                                   t2 ? T * T : 1.0f);
        }
    add_term:;
        kd_built_term *bt = &L->terms[L->n++];
        snprintf(bt->name, sizeof bt->name, "%s", t->name);
        bt->weight = weight;
        bt->value = v;
        kd_node_set_name(v, "loss.%d.%s", i + 1, t->name);
        bt->scaled = kd_scale(lm->g, v, weight);
        L->total = L->total ? kd_add(lm->g, L->total, bt->scaled) : bt->scaled;
        L->uses_teacher |= kind >= 0;
    }
    return KD_OK;
}

kd_status kd_lm_new(kd_lm *lm, const kd_lm_setup *s, uint64_t seed) {
    memset(lm, 0, sizeof *lm);
    lm->seq = s->seq;
    lm->vocab = s->vocab;
    lm->cache_k = s->cache_k;
    lm->g = kd_graph_new();
    int xs[2] = {s->max_batch, s->seq};
    lm->x = kd_input(lm->g, "x", 2, xs);
    lm->y = kd_input(lm->g, "y", 2, xs);
    lm->mask = kd_input(lm->g, "mask", 2, xs);
    lm->lora = s->lora;
    lm->okd = s->okd;
    lm->okd_lora = s->okd_lora;
    kd_status st = kd_lora_model_build(lm->g, s->student, "s.", lm->x, s->vocab, &s->lora, &lm->m);
    if (st != KD_OK) st = kd_error_prefix(st, "student model");
    if (st == KD_OK) {
        lm->ce = kd_cross_entropy(lm->g, lm->m.logits, lm->y, 0.0f);
        kd_node_set_name(lm->ce, "s.ce");
        lm->ce->flags |= KD_F_KEEP;
    }
    if (st == KD_OK && s->okd && (s->n_teachers != 1 || s->cache_k > 0 || s->okd_lora.r < 1))
        st = kd_errorf(KD_ECONFIG, "OKD needs exactly one teacher in the graph (not a cache) and adapters for it "
                                   "(a rank r >= 1)");
    /* teachers */
    if (st == KD_OK && s->n_teachers > 0) {
        kd_graph_set_frozen(lm->g, 1);
        double wsum = 0.0;
        for (int i = 0; i < s->n_teachers; i++) wsum += s->weights[i] > 0 ? s->weights[i] : 1.0;
        for (int i = 0; i < s->n_teachers && st == KD_OK; i++) {
            char prefix[16];
            snprintf(prefix, sizeof prefix, i ? "t%d." : "t.", i);
            st = kd_lora_model_build(lm->g, s->teachers[i], prefix, lm->x, s->vocab, s->okd ? &s->okd_lora : NULL,
                                     &lm->teachers[i]);
            if (st != KD_OK) {
                st = kd_error_prefix(st, "teacher %d model", i + 1);
                break;
            }
            if (s->n_teachers == 1) {
                lm->t_mix = lm->teachers[0].logits;
            } else {
                kd_node *term = kd_scale(lm->g, lm->teachers[i].logits,
                                         (float)((s->weights[i] > 0 ? s->weights[i] : 1.0) / wsum));
                lm->t_mix = lm->t_mix ? kd_add(lm->g, lm->t_mix, term) : term;
            }
        }
        kd_graph_set_frozen(lm->g, 0);
        if (st == KD_OK) {
            lm->n_teachers = s->n_teachers;
            if (s->n_teachers > 1) kd_node_set_name(lm->t_mix, "t.ensemble");
            lm->t_mix->flags |= KD_F_KEEP;
        }
    } else if (st == KD_OK && s->cache_k > 0) {
        int ks[3] = {s->max_batch, s->seq, s->cache_k};
        lm->t_ids = kd_input(lm->g, "t.ids", 3, ks);
        lm->t_logp = kd_input(lm->g, "t.logp", 3, ks);
    }
    /* the loss */
    int plain = !s->loss || !*s->loss;
    if (st == KD_OK && plain) {
        lm->loss = lm->ce;
    } else if (st == KD_OK && s->cache_k > 0) {
        st = build_cached_terms(lm, s->loss, s->cache_T);
        if (st == KD_OK) lm->loss = lm->terms.total;
    } else if (st == KD_OK) {
        kd_loss_spec spec;
        st = kd_loss_spec_parse(s->loss, &spec);
        kd_loss_inputs in = {.student = &lm->m,
                             .teacher = lm->n_teachers ? &lm->teachers[0] : NULL,
                             .s_logits = lm->m.logits,
                             .t_logits = lm->t_mix,
                             .labels = lm->y,
                             .mask = lm->mask,
                             .ce = lm->ce}; /* the student's CE, kept for validation, serves a `ce` term too */
        if (st == KD_OK) st = kd_loss_build(lm->g, &spec, &in, &lm->terms);
        if (st == KD_OK && lm->terms.uses_teacher && !lm->t_mix)
            st = kd_errorf(KD_ECONFIG, "loss '%s' reads a teacher, but none is configured", s->loss);
        if (st == KD_OK) lm->loss = lm->terms.total;
    }
    if (st == KD_OK && s->okd) { /* the teacher adapters' loss, roles swapped */
        kd_loss_spec spec;
        const char *ts = s->okd_loss && *s->okd_loss ? s->okd_loss : "ce + fkl";
        st = kd_loss_spec_parse(ts, &spec);
        kd_loss_inputs in = {.s_logits = lm->t_mix, .t_logits = lm->m.logits, .labels = lm->y, .mask = lm->mask,
                             .proj_prefix = "okd."};
        if (st == KD_OK) st = kd_loss_build(lm->g, &spec, &in, &lm->t_terms);
        if (st != KD_OK)
            st = kd_error_prefix(st, "OKD teacher loss '%s'", ts);
        else
            lm->loss = kd_add(lm->g, lm->loss, lm->t_terms.total);
    }
    if (st == KD_OK) {
        kd_node_set_name(lm->loss, "loss");
        st = kd_graph_compile(lm->g, s->max_batch, seed);
    }
    if (st != KD_OK) kd_lm_free(lm);
    return st;
}

void kd_lm_free(kd_lm *lm) {
    kd_graph_free(lm->g);
    lm->g = NULL;
}

const float *kd_lm_lookup(void *ctx, const char *name, int ndim, const int *shape) {
    const kd_lm_view *v = ctx;
    char full[160];
    snprintf(full, sizeof full, "%s%s", v->m->prefix, name);
    kd_node *n = kd_graph_find(v->g, full);
    if (!n || n->val.ndim != ndim) return NULL;
    for (int i = 0; i < ndim; i++)
        if (n->val.shape[i] != shape[i]) return NULL;
    return n->val.data;
}

/* ---------------------------------------------------------------- eval */

static void fill_ones(float *p, int64_t n) {
    for (int64_t i = 0; i < n; i++) p[i] = 1.0f;
}

/* log-sum-exp of a row, in double */
static double row_lse(const float *z, int V) {
    double m = z[0];
    for (int v = 1; v < V; v++) m = z[v] > m ? z[v] : m;
    double s = 0.0;
    for (int v = 0; v < V; v++) s += exp(z[v] - m);
    return m + log(s);
}

kd_lm_eval_result kd_lm_evaluate(kd_lm *lm, const kd_text_data *d, int split, int batch, int max_windows,
                                 int with_teacher) {
    kd_lm_eval_result r;
    memset(&r, 0, sizeof r);
    int T = lm->seq, V = lm->vocab;
    if (batch > kd_graph_max_batch(lm->g)) batch = kd_graph_max_batch(lm->g);
    int64_t nw = (int64_t)kd_text_n_windows(d, split, T);
    if (max_windows > 0 && nw > max_windows) nw = max_windows;
    with_teacher = with_teacher && lm->t_mix;
    double sum = 0.0, tsum = 0.0, agree = 0.0, kl = 0.0;
    int64_t toks = 0;
    for (int64_t w0 = 0; w0 < nw; w0 += batch) {
        int B = (int)(nw - w0 < batch ? nw - w0 : batch);
        for (int b = 0; b < B; b++)
            kd_text_window(d, split, (size_t)(w0 + b), T, lm->x->val.data + (size_t)b * T,
                           lm->y->val.data + (size_t)b * T);
        fill_ones(lm->mask->val.data, (int64_t)B * T);
        kd_graph_set_batch(lm->g, B);
        if (!with_teacher) {
            kd_graph_forward_to(lm->g, 0, lm->ce);
            sum += (double)lm->ce->val.data[0] * B * T;
        } else {
            kd_graph_forward_to(lm->g, 0, lm->t_mix);
            sum += (double)lm->ce->val.data[0] * B * T;
            const float *zs = lm->m.logits->val.data, *zt = lm->t_mix->val.data, *y = lm->y->val.data;
            for (int64_t i = 0; i < (int64_t)B * T; i++) {
                const float *a = zs + i * V, *t = zt + i * V;
                double ls = row_lse(a, V), lt = row_lse(t, V), k = 0.0;
                int as = 0, at = 0;
                for (int v = 0; v < V; v++) {
                    if (a[v] > a[as]) as = v;
                    if (t[v] > t[at]) at = v;
                    double lq = t[v] - lt;
                    k += exp(lq) * (lq - (a[v] - ls));
                }
                agree += as == at;
                kl += k;
                tsum += lt - t[(int)y[i]];
            }
        }
        toks += (int64_t)B * T;
    }
    if (toks > 0) {
        r.loss = sum / toks;
        r.ppl = exp(r.loss);
        r.tokens = toks;
        if (with_teacher) {
            r.with_teacher = 1;
            r.t_loss = tsum / toks;
            r.agree = agree / toks;
            r.kl = kl / toks;
        }
    }
    return r;
}

/* ---------------------------------------------------------------- train */

/* fills a batch from fixed windows (and a cached teacher's top-k) */
static void fill_windows(kd_lm *lm, const kd_lm_windows *w, kd_rng *rng, int B) {
    int T = lm->seq, k = lm->cache_k;
    for (int b = 0; b < B; b++) {
        int64_t i = (int64_t)(kd_rng_u64(rng) % (uint64_t)w->n);
        const uint16_t *tok = w->tokens + i * (T + 1);
        float *x = lm->x->val.data + (size_t)b * T, *y = lm->y->val.data + (size_t)b * T;
        for (int t = 0; t < T; t++) {
            x[t] = tok[t];
            y[t] = tok[t + 1];
        }
        if (k > 0) {
            const uint16_t *ids = w->ids + i * T * k, *lp = w->logp + i * T * k;
            float *di = lm->t_ids->val.data + (size_t)b * T * k, *dl = lm->t_logp->val.data + (size_t)b * T * k;
            for (int j = 0; j < T * k; j++) {
                di[j] = ids[j];
                dl[j] = kd_f16_to_f32(lp[j]);
            }
        }
    }
}

void kd_lm_onpolicy_batch(kd_lm *lm, kd_gpt_runner *run, const kd_text_data *d, const kd_lm_train_opts *o,
                          kd_rng *rng, int B, int *prompt, int *gen) {
    int T = lm->seq, P = o->prompt, n_new = T + 1 - P;
    kd_text_batch(d, 0, rng, B, T, lm->x->val.data, lm->y->val.data);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < P; t++) prompt[b * P + t] = (int)lm->x->val.data[(size_t)b * T + t];
    kd_gpt_runner_reset(run);
    kd_status st = kd_gpt_generate(run, B, prompt, P, n_new, &o->sample, rng, gen);
    KD_ASSERT(st == KD_OK, "generation within the context failed: %s", kd_error_message());
    for (int b = 0; b < B; b++) {
        float *x = lm->x->val.data + (size_t)b * T, *y = lm->y->val.data + (size_t)b * T;
        float *m = lm->mask->val.data + (size_t)b * T;
        for (int t = P; t < T; t++) x[t] = (float)gen[b * n_new + t - P];
        for (int t = 0; t < T; t++) {
            y[t] = -1.0f;
            m[t] = t >= P - 1 ? 1.0f : 0.0f;
        }
    }
}

kd_status kd_lm_train(kd_lm *lm, const kd_text_data *d, const kd_lm_train_opts *o, kd_log *log,
                      kd_lm_train_result *res) {
    memset(res, 0, sizeof *res);
    KD_ASSERT(o->batch <= kd_graph_max_batch(lm->g), "batch %d above the graph's %d", o->batch,
              kd_graph_max_batch(lm->g));
    int T = lm->seq, B = o->batch;
    kd_optim_cfg oc = o->opt;
    oc.warmup_steps = o->warmup_steps;
    kd_optim *opt = kd_optim_new(&oc, kd_graph_param_count(lm->g));
    float *p = kd_graph_param_data(lm->g), *gr = kd_graph_param_grad(lm->g);
    kd_rng rng, prng;
    kd_rng_seed(&rng, o->seed ^ 0x1e7a11ull);
    kd_rng_seed(&prng, o->seed ^ 0x9017c1ull);
    kd_gpt_runner *run = NULL;
    int *prompt = NULL, *gen = NULL;
    kd_lm_view view = {lm->g, &lm->m};
    kd_status st = KD_OK;
    if (o->onpolicy > 0.0f) {
        kd_gpt_cfg cfg;
        st = kd_gpt_cfg_parse(lm->m.spec, lm->vocab, &cfg);
        if (st == KD_OK) st = kd_gpt_runner_new(&run, &cfg, kd_lm_lookup, &view, B);
        prompt = kd_malloc((size_t)B * (o->prompt + 1) * sizeof *prompt);
        gen = kd_malloc((size_t)B * (T + 2) * sizeof *gen);
    }
    double t0 = kd_now(), tgen = 0.0, win = 0.0, run_loss = 0.0;
    int wsteps = 0;
    int64_t step = 0, tokens = 0;
    for (step = 0; step < o->steps && st == KD_OK; step++) {
        int onp = run && kd_rng_uniform(&prng) < o->onpolicy;
        if (onp) {
            double tg = kd_now();
            kd_lm_onpolicy_batch(lm, run, d, o, &rng, B, prompt, gen);
            tgen += kd_now() - tg;
            res->onpolicy_batches++;
        } else {
            if (o->windows)
                fill_windows(lm, o->windows, &rng, B);
            else
                kd_text_batch(d, 0, &rng, B, T, lm->x->val.data, lm->y->val.data);
            fill_ones(lm->mask->val.data, (int64_t)B * T);
        }
        kd_graph_set_batch(lm->g, B);
        kd_graph_set_step(lm->g, (uint64_t)step);
        kd_graph_forward(lm->g, 1);
        float loss = lm->loss->val.data[0];
        if (!isfinite(loss)) {
            kd_node *badn = kd_graph_forward_check(lm->g, 1, lm->loss);
            st = kd_errorf(KD_ENUMERIC,
                           "%s: loss is %g at step %lld; first non-finite tensor: '%s' (try a lower [train] lr or "
                           "set [train] clip)",
                           o->role, (double)loss, (long long)step + 1, badn ? badn->name : "?");
            break;
        }
        kd_graph_backward(lm->g, lm->loss);
        if (oc.clip > 0.0f) kd_clip_grad_norm(gr, kd_graph_param_count(lm->g), oc.clip);
        float lr = kd_schedule_lr(&oc, step, o->steps, o->steps);
        kd_optim_step(opt, p, gr, lr);
        tokens += (int64_t)B * T;
        win += loss;
        wsteps++;
        run_loss = run_loss == 0.0 ? loss : 0.98 * run_loss + 0.02 * loss;
        int64_t done = step + 1;
        if (log->metrics && o->log_every > 0 && done % o->log_every == 0) {
            fprintf(log->metrics, "{\"role\":\"%s\",\"step\":%lld,\"loss\":%.6g,\"lr\":%.6g", o->role,
                    (long long)done, win / wsteps, (double)lr);
            for (int i = 0; i < lm->terms.n; i++)
                fprintf(log->metrics, ",\"%d.%s\":%.6g", i + 1, lm->terms.terms[i].name,
                        (double)lm->terms.terms[i].value->val.data[0]);
            for (int i = 0; i < lm->t_terms.n; i++) /* OKD: the teacher side */
                fprintf(log->metrics, ",\"t.%d.%s\":%.6g", i + 1, lm->t_terms.terms[i].name,
                        (double)lm->t_terms.terms[i].value->val.data[0]);
            fputs("}\n", log->metrics);
            win = 0.0;
            wsteps = 0;
        }
        double el = kd_now() - t0;
        double tps = tokens / (el > 1e-9 ? el : 1e-9);
        if (log->tty && !log->quiet && (done % 5 == 0 || done == o->steps))
            kd_progress(log, o->role, 1, 1, (int)done, (int)o->steps, run_loss, tps,
                        (double)(o->steps - done) * B * T / (tps > 0 ? tps : 1));
        if ((o->eval_every > 0 && done % o->eval_every == 0) || done == o->steps) {
            double te = kd_now();
            kd_lm_eval_result ev = kd_lm_evaluate(lm, d, 1, B, o->eval_windows, 0);
            t0 += kd_now() - te; /* evaluation is not training time */
            res->val = ev;
            if (log->metrics) {
                fprintf(log->metrics, "{\"role\":\"%s\",\"step\":%lld,\"train_loss\":%.6g,\"val_loss\":%.6g,"
                                      "\"val_ppl\":%.6g}\n",
                        o->role, (long long)done, run_loss, ev.loss, ev.ppl);
                fflush(log->metrics);
            }
            if (!log->quiet) {
                if (log->tty) fprintf(stderr, "\r\033[K");
                fprintf(stderr, "%s step %lld/%lld: train loss %.4f, val loss %.4f, val ppl %.3f (%.0f tokens/s)\n",
                        o->role, (long long)done, (long long)o->steps, run_loss, ev.loss, ev.ppl, tps);
            }
        }
    }
    res->train_seconds = kd_now() - t0;
    res->tokens_per_s = tokens / (res->train_seconds > 1e-9 ? res->train_seconds : 1e-9);
    res->final_loss = run_loss;
    res->gen_seconds = tgen;
    kd_gpt_runner_free(run);
    free(prompt);
    free(gen);
    kd_optim_free(opt);
    return st;
}

/* ---------------------------------------------------------------- checkpoints */

kd_status kd_lm_save(const kd_graph *g, const kd_model *m, int vocab, const char *tokenizer_json, const char *path) {
    kd_st_writer *w = kd_st_writer_new();
    size_t pl = strlen(m->prefix);
    for (int i = 0; i < kd_graph_n_state(g); i++) {
        kd_node *n = kd_graph_state(g, i);
        if (strncmp(n->name, m->prefix, pl) != 0) continue;
        kd_st_add_f32(w, n->name + pl, n->val.ndim, n->val.shape, n->val.data);
    }
    char buf[32];
    kd_st_set_meta(w, "format", "distill/1");
    kd_st_set_meta(w, "model", m->spec);
    snprintf(buf, sizeof buf, "%d", vocab);
    kd_st_set_meta(w, "vocab", buf);
    if (tokenizer_json) kd_st_set_meta(w, "tokenizer", tokenizer_json);
    kd_status st = kd_st_write(w, path);
    kd_st_writer_free(w);
    return st;
}

kd_status kd_lm_load(kd_graph *g, const kd_model *m, const char *path) { return kd_checkpoint_load(g, m, path); }

/* ---------------------------------------------------------------- samples */

kd_status kd_lm_sample_windows(kd_gpt_runner *r, const kd_text_data *d, int64_t n, int seq, int prompt, int batch,
                               const kd_sample_opts *so, uint64_t seed, uint16_t *out) {
    if (prompt < 1 || prompt > seq) return kd_errorf(KD_ECONFIG, "prompt length %d must be in [1, %d]", prompt, seq);
    kd_rng rng;
    kd_rng_seed(&rng, seed ^ 0x5e9c0ull);
    int n_new = seq + 1 - prompt;
    float *x = kd_malloc((size_t)batch * seq * sizeof *x), *y = kd_malloc((size_t)batch * seq * sizeof *y);
    int *pr = kd_malloc((size_t)batch * prompt * sizeof *pr), *gen = kd_malloc((size_t)batch * n_new * sizeof *gen);
    kd_status st = KD_OK;
    for (int64_t i0 = 0; i0 < n && st == KD_OK; i0 += batch) {
        int B = (int)(n - i0 < batch ? n - i0 : batch);
        kd_text_batch(d, 0, &rng, B, seq, x, y);
        for (int b = 0; b < B; b++)
            for (int t = 0; t < prompt; t++) pr[b * prompt + t] = (int)x[(size_t)b * seq + t];
        kd_gpt_runner_reset(r);
        st = kd_gpt_generate(r, B, pr, prompt, n_new, so, &rng, gen);
        for (int b = 0; b < B && st == KD_OK; b++) {
            uint16_t *o = out + (i0 + b) * (seq + 1);
            for (int t = 0; t < prompt; t++) o[t] = (uint16_t)pr[b * prompt + t];
            for (int t = 0; t < n_new; t++) o[prompt + t] = (uint16_t)gen[b * n_new + t];
        }
    }
    free(x);
    free(y);
    free(pr);
    free(gen);
    return st;
}
