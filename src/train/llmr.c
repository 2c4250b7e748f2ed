/* llmr.c - LLMR training (Li, Hao & Mou 2024; include/kd_llmr.h,
 * docs/losses/llmr.md): REINFORCE steps on the student's own samples with a
 * per-token reward induced from the teacher's logits, after a token-level
 * KD warm start (kd_lm_train, or a checkpoint), and the sample-quality
 * measure both are compared on: the teacher's NLL of student samples.
 *
 * The REINFORCE graph is a second graph beside the caller's kd_lm: inputs
 * x, y, mask (B,T); the student ("s.") and its CE (so kd_lm_evaluate works
 * on it); the frozen teacher ("t."); the advantages from the teacher's
 * logits and the actions; the weighted NLL. One forward runs the teacher
 * and the student once each. y holds the actions: the sampled token that
 * follows each position P-1 .. T-2 (P the prompt length), -1 elsewhere.
 * The student's weights are copied in at the start and back at the end;
 * the sampler (a KV-cache runner) reads the REINFORCE graph's live weights.
 *
 * Not here: the ops (src/distill/pg.c), the config glue (src/cli/run_llmr.c).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kd_llmr.h"

/* copies every state tensor whose name starts with prefix from one graph
 * to the same-named tensor of the other */
static kd_status copy_state(kd_graph *to, const kd_graph *from, const char *prefix) {
    size_t pl = strlen(prefix);
    for (int i = 0; i < kd_graph_n_state(from); i++) {
        kd_node *a = kd_graph_state(from, i);
        if (strncmp(a->name, prefix, pl) != 0) continue;
        kd_node *b = kd_graph_find(to, a->name);
        if (!b || kd_numel(&b->val) != kd_numel(&a->val))
            return kd_errorf(KD_EFORMAT, "LLMR graph: tensor '%s' missing or of another size", a->name);
        memcpy(b->val.data, a->val.data, (size_t)kd_numel(&a->val) * sizeof(float));
    }
    return KD_OK;
}

typedef struct llmr_graph {
    kd_lm lm; /* the student, teacher, inputs; lm.loss is the surrogate */
    kd_node *adv;
} llmr_graph;

static kd_status build(llmr_graph *L, const kd_lm *src, int B, const kd_llmr_opts *lo, uint64_t seed) {
    memset(L, 0, sizeof *L);
    kd_lm *lm = &L->lm;
    lm->seq = src->seq;
    lm->vocab = src->vocab;
    lm->g = kd_graph_new();
    int xs[2] = {B, src->seq};
    lm->x = kd_input(lm->g, "x", 2, xs);
    lm->y = kd_input(lm->g, "y", 2, xs);
    lm->mask = kd_input(lm->g, "mask", 2, xs);
    kd_status st = kd_model_build(lm->g, src->m.spec, "s.", lm->x, src->vocab, &lm->m);
    if (st == KD_OK) {
        lm->ce = kd_cross_entropy(lm->g, lm->m.logits, lm->y, 0.0f);
        kd_node_set_name(lm->ce, "s.ce");
        lm->ce->flags |= KD_F_KEEP;
        kd_graph_set_frozen(lm->g, 1);
        st = kd_model_build(lm->g, src->teachers[0].spec, "t.", lm->x, src->vocab, &lm->teachers[0]);
        kd_graph_set_frozen(lm->g, 0);
    }
    if (st == KD_OK) {
        lm->n_teachers = 1;
        lm->t_mix = lm->teachers[0].logits;
        lm->t_mix->flags |= KD_F_KEEP;
        L->adv = kd_pg_advantage(lm->g, lm->t_mix, lm->y, lo->gamma, lo->baseline);
        kd_node_set_name(L->adv, "llmr.advantage");
        L->adv->flags |= KD_F_KEEP;
        lm->loss = kd_pg_nll(lm->g, lm->m.logits, lm->y, L->adv);
        kd_node_set_name(lm->loss, "loss");
        st = kd_graph_compile(lm->g, B, seed);
    }
    if (st == KD_OK) st = copy_state(lm->g, src->g, "s.");
    if (st == KD_OK) st = copy_state(lm->g, src->g, "t.");
    if (st != KD_OK) {
        kd_graph_free(lm->g);
        lm->g = NULL;
    }
    return st;
}

/* actions: the token after each position P-1 .. T-2, -1 elsewhere */
static void set_actions(kd_lm *lm, int B, int P) {
    int T = lm->seq;
    for (int b = 0; b < B; b++) {
        const float *x = lm->x->val.data + (size_t)b * T;
        float *y = lm->y->val.data + (size_t)b * T;
        for (int t = 0; t < T; t++) y[t] = t >= P - 1 && t + 1 < T ? x[t + 1] : -1.0f;
    }
}

/* the mean over actions of the induced reward (from the advantage op's
 * workspace) and of the teacher's NLL of the action */
static void step_stats(const llmr_graph *L, int B, double *reward, double *t_nll) {
    const kd_lm *lm = &L->lm;
    int T = lm->seq, V = lm->vocab;
    const float *r = L->adv->ws, *y = lm->y->val.data, *q = lm->t_mix->val.data;
    double sr = 0.0, sn = 0.0;
    int64_t n = 0;
    for (int64_t i = 0; i < (int64_t)B * T; i++) {
        if (y[i] < 0.0f) continue;
        const float *qi = q + i * V;
        float m = qi[0];
        for (int v = 1; v < V; v++) m = qi[v] > m ? qi[v] : m;
        double s = 0.0;
        for (int v = 0; v < V; v++) s += exp((double)qi[v] - m);
        sn += m + log(s) - qi[(int)y[i]];
        sr += r[i];
        n++;
    }
    *reward = n ? sr / n : 0.0;
    *t_nll = n ? sn / n : 0.0;
}

kd_status kd_llmr_train(kd_lm *lm, const kd_text_data *d, const kd_lm_train_opts *o, const kd_llmr_opts *lo,
                        kd_log *log, kd_lm_train_result *res) {
    memset(res, 0, sizeof *res);
    if (lm->n_teachers != 1 || !lm->t_mix)
        return kd_errorf(KD_ECONFIG, "LLMR needs exactly one online teacher in the graph (not a cache or an ensemble)");
    int T = lm->seq, B = o->batch, P = o->prompt;
    if (P < 1 || P > T - 2)
        return kd_errorf(KD_ECONFIG, "LLMR: prompt length %d must be in [1, %d] (windows of %d)", P, T - 2, T);
    if (!(lo->gamma >= 0.0f && lo->gamma <= 1.0f))
        return kd_errorf(KD_ECONFIG, "LLMR: gamma=%g must be in [0, 1]", (double)lo->gamma);
    kd_status st = kd_sample_opts_check(&o->sample);
    if (st != KD_OK) return st;
    llmr_graph L;
    st = build(&L, lm, B, lo, o->seed ^ 0x11a3ull);
    if (st != KD_OK) return st;
    kd_lm *g = &L.lm;
    kd_optim_cfg oc = o->opt;
    oc.warmup_steps = o->warmup_steps;
    size_t np = kd_graph_param_count(g->g);
    kd_optim *opt = kd_optim_new(&oc, np);
    float *p = kd_graph_param_data(g->g), *gr = kd_graph_param_grad(g->g);
    kd_gpt_cfg cfg;
    kd_gpt_runner *run = NULL;
    kd_lm_view view = {g->g, &g->m};
    st = kd_gpt_cfg_parse(g->m.spec, g->vocab, &cfg);
    if (st == KD_OK) st = kd_gpt_runner_new(&run, &cfg, kd_lm_lookup, &view, B);
    int *prompt = kd_malloc((size_t)B * (P + 1) * sizeof *prompt);
    int *gen = kd_malloc((size_t)B * (T + 2) * sizeof *gen);
    kd_rng rng;
    kd_rng_seed(&rng, o->seed ^ 0x77e1a5ull);
    double t0 = kd_now(), tgen = 0.0, win = 0.0, run_loss = 0.0;
    int wsteps = 0;
    int64_t tokens = 0;
    for (int64_t step = 0; step < lo->steps && st == KD_OK; step++) {
        double tg = kd_now();
        kd_lm_onpolicy_batch(g, run, d, o, &rng, B, prompt, gen);
        tgen += kd_now() - tg;
        set_actions(g, B, P);
        kd_graph_set_batch(g->g, B);
        kd_graph_set_step(g->g, (uint64_t)step);
        kd_graph_forward(g->g, 1);
        float loss = g->loss->val.data[0];
        if (!isfinite(loss)) {
            kd_node *bad = kd_graph_forward_check(g->g, 1, g->loss);
            st = kd_errorf(KD_ENUMERIC, "%s: LLMR loss is %g at step %lld; first non-finite tensor: '%s' (try a lower "
                           "[train] lr or set [train] clip)",
                           o->role, (double)loss, (long long)step + 1, bad ? bad->name : "?");
            break;
        }
        int64_t done = step + 1;
        int logging = log->metrics && o->log_every > 0 && done % o->log_every == 0;
        double reward = 0.0, t_nll = 0.0;
        if (logging) step_stats(&L, B, &reward, &t_nll); /* before backward: values are shared after it */
        kd_graph_backward(g->g, g->loss);
        if (oc.clip > 0.0f) kd_clip_grad_norm(gr, np, oc.clip);
        float lr = kd_schedule_lr(&oc, step, lo->steps, lo->steps);
        kd_optim_step(opt, p, gr, lr);
        tokens += (int64_t)B * T;
        win += loss;
        wsteps++;
        run_loss = step == 0 ? loss : 0.98 * run_loss + 0.02 * loss;
        if (logging) {
            fprintf(log->metrics,
                    "{\"role\":\"%s\",\"phase\":\"llmr\",\"step\":%lld,\"loss\":%.6g,\"lr\":%.6g,\"reward\":%.6g,"
                    "\"t_nll\":%.6g}\n",
                    o->role, (long long)done, win / wsteps, (double)lr, reward, t_nll);
            win = 0.0;
            wsteps = 0;
        }
        double el = kd_now() - t0;
        double tps = tokens / (el > 1e-9 ? el : 1e-9);
        if (log->tty && !log->quiet && (done % 5 == 0 || done == lo->steps))
            kd_progress(log, o->role, 1, 1, (int)done, (int)lo->steps, run_loss, tps,
                        (double)(lo->steps - done) * B * T / (tps > 0 ? tps : 1));
        if ((o->eval_every > 0 && done % o->eval_every == 0) || done == lo->steps) {
            double te = kd_now();
            kd_lm_eval_result ev = kd_lm_evaluate(g, d, 1, B, o->eval_windows, 0);
            t0 += kd_now() - te;
            res->val = ev;
            if (log->metrics) {
                fprintf(log->metrics,
                        "{\"role\":\"%s\",\"phase\":\"llmr\",\"step\":%lld,\"train_loss\":%.6g,\"val_loss\":%.6g,"
                        "\"val_ppl\":%.6g}\n",
                        o->role, (long long)done, run_loss, ev.loss, ev.ppl);
                fflush(log->metrics);
            }
            if (!log->quiet) {
                if (log->tty) fprintf(stderr, "\r\033[K");
                fprintf(stderr, "%s LLMR step %lld/%lld: surrogate loss %.4f, val loss %.4f, val ppl %.3f\n", o->role,
                        (long long)done, (long long)lo->steps, run_loss, ev.loss, ev.ppl);
            }
        }
    }
    res->train_seconds = kd_now() - t0;
    res->tokens_per_s = tokens / (res->train_seconds > 1e-9 ? res->train_seconds : 1e-9);
    res->final_loss = run_loss;
    res->gen_seconds = tgen;
    res->onpolicy_batches = lo->steps;
    if (st == KD_OK) st = copy_state(lm->g, g->g, "s.");
    kd_gpt_runner_free(run);
    free(prompt);
    free(gen);
    kd_optim_free(opt);
    kd_graph_free(g->g);
    return st;
}

/* ---------------------------------------------------------------- sample quality */

kd_status kd_llmr_sample_eval_run(kd_lm *lm, const kd_text_data *d, int n, int prompt, const kd_sample_opts *so,
                                  uint64_t seed, kd_llmr_sample_eval *out) {
    memset(out, 0, sizeof *out);
    int T = lm->seq, V = lm->vocab, P = prompt;
    if (!lm->t_mix) return kd_errorf(KD_ECONFIG, "the teacher's NLL of student samples needs a teacher in the graph");
    if (P < 1 || P > T - 1) return kd_errorf(KD_ECONFIG, "prompt length %d must be in [1, %d]", P, T - 1);
    int64_t avail = (int64_t)kd_text_n_windows(d, 1, T);
    if (n < 1 || n > avail)
        return kd_errorf(KD_ECONFIG, "%d sample windows asked for; the validation split holds %lld", n,
                         (long long)avail);
    kd_status st = kd_sample_opts_check(so);
    if (st != KD_OK) return st;
    int Bmax = kd_graph_max_batch(lm->g), n_new = T - P;
    kd_gpt_cfg cfg;
    kd_gpt_runner *run = NULL;
    kd_lm_view view = {lm->g, &lm->m};
    st = kd_gpt_cfg_parse(lm->m.spec, V, &cfg);
    if (st == KD_OK) st = kd_gpt_runner_new(&run, &cfg, kd_lm_lookup, &view, Bmax);
    if (st != KD_OK) return st;
    int *pr = kd_malloc((size_t)Bmax * P * sizeof *pr), *gen = kd_malloc((size_t)Bmax * n_new * sizeof *gen);
    kd_rng rng;
    kd_rng_seed(&rng, seed ^ 0x5a3b1eull);
    double tn = 0.0, sn = 0.0;
    int64_t cnt = 0;
    for (int w0 = 0; w0 < n && st == KD_OK; w0 += Bmax) {
        int B = n - w0 < Bmax ? n - w0 : Bmax;
        for (int b = 0; b < B; b++) {
            float *x = lm->x->val.data + (size_t)b * T;
            kd_text_window(d, 1, (size_t)(w0 + b), T, x, lm->y->val.data + (size_t)b * T);
            for (int t = 0; t < P; t++) pr[b * P + t] = (int)x[t];
        }
        st = kd_gpt_generate(run, B, pr, P, n_new, so, &rng, gen);
        if (st != KD_OK) break;
        for (int b = 0; b < B; b++) {
            float *x = lm->x->val.data + (size_t)b * T, *y = lm->y->val.data + (size_t)b * T;
            float *m = lm->mask->val.data + (size_t)b * T;
            for (int t = P; t < T; t++) x[t] = (float)gen[b * n_new + t - P];
            for (int t = 0; t < T; t++) {
                y[t] = t + 1 < T ? x[t + 1] : -1.0f;
                m[t] = 1.0f;
            }
        }
        kd_graph_set_batch(lm->g, B);
        kd_graph_forward_to(lm->g, 0, lm->t_mix);
        const float *zs = lm->m.logits->val.data, *zt = lm->t_mix->val.data;
        for (int b = 0; b < B; b++)
            for (int t = P - 1; t < T - 1; t++) {
                size_t i = (size_t)b * T + t;
                int a = (int)lm->x->val.data[i + 1];
                const float *s = zs + i * V, *q = zt + i * V;
                float ms = s[0], mq = q[0];
                for (int v = 1; v < V; v++) {
                    ms = s[v] > ms ? s[v] : ms;
                    mq = q[v] > mq ? q[v] : mq;
                }
                double ss = 0.0, sq = 0.0;
                for (int v = 0; v < V; v++) {
                    ss += exp((double)s[v] - ms);
                    sq += exp((double)q[v] - mq);
                }
                sn += ms + log(ss) - s[a];
                tn += mq + log(sq) - q[a];
                cnt++;
            }
    }
    if (st == KD_OK && cnt > 0) {
        out->t_nll = tn / cnt;
        out->s_nll = sn / cnt;
        out->tokens = cnt;
    }
    kd_gpt_runner_free(run);
    free(pr);
    free(gen);
    return st;
}
