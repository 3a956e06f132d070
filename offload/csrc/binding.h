// What the Python bindings share (module.cpp, dot_binding.cpp, engine_binding.cpp).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

namespace tandem::binding {

// An array's dtype as numpy names it (float32, int64, bfloat16, bool), for error messages.
inline std::string dtype_name(nanobind::dlpack::dtype t) {
    using code = nanobind::dlpack::dtype_code;
    const std::string bits = std::to_string(t.bits);
    switch (static_cast<code>(t.code)) {
        case code::Int: return "int" + bits;
        case code::UInt: return "uint" + bits;
        case code::Float: return "float" + bits;
        case code::Bfloat: return "bfloat" + bits;
        case code::Bool: return "bool";
        default: return "dtype code " + std::to_string(t.code);
    }
}

// A ValueError in Python.
[[noreturn]] inline void fail(const std::string& msg) { throw nanobind::value_error(msg.c_str()); }

}  // namespace tandem::binding
