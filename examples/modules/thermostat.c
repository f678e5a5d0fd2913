/* thermostat — a threshold controller with hysteresis over temperature readings.
 *
 * Input (edge-agent module contract): {"trigger", "readings", "config", "state"}.
 * config: {"metric": "temp", "high": 30.0, "low": 27.0, "actuator_prefix": "actuators"}
 * For every device with readings of `metric`, takes its newest value:
 *   fan off and value >= high -> fan on  (actuation + "overheat" warning event)
 *   fan on  and value <= low  -> fan off (actuation + "cooled" info event)
 * Between low and high nothing changes (hysteresis), so a sensor hovering at the threshold does
 * not make the fan flap. The fan state per device is the module's saved state, so it survives
 * restarts of the agent. Every run reports properties "fan" and "<metric>" for the devices seen.
 */
#include "mjson.h"

#define MAX_DEVICES 64

typedef struct { const char *name; int on; int seen; double value; } device;

static device devs[MAX_DEVICES];
static int ndev = 0;

static device *find(const char *name, int create) {
    for (int i = 0; i < ndev; i++) if (!strcmp(devs[i].name, name)) return &devs[i];
    if (!create || ndev == MAX_DEVICES) return NULL;
    devs[ndev].name = name; devs[ndev].on = 0; devs[ndev].seen = 0;
    return &devs[ndev++];
}

int main(void) {
    mj *in = mj_read_stdin();
    mj *config = mj_get(in, "config");
    mj *state = mj_get(in, "state");
    const char *metric = mj_str(config, "metric", "temp");
    double high = mj_num(config, "high", 30.0);
    double low = mj_num(config, "low", 27.0);
    const char *prefix = mj_str(config, "actuator_prefix", "actuators");
    if (low > high) { fprintf(stderr, "config: low (%g) must not exceed high (%g)\n", low, high); return 3; }

    /* restore the fan state of every device we know */
    mj *on = mj_get(state, "on");
    if (on && on->type == MJ_OBJ)
        for (mj *m = on->child; m; m = m->next) { device *d = find(m->key, 1); if (d) d->on = (m->type == MJ_BOOL && m->num != 0); }
    double runs = mj_num(state, "runs", 0);

    /* newest value per device (readings are oldest first) */
    mj *readings = mj_get(in, "readings");
    if (readings && readings->type == MJ_ARR)
        for (mj *r = readings->child; r; r = r->next) {
            mj *v = mj_get(r, "value");
            const char *dev = mj_str(r, "device", NULL);
            if (!dev || !v || v->type != MJ_NUM || strcmp(mj_str(r, "metric", ""), metric)) continue;
            device *d = find(dev, 1);
            if (d) { d->seen = 1; d->value = v->num; }
        }

    printf("{\"actuations\":[");
    int first = 1;
    int changed[MAX_DEVICES] = {0};
    for (int i = 0; i < ndev; i++) {
        device *d = &devs[i];
        if (!d->seen) continue;
        if (!d->on && d->value >= high) { d->on = 1; changed[i] = 1; }
        else if (d->on && d->value <= low) { d->on = 0; changed[i] = 1; }
        if (!changed[i]) continue;
        if (!first) putchar(',');
        first = 0;
        printf("{\"topic\":\"%s/%s/fan\",\"payload\":{\"fan\":\"%s\",\"device\":", prefix, d->name, d->on ? "on" : "off");
        mj_put_str(d->name);
        printf(",\"value\":");
        mj_put_num(d->value);
        printf("}}");
    }
    printf("],\"events\":[");
    first = 1;
    for (int i = 0; i < ndev; i++) {
        if (!changed[i]) continue;
        device *d = &devs[i];
        if (!first) putchar(',');
        first = 0;
        printf("{\"severity\":\"%s\",\"type\":\"%s\",\"device\":", d->on ? "warning" : "info", d->on ? "overheat" : "cooled");
        mj_put_str(d->name);
        printf(",\"message\":\"%s %s ", metric, d->on ? "reached" : "fell to");
        mj_put_num(d->value);
        printf(", fan %s\"}", d->on ? "on" : "off");
    }
    printf("],\"properties\":[");
    first = 1;
    for (int i = 0; i < ndev; i++) {
        device *d = &devs[i];
        if (!d->seen) continue;
        if (!first) putchar(',');
        first = 0;
        printf("{\"device\":"); mj_put_str(d->name);
        printf(",\"name\":\"fan\",\"value\":\"%s\",\"type\":\"string\"},", d->on ? "on" : "off");
        printf("{\"device\":"); mj_put_str(d->name);
        printf(",\"name\":"); mj_put_str(metric);
        printf(",\"value\":"); mj_put_num(d->value);
        printf(",\"type\":\"float\"}");
    }
    printf("],\"state\":{\"runs\":");
    mj_put_num(runs + 1);
    printf(",\"on\":{");
    for (int i = 0; i < ndev; i++) {
        if (i) putchar(',');
        mj_put_str(devs[i].name);
        printf(":%s", devs[i].on ? "true" : "false");
    }
    printf("}}}\n");
    return 0;
}
