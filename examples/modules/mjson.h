/* mjson.h — a tiny JSON reader/writer for edge-agent workload modules (wasm32-wasi, wasi-libc).
 *
 * Header-only on purpose: a module is one .c file plus this header, built by
 * scripts/build-examples.sh with Debian's clang. Reads the whole of stdin, parses it into a small
 * tree (objects keep key order), and offers helpers to write escaped JSON on stdout.
 * Not a general-purpose library: limits are fixed (depth 64, input 4 MiB).
 */
#ifndef MJSON_H
#define MJSON_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { MJ_NULL, MJ_BOOL, MJ_NUM, MJ_STR, MJ_ARR, MJ_OBJ } mj_type;

typedef struct mj {
    mj_type type;
    double num;          /* MJ_NUM, MJ_BOOL (0/1) */
    char *str;           /* MJ_STR value; for object members: the key is in `key` */
    char *key;           /* set on members of an object */
    struct mj *child;    /* first element / member */
    struct mj *next;     /* next sibling */
} mj;

typedef struct { const char *p; const char *end; int depth; const char *err; } mj_parser;

static void mj_ws(mj_parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\n' || *ps->p == '\r' || *ps->p == '\t')) ps->p++;
}

static mj *mj_new(mj_type t) {
    mj *v = (mj *)calloc(1, sizeof(mj));
    if (!v) { fputs("out of memory\n", stderr); exit(2); }
    v->type = t;
    return v;
}

static char *mj_parse_string(mj_parser *ps) {
    /* ps->p at the opening quote */
    ps->p++;
    size_t cap = 16, n = 0;
    char *out = (char *)malloc(cap);
    if (!out) { fputs("out of memory\n", stderr); exit(2); }
    while (ps->p < ps->end && *ps->p != '"') {
        char c = *ps->p++;
        if (c == '\\') {
            if (ps->p >= ps->end) { ps->err = "bad escape"; return out; }
            char e = *ps->p++;
            switch (e) {
                case 'n': c = '\n'; break;
                case 't': c = '\t'; break;
                case 'r': c = '\r'; break;
                case 'b': c = '\b'; break;
                case 'f': c = '\f'; break;
                case 'u': /* keep ASCII only; others become '?' */
                    if (ps->end - ps->p < 4) { ps->err = "bad \\u escape"; return out; }
                    { char hex[5] = {ps->p[0], ps->p[1], ps->p[2], ps->p[3], 0}; long cp = strtol(hex, NULL, 16);
                      c = (cp > 0 && cp < 128) ? (char)cp : '?'; }
                    ps->p += 4; break;
                default: c = e;
            }
        }
        if (n + 2 > cap) { cap *= 2; out = (char *)realloc(out, cap); if (!out) { fputs("oom\n", stderr); exit(2); } }
        out[n++] = c;
    }
    if (ps->p >= ps->end) { ps->err = "unterminated string"; }
    else ps->p++;
    out[n] = 0;
    return out;
}

static mj *mj_value(mj_parser *ps);

static mj *mj_container(mj_parser *ps, int is_obj) {
    mj *v = mj_new(is_obj ? MJ_OBJ : MJ_ARR);
    mj **tail = &v->child;
    ps->p++;
    if (++ps->depth > 64) { ps->err = "too deep"; return v; }
    mj_ws(ps);
    if (ps->p < ps->end && *ps->p == (is_obj ? '}' : ']')) { ps->p++; ps->depth--; return v; }
    while (!ps->err) {
        char *key = NULL;
        mj_ws(ps);
        if (is_obj) {
            if (ps->p >= ps->end || *ps->p != '"') { ps->err = "expected a key"; break; }
            key = mj_parse_string(ps);
            mj_ws(ps);
            if (ps->p >= ps->end || *ps->p != ':') { ps->err = "expected ':'"; break; }
            ps->p++;
        }
        mj *item = mj_value(ps);
        if (!item) break;
        item->key = key;
        *tail = item; tail = &item->next;
        mj_ws(ps);
        if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
        if (ps->p < ps->end && *ps->p == (is_obj ? '}' : ']')) { ps->p++; break; }
        ps->err = "expected ',' or a closing bracket";
    }
    ps->depth--;
    return v;
}

static mj *mj_value(mj_parser *ps) {
    mj_ws(ps);
    if (ps->p >= ps->end) { ps->err = "unexpected end"; return NULL; }
    char c = *ps->p;
    if (c == '{' || c == '[') return mj_container(ps, c == '{');
    if (c == '"') { mj *v = mj_new(MJ_STR); v->str = mj_parse_string(ps); return v; }
    if (!strncmp(ps->p, "null", 4)) { ps->p += 4; return mj_new(MJ_NULL); }
    if (!strncmp(ps->p, "true", 4)) { ps->p += 4; mj *v = mj_new(MJ_BOOL); v->num = 1; return v; }
    if (!strncmp(ps->p, "false", 5)) { ps->p += 5; mj *v = mj_new(MJ_BOOL); return v; }
    char *endp = NULL;
    double d = strtod(ps->p, &endp);
    if (endp == ps->p) { ps->err = "unexpected character"; return NULL; }
    ps->p = endp;
    mj *v = mj_new(MJ_NUM); v->num = d;
    return v;
}

/* Read all of stdin and parse it; exits with status 2 and a message on stderr if it is not JSON. */
static mj *mj_read_stdin(void) {
    size_t cap = 65536, n = 0;
    char *buf = (char *)malloc(cap);
    if (!buf) { fputs("out of memory\n", stderr); exit(2); }
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, stdin)) > 0) {
        n += got;
        if (n == cap) {
            if (cap >= (4u << 20)) { fputs("input too large\n", stderr); exit(2); }
            cap *= 2; buf = (char *)realloc(buf, cap);
            if (!buf) { fputs("out of memory\n", stderr); exit(2); }
        }
    }
    mj_parser ps = { buf, buf + n, 0, NULL };
    mj *root = mj_value(&ps);
    if (ps.err || !root) { fprintf(stderr, "input is not JSON: %s\n", ps.err ? ps.err : "empty"); exit(2); }
    return root;
}

static mj *mj_get(const mj *obj, const char *key) {
    if (!obj || obj->type != MJ_OBJ) return NULL;
    for (mj *m = obj->child; m; m = m->next) if (m->key && !strcmp(m->key, key)) return m;
    return NULL;
}

static double mj_num(const mj *obj, const char *key, double dflt) {
    mj *v = mj_get(obj, key);
    return (v && (v->type == MJ_NUM || v->type == MJ_BOOL)) ? v->num : dflt;
}

static const char *mj_str(const mj *obj, const char *key, const char *dflt) {
    mj *v = mj_get(obj, key);
    return (v && v->type == MJ_STR) ? v->str : dflt;
}

/* Writing: escaped strings and finite numbers. */
static void mj_put_str(const char *s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') { putchar('\\'); putchar(c); }
        else if (c == '\n') fputs("\\n", stdout);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void mj_put_num(double d) {
    if (!isfinite(d)) { fputs("null", stdout); return; }
    if (d == (double)(long long)d && fabs(d) < 1e15) printf("%lld", (long long)d);
    else printf("%.6g", d);
}

#endif
