// A WASI command in C that uses samepage's guest API (`samepage:dedup/advice@0.1.0`)
// through the bindings `wit-bindgen c` generates from wit/dedup.wit (world `guest`).
//
// It fills a 4 MiB buffer with a pattern that depends on nothing but the page and word
// index, so every instance of this program holds the same pages at the same offsets;
// advises a second buffer of the same bytes `unmergeable`; merges the first at once with
// `merge-now`; shows the errors the API gives for an unaligned offset and a range past the
// memory's end; reads the instance's `stats`; and checks the bytes of both buffers survived.
//
// Output is one `key=value` line per fact, in this order:
//
//   buffer_offset=N          where the 4 MiB buffer starts in linear memory (4096-aligned)
//   buffer_bytes=4194304
//   secret_offset=N          where the 64 KiB secret buffer starts (4096-aligned)
//   secret_bytes=65536
//   advise_secret=ok         `advise(secret, unmergeable)`, or the error's WIT name
//   merge_now=ok             `merge-now(buffer)`, or the error's WIT name; if ok:
//   pages_merged=N
//   zero_pages=N
//   advise_unaligned=unaligned          `advise(buffer + 1, 4096, mergeable)`
//   advise_out_of_bounds=out-of-bounds  `advise(memory end, 4096, mergeable)`
//   advise_empty=ok                     `advise(buffer, 0, mergeable)`
//   stats_pages_merged=N
//   stats_zero_pages=N
//   stats_profit_bytes=N     (signed)
//   buffer_checksum=0x...    FNV-1a 64 of the buffer's bytes
//   secret_checksum=0x...    FNV-1a 64 of the secret's bytes
//   expected_buffer_checksum=0x...  the same, computed from the pattern, not the memory
//   expected_secret_checksum=0x...
//   bytes_intact=yes         every word still holds its pattern value (`no` exits 1)
//
// An error value is printed by its WIT name (`out-of-bounds`, `unaligned`, `disabled`,
// `limit`). The program exits 0 unless the bytes changed.
//
// The program calls no malloc, and replaces the exported `cabi_realloc` of wit-bindgen's
// guest.c with one that is not exported. Both keep the component (made with the WASI
// preview 1 command adapter) correct with Debian's wasi-libc (2022-05): see README.md.

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "guest.h"

#define PAGE_BYTES 4096u
#define WORDS_PER_PAGE (PAGE_BYTES / sizeof(uint64_t))
#define BUFFER_BYTES (4u << 20)
#define SECRET_BYTES (64u << 10)

// Word `i` of page `p`: the same in every instance, different on every page, never zero
// pages.
static uint64_t pattern(uint64_t p, uint64_t i) {
    return (p << 24) ^ i ^ 0x5EEDu;
}

static void fill(uint64_t *words, size_t bytes) {
    for (size_t p = 0; p < bytes / PAGE_BYTES; p++)
        for (size_t i = 0; i < WORDS_PER_PAGE; i++)
            words[p * WORDS_PER_PAGE + i] = pattern(p, i);
}

// Whether every word still holds its pattern value.
static int intact(const uint64_t *words, size_t bytes) {
    for (size_t p = 0; p < bytes / PAGE_BYTES; p++)
        for (size_t i = 0; i < WORDS_PER_PAGE; i++)
            if (words[p * WORDS_PER_PAGE + i] != pattern(p, i))
                return 0;
    return 1;
}

// The buffers are static (in .bss), not from malloc: Debian's wasi-libc malloc takes every
// page from __heap_base to the memory's size at its first call as its own, including the
// pages the component adapter grew for its stack and state, and the adapter's stack would
// then live inside the buffer.
static uint64_t buffer[BUFFER_BYTES / sizeof(uint64_t)] __attribute__((aligned(PAGE_BYTES)));
static uint64_t secret[SECRET_BYTES / sizeof(uint64_t)] __attribute__((aligned(PAGE_BYTES)));

// Replaces the weak `cabi_realloc` of guest.c, which wraps realloc and is exported: no
// import of world `guest` returns a list or string, so nothing may call it. Exported, it
// would be wrapped by wasm-ld in a command export that runs the C constructors and
// destructors around every call, and the adapter calls it from inside the first printf to
// allocate its state: the destructors flush stdout there and the first line is lost.
void *cabi_realloc(void *ptr, size_t old_size, size_t align, size_t new_size) {
    (void)ptr;
    (void)old_size;
    (void)align;
    (void)new_size;
    abort();
}

// guest.c links wit-bindgen's `guest_component_type.o` through this symbol, so that the
// world's type travels in the core module. The tests embed that type from wit/ themselves
// when they make the component, so the object (a binary) is neither built nor committed.
void __component_type_object_force_link_guest(void) {}

#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

static uint64_t fnv1a_byte(uint64_t hash, uint8_t byte) {
    return (hash ^ byte) * FNV_PRIME;
}

// FNV-1a 64 of the bytes in memory.
static uint64_t checksum(const void *data, size_t bytes) {
    const uint8_t *at = data;
    uint64_t hash = FNV_OFFSET;
    for (size_t k = 0; k < bytes; k++)
        hash = fnv1a_byte(hash, at[k]);
    return hash;
}

// FNV-1a 64 of the bytes the pattern puts in `bytes` bytes (little-endian words), computed
// without reading the buffer.
static uint64_t expected_checksum(size_t bytes) {
    uint64_t hash = FNV_OFFSET;
    for (size_t p = 0; p < bytes / PAGE_BYTES; p++)
        for (size_t i = 0; i < WORDS_PER_PAGE; i++) {
            uint64_t word = pattern(p, i);
            for (int b = 0; b < 8; b++)
                hash = fnv1a_byte(hash, (uint8_t)(word >> (8 * b)));
        }
    return hash;
}

static const char *error_name(samepage_dedup_advice_error_t error) {
    switch (error) {
    case SAMEPAGE_DEDUP_ADVICE_ERROR_OUT_OF_BOUNDS: return "out-of-bounds";
    case SAMEPAGE_DEDUP_ADVICE_ERROR_UNALIGNED: return "unaligned";
    case SAMEPAGE_DEDUP_ADVICE_ERROR_DISABLED: return "disabled";
    case SAMEPAGE_DEDUP_ADVICE_ERROR_LIMIT: return "limit";
    default: return "unknown-error";
    }
}

// An address in linear memory, as the API takes it.
static uint64_t offset_of(const void *ptr) {
    return (uint64_t)(uintptr_t)ptr;
}

// Calls `advise` and prints `key=ok` or `key=<error>`.
static void advise(const char *key, uint64_t offset, uint64_t length,
                   samepage_dedup_advice_advice_kind_t kind) {
    samepage_dedup_advice_error_t error;
    if (samepage_dedup_advice_advise(offset, length, kind, &error))
        printf("%s=ok\n", key);
    else
        printf("%s=%s\n", key, error_name(error));
}

int main(void) {
    fill(buffer, BUFFER_BYTES);
    // The same bytes as the buffer's first 16 pages: it would merge if it were allowed to.
    fill(secret, SECRET_BYTES);
    printf("buffer_offset=%" PRIu64 "\n", offset_of(buffer));
    printf("buffer_bytes=%u\n", BUFFER_BYTES);
    printf("secret_offset=%" PRIu64 "\n", offset_of(secret));
    printf("secret_bytes=%u\n", SECRET_BYTES);

    advise("advise_secret", offset_of(secret), SECRET_BYTES,
           SAMEPAGE_DEDUP_ADVICE_ADVICE_KIND_UNMERGEABLE);

    samepage_dedup_advice_merge_report_t report;
    samepage_dedup_advice_error_t error;
    if (samepage_dedup_advice_merge_now(offset_of(buffer), BUFFER_BYTES, &report, &error)) {
        printf("merge_now=ok\n");
        printf("pages_merged=%" PRIu64 "\n", report.pages_merged);
        printf("zero_pages=%" PRIu64 "\n", report.zero_pages);
    } else {
        printf("merge_now=%s\n", error_name(error));
    }

    // Refused calls: an offset that is not a multiple of 4096, and a range that starts at
    // the memory's end (memory.size is in 64 KiB pages, so the end is 4096-aligned).
    advise("advise_unaligned", offset_of(buffer) + 1, PAGE_BYTES,
           SAMEPAGE_DEDUP_ADVICE_ADVICE_KIND_MERGEABLE);
    uint64_t memory_end = (uint64_t)__builtin_wasm_memory_size(0) * 65536u;
    advise("advise_out_of_bounds", memory_end, PAGE_BYTES,
           SAMEPAGE_DEDUP_ADVICE_ADVICE_KIND_MERGEABLE);
    // Length 0 succeeds and does nothing.
    advise("advise_empty", offset_of(buffer), 0, SAMEPAGE_DEDUP_ADVICE_ADVICE_KIND_MERGEABLE);

    samepage_dedup_advice_instance_stats_t stats;
    samepage_dedup_advice_stats(&stats);
    printf("stats_pages_merged=%" PRIu64 "\n", stats.pages_merged);
    printf("stats_zero_pages=%" PRIu64 "\n", stats.zero_pages);
    printf("stats_profit_bytes=%" PRId64 "\n", stats.profit_bytes);

    printf("buffer_checksum=0x%016" PRIx64 "\n", checksum(buffer, BUFFER_BYTES));
    printf("secret_checksum=0x%016" PRIx64 "\n", checksum(secret, SECRET_BYTES));
    printf("expected_buffer_checksum=0x%016" PRIx64 "\n", expected_checksum(BUFFER_BYTES));
    printf("expected_secret_checksum=0x%016" PRIx64 "\n", expected_checksum(SECRET_BYTES));
    int ok = intact(buffer, BUFFER_BYTES) && intact(secret, SECRET_BYTES);
    printf("bytes_intact=%s\n", ok ? "yes" : "no");
    return ok ? 0 : 1;
}
