/* distiller.c - teacher and student in one compiled graph.
 *
 * Order of the nodes: inputs, the student (prefix "s."), the teacher
 * (prefix "t.", built frozen: eval-mode BN and dropout, no gradient
 * buffers, and its intermediate activations share memory as soon as they
 * are consumed), then the loss terms. Because the student comes first,
 * evaluating the student (forward up to its logits) never runs the teacher.
 * With a teacher cache there is no teacher sub-graph: its logits are an
 * input node ("t.logits") the trainer fills from the cache per batch.
 */
#include <string.h>

#include "kd_train.h"

static kd_status build(kd_distiller *d, const char *teacher_spec, const char *student_spec, const char *loss_spec,
                       const kd_dataset *ds, int max_batch, uint64_t seed) {
    memset(d, 0, sizeof *d);
    kd_loss_spec spec;
    kd_status st = kd_loss_spec_parse(loss_spec, &spec);
    if (st != KD_OK) return st;
    kd_classifier *c = &d->c;
    c->g = kd_graph_new();
    int xs[4] = {max_batch, ds->c, ds->h, ds->w}, ys[1] = {max_batch};
    c->x = kd_input(c->g, "x", 4, xs);
    c->y = kd_input(c->g, "y", 1, ys);
    st = kd_model_build(c->g, student_spec, "s.", c->x, ds->n_classes, &c->m);
    if (st != KD_OK) st = kd_error_prefix(st, "[student] model");
    if (st == KD_OK && teacher_spec) {
        kd_graph_set_frozen(c->g, 1);
        st = kd_model_build(c->g, teacher_spec, "t.", c->x, ds->n_classes, &d->teacher);
        kd_graph_set_frozen(c->g, 0);
        if (st != KD_OK) st = kd_error_prefix(st, "[teacher] model");
    } else if (st == KD_OK) { /* cached: the teacher's logits are an input filled per batch */
        int ts[2] = {max_batch, ds->n_classes};
        d->t_logits = kd_input(c->g, "t.logits", 2, ts);
    }
    if (st == KD_OK) {
        kd_loss_inputs in = {.student = &c->m,
                             .teacher = teacher_spec ? &d->teacher : NULL,
                             .s_logits = c->m.logits,
                             .t_logits = teacher_spec ? d->teacher.logits : d->t_logits,
                             .labels = c->y,
                             .s_prefix = "s."};
        st = kd_loss_build(c->g, &spec, &in, &d->loss);
        if (st != KD_OK) st = kd_error_prefix(st, "[distill] loss");
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
    return build(d, teacher_spec, student_spec, loss_spec, ds, max_batch, seed);
}

kd_status kd_distiller_new_cached(kd_distiller *d, const char *student_spec, const char *loss_spec, const kd_dataset *ds,
                                  int max_batch, uint64_t seed) {
    return build(d, NULL, student_spec, loss_spec, ds, max_batch, seed);
}

void kd_distiller_free(kd_distiller *d) { kd_classifier_free(&d->c); }
