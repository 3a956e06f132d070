// What the Python bindings share (module.cpp, dot_binding.cpp, engine_binding.cpp).
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <string>

#include "dot.h"

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

// Whether a weight of `type` comes in `d` as its values rather than as uint8 raw blocks (which any type may):
// float32 for F32, float16 for F16, bfloat16 (or its uint16 / int16 bits) for BF16.
inline bool value_dtype(nanobind::dlpack::dtype d, GgmlType type) {
    using code = nanobind::dlpack::dtype_code;
    auto is = [&](code c, int bits) { return d.code == static_cast<uint8_t>(c) && d.bits == bits && d.lanes == 1; };
    return (type == GgmlType::F32 && is(code::Float, 32)) || (type == GgmlType::F16 && is(code::Float, 16)) ||
           (type == GgmlType::BF16 && (is(code::Bfloat, 16) || is(code::UInt, 16) || is(code::Int, 16)));
}

// " or <the dtype of its values>" for an error that lists what a weight of `type` may come in.
inline const char* or_value_dtype(GgmlType type) {
    return type == GgmlType::F32 ? " or float32" : type == GgmlType::F16 ? " or float16"
           : type == GgmlType::BF16 ? " or bfloat16 (or its uint16 bits)" : "";
}

// A ValueError in Python.
[[noreturn]] inline void fail(const std::string& msg) { throw nanobind::value_error(msg.c_str()); }

}  // namespace tandem::binding
