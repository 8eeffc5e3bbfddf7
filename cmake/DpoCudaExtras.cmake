# dpo_find_cuda_extra(<NAME> HEADER <file.h> LIBS <name>...)
#
# Finds an optional CUDA library that may live outside the toolkit, as in PyTorch's pip wheels
# (site-packages/nvidia/nccl/{include/nccl.h, lib/libnccl.so.2}: a versioned soname and no unversioned link).
# The header and the library are found as a pair or not at all:
#   - DPO_<NAME>_ROOT (a folder with include/ and lib/) restricts the search to that folder;
#   - DPO_<NAME>_INCLUDE_DIR (the folder holding the header) and DPO_<NAME>_LIB (the library file) may be given
#     directly and are checked;
#   - otherwise the toolkit's folders and the system's are searched.
# A header without its library, or a library without its header, or a ROOT/INCLUDE_DIR/LIB that does not hold
# what it should, stops the configuration with an error naming the missing piece: a build that silently drops
# NCCL runs single-process, and one that drops cuDNN loses its fused attention, with nothing said.
# Sets DPO_<NAME>_FOUND (ON/OFF), DPO_<NAME>_INCLUDE_DIR and DPO_<NAME>_LIB (cache).
function(dpo_find_cuda_extra name)
  cmake_parse_arguments(PARSE_ARGV 1 arg "" "HEADER" "LIBS")
  set(root "${DPO_${name}_ROOT}")
  set(hints "")
  if(CUDAToolkit_INCLUDE_DIRS)
    list(APPEND hints ${CUDAToolkit_INCLUDE_DIRS})
  endif()
  set(lib_hints "")
  if(CUDAToolkit_LIBRARY_DIR)
    list(APPEND lib_hints ${CUDAToolkit_LIBRARY_DIR})
  endif()
  set(explicit OFF)
  if(root OR DPO_${name}_INCLUDE_DIR OR DPO_${name}_LIB)
    set(explicit ON)
  endif()
  if(root)
    if(NOT IS_DIRECTORY "${root}")
      message(FATAL_ERROR "dpo: DPO_${name}_ROOT=${root} is not a folder")
    endif()
    find_path(DPO_${name}_INCLUDE_DIR ${arg_HEADER} PATHS "${root}/include" NO_DEFAULT_PATH
              DOC "folder holding ${arg_HEADER}")
    find_library(DPO_${name}_LIB NAMES ${arg_LIBS} PATHS "${root}/lib" "${root}/lib64" NO_DEFAULT_PATH
                 DOC "${name} library file")
  else()
    find_path(DPO_${name}_INCLUDE_DIR ${arg_HEADER} HINTS ${hints} DOC "folder holding ${arg_HEADER}")
    find_library(DPO_${name}_LIB NAMES ${arg_LIBS} HINTS ${lib_hints} DOC "${name} library file")
  endif()
  set(inc "${DPO_${name}_INCLUDE_DIR}")
  set(lib "${DPO_${name}_LIB}")
  if(inc AND NOT EXISTS "${inc}/${arg_HEADER}")
    message(FATAL_ERROR "dpo: DPO_${name}_INCLUDE_DIR=${inc} does not hold ${arg_HEADER}")
  endif()
  if(lib AND NOT EXISTS "${lib}")
    message(FATAL_ERROR "dpo: DPO_${name}_LIB=${lib} does not exist")
  endif()
  if(inc AND lib)
    set(DPO_${name}_FOUND ON PARENT_SCOPE)
    message(STATUS "dpo: ${name} ${lib} (${inc}/${arg_HEADER})")
  elseif(inc OR lib OR explicit)
    set(where "")
    if(root)
      set(where " under DPO_${name}_ROOT=${root}")
    endif()
    if(inc)
      set(missing "the library (${arg_LIBS})${where}; found the header ${inc}/${arg_HEADER}")
    elseif(lib)
      set(missing "the header ${arg_HEADER}${where}; found the library ${lib}")
    else()
      set(missing "both the header ${arg_HEADER} and the library (${arg_LIBS})${where}")
    endif()
    message(FATAL_ERROR "dpo: ${name} is incomplete: missing ${missing}. Give DPO_${name}_ROOT (a folder with "
                        "include/ and lib/), or DPO_${name}_INCLUDE_DIR and DPO_${name}_LIB, or neither; "
                        "-DDPO_ENABLE_${name}=OFF builds without it.")
  else()
    set(DPO_${name}_FOUND OFF PARENT_SCOPE)
  endif()
endfunction()
