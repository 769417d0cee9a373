// `import fuseformer._C` loads this library, whose static initializers register the ops
// (TORCH_LIBRARY blocks). It defines no Python functions: the ops are reached through
// torch.ops.fuseformer, which torch.compile can trace.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fuseformer kernels (registered as torch.ops.fuseformer)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
