# Sunway target: kernels tiled for the SW26010-Pro LDM (256 KB per compute core, 64 compute cores
# per core group), built for and run on the host CPU as glmrt._native_sunway. C++17 + OpenMP;
# the fp32 inner loops are multi-versioned (AVX-512 / AVX2 / portable) on x86-64 and chosen at
# load time. It shares native/cpu/dtype.h (the fp32 <-> bf16 / fp16 conversions) with the CPU target.
#
# Usage, from the top-level CMakeLists.txt (after pybind11 is found):
#   include(glmrt_sunway)
#   glmrt_add_sunway_module()
#
# Setting (environment variable or -D cache entry; the environment wins):
#   GLMRT_SUNWAY  AUTO (default): build when the C++ compiler has what the kernels need (C++17
#                 with std::aligned_alloc), else skip with one line. ON: a missing prerequisite
#                 fails the build. OFF: skip.

# The repository root, taken where this file is included (inside a function CMAKE_CURRENT_LIST_DIR
# would name the caller's directory).
get_filename_component(GLMRT_SUNWAY_ROOT "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)

set(GLMRT_SUNWAY "AUTO" CACHE STRING "Build glmrt._native_sunway: AUTO (if the compiler can), ON (required), OFF")
set_property(CACHE GLMRT_SUNWAY PROPERTY STRINGS AUTO ON OFF)

function(glmrt_add_sunway_module)
  if(DEFINED ENV{GLMRT_SUNWAY} AND NOT "$ENV{GLMRT_SUNWAY}" STREQUAL "")
    set(mode "$ENV{GLMRT_SUNWAY}")
  else()
    set(mode "${GLMRT_SUNWAY}")
  endif()
  string(TOUPPER "${mode}" mode)
  if(mode MATCHES "^(1|TRUE|YES|REQUIRED)$")
    set(mode ON)
  elseif(mode MATCHES "^(0|FALSE|NO)$")
    set(mode OFF)
  endif()
  if(NOT mode MATCHES "^(AUTO|ON|OFF)$")
    message(FATAL_ERROR "glmrt: GLMRT_SUNWAY must be AUTO, ON or OFF, not '${mode}'")
  endif()
  if(mode STREQUAL "OFF")
    message(STATUS "glmrt: skipping the Sunway module glmrt._native_sunway: GLMRT_SUNWAY=OFF")
    return()
  endif()

  # The kernels need a C++17 compiler with std::aligned_alloc (the 256 KB LDM arenas).
  include(CheckCXXSourceCompiles)
  set(CMAKE_REQUIRED_FLAGS "${CMAKE_CXX17_STANDARD_COMPILE_OPTION}")
  check_cxx_source_compiles("
    #include <cstdlib>
    #include <cstddef>
    int main() { void* p = std::aligned_alloc(64, 256 * 1024); std::byte b{}; (void)b; std::free(p); return 0; }"
    GLMRT_SUNWAY_CXX_OK)
  if(NOT GLMRT_SUNWAY_CXX_OK)
    set(why "the C++ compiler (${CMAKE_CXX_COMPILER}) cannot build C++17 code with std::aligned_alloc")
    if(mode STREQUAL "ON")
      message(FATAL_ERROR "glmrt: GLMRT_SUNWAY=ON but ${why}")
    endif()
    message(STATUS "glmrt: skipping the Sunway module glmrt._native_sunway: ${why}")
    return()
  endif()

  set(src "${GLMRT_SUNWAY_ROOT}/native/sunway")
  pybind11_add_module(_native_sunway MODULE
    ${src}/module.cpp
    ${src}/gemm_tiled.cpp
    ${src}/norm_tiled.cpp
    ${src}/convert.cpp)
  target_include_directories(_native_sunway PRIVATE ${src} "${GLMRT_SUNWAY_ROOT}/native/cpu")
  target_compile_features(_native_sunway PRIVATE cxx_std_17)
  find_package(OpenMP)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(_native_sunway PRIVATE OpenMP::OpenMP_CXX)
    target_compile_definitions(_native_sunway PRIVATE GLMRT_HAVE_OPENMP=1)
  else()
    message(STATUS "glmrt: OpenMP not found; the Sunway kernels will run their 64 logical workers on one thread")
  endif()
  target_compile_options(_native_sunway PRIVATE -O3 -fno-math-errno)
  install(TARGETS _native_sunway LIBRARY DESTINATION glmrt)
  message(STATUS "glmrt: building the Sunway module glmrt._native_sunway (LDM-tiled kernels on the host CPU)")
endfunction()
