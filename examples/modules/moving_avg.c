/* moving_avg — derived telemetry: the mean, min and max of each device's metric over the window.
 *
 * config: {"metric": "temp", "suffix": "_avg"}
 * For every device with readings of `metric` in this run's window, emits telemetry
 * {"device", "metric": metric+suffix, "value": mean} (plus _min/_max), and keeps in its state the
 * running total of readings it has averaged so far (a real saved-state example).
 */
#include "mjson.h"

#define MAX_DEVICES 128

typedef struct { const char *name; double sum, min, max, last_wall; int n; } acc;

int main(void) {
    static acc devs[MAX_DEVICES];
    int ndev = 0;
    mj *in = mj_read_stdin();
    mj *config = mj_get(in, "config");
    const char *metric = mj_str(config, "metric", "temp");
    const char *suffix = mj_str(config, "suffix", "_avg");
    double total = mj_num(mj_get(in, "state"), "readings_total", 0);

    mj *readings = mj_get(in, "readings");
    if (readings && readings->type == MJ_ARR)
        for (mj *r = readings->child; r; r = r->next) {
            mj *v = mj_get(r, "value");
            const char *dev = mj_str(r, "device", NULL);
            if (!dev || !v || v->type != MJ_NUM || strcmp(mj_str(r, "metric", ""), metric)) continue;
            acc *a = NULL;
            for (int i = 0; i < ndev; i++) if (!strcmp(devs[i].name, dev)) { a = &devs[i]; break; }
            if (!a) {
                if (ndev == MAX_DEVICES) continue;
                a = &devs[ndev++]; a->name = dev; a->n = 0; a->sum = 0; a->min = v->num; a->max = v->num;
            }
            a->sum += v->num; a->n++; total++;
            if (v->num < a->min) a->min = v->num;
            if (v->num > a->max) a->max = v->num;
            a->last_wall = mj_num(r, "wall", 0);
        }

    printf("{\"telemetry\":[");
    for (int i = 0; i < ndev; i++) {
        acc *a = &devs[i];
        const char *names[3] = {suffix, "_min", "_max"};
        double values[3] = {a->sum / a->n, a->min, a->max};
        for (int k = 0; k < 3; k++) {
            if (i || k) putchar(',');
            printf("{\"device\":"); mj_put_str(a->name);
            printf(",\"metric\":\"%s%s\",\"value\":", metric, names[k]);
            mj_put_num(values[k]);
            printf(",\"wall\":"); printf("%.3f", a->last_wall);
            printf("}");
        }
    }
    printf("],\"state\":{\"readings_total\":");
    mj_put_num(total);
    printf("}}\n");
    return 0;
}
