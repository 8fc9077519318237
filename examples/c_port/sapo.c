/* sapo.c: options, defaults and validation of the SAPO-family losses; the loss itself is
 * sapo_kernel.inc, written once and compiled for double and for float (C99 <tgmath.h> picks
 * exp/expf, expm1/expm1f, ... from the argument type). */
#include "sapo.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Clause 6.3 and the numerics table: X_sat = 1e30, the tau * (r - 1) past which every SAPO
 * output is at its float32 and float64 limit. */
#define SAPO_X_SAT 1e30

static const char *const METHOD_NAMES[] = {"sapo", "sapo-seq", "grpo", "gspo", "gspo-token"};
static const char *const AGG_NAMES[] = {"token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                        "seq-mean-token-sum-norm"};

static int fail(sapo_error *err, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return SAPO_EINVAL;
}

void sapo_default_options(sapo_options *opt, sapo_method method)
{
    /* Clause 4.1 (method defaults) and 4.2 (aggregation and empty rows). */
    memset(opt, 0, sizeof *opt);
    opt->method = method;
    opt->loss_agg = SAPO_AGG_SEQ_MEAN_TOKEN_MEAN;
    opt->tau_pos = 1.0;
    opt->tau_neg = 1.05;
    if (method == SAPO_METHOD_GRPO) {
        opt->eps_low = opt->eps_high = 0.2;
    } else {
        opt->eps_low = 3e-4;
        opt->eps_high = 4e-4;
    }
}

int sapo_parse_method(const char *name, sapo_method *out)
{
    for (int k = 0; k < 5; k++)
        if (strcmp(name, METHOD_NAMES[k]) == 0) {
            *out = (sapo_method)k;
            return SAPO_OK;
        }
    return SAPO_EINVAL; /* clause 8.3 */
}

int sapo_parse_loss_agg(const char *name, sapo_loss_agg *out)
{
    for (int k = 0; k < 4; k++)
        if (strcmp(name, AGG_NAMES[k]) == 0) {
            *out = (sapo_loss_agg)k;
            return SAPO_OK;
        }
    return SAPO_EINVAL; /* clause 8.3 */
}

static int in_range(double v, double lo, double hi) { return isfinite(v) && v >= lo && v <= hi; }

/* Clause 8.4: every parameter the method uses inside its domain. */
static int check_options(const sapo_options *o, sapo_error *err)
{
    if ((unsigned)o->method > SAPO_METHOD_GSPO_TOKEN)
        return fail(err, "method: unknown (expected one of sapo, sapo-seq, grpo, gspo, gspo-token)");
    if ((unsigned)o->loss_agg > SAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM)
        return fail(err, "loss_agg: unknown (expected one of token-mean, seq-mean-token-mean, "
                         "seq-mean-token-sum, seq-mean-token-sum-norm)");
    if (o->method == SAPO_METHOD_SAPO || o->method == SAPO_METHOD_SAPO_SEQ) {
        if (!in_range(o->tau_pos, 1e-6, 1e6)) return fail(err, "tau_pos = %g: expected [1e-06, 1e+06]", o->tau_pos);
        if (!in_range(o->tau_neg, 1e-6, 1e6)) return fail(err, "tau_neg = %g: expected [1e-06, 1e+06]", o->tau_neg);
    } else {
        if (!in_range(o->eps_low, 0, 1e6)) return fail(err, "eps_low = %g: expected [0, 1e+06]", o->eps_low);
        if (!in_range(o->eps_high, 0, 1e6)) return fail(err, "eps_high = %g: expected [0, 1e+06]", o->eps_high);
        if (o->dual_clip != 0 && !(in_range(o->dual_clip, 1, 1e6) && o->dual_clip > 1))
            return fail(err, "dual_clip = %g: expected (1, 1e+06] (0 disables it)", o->dual_clip);
    }
    if (o->loss_agg == SAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM) {
        if (!(in_range(o->norm_length, 0, 1e12) && o->norm_length > 0))
            return fail(err, "norm_length = %g: seq-mean-token-sum-norm needs it in (0, 1e+12]", o->norm_length);
    } else if (o->norm_length != 0) {
        return fail(err, "norm_length: only seq-mean-token-sum-norm takes it (clause 3.5)");
    }
    return SAPO_OK;
}

static int is_sequence(sapo_method m) /* clause 1.4: the gate sees s_i */
{
    return m == SAPO_METHOD_SAPO_SEQ || m == SAPO_METHOD_GSPO || m == SAPO_METHOD_GSPO_TOKEN;
}

static int spreads_gradient(sapo_method m) /* clauses 2.3, 2.7: d mu_i / d logp_it = m_it / L_i */
{
    return m == SAPO_METHOD_SAPO_SEQ || m == SAPO_METHOD_GSPO;
}

static int is_soft(sapo_method m) { return m == SAPO_METHOD_SAPO || m == SAPO_METHOD_SAPO_SEQ; }

/* The denominator D of clauses 3.2-3.5 from the two batch counts (clause 3.1). */
static double denominator(const sapo_options *o, double tokens, double rows)
{
    switch (o->loss_agg) {
    case SAPO_AGG_TOKEN_MEAN: return tokens;
    case SAPO_AGG_SEQ_MEAN_TOKEN_SUM_NORM: return rows * o->norm_length;
    default: return rows;
    }
}

#include <tgmath.h> /* after the double-only helpers above: from here math calls are generic */
#include <float.h>

#define SAPO_CAT_(a, b) a##b
#define SAPO_CAT(a, b) SAPO_CAT_(a, b)

#define REAL double
#define REAL_MAX DBL_MAX
#define SFX f64
#include "sapo_kernel.inc"
#undef REAL
#undef REAL_MAX
#undef SFX

#define REAL float
#define REAL_MAX FLT_MAX
#define SFX f32
#include "sapo_kernel.inc"
