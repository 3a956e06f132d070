#include "pages.h"

#include <fstream>
#include <new>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tandem {
namespace {
constexpr size_t kHuge = size_t{2} << 20;
}

PageBuffer allocate_pages(size_t size) {
    PageBuffer b;
    b.size = size;
#if defined(__linux__)
    // over-map by one huge page and start at the first 2 MiB boundary inside the mapping (address space
    // only: untouched pages cost nothing); a buffer under 2 MiB stays on small pages
    b.mapped = size >= kHuge ? size + kHuge : size;
    void* p = mmap(nullptr, b.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    b.base = p;
    b.data = static_cast<uint8_t*>(p);
    if (size >= kHuge) {
        b.data = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1));
#ifdef MADV_HUGEPAGE
        // whole huge pages only, so the last one holds no unused memory; advice, so failure is harmless
        madvise(b.data, size & ~(kHuge - 1), MADV_HUGEPAGE);
#endif
    }
#else
    b.mapped = size + 64;
    b.base = ::operator new(b.mapped);
    b.data = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(b.base) + 63) & ~uintptr_t{63});
#endif
    return b;
}

void release_pages(const PageBuffer& b) {
    if (!b.base) return;
#if defined(__linux__)
    munmap(b.base, b.mapped);
#else
    ::operator delete(b.base);
#endif
}

bool huge_pages_available() {
#if defined(__linux__)
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string line;
    if (!std::getline(f, line)) return false;
    return line.find("[always]") != std::string::npos || line.find("[madvise]") != std::string::npos;
#else
    return false;
#endif
}

}  // namespace tandem
