/* run_llmr.c - the distilled language-model student's extras in `distill
 * run` (called by run_lm.c for the "student" stage): a warm start from a
 * checkpoint ([lm] init), LLMR's REINFORCE steps after the token-level KD
 * steps ([lm] llmr, llmr_gamma, llmr_baseline; docs/losses/llmr.md), and
 * the teacher's NLL of the student's own samples ([lm] sample_eval), a
 * sample-quality measure written to metrics.jsonl.
 */
#include <string.h>

#include "cli/cli.h"
#include "kd_config.h"
#include "kd_llmr.h"

kd_status cli_lm_student_train(const struct kd_config *c, struct kd_lm *lm, const struct kd_text_data *d,
                               const struct kd_lm_train_opts *o, struct kd_log *log,
                               struct kd_lm_train_result *res) {
    kd_status st = KD_OK;
    const char *init = kd_config_str(c, "lm", "init");
    if (*init) {
        st = kd_lm_load(lm->g, &lm->m, init);
        if (st != KD_OK) return kd_config_error(c, "lm", "init", "%s", kd_error_message());
        kd_log_info(log, "student starts from %s", init);
    }
    int n = kd_config_int(c, "lm", "llmr");
    kd_llmr_opts lo = {.steps = n, .gamma = (float)kd_config_float(c, "lm", "llmr_gamma")};
    const char *bl = kd_config_str(c, "lm", "llmr_baseline");
    if (n < 0 || n > o->steps)
        return kd_config_error(c, "lm", "llmr", "must be in [0, %lld] (the last N of [lm] steps)", (long long)o->steps);
    if (!(lo.gamma >= 0.0f && lo.gamma <= 1.0f)) return kd_config_error(c, "lm", "llmr_gamma", "must be in [0, 1]");
    if (strcmp(bl, "batch") == 0)
        lo.baseline = KD_PG_BASELINE_BATCH;
    else if (strcmp(bl, "none") == 0)
        lo.baseline = KD_PG_BASELINE_NONE;
    else
        return kd_config_error(c, "lm", "llmr_baseline", "expected batch or none, got '%s'", bl);
    int ns = kd_config_int(c, "lm", "sample_eval");
    if (ns < 0) return kd_config_error(c, "lm", "sample_eval", "must be >= 0");
    if ((n > 0 || ns > 0) && (lm->n_teachers != 1 || !lm->t_mix))
        return kd_config_error(c, "lm", n > 0 ? "llmr" : "sample_eval",
                               "needs one online teacher in the graph: a [distill] loss that reads it (e.g. "
                               "ce(weight=0.5) + fkl(weight=0.5), the warm start), no [teacher] cache");
    if (n > 0 && (o->prompt < 1 || o->prompt > lm->seq - 2))
        return kd_config_error(c, "lm", "prompt", "must be in [1, %d] for LLMR", lm->seq - 2);
    if (ns > 0 && (o->prompt < 1 || o->prompt > lm->seq - 1))
        return kd_config_error(c, "lm", "prompt", "must be in [1, %d] for sample_eval", lm->seq - 1);
    if (n == 0) {
        st = kd_lm_train(lm, d, o, log, res);
    } else {
        kd_lm_train_result warm;
        memset(&warm, 0, sizeof warm);
        if (o->steps > n) { /* the token-level KD warm start */
            kd_lm_train_opts ko = *o;
            ko.steps = o->steps - n;
            st = kd_lm_train(lm, d, &ko, log, &warm);
        }
        if (st == KD_OK) {
            kd_log_info(log, "%s: %d LLMR steps (gamma %g, baseline %s)", o->role, n, (double)lo.gamma, bl);
            st = kd_llmr_train(lm, d, o, &lo, log, res);
        }
        res->train_seconds += warm.train_seconds;
    }
    if (st == KD_OK && ns > 0) {
        kd_llmr_sample_eval se;
        st = kd_llmr_sample_eval_run(lm, d, ns, o->prompt, &o->sample, o->seed, &se);
        if (st != KD_OK) return kd_config_error(c, "lm", "sample_eval", "%s", kd_error_message());
        if (log->metrics) {
            fprintf(log->metrics,
                    "{\"role\":\"%s\",\"step\":%lld,\"sample_t_nll\":%.6g,\"sample_s_nll\":%.6g,\"sample_tokens\":%lld}\n",
                    o->role, (long long)o->steps, se.t_nll, se.s_nll, (long long)se.tokens);
            fflush(log->metrics);
        }
        kd_log_info(log, "%s: teacher NLL of %d student samples %.4f nats/token (student's own %.4f, %lld tokens)",
                    o->role, ns, se.t_nll, se.s_nll, (long long)se.tokens);
    }
    return st;
}
