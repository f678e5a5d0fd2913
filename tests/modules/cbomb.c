/* memory bomb in C: allocates and touches 1 MiB blocks (kept in a list, so the compiler cannot
 * drop them) until malloc fails, then aborts */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void) {
    void **list = NULL;
    unsigned long blocks = 0;
    for (;;) {
        void **p = malloc(1 << 20);
        if (!p) { fprintf(stderr, "malloc failed after %lu MiB\n", blocks); abort(); }
        memset(p, 1, 1 << 20);
        *p = list;
        list = p;
        blocks++;
    }
}
