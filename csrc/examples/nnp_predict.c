/*
 * nnp_predict - evaluate a model.nnp and its partial derivatives at points read from standard input.
 *
 *     nnp_predict model.nnp < points.txt
 *
 * Input: one point per line, n_in numbers separated by spaces, tabs or commas. Empty lines and lines starting
 * with '#' are skipped. Output: one line per point with the n_out outputs y_i followed by the n_out * n_in
 * partials dy_i/dx_j (i-major: dy_0/dx_0 dy_0/dx_1 ... dy_1/dx_0 ...), separated by spaces.
 *
 * Build: cc -std=c99 -O2 -I csrc csrc/examples/nnp_predict.c csrc/nnp*.c -lm -o nnp_predict
 */
#include "nnp.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned char *read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    unsigned char *buf = NULL;
    size_t cap = 0, n = 0;
    if (!fp) {
        fprintf(stderr, "nnp_predict: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    for (;;) {
        size_t got;
        if (n == cap) {
            unsigned char *nb;
            cap = cap ? 2 * cap : 65536;
            nb = (unsigned char *)realloc(buf, cap);
            if (!nb) {
                fprintf(stderr, "nnp_predict: out of memory reading %s\n", path);
                free(buf);
                fclose(fp);
                return NULL;
            }
            buf = nb;
        }
        got = fread(buf + n, 1, cap - n, fp);
        n += got;
        if (got == 0) break;
    }
    if (ferror(fp)) {
        fprintf(stderr, "nnp_predict: error reading %s\n", path);
        free(buf);
        fclose(fp);
        return NULL;
    }
    fclose(fp);
    *len = n;
    return buf;
}

/* Parse up to n numbers from line into x; returns how many were found, or -1 on a malformed token. */
static long parse_point(char *line, float *x, size_t n)
{
    char *p = line;
    size_t count = 0;
    for (;;) {
        char *end;
        double v;
        while (*p == ' ' || *p == '\t' || *p == ',' || *p == '\r' || *p == '\n') p++;
        if (*p == '\0') break;
        errno = 0;
        v = strtod(p, &end);
        if (end == p) return -1;
        if (count < n) x[count] = (float)v;
        count++;
        p = end;
        if (*p != '\0' && *p != ' ' && *p != '\t' && *p != ',' && *p != '\r' && *p != '\n') return -1;
    }
    return (long)count;
}

int main(int argc, char **argv)
{
    unsigned char *file;
    size_t len = 0, need = 0, wlen = 0, n_in, n_out, i, cap = 0, lineno = 0;
    void *storage;
    nnp_model *m = NULL;
    float *x, *y, *J, *work;
    char *line = NULL;
    int rc, status = 0;

    if (argc != 2) {
        fprintf(stderr, "usage: %s model.nnp < points\n", argv[0]);
        return 2;
    }
    file = read_file(argv[1], &len);
    if (!file) return 1;
    rc = nnp_model_bytes(file, len, &need);
    if (rc != NNP_OK) {
        fprintf(stderr, "nnp_predict: %s: %s\n", argv[1], nnp_strerror(rc));
        free(file);
        return 1;
    }
    storage = malloc(need);
    if (!storage) {
        free(file);
        return 1;
    }
    rc = nnp_load(file, len, storage, need, &m);
    free(file);
    if (rc != NNP_OK) {
        fprintf(stderr, "nnp_predict: %s: %s\n", argv[1], nnp_strerror(rc));
        free(storage);
        return 1;
    }
    n_in = nnp_n_in(m);
    n_out = nnp_n_out(m);
    rc = nnp_workspace(m, NNP_WS_JACOBIAN, 1, &wlen);
    x = (float *)malloc(n_in * sizeof(float));
    y = (float *)malloc(n_out * sizeof(float));
    J = (float *)malloc(n_out * n_in * sizeof(float));
    work = (float *)malloc((wlen ? wlen : 1) * sizeof(float));
    if (rc != NNP_OK || !x || !y || !J || !work) {
        fprintf(stderr, "nnp_predict: cannot allocate buffers\n");
        status = 1;
        goto done;
    }

    /* read lines of any length */
    for (;;) {
        size_t n = 0;
        int c;
        long got;
        while ((c = getchar()) != EOF && c != '\n') {
            if (n + 1 >= cap) {
                char *nl = (char *)realloc(line, cap ? 2 * cap : 256);
                if (!nl) {
                    fprintf(stderr, "nnp_predict: out of memory\n");
                    status = 1;
                    goto done;
                }
                line = nl;
                cap = cap ? 2 * cap : 256;
            }
            line[n++] = (char)c;
        }
        if (c == EOF && n == 0) break;
        lineno++;
        if (!line) {
            line = (char *)malloc(256);
            if (!line) {
                status = 1;
                goto done;
            }
            cap = 256;
        }
        line[n] = '\0';
        {
            char *s = line;
            while (*s == ' ' || *s == '\t' || *s == '\r') s++;
            if (*s == '\0' || *s == '#') continue;
        }
        got = parse_point(line, x, n_in);
        if (got < 0 || (size_t)got != n_in) {
            fprintf(stderr, "nnp_predict: line %lu: expected %lu numbers separated by spaces or commas\n",
                    (unsigned long)lineno, (unsigned long)n_in);
            status = 1;
            goto done;
        }
        rc = nnp_jacobian_checked(m, NNP_MODE_AUTO, 1, x, y, J, work, wlen); /* rejects nan, inf, 1e39 */
        if (rc != NNP_OK) {
            fprintf(stderr, "nnp_predict: line %lu: %s\n", (unsigned long)lineno, nnp_strerror(rc));
            status = 1;
            goto done;
        }
        for (i = 0; i < n_out; i++) printf(i ? " %.9g" : "%.9g", (double)y[i]);
        for (i = 0; i < n_out * n_in; i++) printf(" %.9g", (double)J[i]);
        printf("\n");
    }
done:
    free(line);
    free(x);
    free(y);
    free(J);
    free(work);
    free(storage);
    if (fflush(stdout) != 0) status = 1;
    return status;
}
