/*
 * upper: a Frys Edge WASI command plugin (the ABI is in ../ABI.md). Reads JSON
 * on stdin and writes it to stdout with the ASCII letters inside strings
 * uppercased: "hello" -> "HELLO". Letters outside strings (true, null, 1e5)
 * and the letter after a backslash (\n, \u) are left alone, so valid JSON in
 * gives valid JSON out. Streams in 64 KiB chunks; exit status 1 on an I/O error.
 */
#include <unistd.h>

static unsigned char buf[65536];

static int write_all(const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = write(1, p, n);
        if (w <= 0) return 0;
        p += w;
        n -= (size_t)w;
    }
    return 1;
}

int main(void) {
    int in_string = 0, escaped = 0;
    for (;;) {
        ssize_t n = read(0, buf, sizeof buf);
        if (n < 0) return 1;
        if (n == 0) return 0;
        for (ssize_t i = 0; i < n; i++) {
            unsigned char c = buf[i];
            if (!in_string) {
                in_string = c == '"';
            } else if (escaped) {
                escaped = 0;
            } else if (c == '\\') {
                escaped = 1;
            } else if (c == '"') {
                in_string = 0;
            } else if (c >= 'a' && c <= 'z') {
                buf[i] = (unsigned char)(c - 'a' + 'A');
            }
        }
        if (!write_all(buf, (size_t)n)) return 1;
    }
}
