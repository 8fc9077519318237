/* sapo.h: SAPO-family policy losses in C99, a worked port of the sapo-ref specification.
 *
 * Loss and closed-form gradient d loss / d logp for the methods sapo, sapo-seq, grpo, gspo and
 * gspo-token and the four aggregations of spec/SPEC.md (version 0.1.0), in float64 and in
 * float32. Clause numbers in the comments are the spec's. bfloat16 and float16 inputs are
 * computed with the float32 functions (clause 6.4: low precision computes in float32).
 *
 * Certified through the file protocol of sapo-conformance (tools/certify_examples.sh):
 *   sapo-conformance export DIR; ./run_cases DIR; sapo-conformance judge DIR
 */
#ifndef SAPO_H
#define SAPO_H

#include <stddef.h>

typedef enum {
    SAPO_METHOD_SAPO,       /* clause 2.1: soft gate on the token ratio */
    SAPO_METHOD_SAPO_SEQ,   /* clause 2.3: soft gate on the sequence ratio */
    SAPO_METHOD_GRPO,       /* clause 2.4: hard clip on the token ratio */
    SAPO_METHOD_GSPO,       /* clause 2.7: hard clip on the sequence ratio, gradient spread */
    SAPO_METHOD_GSPO_TOKEN  /* clause 2.8: value of gspo, gradient through each token only */
} sapo_method;

typedef enum {
    SAPO_AGG_TOKEN_MEAN,             /* clause 3.2 */
    SAPO_AGG_SEQ_MEAN_TOKEN_MEAN,    /* clause 3.3, the default */
    SAPO_AGG_SEQ_MEAN_TOKEN_SUM,     /* clause 3.4 */
    SAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM /* clause 3.5 (Dr. GRPO), needs norm_length */
} sapo_loss_agg;

typedef struct {
    sapo_method method;
    sapo_loss_agg loss_agg;
    double tau_pos, tau_neg;   /* soft methods (clause 1.6) */
    double eps_low, eps_high;  /* clip methods (clause 2.4) */
    double dual_clip;          /* clause 2.6; 0 = disabled */
    double norm_length;        /* clause 3.5; 0 = not given */
    int count_empty_rows;      /* clause 3.6; 0 = R counts non-empty rows only */
} sapo_options;

/* A batch: N rows of T tokens, row-major. advantages holds N values (per sequence) or N*T
 * (per token, adv_per_token = 1). mask holds 0/1; nothing at a position with mask 0 is read
 * into any arithmetic (clause 6.1), so it may hold NaN, infinities, anything. */
typedef struct {
    size_t n, t;
    const double *logp, *old_logp, *advantages;
    int adv_per_token;
    const unsigned char *mask;
} sapo_batch_f64;

typedef struct {
    size_t n, t;
    const float *logp, *old_logp, *advantages;
    int adv_per_token;
    const unsigned char *mask;
} sapo_batch_f32;

/* Why a call was refused (clause 8): the argument and what was expected. */
typedef struct {
    char message[200];
} sapo_error;

enum { SAPO_OK = 0, SAPO_EINVAL = 1 };

/* The spec's defaults for a method (clauses 4.1, 4.2): SAPO tau_pos = 1, tau_neg = 1.05; GRPO
 * eps = 0.2/0.2; GSPO and GSPO-token eps = 3e-4/4e-4; no dual clip; seq-mean-token-mean;
 * empty rows not counted. */
void sapo_default_options(sapo_options *opt, sapo_method method);

/* Method and aggregation names as the spec spells them ("sapo-seq", "token-mean", ...);
 * SAPO_EINVAL for an unknown name (clause 8.3). */
int sapo_parse_method(const char *name, sapo_method *out);
int sapo_parse_loss_agg(const char *name, sapo_loss_agg *out);

/* loss = L (clause 1.7) and grad[i*t + j] = d L / d logp[i][j] (0 at invalid tokens).
 * Returns SAPO_OK, or SAPO_EINVAL with err filled (err may be NULL): bad parameters (8.4), a
 * non-finite advantage (8.5) or an undefined log-ratio (8.6, 5.5) at a valid token. Inputs are
 * never written (clause 6.5); grad must hold n*t values. */
int sapo_policy_loss_f64(const sapo_options *opt, const sapo_batch_f64 *batch, double *loss, double *grad,
                         sapo_error *err);
int sapo_policy_loss_f32(const sapo_options *opt, const sapo_batch_f32 *batch, float *loss, float *grad,
                         sapo_error *err);

#endif /* SAPO_H */
