# CUTLASS/CuTe headers from the `nvidia-cutlass` wheel (pip install --no-deps nvidia-cutlass).
# Sets DIFFORGE_CUTLASS_INCLUDE_DIRS (empty when the wheel is absent); kernels that need CUTLASS
# check DIFFORGE_HAVE_CUTLASS.
find_package(Python3 QUIET COMPONENTS Interpreter)
set(DIFFORGE_CUTLASS_INCLUDE_DIRS "")
if(Python3_EXECUTABLE)
  execute_process(
    COMMAND "${Python3_EXECUTABLE}" -c
      "import importlib.util, pathlib; s = importlib.util.find_spec('cutlass_library'); print(pathlib.Path(s.origin).parent / 'source' if s else '')"
    OUTPUT_VARIABLE _cutlass_root OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_cutlass_root AND EXISTS "${_cutlass_root}/include/cutlass")
    set(DIFFORGE_CUTLASS_INCLUDE_DIRS "${_cutlass_root}/include" "${_cutlass_root}/tools/util/include")
  endif()
endif()
if(DIFFORGE_CUTLASS_INCLUDE_DIRS)
  set(DIFFORGE_HAVE_CUTLASS ON)
  message(STATUS "difforge: CUTLASS headers from ${_cutlass_root}")
else()
  set(DIFFORGE_HAVE_CUTLASS OFF)
  message(STATUS "difforge: nvidia-cutlass wheel not found; CUTLASS-based kernels are not built")
endif()
