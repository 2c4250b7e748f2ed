/* run_lm.c - `distill run` for language models (a [data] train of "text..."):
 * train or load the GPT teacher, train the baseline student with next-token
 * cross-entropy, distil the student (online teacher, top-k cache,
 * sequence-level KD on teacher samples, on-policy student samples), and
 * report validation loss, perplexity and teacher-student agreement.
 * Writes config.ini, metrics.jsonl, *.safetensors and summary.json like a
 * classifier run. docs/lm.md is the guide.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/run_progress.h"
#include "kd_config.h"
#include "kd_lm.h"
#include "kd_report.h"

typedef struct lm_stage {
    char role[32], spec[256];
    int64_t params;
    int ran, loaded;
    int64_t adapter_params; /* LoRA student or OKD teacher adapters */
    kd_lm_train_result tr;
    kd_lm_eval_result val; /* final, with agreement when a teacher ran */
} lm_stage;

typedef struct lm_run {
    const kd_config *cfg;
    const char *dir;
    kd_log *log;
    kd_text_data data;
    kd_tokenizer tok;
    int bpe;
    char *tok_json;
    int seq, batch;
    kd_lm_train_opts base;
    const char *lora_base; /* [lm] lora_base: the LoRA student's base weights */
} lm_run;

/* [train] and [lm] keys into training options */
static kd_status lm_opts(const kd_config *c, kd_lm_train_opts *o) {
    memset(o, 0, sizeof *o);
    o->steps = kd_config_int(c, "lm", "steps");
    if (o->steps < 1) return kd_config_error(c, "lm", "steps", "must be at least 1");
    o->batch = kd_config_int(c, "train", "batch");
    if (o->batch < 1 || o->batch > 4096) return kd_config_error(c, "train", "batch", "must be in [1, 4096]");
    o->seed = (uint64_t)kd_config_int(c, "run", "seed");
    kd_optim_cfg *oc = &o->opt;
    const char *opt = kd_config_str(c, "train", "optimizer");
    oc->kind = strcmp(opt, "adamw") == 0 ? KD_OPTIM_ADAMW : KD_OPTIM_SGD;
    if (strcmp(opt, "adamw") != 0 && strcmp(opt, "sgd") != 0)
        return kd_config_error(c, "train", "optimizer", "expected sgd or adamw");
    oc->lr = (float)kd_config_float(c, "train", "lr");
    if (!(oc->lr > 0.0f)) return kd_config_error(c, "train", "lr", "must be positive");
    oc->momentum = (float)kd_config_float(c, "train", "momentum");
    oc->nesterov = kd_config_int(c, "train", "nesterov") && oc->momentum > 0.0f;
    oc->weight_decay = (float)kd_config_float(c, "train", "weight_decay");
    oc->beta1 = (float)kd_config_float(c, "train", "beta1");
    oc->beta2 = (float)kd_config_float(c, "train", "beta2");
    oc->eps = (float)kd_config_float(c, "train", "eps");
    const char *s = kd_config_str(c, "train", "schedule");
    oc->sched = strcmp(s, "cosine") == 0 ? KD_SCHED_COSINE : KD_SCHED_CONSTANT;
    if (strcmp(s, "cosine") != 0 && strcmp(s, "constant") != 0)
        return kd_config_error(c, "train", "schedule", "language models use constant or cosine");
    oc->min_lr = (float)kd_config_float(c, "train", "min_lr");
    oc->step_epochs = 1;
    oc->gamma = 1.0f;
    oc->clip = (float)kd_config_float(c, "train", "clip");
    if (oc->clip < 0.0f) return kd_config_error(c, "train", "clip", "must be >= 0");
    o->warmup_steps = kd_config_int(c, "lm", "warmup");
    if (o->warmup_steps < 0) return kd_config_error(c, "lm", "warmup", "must be >= 0");
    o->log_every = kd_config_int(c, "train", "log_every");
    o->eval_every = kd_config_int(c, "lm", "eval_every");
    if (o->eval_every < 1) return kd_config_error(c, "lm", "eval_every", "must be at least 1");
    o->eval_windows = kd_config_int(c, "lm", "eval_windows");
    if (o->eval_windows < 0) return kd_config_error(c, "lm", "eval_windows", "must be >= 0");
    o->onpolicy = (float)kd_config_float(c, "lm", "onpolicy");
    if (o->onpolicy < 0.0f || o->onpolicy > 1.0f) return kd_config_error(c, "lm", "onpolicy", "must be in [0, 1]");
    o->prompt = kd_config_int(c, "lm", "prompt");
    o->sample.temperature = (float)kd_config_float(c, "lm", "temperature");
    if (o->sample.temperature < 0.0f) return kd_config_error(c, "lm", "temperature", "must be >= 0 (0: greedy)");
    o->sample.top_k = kd_config_int(c, "lm", "top_k");
    if (o->sample.top_k < 0) return kd_config_error(c, "lm", "top_k", "must be >= 0");
    o->sample.top_p = (float)kd_config_float(c, "lm", "top_p");
    if (!(o->sample.top_p > 0.0f && o->sample.top_p <= 1.0f))
        return kd_config_error(c, "lm", "top_p", "must be in (0, 1]");
    return KD_OK;
}

/* trains one model with setup s (and teacher checkpoints), saves it to out */
static kd_status train_one(lm_run *r, const kd_lm_setup *s, const char *const *tckpts, const kd_lm_train_opts *o,
                           const char *out, lm_stage *stage) {
    kd_lm lm;
    kd_status st = kd_lm_new(&lm, s, o->seed + (uint64_t)(stage->role[0]));
    if (st != KD_OK) return st;
    for (int i = 0; i < lm.n_teachers && st == KD_OK; i++) st = kd_lm_load(lm.g, &lm.teachers[i], tckpts[i]);
    if (st == KD_OK && s->lora.r > 0) { /* LoRA: the frozen base comes from [lm] lora_base */
        st = kd_lm_load(lm.g, &lm.m, r->lora_base);
        if (st != KD_OK) st = kd_config_error(r->cfg, "lm", "lora_base", "%s", kd_error_message());
    }
    snprintf(stage->spec, sizeof stage->spec, "%s", s->student);
    stage->params = kd_model_params(lm.g, &lm.m);
    if (s->lora.r > 0) stage->adapter_params = kd_lora_params(lm.g, &lm.m);
    if (s->okd) stage->adapter_params = kd_lora_params(lm.g, &lm.teachers[0]);
    if (!r->log->quiet)
        fprintf(stderr, "distill: %s %s (%lld parameters), %lld steps of %d x %d tokens%s\n", stage->role, s->student,
                (long long)stage->params, (long long)o->steps, o->batch, r->seq,
                s->loss && *s->loss ? "" : ", cross-entropy");
    if (st == KD_OK) /* the distilled student's extras: [lm] init, llmr, sample_eval (run_llmr.c) */
        st = strcmp(stage->role, "student") == 0 ? cli_lm_student_train(r->cfg, &lm, &r->data, o, r->log, &stage->tr)
                                                 : kd_lm_train(&lm, &r->data, o, r->log, &stage->tr);
    if (st == KD_OK) {
        stage->ran = 1;
        /* the last evaluation of training, or a sweep with agreement and KL */
        stage->val = lm.n_teachers > 0 ? kd_lm_evaluate(&lm, &r->data, 1, o->batch, o->eval_windows, 1) : stage->tr.val;
        st = kd_lm_save(lm.g, &lm.m, r->data.vocab, r->tok_json, out);
    }
    char ap[4400];
    if (st == KD_OK && s->lora.r > 0) { /* the adapters next to the (base) student: NAME.lora.safetensors */
        snprintf(ap, sizeof ap, "%.*s.lora.safetensors", (int)(strlen(out) - (strstr(out, ".safetensors") ? 12 : 0)), out);
        st = kd_lora_save(lm.g, &lm.m, &s->lora, r->data.vocab, ap);
    }
    if (st == KD_OK && s->okd) {
        snprintf(ap, sizeof ap, "%s/teacher.lora.safetensors", r->dir);
        st = kd_lora_save(lm.g, &lm.teachers[0], &s->okd_lora, r->data.vocab, ap);
    }
    kd_lm_free(&lm);
    return st;
}

static kd_status eval_teacher(lm_run *r, const char *spec, const char *ckpt, lm_stage *stage) {
    kd_lm lm;
    kd_lm_setup s = {.student = spec, .vocab = r->data.vocab, .seq = r->seq, .max_batch = r->batch};
    kd_status st = kd_lm_new(&lm, &s, 0);
    if (st == KD_OK) st = kd_lm_load(lm.g, &lm.m, ckpt);
    if (st == KD_OK) {
        stage->params = kd_model_params(lm.g, &lm.m);
        stage->val = kd_lm_evaluate(&lm, &r->data, 1, r->batch, r->base.eval_windows, 0);
        stage->ran = stage->loaded = 1;
        snprintf(stage->spec, sizeof stage->spec, "%s", spec);
        if (!r->log->quiet)
            fprintf(stderr, "distill: teacher loaded from %s: val loss %.4f, ppl %.3f\n", ckpt, stage->val.loss,
                    stage->val.ppl);
        if (r->log->metrics)
            fprintf(r->log->metrics, "{\"role\":\"teacher\",\"step\":0,\"val_loss\":%.6g,\"val_ppl\":%.6g}\n",
                    stage->val.loss, stage->val.ppl);
    }
    if (lm.g) kd_lm_free(&lm);
    return st;
}

static void stage_json(cJSON *root, const lm_stage *s) {
    if (!s->ran) return;
    cJSON *t = cJSON_AddObjectToObject(root, s->role);
    cJSON_AddStringToObject(t, "model", s->spec);
    cJSON_AddNumberToObject(t, "params", (double)s->params);
    cJSON_AddNumberToObject(t, "val_loss", s->val.loss);
    cJSON_AddNumberToObject(t, "val_ppl", s->val.ppl);
    cJSON_AddNumberToObject(t, "val_tokens", (double)s->val.tokens);
    if (s->val.with_teacher) {
        cJSON_AddNumberToObject(t, "agreement", s->val.agree);
        cJSON_AddNumberToObject(t, "kl_teacher", s->val.kl);
    }
    if (s->adapter_params) { /* LoRA student: its adapters; OKD: the teacher's adapted loss */
        cJSON_AddNumberToObject(t, "adapter_params", (double)s->adapter_params);
        if (s->val.with_teacher) cJSON_AddNumberToObject(t, "teacher_val_loss", s->val.t_loss);
    }
    if (!s->loaded) {
        cJSON_AddNumberToObject(t, "train_seconds", s->tr.train_seconds);
        cJSON_AddNumberToObject(t, "tokens_per_second", s->tr.tokens_per_s);
        if (s->tr.onpolicy_batches) {
            cJSON_AddNumberToObject(t, "onpolicy_batches", (double)s->tr.onpolicy_batches);
            cJSON_AddNumberToObject(t, "generation_seconds", s->tr.gen_seconds);
        }
    }
    if (!strcmp(s->role, "teacher")) cJSON_AddBoolToObject(t, "loaded", s->loaded);
}

static kd_status write_summary(const char *dir, const lm_stage *st, int n, int threads, const char *loss,
                               double extra_seconds) {
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "task", "lm");
    for (int i = 0; i < n; i++) stage_json(root, &st[i]);
    if (loss) cJSON_AddStringToObject(root, "loss", loss);
    if (extra_seconds > 0) cJSON_AddNumberToObject(root, "seqkd_sampling_seconds", extra_seconds);
    cJSON_AddNumberToObject(root, "threads", threads);
    kd_report_add_machine(root);
    char path[4200];
    snprintf(path, sizeof path, "%s/summary.json", dir);
    kd_status s = run_write_json(path, root);
    cJSON_Delete(root);
    return s;
}

/* the GPT spec's context, checked against the data */
static kd_status model_ctx(const kd_config *c, const char *section, int vocab, int *ctx) {
    kd_gpt_cfg g;
    const char *spec = kd_config_str(c, section, "model");
    if (strncmp(spec, "gpt", 3) != 0)
        return kd_config_error(c, section, "model", "a text dataset needs a 'gpt: ...' model, got '%s'", spec);
    kd_status st = kd_gpt_cfg_parse(spec, vocab, &g);
    if (st != KD_OK) return kd_config_error(c, section, "model", "%s", kd_error_message());
    if (g.vocab != vocab)
        return kd_config_error(c, section, "model", "vocab=%d differs from the data's %d", g.vocab, vocab);
    *ctx = g.ctx;
    return KD_OK;
}

int cli_run_lm(const kd_config *cfg, const char *dir, int threads, kd_log *log) {
    lm_run r;
    memset(&r, 0, sizeof r);
    r.cfg = cfg;
    r.dir = dir;
    r.log = log;
    kd_status st = lm_opts(cfg, &r.base);
    r.batch = r.base.batch;
    const char *tokp = kd_config_str(cfg, "lm", "tokenizer");
    float vf = (float)kd_config_float(cfg, "lm", "val_frac");
    if (st == KD_OK && !(vf > 0.0f && vf <= 0.5f)) st = kd_config_error(cfg, "lm", "val_frac", "must be in (0, 0.5]");
    if (st == KD_OK && *tokp) {
        st = kd_tokenizer_load(&r.tok, tokp);
        if (st != KD_OK)
            st = kd_config_error(cfg, "lm", "tokenizer", "%s", kd_error_message());
        else {
            r.bpe = 1;
            r.tok_json = kd_tokenizer_to_json(&r.tok);
        }
    }
    if (st == KD_OK) st = kd_text_load(&r.data, kd_config_str(cfg, "data", "train"), r.bpe ? &r.tok : NULL, vf);
    const char *sspec = kd_config_str(cfg, "student", "model"), *tspec = kd_config_str(cfg, "teacher", "model");
    const char *cache_path = kd_config_str(cfg, "teacher", "cache"), *loss = kd_config_str(cfg, "distill", "loss");
    int ctx = 0, sctx = 0;
    if (st == KD_OK) st = model_ctx(cfg, "teacher", r.data.vocab, &ctx);
    if (st == KD_OK && *sspec) {
        st = model_ctx(cfg, "student", r.data.vocab, &sctx);
        if (sctx < ctx) ctx = sctx;
    }
    if (st == KD_OK) {
        r.seq = kd_config_int(cfg, "lm", "seq");
        if (r.seq == 0) r.seq = ctx;
        if (r.seq < 2 || r.seq > ctx)
            st = kd_config_error(cfg, "lm", "seq", "must be in [2, %d] (the models' context), got %d", ctx, r.seq);
    }
    if (st == KD_OK && (r.data.n_train < (size_t)r.seq + 1 || r.data.n_val < (size_t)r.seq + 1))
        st = kd_errorf(KD_ECONFIG, "%s: %zu training and %zu validation tokens: both need at least %d ([lm] seq + 1)",
                       r.data.name, r.data.n_train, r.data.n_val, r.seq + 1);
    if (st == KD_OK && (r.base.onpolicy > 0.0f || kd_config_int(cfg, "lm", "seqkd") > 0) &&
        (r.base.prompt < 1 || r.base.prompt >= r.seq))
        st = kd_config_error(cfg, "lm", "prompt", "must be in [1, %d)", r.seq);
    if (st == KD_OK && kd_config_int(cfg, "lm", "seqkd") < 0) st = kd_config_error(cfg, "lm", "seqkd", "must be >= 0");
    kd_lora_cfg slora, tlora;
    memset(&slora, 0, sizeof slora);
    memset(&tlora, 0, sizeof tlora);
    int okd = kd_config_int(cfg, "lm", "okd");
    if (st == KD_OK && kd_lora_cfg_parse(kd_config_str(cfg, "lm", "lora"), &slora) != KD_OK)
        st = kd_config_error(cfg, "lm", "lora", "%s", kd_error_message());
    if (st == KD_OK && okd && kd_lora_cfg_parse(kd_config_str(cfg, "lm", "okd_lora"), &tlora) != KD_OK)
        st = kd_config_error(cfg, "lm", "okd_lora", "%s", kd_error_message());
    if (st == KD_OK && okd && tlora.r < 1) st = kd_config_error(cfg, "lm", "okd_lora", "OKD needs r=N (N >= 1)");
    r.lora_base = kd_config_str(cfg, "lm", "lora_base");
    if (st == KD_OK && slora.r > 0 && !*r.lora_base)
        st = kd_config_error(cfg, "lm", "lora_base", "LoRA adapters need the student's base weights (a checkpoint)");
    if (st == KD_OK && slora.r > 0 && r.base.onpolicy > 0.0f)
        st = kd_config_error(cfg, "lm", "onpolicy", "on-policy sampling reads the student's base weights only: not "
                                                    "available with [lm] lora (merge the adapters first)");
    if (st == KD_OK && okd && *cache_path)
        st = kd_config_error(cfg, "lm", "okd", "OKD trains the teacher's adapters: it needs the teacher itself, not "
                                               "[teacher] cache");
    if (st == KD_OK && okd) {
        kd_loss_spec ls;
        if (kd_loss_spec_parse(kd_config_str(cfg, "lm", "okd_loss"), &ls) != KD_OK)
            st = kd_config_error(cfg, "lm", "okd_loss", "%s", kd_error_message());
    }
    if (st == KD_OK && *sspec) {
        kd_loss_spec ls;
        st = kd_loss_spec_parse(loss, &ls);
        if (st != KD_OK) st = kd_error_prefix(st, "[distill] loss");
    }
    if (st != KD_OK) goto done;
    if (!log->quiet)
        fprintf(stderr, "distill: %s: %zu train / %zu val tokens (vocab %d, %s), windows of %d\n", r.data.name,
                r.data.n_train, r.data.n_val, r.data.vocab, r.bpe ? "BPE" : "bytes", r.seq);

    lm_stage stages[4];
    memset(stages, 0, sizeof stages);
    int ns = 0;
    char tpath[4200], path[4200];
    snprintf(tpath, sizeof tpath, "%s/teacher.safetensors", dir);
    int cached = *sspec && *cache_path;
    const char *tck = kd_config_str(cfg, "teacher", "checkpoint");
    /* the teacher */
    lm_stage *ts = &stages[ns++];
    snprintf(ts->role, sizeof ts->role, "teacher");
    if (*tck && run_file_exists(tck)) {
        st = eval_teacher(&r, tspec, tck, ts);
        if (st == KD_OK) st = run_copy_file(tck, tpath);
    } else if (!cached) {
        kd_lm_setup s = {.student = tspec, .vocab = r.data.vocab, .seq = r.seq, .max_batch = r.batch};
        kd_lm_train_opts o = r.base;
        int tsteps = kd_config_int(cfg, "lm", "teacher_steps");
        if (tsteps < 0) st = kd_config_error(cfg, "lm", "teacher_steps", "must be >= 0");
        if (tsteps > 0) o.steps = tsteps;
        if (kd_config_float(cfg, "teacher", "lr") > 0) o.opt.lr = (float)kd_config_float(cfg, "teacher", "lr");
        o.onpolicy = 0.0f;
        o.role = "teacher";
        if (st == KD_OK) st = train_one(&r, &s, NULL, &o, tpath, ts);
        if (st == KD_OK && *tck) {
            char tdir[4200];
            snprintf(tdir, sizeof tdir, "%s", tck);
            char *slash = strrchr(tdir, '/');
            if (slash) {
                *slash = '\0';
                st = cli_mkdirs(tdir);
            }
            if (st == KD_OK) st = run_copy_file(tpath, tck);
        }
    } else {
        ns--; /* cached and no teacher checkpoint: nothing to report */
    }
    double seqkd_seconds = 0.0;
    if (st == KD_OK && *sspec) {
        const char *tfile = *tck && run_file_exists(tck) ? tck : tpath;
        if (kd_config_int(cfg, "distill", "baseline")) {
            lm_stage *bs = &stages[ns++];
            snprintf(bs->role, sizeof bs->role, "baseline");
            kd_lm_setup s = {.student = sspec, .vocab = r.data.vocab, .seq = r.seq, .max_batch = r.batch};
            kd_lm_train_opts o = r.base;
            o.onpolicy = 0.0f;
            o.role = "baseline";
            snprintf(path, sizeof path, "%s/baseline.safetensors", dir);
            st = train_one(&r, &s, NULL, &o, path, bs);
        }
        kd_lm_cache cache;
        memset(&cache, 0, sizeof cache);
        uint16_t *seqkd = NULL;
        kd_lm_windows sw;
        kd_lm_train_opts o = r.base;
        o.role = "student";
        kd_lm_setup s = {.student = sspec, .loss = loss, .vocab = r.data.vocab, .seq = r.seq, .max_batch = r.batch,
                         .lora = slora, .okd = okd, .okd_lora = tlora, .okd_loss = kd_config_str(cfg, "lm", "okd_loss")};
        if (st == KD_OK && cached) {
            st = kd_lm_cache_open(cache_path, &cache);
            if (st == KD_OK && (cache.vocab != r.data.vocab || cache.seq != r.seq))
                st = kd_config_error(cfg, "teacher", "cache", "%s holds vocab %d, windows of %d; this run needs %d, %d",
                                     cache_path, cache.vocab, cache.seq, r.data.vocab, r.seq);
            if (st == KD_OK && r.base.onpolicy > 0.0f)
                st = kd_config_error(cfg, "lm", "onpolicy", "on-policy batches need the teacher itself, not a cache");
            s.cache_k = cache.k;
            s.cache_T = cache.T;
            o.windows = &cache.w;
        } else if (st == KD_OK) {
            /* a teacher in the graph only when some term reads it */
            kd_loss_spec ls;
            int reads = 0;
            if (kd_loss_spec_parse(loss, &ls) == KD_OK)
                for (int i = 0; i < ls.n; i++) reads |= strcmp(ls.terms[i].name, "ce") != 0;
            s.n_teachers = reads || r.base.onpolicy > 0.0f || okd;
            s.teachers[0] = tspec;
        }
        int nseq = kd_config_int(cfg, "lm", "seqkd");
        if (st == KD_OK && nseq > 0) { /* sequence-level KD: teacher samples */
            kd_gpt_cfg gc;
            kd_gpt_runner *run = NULL;
            char *tj = NULL;
            double t0 = kd_now();
            st = kd_gpt_load(tfile, &gc, &run, &tj);
            free(tj);
            if (st == KD_OK) {
                kd_gpt_runner_reserve(run, r.batch);
                seqkd = kd_malloc((size_t)nseq * (r.seq + 1) * sizeof *seqkd);
                st = kd_lm_sample_windows(run, &r.data, nseq, r.seq, r.base.prompt, r.batch, &r.base.sample,
                                          r.base.seed, seqkd);
            }
            kd_gpt_runner_free(run);
            seqkd_seconds = kd_now() - t0;
            sw = (kd_lm_windows){.tokens = seqkd, .n = nseq};
            o.windows = &sw;
            if (!log->quiet && st == KD_OK)
                fprintf(stderr, "distill: sampled %d teacher windows for sequence-level KD in %.1f s\n", nseq,
                        seqkd_seconds);
        }
        if (st == KD_OK) {
            lm_stage *ss = &stages[ns++];
            snprintf(ss->role, sizeof ss->role, "student");
            snprintf(path, sizeof path, "%s/student.safetensors", dir);
            const char *tck1[1] = {tfile};
            st = train_one(&r, &s, tck1, &o, path, ss);
        }
        free(seqkd);
        if (cache.open) kd_lm_cache_close(&cache);
    }
    if (st == KD_OK) st = write_summary(dir, stages, ns, threads, *sspec ? loss : NULL, seqkd_seconds);
    if (st == KD_OK) {
        printf("%-9s %-40s %10s %9s %9s %7s %9s\n", "model", "spec", "params", "val loss", "val ppl", "agree", "train s");
        for (int i = 0; i < ns; i++) {
            const lm_stage *s = &stages[i];
            if (!s->ran) continue;
            char agree[16] = "-";
            if (s->val.with_teacher) snprintf(agree, sizeof agree, "%.1f%%", 100.0 * s->val.agree);
            printf("%-9s %-40.40s %10lld %9.4f %9.3f %7s %9.1f\n", s->role, s->spec, (long long)s->params, s->val.loss,
                   s->val.ppl, agree, s->loaded ? 0.0 : s->tr.train_seconds);
        }
        if (!log->quiet) fprintf(stderr, "distill: wrote %s\n", dir);
    }
done:
    free(r.tok_json);
    if (r.bpe) kd_tokenizer_free(&r.tok);
    kd_text_free(&r.data);
    if (st != KD_OK) {
        fprintf(stderr, "distill: error: %s\n", kd_error_message());
        return st == KD_EUSAGE ? 2 : 1;
    }
    return 0;
}
