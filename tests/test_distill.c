/* test_distill.c - the loss spec language, the loss builder's errors,
 * teacher + student in one graph (frozen teacher, student-only eval,
 * projectors outside the student's checkpoint), warm-up schedules, the
 * unlabelled transfer set, and `distill loss` against a closed form. */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include "kd_distill.h"
#include "kd_io.h"
#include "kd_losses.h"
#include "kd_train.h"
#include "test.h"

static void spec_parser(void) {
    TEST("spec parser: terms and arguments") {
        kd_loss_spec s;
        CHECK(kd_loss_spec_parse(" ce(weight=0.1)+kd( T = 4 , weight=0.9 ) + fitnet(t=block2, s=block1, proj=conv1x1)",
                                 &s) == KD_OK);
        CHECK(s.n == 3);
        CHECK(strcmp(s.terms[0].name, "ce") == 0 && s.terms[0].n_args == 1);
        CHECK(strcmp(s.terms[1].args[0].key, "T") == 0 && strcmp(s.terms[1].args[0].value, "4") == 0);
        CHECK(strcmp(s.terms[2].args[2].value, "conv1x1") == 0);
        CHECK(kd_loss_spec_parse("kd", &s) == KD_OK && s.n == 1 && s.terms[0].n_args == 0);
    }
    TEST("spec parser: errors point at the problem") {
        const char *bad[][2] = {{"", "empty"},
                                {"ce +", "loss name"},
                                {"kd(T=4", "expected ',' or ')'"},
                                {"kd(T 4)", "'='"},
                                {"kd(T=4, T=2)", "twice"},
                                {"ce kd", "'+'"},
                                {"kd(=4)", "argument name"},
                                {"kd(T=)", "value"},
                                {"kd(T=4, aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa=1)", "argument name too long"},
                                {"fitnet(s=b1+b2+b3+b4+b5+b6+b7+b8+b9+b10+b11+b12+b13+b14+b15+b16+b17+b18+b19+b20+b21+"
                                 "b22+b23+b24+b25+b26+b27+b28+b29+b30+b31+b32+b33)",
                                 "value longer than"}};
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            kd_loss_spec s;
            kd_status st = kd_loss_spec_parse(bad[i][0], &s);
            CHECK_MSG(st == KD_ECONFIG, "'%s' parsed", bad[i][0]);
            CHECK_MSG(strstr(kd_error_message(), bad[i][1]) != NULL, "'%s': %s", bad[i][0], kd_error_message());
        }
    }
}

static kd_dataset tiny(int n) {
    kd_dataset ds = {.n = n, .c = 1, .h = 8, .w = 8, .n_classes = 3, .mean = 0.5f, .std = 0.25f};
    ds.images = kd_malloc((size_t)n * 64);
    ds.labels = kd_malloc((size_t)n);
    kd_rng r;
    kd_rng_seed(&r, 9);
    for (int i = 0; i < n; i++) {
        ds.labels[i] = (uint8_t)(i % 3);
        for (int p = 0; p < 64; p++)
            ds.images[(size_t)i * 64 + p] = (uint8_t)((p / 22 == i % 3 ? 180 : 40) + kd_rng_below(&r, 50));
    }
    return ds;
}

static void builder_errors(void) {
    kd_dataset ds = tiny(12);
    const char *bad[][2] = {
        {"ce + bogus(T=1)", "unknown loss 'bogus'"},
        {"kd(tau=3)", "no argument 'tau'"},
        {"kd(T=abc)", "not a number"},
        {"kd(T=0)", "outside"},
        {"jsd(beta=1.5)", "outside"},
        {"ce(weight=-1)", "weight"},
        {"fitnet(s=nope, t=block1)", "nope"},
        {"fitnet(s=block1, t=block1, proj=none)", "does not match"},
        {"fitnet(s=block1, t=block1, proj=fancy)", "proj=fancy"},
        {"at(s=block1, t=feat)", "same H and W"},
    };
    TEST("loss builder errors name the term") {
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            kd_distiller d;
            kd_status st = kd_distiller_new(&d, "cnn: c6 p f12", "cnn: c3 p f8", bad[i][0], &ds, 4, 1);
            CHECK_MSG(st != KD_OK, "'%s' built", bad[i][0]);
            CHECK_MSG(strstr(kd_error_message(), bad[i][1]) != NULL, "'%s': %s", bad[i][0], kd_error_message());
            if (st == KD_OK) kd_distiller_free(&d);
        }
    }
    kd_dataset_free(&ds);
}

static void distiller_graph(void) {
    kd_dataset ds = tiny(60);
    TEST("teacher is frozen, the student trains, projectors stay outside the student") {
        kd_distiller d;
        kd_status st = kd_distiller_new(&d, "cnn: c6 p f12", "cnn: c3 p f8",
                                        "ce(weight=0.5) + kd(T=2, weight=0.5) + fitnet(s=block1, t=block1, weight=2)",
                                        &ds, 16, 3);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_graph *g = d.c.g;
            CHECK(kd_graph_find(g, "t.conv1.weight")->grad.data == NULL);
            CHECK(kd_graph_find(g, "s.conv1.weight")->grad.data != NULL);
            CHECK(kd_graph_find(g, "proj3.weight") != NULL && kd_graph_find(g, "proj3.weight")->grad.data != NULL);
            CHECK(d.loss.n == 3 && d.loss.terms[2].weight == 2.0f);
            /* the student's parameters count excludes the projector */
            CHECK(kd_model_params(g, &d.c.m) == 3 * 9 + 3 * 2 + 3 * 16 * 8 + 8 + 8 * 3 + 3); /* conv (no bias), BN, fc1, head */
            /* training lowers the total loss */
            kd_log quiet = {.quiet = 1};
            kd_train_opts o = {.epochs = 4, .batch = 16, .seed = 2, .role = "student", .terms = &d.loss};
            o.opt.kind = KD_OPTIM_SGD;
            o.opt.lr = 0.05f;
            o.opt.momentum = 0.9f;
            kd_node *tw = kd_graph_find(g, "t.head.weight");
            float t0 = tw->val.data[0];
            kd_graph_set_batch(g, 16);
            kd_loader_opts lo = {.batch = 16};
            kd_loader *ld = kd_loader_new(&ds, &lo);
            kd_loader_next(ld, d.c.x->val.data, d.c.y->val.data, NULL);
            kd_graph_forward(g, 1);
            float before = d.loss.total->val.data[0];
            kd_train_result r;
            CHECK(kd_train_classifier(&d.c, &ds, &ds, &o, &quiet, &r) == KD_OK);
            kd_loader_start_epoch(ld, 0);
            kd_loader_next(ld, d.c.x->val.data, d.c.y->val.data, NULL);
            kd_graph_set_batch(g, 16);
            kd_graph_forward(g, 1);
            CHECK_MSG(d.loss.total->val.data[0] < before, "loss %g -> %g", before, d.loss.total->val.data[0]);
            CHECK(tw->val.data[0] == t0); /* the teacher did not move */
            /* evaluating the student does not run the teacher */
            CHECK(d.c.m.logits->id < kd_graph_find(g, "t.conv1")->id);
            kd_loader_free(ld);
            kd_distiller_free(&d);
        }
    }
    TEST("DKD warm-up scales the term linearly") {
        kd_distiller d;
        kd_status st = kd_distiller_new(&d, "mlp: 10", "mlp: 6", "ce + dkd(warmup=4, weight=2)", &ds, 8, 1);
        CHECK_MSG(st == KD_OK, "%s", kd_error_message());
        if (st == KD_OK) {
            kd_loss_set_epoch(&d.loss, 1);
            CHECK_CLOSE(d.loss.terms[1].scaled->fp[0], 0.5, 1e-7, 0);
            kd_loss_set_epoch(&d.loss, 3);
            CHECK_CLOSE(d.loss.terms[1].scaled->fp[0], 1.5, 1e-7, 0);
            kd_loss_set_epoch(&d.loss, 9);
            CHECK_CLOSE(d.loss.terms[1].scaled->fp[0], 2.0, 1e-7, 0);
            CHECK_CLOSE(d.loss.terms[0].scaled->fp[0], 1.0, 0, 0);
            kd_distiller_free(&d);
        }
    }
    TEST("unlabelled transfer set: labels beyond `labeled` read as -1") {
        kd_dataset v = ds;
        v.labeled = 10;
        kd_loader_opts lo = {.batch = 60};
        kd_loader *ld = kd_loader_new(&v, &lo);
        float *x = malloc(sizeof(float) * 60 * 64), y[60];
        int aug[240];
        CHECK(kd_loader_next(ld, x, y, aug) == 60);
        int ok = 1;
        for (int i = 0; i < 60; i++) ok &= aug[4 * i + 3] < 10 ? y[i] == ds.labels[aug[4 * i + 3]] : y[i] == -1.0f;
        CHECK(ok);
        kd_loader_free(ld);
        free(x);
    }
    kd_dataset_free(&ds);
}

/* distill loss "ce + kd(T=4, weight=0.5)" against the closed form in double */
static void loss_command(void) {
    TEST("distill loss matches a closed form") {
        const int N = 5, K = 7;
        float s[35], t[35], lab[5];
        kd_rng r;
        kd_rng_seed(&r, 4);
        for (int i = 0; i < N * K; i++) s[i] = 3 * kd_rng_normal(&r), t[i] = 3 * kd_rng_normal(&r);
        for (int i = 0; i < N; i++) lab[i] = (float)kd_rng_below(&r, K);
        char in[512], out[512], cmd[2048];
        snprintf(in, sizeof in, "%s/lossin.safetensors", kd_test_tmpdir());
        snprintf(out, sizeof out, "%s/lossout.safetensors", kd_test_tmpdir());
        kd_st_writer *w = kd_st_writer_new();
        int sh[2] = {N, K}, shl[1] = {N};
        kd_st_add_f32(w, "s_logits", 2, sh, s);
        kd_st_add_f32(w, "t_logits", 2, sh, t);
        kd_st_add_f32(w, "labels", 1, shl, lab);
        CHECK(kd_st_write(w, in) == KD_OK);
        kd_st_writer_free(w);
        const char *bin = getenv("KD_DISTILL") ? getenv("KD_DISTILL") : "build/distill";
        snprintf(cmd, sizeof cmd, "%s loss \"ce + kd(T=4, weight=0.5)\" --in %s --out %s > /dev/null", bin, in, out);
        CHECK(system(cmd) == 0);
        /* reference */
        double loss = 0, grad[35];
        for (int n = 0; n < N; n++) {
            double ls[7], ms = -1e30, zs = 0, ls4[7], lt4[7], m4 = -1e30, n4 = -1e30, z4 = 0, y4 = 0;
            for (int k = 0; k < K; k++) ms = fmax(ms, s[n * K + k]);
            for (int k = 0; k < K; k++) zs += exp(s[n * K + k] - ms);
            for (int k = 0; k < K; k++) ls[k] = s[n * K + k] - ms - log(zs);
            for (int k = 0; k < K; k++) m4 = fmax(m4, s[n * K + k] / 4), n4 = fmax(n4, t[n * K + k] / 4);
            for (int k = 0; k < K; k++) z4 += exp(s[n * K + k] / 4 - m4), y4 += exp(t[n * K + k] / 4 - n4);
            for (int k = 0; k < K; k++) ls4[k] = s[n * K + k] / 4 - m4 - log(z4), lt4[k] = t[n * K + k] / 4 - n4 - log(y4);
            int y = (int)lab[n];
            loss += -ls[y] / N;
            for (int k = 0; k < K; k++) {
                loss += 0.5 * 16 * exp(lt4[k]) * (lt4[k] - ls4[k]) / N;
                /* d/ds: CE (p - onehot)/N; KD: 0.5 * T^2 * (q_s - q_t) / T / N */
                grad[n * K + k] = (exp(ls[k]) - (k == y)) / N + 0.5 * 4 * (exp(ls4[k]) - exp(lt4[k])) / N;
            }
        }
        kd_safetensors st;
        CHECK(kd_st_read(out, &st) == KD_OK);
        float got[35], gl;
        const kd_st_tensor *lt = kd_st_find(&st, "loss");
        CHECK(lt && lt->ndim == 0);
        if (lt) memcpy(&gl, lt->data, 4);
        CHECK_CLOSE(gl, loss, 1e-6, 1e-5);
        CHECK(kd_st_get_f32(&st, "grad.s_logits", got, 2, sh) == KD_OK);
        float want[35];
        for (int i = 0; i < 35; i++) want[i] = (float)grad[i];
        CHECK_ARRAYS("grad.s_logits", got, want, 35, 1e-6, 1e-4);
        CHECK(kd_st_find(&st, "term.2.kd") != NULL);
        kd_st_free(&st);
        /* a bad spec exits non-zero with one error line */
        snprintf(cmd, sizeof cmd, "%s loss \"kd(Q=1)\" --in %s --out %s 2> /dev/null", bin, in, out);
        int rc = system(cmd);
        CHECK(WIFEXITED(rc) && WEXITSTATUS(rc) == 1);
    }
}

static void strategies(void) {
    kd_dataset ds = tiny(40);
    TEST("ensemble: the teachers' logits are averaged with normalised weights") {
        kd_distill_setup s = {.student = "mlp: 6", .loss = "kd(T=2)", .n_teachers = 2,
                              .teachers = {"mlp: 10", "cnn: c2 p f5"}, .weights = {1, 3}};
        kd_distiller d;
        CHECK_MSG(kd_distiller_build(&d, &s, &ds, 8, 1) == KD_OK, "%s", kd_error_message());
        if (d.c.g) {
            kd_rng r;
            kd_rng_seed(&r, 3);
            for (int i = 0; i < 8 * 64; i++) d.c.x->val.data[i] = kd_rng_normal(&r);
            for (int i = 0; i < 8; i++) d.c.y->val.data[i] = (float)(i % 3);
            kd_graph_forward(d.c.g, 1);
            int bad = 0;
            for (int i = 0; i < 8 * 3; i++) {
                double want = 0.25 * d.teachers[0].logits->val.data[i] + 0.75 * d.teachers[1].logits->val.data[i];
                bad += fabs(d.t_mix->val.data[i] - want) > 1e-5 * (1 + fabs(want));
            }
            CHECK_MSG(bad == 0, "%d mixed logits off", bad);
            CHECK(kd_graph_find(d.c.g, "t1.conv1.weight") != NULL);
            CHECK(kd_graph_find(d.c.g, "t1.conv1.weight")->grad.data == NULL);
            kd_distiller_free(&d);
        }
    }
    TEST("mutual learning: both students train, each taught by the other") {
        kd_distill_setup s = {.student = "mlp: 6", .loss = "ce + kd(T=2)", .peer = "mlp: 7"};
        kd_distiller d;
        CHECK_MSG(kd_distiller_build(&d, &s, &ds, 8, 1) == KD_OK, "%s", kd_error_message());
        if (d.c.g) {
            CHECK(d.has_peer && d.loss.n == 4 && strcmp(d.loss.terms[3].name, "peer.kd") == 0);
            kd_node *pw = kd_graph_find(d.c.g, "p.fc1.weight"), *sw = kd_graph_find(d.c.g, "s.fc1.weight");
            CHECK(pw && sw && pw->grad.data && sw->grad.data);
            kd_rng r;
            kd_rng_seed(&r, 3);
            for (int i = 0; i < 8 * 64; i++) d.c.x->val.data[i] = kd_rng_normal(&r);
            for (int i = 0; i < 8; i++) d.c.y->val.data[i] = (float)(i % 3);
            kd_graph_forward(d.c.g, 1);
            kd_graph_backward(d.c.g, d.loss.total);
            double gp = 0, gs = 0;
            for (int i = 0; i < 64 * 7; i++) gp += fabs(pw->grad.data[i]);
            for (int i = 0; i < 64 * 6; i++) gs += fabs(sw->grad.data[i]);
            CHECK(gp > 0 && gs > 0);
            kd_distiller_free(&d);
        }
    }
    kd_dataset_free(&ds);
}

void test_distill(void) {
    strategies();
    spec_parser();
    builder_errors();
    distiller_graph();
    loss_command();
}
