// A stand-in for tools/cuda/kernel_trace.c on a machine without a GPU (tests/cli.rs): the same
// exported function and output format, with one made-up kernel per window ("work in <label>",
// lying inside it) instead of CUPTI's records. It checks candela's side of the contract (the
// windows it marks, found through dlsym) and kernel_table.py's reading of the file.
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static unsigned long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}

static unsigned long long opened;

void candela_trace_window(const char *label, int begin) {
    const char *path = getenv("KERNEL_TRACE_OUT");
    FILE *out = path ? fopen(path, "a") : NULL;
    if (!out) return;
    unsigned long long t = now_ns();
    if (begin) {
        opened = t;
        fprintf(out, "B\t%llu\t%s\n", t, label);
    } else {
        // 2 µs of "kernel" inside the window (which lasts far longer than that).
        fprintf(out, "K\t%llu\t%llu\twork in %s\n", opened + 1000, opened + 3000, label);
        fprintf(out, "E\t%llu\t%s\n", t + 4000, label);
    }
    fclose(out);
}
