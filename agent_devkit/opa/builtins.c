/* Host-builtin dispatch as OPA compiles it: non-contiguous static ids, opa_builtinN by arity,
 * ctx always 0, a 0 return = undefined. */
#include "opa_rt.h"

#ifdef EXTRA_BUILTIN
const char BUILTINS_JSON[] = "{\"sprintf\":3,\"time.now_ns\":7,\"custom.zero\":0,\"custom.undef\":12,"
                             "\"custom.cat4\":9,\"custom.fail\":2,\"crypto.x509.parse_certificates\":20}";
#else
const char BUILTINS_JSON[] = "{\"sprintf\":3,\"time.now_ns\":7,\"custom.zero\":0,\"custom.undef\":12,"
                             "\"custom.cat4\":9,\"custom.fail\":2}";
#endif
const char ENTRYPOINTS_JSON[] = "{\"t/fmt\":0,\"t/now\":1,\"t/undef\":2,\"t/cat4\":3,\"t/zero\":4,\"t/fail\":5,"
                                "\"t/call3\":6}";

value *policy_eval(int ep, value *input, value *data) {
  (void)data;
  switch (ep) {
  case 0: { /* sprintf("%s has %d items (%.2f%%)", [input.name, input.n, input.pct]) */
    value *args = mk_arr();
    value *name = obj_get(input, "name"), *n = obj_get(input, "n"), *pct = obj_get(input, "pct");
    if (!name || !n || !pct) return 0;
    arr_push(args, name); arr_push(args, n); arr_push(args, pct);
    return opa_builtin2(3, 0, mk_str("%s has %d items (%.2f%%)"), args);
  }
  case 1: { /* [time.now_ns(), time.now_ns()] : one value per evaluation */
    value *a = mk_arr();
    value *x = opa_builtin0(7, 0); if (!x) return 0;
    value *y = opa_builtin0(7, 0); if (!y) return 0;
    arr_push(a, x); arr_push(a, y);
    return a;
  }
  case 2: return opa_builtin1(12, 0, input ? input : mk_null()); /* 0 = undefined */
  case 3: {
    if (!input || input->t != T_ARR || input->len != 4) return 0;
    return opa_builtin4(9, 0, input->a[0], input->a[1], input->a[2], input->a[3]);
  }
  case 4: return opa_builtin0(0, 0);
  case 5: return opa_builtin1(2, 0, input ? input : mk_null());
  case 6: { /* custom.cat4 is 4-ary; call3 checks opa_builtin3 routes too, via sprintf's id with 3 args */
    if (!input || input->t != T_ARR || input->len != 3) return 0;
    return opa_builtin3(9, 0, input->a[0], input->a[1], input->a[2]);
  }
  }
  return 0;
}
