/* distiller.c - teachers and students in one compiled graph.
 *
 * Order of the nodes: inputs, the student (prefix "s."), then either
 *   - frozen teachers (prefixes "t.", "t1.", "t2.", ...: eval-mode BN and
 *     dropout, no gradient buffers, activations released as soon as they
 *     are consumed), whose logits are averaged with weights when there are
 *     several (a multi-teacher ensemble; feature losses tap the first), or
 *   - an input node "t.logits" filled per batch from a teacher cache, or
 *   - a second trainable student, the peer (prefix "p."), for deep mutual
 *     learning (Zhang et al. 2018): each student's loss treats the other's
 *     logits as a detached teacher, and the two losses are summed;
 * then the loss terms. Because the student comes first, evaluating it
 * (forward up to its logits) never runs a teacher.
 */
#include <string.h>

#include "kd_train.h"

static kd_status build_teachers(kd_distiller *d, const kd_distill_setup *s, const kd_dataset *ds) {
    kd_classifier *c = &d->c;
    kd_graph_set_frozen(c->g, 1);
    kd_status st = KD_OK;
    for (int i = 0; i < s->n_teachers && st == KD_OK; i++) {
        char prefix[16];
        if (i == 0)
            snprintf(prefix, sizeof prefix, "t.");
        else
            snprintf(prefix, sizeof prefix, "t%d.", i);
        st = kd_model_build(c->g, s->teachers[i], prefix, c->x, ds->n_classes, &d->teachers[i]);
        if (st != KD_OK) st = kd_error_prefix(st, "teacher %d model", i + 1);
    }
    kd_graph_set_frozen(c->g, 0);
    if (st != KD_OK) return st;
    d->n_teachers = s->n_teachers;
    d->teacher = d->teachers[0];
    if (s->n_teachers == 1) {
        d->t_mix = d->teachers[0].logits;
        return KD_OK;
    }
    /* weighted mean of the teachers' logits (frozen, so no gradients flow) */
    double wsum = 0.0;
    for (int i = 0; i < s->n_teachers; i++) wsum += s->weights[i] > 0 ? s->weights[i] : 1.0;
    kd_graph_set_frozen(c->g, 1);
    kd_node *mix = NULL;
    for (int i = 0; i < s->n_teachers; i++) {
        float w = (float)((s->weights[i] > 0 ? s->weights[i] : 1.0) / wsum);
        kd_node *term = kd_scale(c->g, d->teachers[i].logits, w);
        mix = mix ? kd_add(c->g, mix, term) : term;
    }
    kd_graph_set_frozen(c->g, 0);
    kd_node_set_name(mix, "t.ensemble");
    mix->flags |= KD_F_KEEP;
    d->t_mix = mix;
    return KD_OK;
}

/* appends the peer's terms to the student's (logged and scheduled together) */
static kd_status merge_peer(kd_distiller *d, kd_built_loss *peer) {
    if (d->loss.n + peer->n > KD_MAX_TERMS)
        return kd_errorf(KD_ECONFIG, "[distill] loss: too many terms for mutual learning (%d + %d > %d)", d->loss.n,
                         peer->n, KD_MAX_TERMS);
    for (int i = 0; i < peer->n; i++) {
        kd_built_term *t = &d->loss.terms[d->loss.n++];
        *t = peer->terms[i];
        char name[32];
        snprintf(name, sizeof name, "peer.%.20s", peer->terms[i].name);
        memcpy(t->name, name, sizeof t->name);
    }
    d->loss.total = kd_add(d->c.g, d->loss.total, peer->total);
    kd_node_set_name(d->loss.total, "loss");
    return KD_OK;
}

kd_status kd_distiller_build(kd_distiller *d, const kd_distill_setup *s, const kd_dataset *ds, int max_batch,
                             uint64_t seed) {
    memset(d, 0, sizeof *d);
    KD_ASSERT(s->n_teachers >= 0 && s->n_teachers <= KD_MAX_TEACHERS, "%d teachers", s->n_teachers);
    KD_ASSERT((s->n_teachers > 0) + (s->cached != 0) + (s->peer != NULL) == 1,
              "exactly one of: teachers, a cache, a peer");
    kd_loss_spec spec;
    kd_status st = kd_loss_spec_parse(s->loss, &spec);
    if (st != KD_OK) return st;
    kd_classifier *c = &d->c;
    c->g = kd_graph_new();
    int xs[4] = {max_batch, ds->c, ds->h, ds->w}, ys[1] = {max_batch};
    c->x = kd_input(c->g, "x", 4, xs);
    c->y = kd_input(c->g, "y", 1, ys);
    st = kd_model_build(c->g, s->student, "s.", c->x, ds->n_classes, &c->m);
    if (st != KD_OK) st = kd_error_prefix(st, "[student] model");
    const kd_model *tm = NULL;
    if (st == KD_OK && s->n_teachers > 0) {
        st = build_teachers(d, s, ds);
        tm = &d->teacher;
    } else if (st == KD_OK && s->cached) {
        int ts[2] = {max_batch, ds->n_classes};
        d->t_logits = kd_input(c->g, "t.logits", 2, ts);
        d->t_mix = d->t_logits;
    } else if (st == KD_OK) {
        st = kd_model_build(c->g, s->peer, "p.", c->x, ds->n_classes, &d->peer);
        if (st != KD_OK) st = kd_error_prefix(st, "[distill] peer");
        d->t_mix = d->peer.logits;
        d->has_peer = 1;
        tm = &d->peer;
    }
    if (st == KD_OK) {
        kd_loss_inputs in = {.student = &c->m, .teacher = tm, .s_logits = c->m.logits, .t_logits = d->t_mix,
                             .labels = c->y, .n_data = ds->n};
        st = kd_loss_build(c->g, &spec, &in, &d->loss);
        if (st != KD_OK) st = kd_error_prefix(st, "[distill] loss");
    }
    if (st == KD_OK && d->has_peer) {
        kd_built_loss pl;
        kd_loss_inputs in = {.student = &d->peer, .teacher = &c->m, .s_logits = d->peer.logits,
                             .t_logits = c->m.logits, .labels = c->y, .proj_prefix = "peer.", .n_data = ds->n};
        st = kd_loss_build(c->g, &spec, &in, &pl);
        if (st != KD_OK) st = kd_error_prefix(st, "[distill] loss (peer)");
        if (st == KD_OK) st = merge_peer(d, &pl);
    }
    if (st == KD_OK) {
        c->loss = d->loss.total;
        st = kd_graph_compile(c->g, max_batch, seed);
    }
    if (st != KD_OK) {
        kd_graph_free(c->g);
        memset(d, 0, sizeof *d);
    }
    return st;
}

kd_status kd_distiller_new(kd_distiller *d, const char *teacher_spec, const char *student_spec, const char *loss_spec,
                           const kd_dataset *ds, int max_batch, uint64_t seed) {
    kd_distill_setup s = {.student = student_spec, .loss = loss_spec, .n_teachers = 1, .teachers = {teacher_spec}};
    return kd_distiller_build(d, &s, ds, max_batch, seed);
}

kd_status kd_distiller_new_cached(kd_distiller *d, const char *student_spec, const char *loss_spec, const kd_dataset *ds,
                                  int max_batch, uint64_t seed) {
    kd_distill_setup s = {.student = student_spec, .loss = loss_spec, .cached = 1};
    return kd_distiller_build(d, &s, ds, max_batch, seed);
}

void kd_distiller_free(kd_distiller *d) { kd_classifier_free(&d->c); }
