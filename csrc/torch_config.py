"""Print torch's build facts as CMake `set()` lines (read by CMakeLists.txt)."""
import os
import sys

import torch
from torch.utils import cpp_extension


def cmake_list(paths):
    return ";".join(p.replace("\\", "/") for p in paths)


def main() -> None:
    cuda = torch.version.cuda or ""
    include_dirs = cpp_extension.include_paths()
    nvidia_root = ""
    if cuda:
        major = cuda.split(".")[0]
        for base in sys.path:
            candidate = os.path.join(base, "nvidia", f"cu{major}")
            if os.path.isdir(os.path.join(candidate, "include")):
                nvidia_root = candidate
                break
    facts = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_INCLUDE_DIRS": cmake_list(include_dirs),
        "TORCH_LIBRARY_DIRS": cmake_list(cpp_extension.library_paths()),
        "TORCH_CUDA_VERSION": cuda,
        "TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "NVIDIA_WHEEL_ROOT": nvidia_root,
    }
    for key, value in facts.items():
        print(f'set({key} "{value}")')


if __name__ == "__main__":
    main()
