// `import fuseformer._C` loads this library, whose static initializers register the ops
// (TORCH_LIBRARY blocks). The ops are reached through torch.ops.fuseformer, which
// torch.compile can trace; the one Python function here reports a fact of the build's CPU
// code that Python must agree with (read once at import, never inside compiled code).
#include <Python.h>

#include "cpu/gemm.h"

namespace {

// "aten" or "onednn": where this CPU sends the kernels' per-call GEMMs unless
// FUSEFORMER_CPU_GEMM overrides it (csrc/cpu/gemm.h); python/fuseformer/backends.py reads it.
PyObject* vendor_cpu_gemm_library(PyObject* /*module*/, PyObject* /*args*/) {
  const bool aten = fuseformer::cpu::vendor_gemm_library() == fuseformer::cpu::GemmLibrary::kAten;
  return PyUnicode_FromString(aten ? "aten" : "onednn");
}

PyMethodDef methods[] = {
    {"vendor_cpu_gemm_library", vendor_cpu_gemm_library, METH_NOARGS,
     "Where this CPU's per-call float32 GEMMs run without FUSEFORMER_CPU_GEMM: 'aten' or 'onednn'."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fuseformer kernels (registered as torch.ops.fuseformer)", -1, methods};
  return PyModule_Create(&module_def);
}
