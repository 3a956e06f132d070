// Memory for the weights the engine streams: anonymous mappings aligned to 2 MiB and advised
// MADV_HUGEPAGE, so reading a matrix walks one TLB entry per 2 MiB instead of one per 4 KiB page
// (a file's memory map stays on 4 KiB pages). Where the kernel gives no huge pages, the same
// mapping simply stays on small pages.
#pragma once

#include <cstddef>
#include <cstdint>

namespace tandem {

struct PageBuffer {
    uint8_t* data = nullptr;  // `size` usable bytes, 2 MiB aligned from 2 MiB up
    size_t size = 0;
    void* base = nullptr;  // the mapping, for release_pages
    size_t mapped = 0;
};

// Throws std::bad_alloc when the mapping fails (out of memory).
PageBuffer allocate_pages(size_t size);
void release_pages(const PageBuffer& buffer);

// Whether transparent huge pages can back an advised mapping here (Linux THP 'always' or 'madvise').
bool huge_pages_available();

}  // namespace tandem
