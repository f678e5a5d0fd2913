/* Test runtime with OPA's Wasm ABI (see opa_rt.h). Built by agent_devkit/opa/build.py with
 * clang --target=wasm32 -nostdlib + wasm-ld (--import-memory); the build script adds the ABI
 * version globals, the memory re-export and the start section the way `opa build` has them. */
#include "opa_rt.h"

extern unsigned char __heap_base;

/* OPA's runtime references all five dispatchers, so every module imports them (and the host must
 * define them even when the policy calls no host builtin). */
__attribute__((used)) void *const opa_rt_builtin_refs[] = {
    (void *)opa_builtin0, (void *)opa_builtin1, (void *)opa_builtin2, (void *)opa_builtin3, (void *)opa_builtin4};

/* ---- libc bits the compiler may call ---- */
void *memcpy(void *d, const void *s, size_t n) {
  unsigned char *dd = d; const unsigned char *ss = s;
  while (n--) *dd++ = *ss++;
  return d;
}
void *memset(void *d, int c, size_t n) {
  unsigned char *dd = d;
  while (n--) *dd++ = (unsigned char)c;
  return d;
}
void *memmove(void *d, const void *s, size_t n) {
  unsigned char *dd = d; const unsigned char *ss = s;
  if (dd < ss) { while (n--) *dd++ = *ss++; }
  else { dd += n; ss += n; while (n--) *--dd = *--ss; }
  return d;
}
size_t cstrlen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }

/* ---- heap: bump pointer + first-fit free list; heap_ptr_set forgets the free list ---- */
typedef struct block { u32 size; u32 pad; struct block *next; } block; /* header 8 bytes */
static u32 heap_ptr, heap_top, initialised;
static block *free_list, *stash_list;

EXPORT("opa_rt_init") void opa_rt_init(void) { /* run as the module's start function */
  heap_ptr = ((u32)&__heap_base + 7u) & ~7u;
  heap_top = (u32)__builtin_wasm_memory_size(0) * 65536u;
  free_list = 0; stash_list = 0;
  initialised = 1;
#ifdef ABORT_IN_START
  opa_abort("start: runtime self-check failed");
#endif
}

EXPORT("opa_malloc") void *opa_malloc(size_t n) {
  if (!initialised) opa_rt_init();
  u32 size = ((u32)n + 7u) & ~7u;
  if (size < 8) size = 8;
  block **pp = &free_list;
  while (*pp) {
    if ((*pp)->size >= size) { block *b = *pp; *pp = b->next; return (char *)b + 8; }
    pp = &(*pp)->next;
  }
  u32 need = heap_ptr + 8 + size;
  if (need < heap_ptr) opa_abort("opa_malloc: out of memory");
  if (need > heap_top) {
    u32 pages = (need - heap_top) / 65536u + 1u;
    if (__builtin_wasm_memory_grow(0, pages) == (size_t)-1) opa_abort("opa_malloc: out of memory");
    heap_top = (u32)__builtin_wasm_memory_size(0) * 65536u;
  }
  block *b = (block *)heap_ptr;
  b->size = size;
  heap_ptr = need;
  return (char *)b + 8;
}

EXPORT("opa_free") void opa_free(void *p) {
  if (!p) return;
  block *b = (block *)((char *)p - 8);
  b->next = free_list;
  free_list = b;
}
EXPORT("opa_heap_ptr_get") u32 opa_heap_ptr_get(void) { return heap_ptr; }
EXPORT("opa_heap_ptr_set") void opa_heap_ptr_set(u32 p) { heap_ptr = p; free_list = 0; }
EXPORT("opa_heap_blocks_stash") void opa_heap_blocks_stash(void) { stash_list = free_list; free_list = 0; }
EXPORT("opa_heap_blocks_restore") void opa_heap_blocks_restore(void) { free_list = stash_list; stash_list = 0; }
EXPORT("opa_heap_stash_clear") void opa_heap_stash_clear(void) { stash_list = 0; }

/* ---- values ---- */
static value *mk(int t) {
  value *v = opa_malloc(sizeof(value));
  v->t = t; v->len = 0; v->cap = 0; v->s = 0; v->a = 0; v->b = 0;
  return v;
}
value *mk_null(void) { return mk(T_NULL); }
value *mk_bool(int b) { value *v = mk(T_BOOL); v->len = b ? 1 : 0; return v; }
value *mk_str(const char *s) { value *v = mk(T_STR); v->s = s; v->len = (int)cstrlen(s); return v; }
value *mk_arr(void) { return mk(T_ARR); }
value *mk_obj(void) { return mk(T_OBJ); }
value *mk_set(void) { return mk(T_SET); }
value *mk_num_int(long long n) {
  char tmp[24]; int i = 23, neg = n < 0; unsigned long long u = neg ? -(unsigned long long)n : (unsigned long long)n;
  tmp[i] = 0;
  do { tmp[--i] = (char)('0' + u % 10); u /= 10; } while (u);
  if (neg) tmp[--i] = '-';
  int len = 23 - i;
  char *s = opa_malloc(len + 1);
  memcpy(s, tmp + i, len + 1);
  value *v = mk(T_NUM); v->s = s; v->len = len;
  return v;
}

static void grow(value *v, int with_b) {
  int cap = v->cap ? v->cap * 2 : 4;
  value **na = opa_malloc(sizeof(value *) * cap);
  if (v->len) memcpy(na, v->a, sizeof(value *) * v->len);
  if (v->a) opa_free(v->a);
  v->a = na;
  if (with_b) {
    value **nb = opa_malloc(sizeof(value *) * cap);
    if (v->len) memcpy(nb, v->b, sizeof(value *) * v->len);
    if (v->b) opa_free(v->b);
    v->b = nb;
  }
  v->cap = cap;
}
void arr_push(value *arr, value *x) { if (arr->len == arr->cap) grow(arr, 0); arr->a[arr->len++] = x; }
void set_add(value *set, value *x) { /* kept sorted, no duplicates (OPA's set order) */
  int i = 0;
  while (i < set->len) { int c = value_cmp(set->a[i], x); if (c == 0) return; if (c > 0) break; i++; }
  if (set->len == set->cap) grow(set, 0);
  memmove(set->a + i + 1, set->a + i, sizeof(value *) * (set->len - i));
  set->a[i] = x; set->len++;
}
static int str_eq(value *k, const char *s, int n) {
  if (k->len != n) return 0;
  for (int i = 0; i < n; i++) if (k->s[i] != s[i]) return 0;
  return 1;
}
value *obj_get(value *o, const char *key) {
  if (!o || o->t != T_OBJ) return 0;
  int n = (int)cstrlen(key);
  for (int i = 0; i < o->len; i++) if (o->a[i]->t == T_STR && str_eq(o->a[i], key, n)) return o->b[i];
  return 0;
}
value *obj_getv(value *o, value *key) {
  if (!o || !key || o->t != T_OBJ) return 0;
  for (int i = 0; i < o->len; i++) if (value_eq(o->a[i], key)) return o->b[i];
  return 0;
}
static void obj_putv(value *o, value *k, value *x) {
  for (int i = 0; i < o->len; i++) if (value_eq(o->a[i], k)) { o->b[i] = x; return; }
  if (o->len == o->cap) grow(o, 1);
  o->a[o->len] = k; o->b[o->len] = x; o->len++;
}
void obj_put(value *o, const char *key, value *x) { obj_putv(o, mk_str(key), x); }

static double num_val(value *v) { /* enough for comparisons in tests */
  const char *s = v->s; int i = 0, n = v->len; double sign = 1, r = 0, f = 0.1; int e = 0, es = 1;
  if (i < n && s[i] == '-') { sign = -1; i++; }
  while (i < n && s[i] >= '0' && s[i] <= '9') r = r * 10 + (s[i++] - '0');
  if (i < n && s[i] == '.') { i++; while (i < n && s[i] >= '0' && s[i] <= '9') { r += (s[i++] - '0') * f; f /= 10; } }
  if (i < n && (s[i] == 'e' || s[i] == 'E')) {
    i++; if (i < n && (s[i] == '+' || s[i] == '-')) { es = s[i] == '-' ? -1 : 1; i++; }
    while (i < n && s[i] >= '0' && s[i] <= '9') e = e * 10 + (s[i++] - '0');
  }
  while (e-- > 0) r = es > 0 ? r * 10 : r / 10;
  return sign * r;
}
int value_cmp(value *x, value *y) {
  if (x->t != y->t) return x->t < y->t ? -1 : 1;
  switch (x->t) {
  case T_NULL: return 0;
  case T_BOOL: return x->len - y->len;
  case T_NUM: { double a = num_val(x), b = num_val(y); return a < b ? -1 : a > b ? 1 : 0; }
  case T_STR: {
    int n = x->len < y->len ? x->len : y->len;
    for (int i = 0; i < n; i++) if (x->s[i] != y->s[i]) return (unsigned char)x->s[i] < (unsigned char)y->s[i] ? -1 : 1;
    return x->len - y->len;
  }
  default: {
    int n = x->len < y->len ? x->len : y->len;
    for (int i = 0; i < n; i++) {
      int c = value_cmp(x->a[i], y->a[i]); if (c) return c;
      if (x->t == T_OBJ) { c = value_cmp(x->b[i], y->b[i]); if (c) return c; }
    }
    return x->len - y->len;
  }
  }
}
int value_eq(value *a, value *b) { return value_cmp(a, b) == 0; }

/* ---- JSON parser ---- */
static const char *P, *E;
static int perr;
static void ws(void) { while (P < E && (*P == ' ' || *P == '\t' || *P == '\n' || *P == '\r')) P++; }
static int hex4(const char *s) {
  int r = 0;
  for (int i = 0; i < 4; i++) {
    char c = s[i]; r <<= 4;
    if (c >= '0' && c <= '9') r |= c - '0'; else if (c >= 'a' && c <= 'f') r |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') r |= c - 'A' + 10; else return -1;
  }
  return r;
}
static value *parse_str(void) {
  const char *q = ++P; int n = 0;
  while (q < E && *q != '"') { if (*q == '\\') q++; q++; n++; }
  if (q >= E) { perr = 1; return 0; }
  char *out = opa_malloc((size_t)(q - P) + 1); /* decoded is never longer than encoded */
  char *o = out;
  while (P < E && *P != '"') {
    char c = *P++;
    if ((unsigned char)c < 0x20) { perr = 1; return 0; }
    if (c != '\\') { *o++ = c; continue; }
    if (P >= E) { perr = 1; return 0; }
    c = *P++;
    switch (c) {
    case '"': *o++ = '"'; break; case '\\': *o++ = '\\'; break; case '/': *o++ = '/'; break;
    case 'b': *o++ = '\b'; break; case 'f': *o++ = '\f'; break; case 'n': *o++ = '\n'; break;
    case 'r': *o++ = '\r'; break; case 't': *o++ = '\t'; break;
    case 'u': {
      if (E - P < 4) { perr = 1; return 0; }
      int cp = hex4(P); P += 4;
      if (cp < 0) { perr = 1; return 0; }
      if (cp >= 0xD800 && cp < 0xDC00 && E - P >= 6 && P[0] == '\\' && P[1] == 'u') {
        int lo = hex4(P + 2);
        if (lo >= 0xDC00 && lo < 0xE000) { cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00); P += 6; }
      }
      if (cp < 0x80) *o++ = (char)cp;
      else if (cp < 0x800) { *o++ = (char)(0xC0 | (cp >> 6)); *o++ = (char)(0x80 | (cp & 63)); }
      else if (cp < 0x10000) { *o++ = (char)(0xE0 | (cp >> 12)); *o++ = (char)(0x80 | ((cp >> 6) & 63)); *o++ = (char)(0x80 | (cp & 63)); }
      else { *o++ = (char)(0xF0 | (cp >> 18)); *o++ = (char)(0x80 | ((cp >> 12) & 63)); *o++ = (char)(0x80 | ((cp >> 6) & 63)); *o++ = (char)(0x80 | (cp & 63)); }
      break;
    }
    default: perr = 1; return 0;
    }
  }
  P++; /* closing quote */
  *o = 0;
  value *v = mk(T_STR); v->s = out; v->len = (int)(o - out);
  return v;
}
static int lit(const char *w) {
  int n = (int)cstrlen(w);
  if (E - P < n) return 0;
  for (int i = 0; i < n; i++) if (P[i] != w[i]) return 0;
  P += n; return 1;
}
static value *parse_val(int depth) {
  if (depth > 200) { perr = 1; return 0; }
  ws();
  if (P >= E) { perr = 1; return 0; }
  char c = *P;
  if (c == '"') return parse_str();
  if (c == '{') {
    P++; value *o = mk_obj(); ws();
    if (P < E && *P == '}') { P++; return o; }
    for (;;) {
      ws();
      if (P >= E || *P != '"') { perr = 1; return 0; }
      value *k = parse_str(); if (perr) return 0;
      ws(); if (P >= E || *P != ':') { perr = 1; return 0; }
      P++;
      value *x = parse_val(depth + 1); if (perr) return 0;
      obj_putv(o, k, x);
      ws();
      if (P < E && *P == ',') { P++; continue; }
      if (P < E && *P == '}') { P++; return o; }
      perr = 1; return 0;
    }
  }
  if (c == '[') {
    P++; value *a = mk_arr(); ws();
    if (P < E && *P == ']') { P++; return a; }
    for (;;) {
      value *x = parse_val(depth + 1); if (perr) return 0;
      arr_push(a, x); ws();
      if (P < E && *P == ',') { P++; continue; }
      if (P < E && *P == ']') { P++; return a; }
      perr = 1; return 0;
    }
  }
  if (lit("true")) return mk_bool(1);
  if (lit("false")) return mk_bool(0);
  if (lit("null")) return mk_null();
  if (c == '-' || (c >= '0' && c <= '9')) {
    const char *s = P;
    if (*P == '-') P++;
    if (P >= E || *P < '0' || *P > '9') { perr = 1; return 0; }
    while (P < E && *P >= '0' && *P <= '9') P++;
    if (P < E && *P == '.') { P++; while (P < E && *P >= '0' && *P <= '9') P++; }
    if (P < E && (*P == 'e' || *P == 'E')) { P++; if (P < E && (*P == '+' || *P == '-')) P++; while (P < E && *P >= '0' && *P <= '9') P++; }
    int n = (int)(P - s);
    char *t = opa_malloc(n + 1); memcpy(t, s, n); t[n] = 0;
    value *v = mk(T_NUM); v->s = t; v->len = n;
    return v;
  }
  perr = 1; return 0;
}
EXPORT("opa_json_parse") value *opa_json_parse(const char *s, int len) {
  P = s; E = s + len; perr = 0;
  value *v = parse_val(0);
  if (perr) return 0;
  ws();
  if (P != E) return 0;
  return v;
}
EXPORT("opa_value_parse") value *opa_value_parse(const char *s, int len) { return opa_json_parse(s, len); }

/* ---- JSON dump ---- */
typedef struct { char *p; u32 n, cap; } sbuf;
static void put(sbuf *b, const char *s, u32 n) {
  if (b->n + n + 1 > b->cap) {
    u32 cap = b->cap * 2; if (cap < b->n + n + 1) cap = b->n + n + 1;
    char *np = opa_malloc(cap);
    if (b->n) memcpy(np, b->p, b->n);
    opa_free(b->p);
    b->p = np; b->cap = cap;
  }
  memcpy(b->p + b->n, s, n); b->n += n;
}
static void dump(sbuf *b, value *v) {
  static const char hx[] = "0123456789abcdef";
  switch (v->t) {
  case T_NULL: put(b, "null", 4); return;
  case T_BOOL: if (v->len) put(b, "true", 4); else put(b, "false", 5); return;
  case T_NUM: put(b, v->s, v->len); return;
  case T_STR: {
    put(b, "\"", 1);
    for (int i = 0; i < v->len; i++) {
      unsigned char c = (unsigned char)v->s[i];
      if (c == '"') put(b, "\\\"", 2); else if (c == '\\') put(b, "\\\\", 2);
      else if (c == '\n') put(b, "\\n", 2); else if (c == '\t') put(b, "\\t", 2); else if (c == '\r') put(b, "\\r", 2);
      else if (c < 0x20) { char e[6] = {'\\', 'u', '0', '0', hx[c >> 4], hx[c & 15]}; put(b, e, 6); }
      else put(b, (const char *)&v->s[i], 1);
    }
    put(b, "\"", 1);
    return;
  }
  case T_ARR: case T_SET:
    put(b, "[", 1);
    for (int i = 0; i < v->len; i++) { if (i) put(b, ",", 1); dump(b, v->a[i]); }
    put(b, "]", 1);
    return;
  case T_OBJ:
    put(b, "{", 1);
    for (int i = 0; i < v->len; i++) {
      if (i) put(b, ",", 1);
      if (v->a[i]->t == T_STR) dump(b, v->a[i]);
      else { sbuf k = {0, 0, 0}; dump(&k, v->a[i]); put(b, "\"", 1); put(b, k.p, k.n); put(b, "\"", 1); }
      put(b, ":", 1);
      dump(b, v->b[i]);
    }
    put(b, "}", 1);
    return;
  }
  opa_abort("opa_json_dump: corrupt value");
}
EXPORT("opa_json_dump") char *opa_json_dump(value *v) {
  sbuf b = {0, 0, 0};
  if (!v) put(&b, "null", 4); else dump(&b, v);
  put(&b, "", 0);
  b.p[b.n] = 0;
  return b.p;
}
EXPORT("opa_value_dump") char *opa_value_dump(value *v) { return opa_json_dump(v); }
EXPORT("opa_value_free") void opa_value_free(value *v) { opa_free(v); }

/* ---- maps, context API, opa_eval ---- */
EXPORT("builtins") value *builtins(void) { return opa_json_parse(BUILTINS_JSON, (int)cstrlen(BUILTINS_JSON)); }
EXPORT("entrypoints") value *entrypoints(void) { return opa_json_parse(ENTRYPOINTS_JSON, (int)cstrlen(ENTRYPOINTS_JSON)); }

typedef struct { value *input, *data, *result; int entrypoint; } ctx_t;
EXPORT("opa_eval_ctx_new") ctx_t *opa_eval_ctx_new(void) {
  ctx_t *c = opa_malloc(sizeof(ctx_t));
  c->input = 0; c->data = 0; c->result = 0; c->entrypoint = 0;
  return c;
}
EXPORT("opa_eval_ctx_set_input") void opa_eval_ctx_set_input(ctx_t *c, value *v) { c->input = v; }
EXPORT("opa_eval_ctx_set_data") void opa_eval_ctx_set_data(ctx_t *c, value *v) { c->data = v; }
EXPORT("opa_eval_ctx_set_entrypoint") void opa_eval_ctx_set_entrypoint(ctx_t *c, int e) { c->entrypoint = e; }
EXPORT("opa_eval_ctx_get_result") value *opa_eval_ctx_get_result(ctx_t *c) { return c->result; }

static int n_entrypoints(void) { /* count the map's entries without allocating */
  int n = 0;
  for (const char *q = ENTRYPOINTS_JSON; *q; q++) if (*q == ':') n++;
  return n;
}
EXPORT("eval") int eval(ctx_t *c) {
  if (c->entrypoint < 0 || c->entrypoint >= n_entrypoints()) opa_abort("internal: illegal entrypoint id");
  value *rs = mk_set();
  value *r = policy_eval(c->entrypoint, c->input, c->data);
  if (r) { value *b = mk_obj(); obj_put(b, "result", r); set_add(rs, b); }
  c->result = rs;
  return 0;
}
EXPORT("opa_eval") char *opa_eval(int reserved, int ep, value *data, const char *input, int len, u32 heap, int format) {
  if (reserved != 0) opa_abort("opa_eval: reserved argument must be 0");
  opa_heap_ptr_set(heap);
  value *in = 0;
  if (len > 0) {
    in = opa_value_parse(input, len);
    if (!in) opa_abort("opa_eval: invalid input JSON");
  }
  ctx_t c = {in, data, 0, ep};
  if (eval(&c) != 0) opa_abort("eval failed");
  (void)format;
  return opa_json_dump(c.result);
}
