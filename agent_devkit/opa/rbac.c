/* The RBAC example from OPA's docs, hand-compiled:
 *   package app.rbac
 *   default allow := false
 *   allow if user_is_admin
 *   allow if { some grant in user_is_granted; input.action == grant.action; input.type == grant.type }
 *   user_is_admin if "admin" in data.app.rbac.user_roles[input.user]
 *   user_is_granted contains grant if {
 *     some role in data.app.rbac.user_roles[input.user]; some grant in data.app.rbac.role_grants[role] }
 * Entrypoints: app/rbac (the package object) and app/rbac/allow. No host builtins. */
#include "opa_rt.h"

const char BUILTINS_JSON[] = "{}";
const char ENTRYPOINTS_JSON[] = "{\"app/rbac\":0,\"app/rbac/allow\":1}";

static value *user_roles(value *input, value *data) {
  value *app = obj_get(obj_get(data, "app"), "rbac");
  value *user = obj_get(input, "user");
  if (!app || !user) return 0;
  value *roles = obj_getv(obj_get(app, "user_roles"), user);
  return (roles && (roles->t == T_ARR || roles->t == T_SET)) ? roles : 0;
}

static int user_is_admin(value *input, value *data) {
  value *roles = user_roles(input, data);
  if (!roles) return 0;
  value *admin = mk_str("admin");
  for (int i = 0; i < roles->len; i++) if (value_eq(roles->a[i], admin)) return 1;
  return 0;
}

static value *user_is_granted(value *input, value *data) {
  value *set = mk_set();
  value *roles = user_roles(input, data);
  value *grants = obj_get(obj_get(obj_get(data, "app"), "rbac"), "role_grants");
  if (!roles || !grants) return set;
  for (int i = 0; i < roles->len; i++) {
    value *g = obj_getv(grants, roles->a[i]);
    if (!g || (g->t != T_ARR && g->t != T_SET)) continue;
    for (int j = 0; j < g->len; j++) set_add(set, g->a[j]);
  }
  return set;
}

static int allow(value *input, value *data, int admin, value *granted) {
  if (admin) return 1;
  value *action = obj_get(input, "action"), *type = obj_get(input, "type");
  if (!action || !type) return 0;
  for (int i = 0; i < granted->len; i++) {
    value *ga = obj_get(granted->a[i], "action"), *gt = obj_get(granted->a[i], "type");
    if (ga && gt && value_eq(ga, action) && value_eq(gt, type)) return 1;
  }
  (void)data;
  return 0;
}

value *policy_eval(int ep, value *input, value *data) {
  int admin = user_is_admin(input, data);
  value *granted = user_is_granted(input, data);
  value *allowed = mk_bool(allow(input, data, admin, granted));
  if (ep == 1) return allowed;
  value *pkg = mk_obj();
  obj_put(pkg, "allow", allowed);
  if (admin) obj_put(pkg, "user_is_admin", mk_bool(1)); /* undefined rules are absent */
  obj_put(pkg, "user_is_granted", granted);
  return pkg;
}
