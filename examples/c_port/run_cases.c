/* run_cases.c: the C port's side of the sapo-conformance file protocol.
 *
 *   ./run_cases DIR
 *
 * Reads DIR/index.txt (written by `sapo-conformance export DIR`: one case per line, key=value
 * fields), loads each case's raw little-endian arrays, calls sapo_policy_loss_f64 (float64
 * cases) or sapo_policy_loss_f32 (float32, bfloat16, float16 cases, stored as float32), and
 * writes DIR/results/<name>.json and DIR/results/<name>.grad.bin. Where the case has fd_logp
 * (four float64 logp arrays), it also reports its loss at each of them, so the judge can check
 * the gradient against the loss along a direction. No JSON parser needed; assumes a
 * little-endian host (every current CPU the suite targets). Exit status 0 when every case was
 * computed or refused with a reason, 2 on a missing or unreadable index.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sapo.h"

#define MAX_LINE 16384
#define MAX_FIELDS 64

typedef struct {
    const char *key[MAX_FIELDS];
    const char *value[MAX_FIELDS];
    int count;
} fields;

/* Split "case k1=v1 k2=v2 ..." in place. */
static void split_fields(char *line, fields *f)
{
    f->count = 0;
    for (char *tok = strtok(line, " \t\r\n"); tok && f->count < MAX_FIELDS; tok = strtok(NULL, " \t\r\n")) {
        char *eq = strchr(tok, '=');
        if (!eq) continue; /* the leading word "case" */
        *eq = '\0';
        f->key[f->count] = tok;
        f->value[f->count] = eq + 1;
        f->count++;
    }
}

static const char *get(const fields *f, const char *key)
{
    for (int k = 0; k < f->count; k++)
        if (strcmp(f->key[k], key) == 0) return f->value[k];
    return NULL;
}

static void *read_array(const char *dir, const char *rel, size_t elem, size_t count, char *why, size_t why_len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    FILE *fp = fopen(path, "rb");
    void *buf = malloc(elem * count);
    size_t got = 0;
    if (fp && buf) {
        got = fread(buf, elem, count, fp);
        if (fgetc(fp) != EOF) got = 0; /* longer than the shape says */
    }
    if (fp) fclose(fp);
    if (!buf || got != count) {
        snprintf(why, why_len, "cannot read %zu values of %zu bytes from %s", count, elem, rel);
        free(buf);
        return NULL;
    }
    return buf;
}

static void json_number(FILE *fp, double v)
{
    if (isnan(v))
        fputs("\"nan\"", fp);
    else if (isinf(v))
        fputs(v > 0 ? "\"inf\"" : "\"-inf\"", fp);
    else
        fprintf(fp, "%.17g", v);
}

static void json_string(FILE *fp, const char *s)
{
    fputc('"', fp);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fputc('\\', fp);
        if ((unsigned char)*s >= 0x20) fputc(*s, fp);
    }
    fputc('"', fp);
}

static FILE *open_result(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/results/%s.json", dir, name);
    FILE *fp = fopen(path, "w");
    if (!fp) return NULL;
    fputs("{\"schema\": \"sapo-conformance-result/1\", \"case\": ", fp);
    json_string(fp, name);
    fputs(", \"port\": {\"name\": \"c_port\", \"language\": \"C99\"", fp);
#ifdef __VERSION__
    fputs(", \"compiler\": ", fp);
    json_string(fp, __VERSION__);
#endif
    fputs("}", fp);
    return fp;
}

static void write_error(const char *dir, const char *name, const char *message)
{
    FILE *fp = open_result(dir, name);
    if (!fp) return;
    fputs(", \"error\": ", fp);
    json_string(fp, message);
    fputs("}\n", fp);
    fclose(fp);
}

/* The options of one case: absent ones take the spec's defaults (clauses 4.1, 4.2); a parameter
 * the method does not take is refused (clause 8.4). */
static int parse_options(const fields *f, sapo_options *o, char *why, size_t why_len)
{
    sapo_method method = SAPO_METHOD_SAPO;
    const char *name = get(f, "method");
    if (name && sapo_parse_method(name, &method)) {
        snprintf(why, why_len, "method: unknown name '%s' (clause 8.3)", name);
        return 1;
    }
    sapo_default_options(o, method);
    name = get(f, "loss_agg");
    if (name && sapo_parse_loss_agg(name, &o->loss_agg)) {
        snprintf(why, why_len, "loss_agg: unknown name '%s' (clause 8.3)", name);
        return 1;
    }
    const int soft = method == SAPO_METHOD_SAPO || method == SAPO_METHOD_SAPO_SEQ;
    static const char *const soft_keys[] = {"tau_pos", "tau_neg"};
    static const char *const clip_keys[] = {"eps_low", "eps_high", "dual_clip"};
    double *soft_fields[] = {&o->tau_pos, &o->tau_neg};
    double *clip_fields[] = {&o->eps_low, &o->eps_high, &o->dual_clip};
    for (int k = 0; k < 2; k++) {
        const char *v = get(f, soft_keys[k]);
        if (v && !soft) {
            snprintf(why, why_len, "%s: not a parameter of this method (clause 8.4)", soft_keys[k]);
            return 1;
        }
        if (v) *soft_fields[k] = strtod(v, NULL);
    }
    for (int k = 0; k < 3; k++) {
        const char *v = get(f, clip_keys[k]);
        if (v && soft) {
            snprintf(why, why_len, "%s: not a parameter of this method (clause 8.4)", clip_keys[k]);
            return 1;
        }
        if (v) *clip_fields[k] = strtod(v, NULL);
    }
    const char *v = get(f, "norm_length");
    if (v) o->norm_length = strtod(v, NULL);
    return 0;
}

/* One case; returns 0 when a result (numbers or a refusal) was written. */
static int run_one(const char *dir, const fields *f)
{
    const char *name = get(f, "name"), *storage = get(f, "storage"), *adv = get(f, "adv");
    const char *n_s = get(f, "n"), *t_s = get(f, "t");
    char why[512] = "";
    if (!name || !storage || !adv || !n_s || !t_s) {
        fprintf(stderr, "index line without name, storage, adv, n or t\n");
        return 1;
    }
    const size_t n = strtoul(n_s, NULL, 10), t = strtoul(t_s, NULL, 10);
    const int f64 = strcmp(storage, "float64") == 0, per_token = strcmp(adv, "token") == 0;
    const size_t elem = f64 ? sizeof(double) : sizeof(float), n_adv = per_token ? n * t : n;
    sapo_options opt;
    if (parse_options(f, &opt, why, sizeof why)) {
        write_error(dir, name, why);
        return 0;
    }
    void *logp = read_array(dir, get(f, "logp"), elem, n * t, why, sizeof why);
    void *old = logp ? read_array(dir, get(f, "old_logp"), elem, n * t, why, sizeof why) : NULL;
    void *advantages = old ? read_array(dir, get(f, "advantages"), elem, n_adv, why, sizeof why) : NULL;
    unsigned char *mask = advantages ? read_array(dir, get(f, "mask"), 1, n * t, why, sizeof why) : NULL;
    const char *fd_rel = get(f, "fd_logp");
    double *fd = NULL;
    if (mask && fd_rel && strcmp(fd_rel, "-") != 0 && f64)
        fd = read_array(dir, fd_rel, sizeof(double), 4 * n * t, why, sizeof why);
    void *grad = malloc(elem * n * t);
    if (!mask || !grad || (fd_rel && strcmp(fd_rel, "-") != 0 && f64 && !fd)) {
        write_error(dir, name, why[0] ? why : "out of memory");
        free(logp), free(old), free(advantages), free(mask), free(fd), free(grad);
        return 0;
    }

    sapo_error err = {""};
    double loss = 0, fd_losses[4];
    int status;
    if (f64) {
        sapo_batch_f64 b = {n, t, logp, old, advantages, per_token, mask};
        status = sapo_policy_loss_f64(&opt, &b, &loss, grad, &err);
        for (int k = 0; fd && status == SAPO_OK && k < 4; k++) { /* the loss alone at each point */
            sapo_batch_f64 at = b;
            double *scratch = malloc(sizeof(double) * n * t);
            at.logp = fd + (size_t)k * n * t;
            status = scratch ? sapo_policy_loss_f64(&opt, &at, &fd_losses[k], scratch, &err) : SAPO_EINVAL;
            free(scratch);
        }
    } else {
        float loss32 = 0;
        sapo_batch_f32 b = {n, t, logp, old, advantages, per_token, mask};
        status = sapo_policy_loss_f32(&opt, &b, &loss32, grad, &err);
        loss = loss32;
    }

    char grad_rel[4096], path[8192];
    snprintf(grad_rel, sizeof grad_rel, "results/%s.grad.bin", name);
    snprintf(path, sizeof path, "%s/%s", dir, grad_rel);
    FILE *gp = status == SAPO_OK ? fopen(path, "wb") : NULL;
    if (gp) {
        fwrite(grad, elem, n * t, gp);
        fclose(gp);
    }
    if (status != SAPO_OK || !gp) {
        write_error(dir, name, status != SAPO_OK ? err.message : "cannot write the gradient file");
    } else {
        FILE *fp = open_result(dir, name);
        if (fp) {
            fputs(", \"loss\": ", fp);
            json_number(fp, loss);
            fprintf(fp, ", \"grad\": {\"file\": \"%s\", \"dtype\": \"%s\"}", grad_rel, f64 ? "float64" : "float32");
            if (fd) {
                fputs(", \"fd_losses\": [", fp);
                for (int k = 0; k < 4; k++) {
                    if (k) fputs(", ", fp);
                    json_number(fp, fd_losses[k]);
                }
                fputs("]", fp);
            }
            fputs("}\n", fp);
            fclose(fp);
        }
    }
    free(logp), free(old), free(advantages), free(mask), free(fd), free(grad);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s EXPORT_DIR\n", argv[0]);
        return 2;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/index.txt", argv[1]);
    FILE *fp = fopen(path, "r");
    if (!fp) {
        fprintf(stderr, "%s: cannot open (run `sapo-conformance export %s` first)\n", path, argv[1]);
        return 2;
    }
    static char line[MAX_LINE];
    int cases = 0, broken = 0;
    const clock_t start = clock();
    while (fgets(line, sizeof line, fp)) {
        if (strncmp(line, "case ", 5) != 0) continue; /* comments and blank lines */
        fields f;
        split_fields(line, &f);
        broken += run_one(argv[1], &f);
        cases++;
    }
    fclose(fp);
    printf("c_port: %d cases in %.3f s CPU\n", cases, (double)(clock() - start) / CLOCKS_PER_SEC);
    return broken ? 2 : 0;
}
