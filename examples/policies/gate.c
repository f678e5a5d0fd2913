/* gate.rego hand-compiled to the OPA Wasm ABI with the runtime in agent_devkit/opa/opa_rt.c.
 * Entrypoint 0 = edge/decision. No host builtins. See gate.rego for the rules. */
#include "opa_rt.h"

const char BUILTINS_JSON[] = "{}";
const char ENTRYPOINTS_JSON[] = "{\"edge/decision\":0}";

static int is_str(value *v, const char *s) {
  if (!v || v->t != T_STR) return 0;
  int n = (int)cstrlen(s);
  if (v->len != n) return 0;
  for (int i = 0; i < n; i++) if (v->s[i] != s[i]) return 0;
  return 1;
}

static int starts_with(value *v, const char *p) {
  if (!v || v->t != T_STR) return 0;
  int n = (int)cstrlen(p);
  if (v->len < n) return 0;
  for (int i = 0; i < n; i++) if (v->s[i] != p[i]) return 0;
  return 1;
}

static int ends_with(value *v, const char *p) {
  if (!v || v->t != T_STR) return 0;
  int n = (int)cstrlen(p);
  if (v->len < n) return 0;
  for (int i = 0; i < n; i++) if (v->s[v->len - n + i] != p[i]) return 0;
  return 1;
}

static int member(value *coll, value *x) {
  if (!coll || !x || (coll->t != T_ARR && coll->t != T_SET)) return 0;
  for (int i = 0; i < coll->len; i++) if (value_eq(coll->a[i], x)) return 1;
  return 0;
}

static value *verdict(int allow, const char *reason) {
  value *d = mk_obj();
  obj_put(d, "allow", mk_bool(allow));
  obj_put(d, "reason", mk_str(reason));
  return d;
}

value *policy_eval(int ep, value *input, value *data) {
  if (ep != 0) return 0;
  value *edge = obj_get(data, "edge");
  value *lockout = obj_get(edge, "lockout");
  value *limits = obj_get(edge, "limits");
  value *kind = obj_get(input, "kind");
  if (is_str(kind, "actuation")) {
    value *act = obj_get(input, "actuation");
    value *topic = obj_get(act, "topic");
    value *device = obj_get(obj_get(act, "payload"), "device");
    if (member(lockout, device)) return verdict(0, "device is locked out for maintenance");
    if (starts_with(topic, "actuators/") && ends_with(topic, "/fan")) {
      value *d = verdict(1, "fan command");
      value *mask = obj_get(edge, "mask");  /* object.get(data.edge, "mask", ["value"]) */
      if (!mask) {
        mask = mk_arr();
        arr_push(mask, mk_str("value"));
      }
      obj_put(d, "mask", mask);
      return d;
    }
  } else if (is_str(kind, "property")) {
    value *prop = obj_get(input, "property");
    value *actuated = obj_get(edge, "actuated");  /* object.get(data.edge, "actuated", ["fan"]) */
    if (!actuated) {
      actuated = mk_arr();
      arr_push(actuated, mk_str("fan"));
    }
    /* locked_state: an actuated state of a locked-out device (its actuations are denied) */
    if (member(lockout, obj_get(prop, "device")) && member(actuated, obj_get(prop, "name")))
      return verdict(0, "device is locked out for maintenance: actuated state not changed");
    value *limit = obj_getv(limits, obj_get(prop, "name"));
    value *d = verdict(1, "property update");
    if (limit) {
      value *clamp = mk_obj();
      obj_put(clamp, "", limit);
      obj_put(d, "clamp", clamp);
    }
    return d;
  }
  return verdict(0, "only actuators/<line>/<sensor>/fan commands are allowed");
}
