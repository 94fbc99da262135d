/*
 * anomaly: a z-score anomaly detector over a window of readings, as a Frys Edge
 * reactor plugin (the ABI is in ../ABI.md). Freestanding C: no libc, a per-call
 * arena, and a JSON reader that accepts exactly one input shape.
 *
 *   detect        {"values": [numbers...], "threshold": 3.0}
 *              -> {"mean": m, "std": s, "anomalies": [indexes], "scores": [z...]}
 *   detect_batch  [input, input, ...] -> [output, output, ...]
 *
 * std is the population standard deviation; an index is an anomaly when
 * |z| > threshold; when std is 0 every score is 0. "threshold" is optional
 * (default 3). Anything else (unknown or duplicate keys, non-numbers, trailing
 * data) is refused through frys.fail with the byte offset of the problem.
 */

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long usize;

#define IMPORT(name) __attribute__((import_module("frys"), import_name(name)))
#define EXPORT(name) __attribute__((export_name(name)))

IMPORT("log") void frys_log(int level, const u8 *ptr, u32 len);
IMPORT("fail") void frys_fail(const u8 *ptr, u32 len);

enum { LOG_DEBUG = 0 };

/* ---- memory ------------------------------------------------------------------
 * [__heap_base, +input_cap)   the input buffer: the host writes every input here
 *                             (input_buffer grows it; nothing else touches it).
 * [after it, arena_top)       the current call's scratch and output, bump-allocated.
 * Every export resets the arena when it starts, which frees the previous call's
 * output (the host copied it as that call returned), so an instance that serves
 * any number of calls grows only to fit its largest one. */

extern u8 __heap_base;
static u32 input_cap;
static usize arena_top;

/* Makes linear memory at least `end` bytes long; 0 when the memory limit refuses. */
static int reserve(u64 end) {
    u64 have = (u64)__builtin_wasm_memory_size(0) * 65536;
    if (end <= have) return 1;
    if (end > 0xffffffffULL) return 0;
    return __builtin_wasm_memory_grow(0, (usize)((end - have + 65535) / 65536)) != (usize)-1;
}

/* Traps when memory cannot grow: that fails the call (0 would be a valid address). */
EXPORT("input_buffer") u8 *input_buffer(u32 size) {
    if (size > input_cap) {
        if (!reserve((u64)(usize)&__heap_base + size)) __builtin_trap();
        input_cap = size;
    }
    return &__heap_base;
}

static void arena_reset(void) { arena_top = ((usize)&__heap_base + input_cap + 7) & ~(usize)7; }

/* size bytes from the arena, 8-aligned; 0 when memory cannot grow. */
static void *alloc(u32 size) {
    usize base = (arena_top + 7) & ~(usize)7;
    if (!reserve((u64)base + size)) return 0;
    arena_top = base + size;
    return (void *)base;
}

/* ---- small text helpers ---------------------------------------------------- */

__attribute__((noinline)) static u8 *put_str(u8 *o, const char *s) {
    while (*s) *o++ = (u8)*s++;
    return o;
}

__attribute__((noinline)) static u8 *put_u32(u8 *o, u32 v) {
    u8 tmp[10];
    int n = 0;
    do {
        tmp[n++] = (u8)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) *o++ = tmp[--n];
    return o;
}

static const double POW10[23] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                 1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* v * 10^e using exact powers of ten, one rounding per factor of 1e22. */
static double scale10(double v, int e) {
    while (e > 22 && v != 0 && v - v == 0) {
        v *= 1e22;
        e -= 22;
    }
    while (e < -22 && v != 0) {
        v /= 1e22;
        e += 22;
    }
    return e >= 0 ? v * POW10[e] : v / POW10[-e];
}

/* A finite double as a JSON number with 15 significant digits, at most 22 bytes. */
enum { NUM_MAX = 24 };

static u8 *put_double(u8 *o, double v) {
    if (v == 0) {
        *o++ = '0';
        return o;
    }
    if (v < 0) {
        *o++ = '-';
        v = -v;
    }
    /* k = floor(log10(v)), estimated from the binary exponent then corrected. */
    union {
        double d;
        u64 u;
    } bits = {v};
    int e2 = (int)((bits.u >> 52) & 0x7ff) - 1023;
    int k = (e2 * 30103) / 100000 - (e2 < 0);
    double m = scale10(v, 14 - k);
    for (int i = 0; i < 24 && (m >= 1e15 || m < 1e14); i++) {
        k += m >= 1e15 ? 1 : -1;
        m = scale10(v, 14 - k);
    }
    u64 digits = (u64)(m + 0.5);
    if (digits >= 1000000000000000ULL) {
        digits /= 10;
        k++;
    }
    u8 d[15];
    for (int i = 14; i >= 0; i--) {
        d[i] = (u8)('0' + digits % 10);
        digits /= 10;
    }
    int nd = 15;
    while (nd > 1 && d[nd - 1] == '0') nd--;

    if (k >= 0 && k < 15) { /* 123.456 */
        for (int i = 0; i <= k; i++) *o++ = i < nd ? d[i] : '0';
        if (nd > k + 1) {
            *o++ = '.';
            for (int i = k + 1; i < nd; i++) *o++ = d[i];
        }
    } else if (k < 0 && k >= -5) { /* 0.00123 */
        *o++ = '0';
        *o++ = '.';
        for (int i = -1; i > k; i--) *o++ = '0';
        for (int i = 0; i < nd; i++) *o++ = d[i];
    } else { /* 1.23e-7 */
        *o++ = d[0];
        if (nd > 1) {
            *o++ = '.';
            for (int i = 1; i < nd; i++) *o++ = d[i];
        }
        *o++ = 'e';
        if (k < 0) {
            *o++ = '-';
            k = -k;
        }
        o = put_u32(o, (u32)k);
    }
    return o;
}

/* ---- errors ---------------------------------------------------------------- */

static const char *export_name;
static int batch_item = -1;

static void fail_msg(const char *what, const char *detail, u32 at, int with_offset) {
    u8 buf[256];
    u8 *o = put_str(buf, "anomaly.");
    o = put_str(o, export_name);
    o = put_str(o, ": ");
    if (batch_item >= 0) {
        o = put_str(o, "item ");
        o = put_u32(o, (u32)batch_item);
        o = put_str(o, ": ");
    }
    o = put_str(o, what);
    o = put_str(o, detail);
    if (with_offset) {
        o = put_str(o, " at byte ");
        o = put_u32(o, at);
    }
    frys_fail(buf, (u32)(o - buf));
}

/* ---- JSON reading ----------------------------------------------------------- */

typedef struct {
    const u8 *start, *p, *end;
} Cursor;

static int reject(Cursor *c, const char *what) {
    fail_msg(what, "", (u32)(c->p - c->start), 1);
    return 0;
}

__attribute__((noinline)) static void skip_ws(Cursor *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\n' || *c->p == '\r'))
        c->p++;
}

static int peek(Cursor *c) { return c->p < c->end ? *c->p : -1; }

static int is_digit(int ch) { return ch >= '0' && ch <= '9'; }

/* A JSON number (RFC 8259 grammar). Exact whenever the digits fit 2^53 and the
 * decimal exponent is within +-22 (so typical readings like 21.37); otherwise
 * within a few units in the last place. */
static int read_number(Cursor *c, double *out) {
    int neg = 0, exp10 = 0, sig = 0;
    u64 mant = 0;
    const u8 *at = c->p;
    if (peek(c) == '-') {
        neg = 1;
        c->p++;
    }
    if (!is_digit(peek(c))) return reject(c, "expected a number");
    if (*c->p == '0') {
        c->p++;
    } else {
        while (is_digit(peek(c))) {
            if (sig < 19) {
                mant = mant * 10 + (u64)(*c->p - '0');
                if (mant) sig++;
            } else {
                exp10++;
            }
            c->p++;
        }
    }
    if (peek(c) == '.') {
        c->p++;
        if (!is_digit(peek(c))) return reject(c, "expected a digit after '.'");
        while (is_digit(peek(c))) {
            if (sig < 19) {
                mant = mant * 10 + (u64)(*c->p - '0');
                if (mant) sig++;
                exp10--;
            }
            c->p++;
        }
    }
    if (peek(c) == 'e' || peek(c) == 'E') {
        int eneg = 0, e = 0;
        c->p++;
        if (peek(c) == '+' || peek(c) == '-') eneg = *c->p++ == '-';
        if (!is_digit(peek(c))) return reject(c, "expected a digit in the exponent");
        while (is_digit(peek(c))) {
            if (e < 100000) e = e * 10 + (*c->p - '0');
            c->p++;
        }
        exp10 += eneg ? -e : e;
    }
    double v;
    if (mant == 0)
        v = 0;
    else if (exp10 > 400)
        v = 1e308 * 10; /* infinity, refused below */
    else if (exp10 < -400)
        v = 0;
    else if (mant < (1ULL << 53) && exp10 >= -22 && exp10 <= 22)
        v = exp10 >= 0 ? (double)mant * POW10[exp10] : (double)mant / POW10[-exp10];
    else
        v = scale10((double)mant, exp10);
    if (v - v != 0) {
        c->p = at;
        return reject(c, "number out of range for a double");
    }
    *out = neg ? -v : v;
    return 1;
}

/* An object key into buf (NUL-terminated, truncated to cap-1 bytes). Escapes
 * are decoded for ASCII; anything else simply will not match a known key. */
static int read_key(Cursor *c, char *buf, int cap) {
    int n = 0;
    c->p++; /* the opening quote */
    for (;;) {
        int ch = peek(c);
        if (ch < 0) return reject(c, "unterminated string");
        if (ch < 0x20) return reject(c, "control character in string");
        c->p++;
        if (ch == '"') break;
        if (ch == '\\') {
            int esc = peek(c);
            if (esc < 0) return reject(c, "unterminated string");
            c->p++;
            switch (esc) {
            case '"': case '\\': case '/': ch = esc; break;
            case 'b': ch = '\b'; break;
            case 'f': ch = '\f'; break;
            case 'n': ch = '\n'; break;
            case 'r': ch = '\r'; break;
            case 't': ch = '\t'; break;
            case 'u': {
                int cp = 0;
                for (int i = 0; i < 4; i++) {
                    int h = peek(c);
                    if (is_digit(h)) cp = cp * 16 + (h - '0');
                    else if (h >= 'a' && h <= 'f') cp = cp * 16 + (h - 'a' + 10);
                    else if (h >= 'A' && h <= 'F') cp = cp * 16 + (h - 'A' + 10);
                    else return reject(c, "bad \\u escape");
                    c->p++;
                }
                ch = cp > 0 && cp < 0x80 ? cp : 0x80; /* NUL or non-ASCII never matches */
                break;
            }
            default:
                c->p--;
                return reject(c, "bad escape in string");
            }
        }
        if (n < cap - 1) buf[n++] = (char)ch;
        else n = cap; /* too long: mark so it matches nothing */
    }
    if (n >= cap) n = cap - 1, buf[0] = 0;
    buf[n] = 0;
    return 1;
}

static int str_eq(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

typedef struct {
    u32 count;
    double threshold;
} Request;

/* One input object. With vals == 0 it only validates and counts the values;
 * with a buffer of req->count doubles it also stores them. */
static int read_request(Cursor *c, Request *req, double *vals) {
    int seen_values = 0, seen_threshold = 0;
    u32 n = 0;
    req->threshold = 3.0;
    skip_ws(c);
    if (peek(c) != '{') return reject(c, "expected '{' (an object with \"values\")");
    c->p++;
    skip_ws(c);
    if (peek(c) == '}') return reject(c, "missing key \"values\"");
    for (;;) {
        char key[16];
        skip_ws(c);
        if (peek(c) != '"') return reject(c, "expected a key string");
        const u8 *key_at = c->p;
        if (!read_key(c, key, sizeof key)) return 0;
        skip_ws(c);
        if (peek(c) != ':') return reject(c, "expected ':' after the key");
        c->p++;
        skip_ws(c);
        if (str_eq(key, "values")) {
            if (seen_values++) {
                c->p = key_at;
                return reject(c, "duplicate key \"values\"");
            }
            if (peek(c) != '[') return reject(c, "expected '[' after \"values\":");
            c->p++;
            skip_ws(c);
            if (peek(c) == ']') {
                c->p++;
            } else {
                for (;;) {
                    double v;
                    skip_ws(c);
                    if (!read_number(c, &v)) return 0;
                    if (vals) vals[n] = v;
                    n++;
                    skip_ws(c);
                    if (peek(c) == ',') {
                        c->p++;
                        continue;
                    }
                    if (peek(c) == ']') {
                        c->p++;
                        break;
                    }
                    return reject(c, "expected ',' or ']' in \"values\"");
                }
            }
        } else if (str_eq(key, "threshold")) {
            if (seen_threshold++) {
                c->p = key_at;
                return reject(c, "duplicate key \"threshold\"");
            }
            if (!read_number(c, &req->threshold)) return 0;
        } else {
            c->p = key_at;
            return reject(c, "unknown key (expected \"values\" or \"threshold\")");
        }
        skip_ws(c);
        if (peek(c) == ',') {
            c->p++;
            continue;
        }
        if (peek(c) == '}') {
            c->p++;
            break;
        }
        return reject(c, "expected ',' or '}'");
    }
    if (!seen_values) return reject(c, "missing key \"values\"");
    req->count = n;
    return 1;
}

/* ---- scoring ---------------------------------------------------------------- */

/* Upper bound of one output object for n values. */
static u64 output_bound(u64 n) { return 64 + 2 * NUM_MAX + n * (NUM_MAX + 1) + n * 11; }

static u32 anomalies_found;

/* Writes the output object for vals[0..n) at o; returns the end, or 0 after fail. */
static u8 *score(u8 *o, const double *vals, u32 n, double threshold) {
    double sum = 0, sq = 0, mean = 0, std = 0;
    for (u32 i = 0; i < n; i++) sum += vals[i];
    if (n) mean = sum / n;
    for (u32 i = 0; i < n; i++) sq += (vals[i] - mean) * (vals[i] - mean);
    if (n) std = __builtin_sqrt(sq / n);
    if (mean - mean != 0 || std - std != 0) {
        fail_msg("values too large to score (mean or std overflows)", "", 0, 0);
        return 0;
    }
    o = put_str(o, "{\"mean\":");
    o = put_double(o, mean);
    o = put_str(o, ",\"std\":");
    o = put_double(o, std);
    o = put_str(o, ",\"anomalies\":[");
    int first = 1;
    for (u32 i = 0; i < n; i++) {
        double z = std > 0 ? (vals[i] - mean) / std : 0;
        if (__builtin_fabs(z) > threshold) {
            if (!first) *o++ = ',';
            o = put_u32(o, i);
            first = 0;
            anomalies_found++;
        }
    }
    o = put_str(o, "],\"scores\":[");
    for (u32 i = 0; i < n; i++) {
        double z = std > 0 ? (vals[i] - mean) / std : 0;
        if (z - z != 0) {
            fail_msg("values too large to score (a z-score overflows)", "", 0, 0);
            return 0;
        }
        if (i) *o++ = ',';
        o = put_double(o, z);
    }
    return put_str(o, "]}");
}

static u64 pack(const u8 *ptr, u8 *end) { return ((u64)(usize)ptr << 32) | (u64)(end - ptr); }

static void log_summary(u32 inputs, u64 values) {
    u8 buf[128];
    u8 *o = put_str(buf, export_name);
    o = put_str(o, ": ");
    o = put_u32(o, inputs);
    o = put_str(o, inputs == 1 ? " input, " : " inputs, ");
    o = put_u32(o, (u32)values);
    o = put_str(o, " values, ");
    o = put_u32(o, anomalies_found);
    o = put_str(o, " anomalies");
    frys_log(LOG_DEBUG, buf, (u32)(o - buf));
}

static int at_end(Cursor *c) {
    skip_ws(c);
    return c->p == c->end ? 1 : reject(c, "unexpected data after the input");
}

/* ---- exports ---------------------------------------------------------------- */

/* The values and the output buffer for one call, from the arena; 0 after fail. */
static int scratch(u32 max_count, u64 bound, double **vals, u8 **out) {
    /* bound < 2^31 also keeps max_count * 8 within u32. */
    *vals = bound < 0x7fffffff ? alloc(max_count * 8) : 0;
    *out = *vals ? alloc((u32)bound) : 0;
    if (*out) return 1;
    fail_msg("out of memory for ", "the values and the output", 0, 0);
    return 0;
}

EXPORT("detect") u64 detect(const u8 *in, u32 in_len) {
    Cursor c = {in, in, in + in_len};
    Request req;
    double *vals;
    u8 *out;
    arena_reset();
    export_name = "detect";
    batch_item = -1;
    anomalies_found = 0;
    if (!read_request(&c, &req, 0) || !at_end(&c)) return 0;
    if (!scratch(req.count, output_bound(req.count), &vals, &out)) return 0;
    c.p = in;
    read_request(&c, &req, vals);
    u8 *end = score(out, vals, req.count, req.threshold);
    if (!end) return 0;
    log_summary(1, req.count);
    return pack(out, end);
}

EXPORT("detect_batch") u64 detect_batch(const u8 *in, u32 in_len) {
    Cursor c = {in, in, in + in_len};
    Request req;
    u32 items = 0, max_count = 0;
    u64 total = 0, bound = 2;
    double *vals;
    u8 *out;
    arena_reset();
    export_name = "detect_batch";
    batch_item = -1;
    anomalies_found = 0;

    /* Pass 1: validate everything and size the buffers. */
    skip_ws(&c);
    if (peek(&c) != '[') return reject(&c, "expected '[' (an array of inputs)");
    c.p++;
    skip_ws(&c);
    if (peek(&c) == ']') {
        c.p++;
    } else {
        for (;;) {
            batch_item = (int)items;
            if (!read_request(&c, &req, 0)) return 0;
            batch_item = -1;
            items++;
            total += req.count;
            bound += output_bound(req.count) + 1;
            if (req.count > max_count) max_count = req.count;
            skip_ws(&c);
            if (peek(&c) == ',') {
                c.p++;
                continue;
            }
            if (peek(&c) == ']') {
                c.p++;
                break;
            }
            return reject(&c, "expected ',' or ']' between inputs");
        }
    }
    if (!at_end(&c) || !scratch(max_count, bound, &vals, &out)) return 0;

    /* Pass 2: input is known good; score each item into the output array. */
    u8 *o = out;
    *o++ = '[';
    c.p = in;
    skip_ws(&c);
    c.p++;
    for (u32 i = 0; i < items; i++) {
        batch_item = (int)i;
        if (i) {
            skip_ws(&c);
            c.p++; /* the ',' */
            *o++ = ',';
        }
        read_request(&c, &req, vals);
        o = score(o, vals, req.count, req.threshold);
        if (!o) return 0;
    }
    batch_item = -1;
    *o++ = ']';
    log_summary(items, total);
    return pack(out, o);
}
