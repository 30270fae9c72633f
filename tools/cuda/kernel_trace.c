// A kernel tracer to preload into `candela-bench` on the GPU machine (which has CUPTI, in
// PyTorch's CUDA libraries, but no Nsight): every kernel, copy and memset the process runs, with
// its device start and end, plus the windows candela marks around its timed parts
// (`engine::profile::kernel_trace_window`). tools/bench/kernel_table.py turns the file into
// a table per window kind — what one denoiser forward runs, kernel by kernel — to set beside
// torch.profiler's table of diffusers' forward (tools/bench/bench_diffusers.py --kernel-trace).
//
//   LD_PRELOAD=libkerneltrace.so KERNEL_TRACE_OUT=trace.tsv candela-bench ...
//
// Lines (tab-separated; times in ns on CUPTI's clock, the same for records and marks):
//   K start end name        a kernel (name as compiled, C++ names mangled)
//   C start end bytes kind  a memcpy (CUpti_ActivityMemcpyKind)
//   S start end bytes       a memset
//   B time label / E time label   a window begins / ends (host time; the device is idle at both)
//   D count                 records CUPTI dropped (the table is incomplete when this appears)
// Built by tools/bench/gpu/prepare.sh against CUPTI 13.0's headers. Without KERNEL_TRACE_OUT it
// does nothing.
#include <cupti.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#define BUFFER_BYTES (8u << 20)

static FILE *out;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int ok(CUptiResult result, const char *what) {
    if (result == CUPTI_SUCCESS) return 1;
    const char *message = "?";
    cuptiGetResultString(result, &message);
    fprintf(stderr, "kernel trace: %s: %s\n", what, message);
    return 0;
}

static void CUPTIAPI buffer_requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = aligned_alloc(8, BUFFER_BYTES);
    *size = *buffer ? BUFFER_BYTES : 0;
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext context, uint32_t stream, uint8_t *buffer,
                                      size_t size, size_t valid) {
    (void)size;
    CUpti_Activity *record = NULL;
    pthread_mutex_lock(&lock);
    while (out && cuptiActivityGetNextRecord(buffer, valid, &record) == CUPTI_SUCCESS) {
        switch (record->kind) {
        case CUPTI_ACTIVITY_KIND_KERNEL:
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
            // CUPTI 13.0 writes version 10 of the record; later versions only append fields
            // (13.2's version 11 has start, end and name at the same offsets: 16, 24, 104).
            const CUpti_ActivityKernel10 *k = (const CUpti_ActivityKernel10 *)record;
            fprintf(out, "K\t%llu\t%llu\t%s\n", (unsigned long long)k->start,
                    (unsigned long long)k->end, k->name ? k->name : "?");
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            const CUpti_ActivityMemcpy6 *c = (const CUpti_ActivityMemcpy6 *)record;
            fprintf(out, "C\t%llu\t%llu\t%llu\t%u\n", (unsigned long long)c->start,
                    (unsigned long long)c->end, (unsigned long long)c->bytes, c->copyKind);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            const CUpti_ActivityMemset4 *s = (const CUpti_ActivityMemset4 *)record;
            fprintf(out, "S\t%llu\t%llu\t%llu\n", (unsigned long long)s->start,
                    (unsigned long long)s->end, (unsigned long long)s->bytes);
            break;
        }
        default:
            break;
        }
    }
    size_t dropped = 0;
    if (out && cuptiActivityGetNumDroppedRecords(context, stream, &dropped) == CUPTI_SUCCESS &&
        dropped)
        fprintf(out, "D\t%zu\n", dropped);
    pthread_mutex_unlock(&lock);
    free(buffer);
}

// CUPTI starts with the first window: nothing before it (loading, kernel modules) is traced, and
// a CUDA context exists by then (this machine's CUPTI, without a driver, recurses until the stack
// runs out when called from the constructor).
static int tracing;

static void start_tracing(void) {
    tracing = -1;
    if (!ok(cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed),
            "registering buffers") ||
        !ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL), "tracing kernels"))
        return;
    ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY), "tracing copies");
    ok(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET), "tracing memsets");
    tracing = 1;
}

// Called by candela (looked up with dlsym) right before a timed part starts (begin != 0) and
// right after the device finished it. At the end of a window every record so far is flushed,
// so a process that exits without running this library's destructor keeps its windows.
void candela_trace_window(const char *label, int begin) {
    if (!out) return;
    if (!tracing) start_tracing();
    if (tracing < 0) return;
    uint64_t now = 0;
    if (!begin) cuptiActivityFlushAll(0);
    cuptiGetTimestamp(&now);
    pthread_mutex_lock(&lock);
    fprintf(out, "%c\t%llu\t%s\n", begin ? 'B' : 'E', (unsigned long long)now, label);
    fflush(out);
    pthread_mutex_unlock(&lock);
}

__attribute__((constructor)) static void open_output(void) {
    const char *path = getenv("KERNEL_TRACE_OUT");
    if (!path || !*path) return;
    out = fopen(path, "w");
    if (!out) perror("kernel trace: KERNEL_TRACE_OUT");
    else fprintf(stderr, "kernel trace: writing %s from the first timed part on\n", path);
}

__attribute__((destructor)) static void finish(void) {
    if (!out) return;
    if (tracing > 0) cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
    pthread_mutex_lock(&lock);
    fclose(out);
    out = NULL;
    pthread_mutex_unlock(&lock);
}
