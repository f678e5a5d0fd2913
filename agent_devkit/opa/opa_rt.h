/* A small OPA-Wasm-ABI-conformant runtime for test policies (the shape of OPA's own C runtime:
 * values on a guest heap, bump allocator with free lists, JSON parse/dump, opa_eval fast path and
 * the context API). Policies implement policy_eval(); see rbac.c, builtins.c, sandbox.c. */
#ifndef OPA_RT_H
#define OPA_RT_H
typedef unsigned int u32;
typedef unsigned long size_t;
enum { T_NULL = 1, T_BOOL, T_NUM, T_STR, T_ARR, T_OBJ, T_SET };
typedef struct value {
  int t;
  int len;   /* string/number bytes, array/set/object element count; bool value */
  int cap;
  const char *s;
  struct value **a; /* elements or keys */
  struct value **b; /* object values */
} value;

#define IMPORT(n) __attribute__((import_module("env"), import_name(n)))
#define EXPORT(n) __attribute__((used, visibility("default"))) /* exported by name via build.py */
IMPORT("opa_abort") void opa_abort(const char *msg);
IMPORT("opa_builtin0") value *opa_builtin0(int id, int ctx);
IMPORT("opa_builtin1") value *opa_builtin1(int id, int ctx, value *a);
IMPORT("opa_builtin2") value *opa_builtin2(int id, int ctx, value *a, value *b);
IMPORT("opa_builtin3") value *opa_builtin3(int id, int ctx, value *a, value *b, value *c);
IMPORT("opa_builtin4") value *opa_builtin4(int id, int ctx, value *a, value *b, value *c, value *d);

void *opa_malloc(size_t n);
void opa_free(void *p);
value *opa_json_parse(const char *s, int len);
char *opa_json_dump(value *v);
value *mk_null(void);
value *mk_bool(int b);
value *mk_str(const char *s);
value *mk_num_int(long long n);
value *mk_arr(void);
value *mk_obj(void);
value *mk_set(void);
void arr_push(value *arr, value *v);
void set_add(value *set, value *v);
void obj_put(value *obj, const char *key, value *v);
value *obj_get(value *obj, const char *key);
value *obj_getv(value *obj, value *key);
int value_eq(value *a, value *b);
int value_cmp(value *a, value *b);
size_t cstrlen(const char *s);

/* supplied by the policy */
extern const char BUILTINS_JSON[];
extern const char ENTRYPOINTS_JSON[];
/* returns the value of the entrypoint, or 0 when undefined */
value *policy_eval(int ep, value *input, value *data);
#endif
