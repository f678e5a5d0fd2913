/* Well-behaved and hostile entrypoints for the sandbox and result-set tests. */
#include "opa_rt.h"
#ifdef WITH_PRINTLN
IMPORT("opa_println") void opa_println(const char *msg);
#endif

const char BUILTINS_JSON[] = "{}";
const char ENTRYPOINTS_JSON[] = "{\"ok/echo\":0,\"ok/data\":1,\"ok/false\":2,\"ok/null\":3,\"ok/undefined\":4,"
                                "\"bad/loop\":5,\"bad/abort\":6,\"bad/bomb\":7,\"bad/huge\":8,\"bad/trap\":9,"
                                "\"ok/data_path\":10,\"ok/print\":11}";

value *policy_eval(int ep, value *input, value *data) {
  switch (ep) {
  case 0: return input; /* undefined input -> undefined result */
  case 1: return data ? data : 0;
  case 2: return mk_bool(0);
  case 3: return mk_null();
  case 4: return 0;
  case 5: { volatile int x = 1; while (x) { x = x + 0; } return 0; }
  case 6: opa_abort("policy.rego:7: eval_conflict_error: complete rules must not produce multiple outputs");
    return 0;
  case 7: for (;;) { char *p = opa_malloc(1 << 20); p[0] = 1; }
  case 8: {
    value *n = obj_get(input, "n");
    int len = 0;
    if (n) for (int i = 0; i < n->len; i++) len = len * 10 + (n->s[i] - '0');
    char *s = opa_malloc(len + 1);
    for (int i = 0; i < len; i++) s[i] = 'x';
    s[len] = 0;
    return mk_str(s);
  }
  case 9: __builtin_trap();
  case 11:
#ifdef WITH_PRINTLN
    opa_println("hello from the policy");
#endif
    return mk_bool(1);
  case 10: { /* data.<input.key> */
    value *k = obj_get(input, "key");
    return k ? obj_getv(data, k) : 0;
  }
  }
  return 0;
}
