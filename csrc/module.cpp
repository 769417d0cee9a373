// `import fuseformer._C` loads this library, whose static initializers register the ops
// (TORCH_LIBRARY blocks). The ops are reached through torch.ops.fuseformer, which
// torch.compile can trace; the Python functions here report on, and manage, the CPU side's
// process-wide state (the per-call GEMM library, the output block cache), outside any graph.
#include <Python.h>

#include "allocate.h"
#include "cpu/gemm.h"

#include <exception>

namespace {

// "aten" or "onednn": where this CPU sends the kernels' per-call GEMMs unless
// FUSEFORMER_CPU_GEMM overrides it (csrc/cpu/gemm.h); python/fuseformer/backends.py reads it.
PyObject* vendor_cpu_gemm_library(PyObject* /*module*/, PyObject* /*args*/) {
  const bool aten = fuseformer::cpu::vendor_gemm_library() == fuseformer::cpu::GemmLibrary::kAten;
  return PyUnicode_FromString(aten ? "aten" : "onednn");
}

// A size from C++ as a Python int; a C++ exception (a bad FUSEFORMER_CPU_CACHE_MIB) becomes a
// Python ValueError.
template <typename F>
PyObject* as_python(F f) {
  try {
    return PyLong_FromSize_t(f());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

// csrc/allocate.h's output cache: the bytes it holds, its budget, and emptying it (returns
// the bytes freed).
PyObject* cpu_cache_bytes(PyObject* /*module*/, PyObject* /*args*/) {
  return as_python([] { return fuseformer::OutputAllocator::get()->cached_bytes(); });
}

PyObject* cpu_cache_budget(PyObject* /*module*/, PyObject* /*args*/) {
  return as_python([] { return fuseformer::OutputAllocator::get()->budget(); });
}

PyObject* empty_cpu_cache(PyObject* /*module*/, PyObject* /*args*/) {
  return as_python([] { return fuseformer::OutputAllocator::get()->empty_cache(); });
}

PyMethodDef methods[] = {
    {"vendor_cpu_gemm_library", vendor_cpu_gemm_library, METH_NOARGS,
     "Where this CPU's per-call float32 GEMMs run without FUSEFORMER_CPU_GEMM: 'aten' or 'onednn'."},
    {"cpu_cache_bytes", cpu_cache_bytes, METH_NOARGS, "Bytes held by the CPU output block cache."},
    {"cpu_cache_budget", cpu_cache_budget, METH_NOARGS, "The most bytes the CPU output block cache holds."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Frees the CPU output block cache; returns the bytes freed."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fuseformer kernels (registered as torch.ops.fuseformer)", -1, methods};
  return PyModule_Create(&module_def);
}
