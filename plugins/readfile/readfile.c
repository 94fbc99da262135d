/* readfile: a WASI command that prints the file whose path (inside the sandbox) arrives on
 * stdin, as a JSON string. It can only see directories the operator granted with
 * [plugins.grants.readfile] dirs = ["HOST:GUEST"]; without the grant the open fails. */
#include <stdio.h>
#include <string.h>

int main(void) {
    char path[512];
    size_t n = fread(path, 1, sizeof path - 1, stdin);
    path[n] = 0;
    while (n && (path[n - 1] == '\n' || path[n - 1] == '"')) path[--n] = 0;
    const char *name = path[0] == '"' ? path + 1 : path;
    FILE *f = fopen(name, "r");
    if (!f) {
        fprintf(stdout, "{\"error\":\"cannot open %s\"}", name);
        return 1;
    }
    putchar('"');
    int c;
    while ((c = fgetc(f)) != EOF) {
        if (c == '"' || c == '\\') putchar('\\');
        if (c >= 32) putchar(c);
    }
    putchar('"');
    fclose(f);
    return 0;
}
