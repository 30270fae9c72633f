// A stand-in for libcupti.so.13 (see cupti/cupti.h beside it): each flush delivers one buffer
// holding a made-up kernel ("fake_kernel"), a host-to-device copy and a memset, all timed just
// after the last timestamp the caller asked for — so, in the tracer's use, inside the window it
// is closing — the way CUPTI hands over completed records.
#include "cupti/cupti.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static CUpti_BuffersCallbackRequestFunc requested;
static CUpti_BuffersCallbackCompleteFunc completed;
static int kernels_on;
static uint64_t last_timestamp;

CUptiResult cuptiGetTimestamp(uint64_t *timestamp) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    *timestamp = last_timestamp = (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
    return CUPTI_SUCCESS;
}

CUptiResult cuptiActivityRegisterCallbacks(CUpti_BuffersCallbackRequestFunc r,
                                           CUpti_BuffersCallbackCompleteFunc c) {
    requested = r;
    completed = c;
    return CUPTI_SUCCESS;
}

CUptiResult cuptiActivityEnable(CUpti_ActivityKind kind) {
    if (kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) kernels_on = 1;
    return CUPTI_SUCCESS;
}

// Records follow each other at 8-byte-aligned offsets; each starts with its kind.
static size_t record_size(CUpti_ActivityKind kind) {
    switch (kind) {
    case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: return sizeof(CUpti_ActivityKernel10);
    case CUPTI_ACTIVITY_KIND_MEMCPY: return sizeof(CUpti_ActivityMemcpy6);
    default: return sizeof(CUpti_ActivityMemset4);
    }
}

CUptiResult cuptiActivityGetNextRecord(uint8_t *buffer, size_t valid, CUpti_Activity **record) {
    uint8_t *next = *record ? (uint8_t *)*record + record_size((*record)->kind) : buffer;
    if (next >= buffer + valid) return CUPTI_ERROR_UNKNOWN;  // CUPTI: MAX_LIMIT_REACHED
    *record = (CUpti_Activity *)next;
    return CUPTI_SUCCESS;
}

CUptiResult cuptiActivityGetNumDroppedRecords(CUcontext c, uint32_t s, size_t *dropped) {
    (void)c, (void)s;
    *dropped = 0;
    return CUPTI_SUCCESS;
}

static void put(uint8_t *buffer, size_t *used, const void *record, size_t size) {
    memcpy(buffer + *used, record, size);
    *used += size;
}

CUptiResult cuptiActivityFlushAll(uint32_t flag) {
    (void)flag;
    if (!kernels_on || !requested) return CUPTI_SUCCESS;
    uint8_t *buffer = NULL;
    size_t size = 0, max_records = 0, used = 0;
    requested(&buffer, &size, &max_records);
    uint64_t t = last_timestamp;
    CUpti_ActivityKernel10 k = {.kind = CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
                                .start = t + 1000, .end = t + 3000, .name = "fake_kernel"};
    CUpti_ActivityMemcpy6 c = {.kind = CUPTI_ACTIVITY_KIND_MEMCPY, .copyKind = 1, .bytes = 4096,
                               .start = t + 3000, .end = t + 4000};
    CUpti_ActivityMemset4 m = {.kind = CUPTI_ACTIVITY_KIND_MEMSET, .bytes = 64,
                               .start = t + 4000, .end = t + 4500};
    put(buffer, &used, &k, sizeof k);
    put(buffer, &used, &c, sizeof c);
    put(buffer, &used, &m, sizeof m);
    completed(NULL, 0, buffer, size, used);
    return CUPTI_SUCCESS;
}

CUptiResult cuptiGetResultString(CUptiResult result, const char **str) {
    *str = result == CUPTI_SUCCESS ? "success" : "fake error";
    return CUPTI_SUCCESS;
}
