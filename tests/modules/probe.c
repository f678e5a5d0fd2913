/* probe: tries to escape the sandbox — read a host file, list the root, write a scratch file,
 * read an environment variable — and reports what worked as a valid module output. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>

static const char *try_read(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return "denied";
    char buf[16];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    return n > 0 ? "read" : "empty";
}

int main(void) {
    const char *passwd = try_read("/etc/passwd");
    const char *root = opendir("/") ? "listed" : "denied";
    const char *scratch = "denied";
    FILE *w = fopen("/scratch/probe.txt", "w");
    if (w) { fputs("hello", w); fclose(w); scratch = try_read("/scratch/probe.txt"); }
    const char *env = getenv("PROBE_TOKEN");
    printf("{\"events\":[{\"severity\":\"info\",\"type\":\"probe\",\"message\":\"sandbox probe\","
           "\"passwd\":\"%s\",\"root\":\"%s\",\"scratch\":\"%s\",\"env\":\"%s\"}]}\n",
           passwd, root, scratch, env ? "set" : "unset");
    return 0;
}
