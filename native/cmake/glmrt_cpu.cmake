# CPU target: C++17 + OpenMP. SIMD paths are chosen at run time inside the kernels
# (function-level target attributes), so one build runs on any x86-64.
function(glmrt_add_cpu_module)
  pybind11_add_module(_native_cpu MODULE
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/module.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/norm.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/layernorm.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/add_norm.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/rope.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/attention.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/rows.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/bind_layers.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/gemv_quant.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/dequant.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/gemv_float.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/gemm_float.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu/membw.cpp)
  target_include_directories(_native_cpu PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/native/cpu)
  find_package(OpenMP)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(_native_cpu PRIVATE OpenMP::OpenMP_CXX)
    target_compile_definitions(_native_cpu PRIVATE GLMRT_HAVE_OPENMP=1)
  else()
    message(STATUS "glmrt: OpenMP not found; CPU kernels will run on one thread")
  endif()
  target_compile_options(_native_cpu PRIVATE -O3 -fno-math-errno)
  install(TARGETS _native_cpu LIBRARY DESTINATION glmrt)
  message(STATUS "glmrt: building the CPU module glmrt._native_cpu")
endfunction()
