# Script mode (cmake -P), run at build time by the glmrt_<platform>_module targets that
# native/cmake/glmrt_gpu.cmake defines: configures and builds native/gpu/CMakeLists.txt as its own
# build tree, timing it. When that fails and REQUIRED is not set, it warns (with the log's tail
# and the log's path) and succeeds anyway, so that glmrt installs without that GPU module.
#
# Variables (-D): SOURCE_DIR BINARY_DIR INIT_CACHE GENERATOR MAKE_PROGRAM MODULE LABEL OUTPUT_DIR
#                 REQUIRED (ON/OFF) JOBS
foreach(var SOURCE_DIR BINARY_DIR INIT_CACHE GENERATOR MODULE LABEL OUTPUT_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "build_module.cmake: ${var} is not set")
  endif()
endforeach()

# A module from an earlier build must not be installed if this one fails.
file(GLOB stale "${OUTPUT_DIR}/${MODULE}*")
if(stale)
  file(REMOVE ${stale})
endif()

set(log "${BINARY_DIR}-build.log")
string(TIMESTAMP started "%s" UTC)
set(configure_args -S "${SOURCE_DIR}" -B "${BINARY_DIR}" -G "${GENERATOR}" -C "${INIT_CACHE}")
if(MAKE_PROGRAM)
  list(APPEND configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" ${configure_args}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
set(step "configuring")
if(rc EQUAL 0)
  set(step "compiling")
  if(NOT JOBS)
    cmake_host_system_information(RESULT JOBS QUERY NUMBER_OF_LOGICAL_CORES)
  endif()
  execute_process(COMMAND "${CMAKE_COMMAND}" --build "${BINARY_DIR}" --parallel ${JOBS}
                  RESULT_VARIABLE rc OUTPUT_VARIABLE build_out ERROR_VARIABLE build_out)
  string(APPEND out "${build_out}")
endif()
file(WRITE "${log}" "${out}")
string(TIMESTAMP finished "%s" UTC)
math(EXPR seconds "${finished} - ${started}")

file(GLOB built "${OUTPUT_DIR}/${MODULE}*")
if(rc EQUAL 0 AND built)
  message(STATUS "glmrt: built glmrt.${MODULE} (${LABEL}) in ${seconds} s")
  return()
endif()

# Show the first errors and the end of the log.
string(REGEX MATCHALL "[^\n]*(error|Error|ERROR)[^\n]*" errors "${out}")
list(LENGTH errors n_errors)
if(n_errors GREATER 8)
  list(SUBLIST errors 0 8 errors)
endif()
list(JOIN errors "\n  " errors)
string(LENGTH "${out}" len)
if(len GREATER 3000)
  math(EXPR from "${len} - 3000")
  string(SUBSTRING "${out}" ${from} -1 tail)
else()
  set(tail "${out}")
endif()
set(what "glmrt: ${step} glmrt.${MODULE} (${LABEL}) failed after ${seconds} s (exit ${rc}); full log: ${log}\n"
         "First errors:\n  ${errors}\nEnd of the log:\n${tail}\n")
if(REQUIRED)
  message(FATAL_ERROR ${what} "GPU modules were required (GLMRT_GPU / GLMRT_CUDA / GLMRT_HIP = ON).")
endif()
message(WARNING ${what} "glmrt installs WITHOUT glmrt.${MODULE}; its backend falls back to torch ops. "
                "Set GLMRT_GPU=ON to make this an error, or GLMRT_GPU=OFF to skip the GPU modules.")
